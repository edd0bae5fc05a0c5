"""``lesion download ham10000 --dest DIR``: fetch HAM10000 from its official source (Harvard Dataverse), or from a
mirror given with ``--url-base``, resumably and with size/checksum checks (see ``lesion.data.download``)."""

from __future__ import annotations

import sys
import urllib.error

from lesion.data.download import DATAVERSE, DownloadError, download_ham10000


def add_arguments(name: str, parser) -> None:
    """Flags of ``lesion download``."""
    parser.add_argument("dataset", choices=["ham10000"], help="data set to download")
    parser.add_argument("--dest", required=True, help="folder to download and extract into")
    parser.add_argument("--url-base", help="fetch <URL>/<file name> from this mirror (http(s):// or file://) "
                                           "instead of the Dataverse API")
    parser.add_argument("--checksums", help="sha256sum-style manifest ('<hex>  <file name>' lines) to verify against")
    parser.add_argument("--with-masks", action="store_true", help="also fetch the lesion segmentation masks")
    parser.add_argument("--keep-archives", action="store_true", help="keep the zip files after extracting them")
    parser.add_argument("--dataverse", default=DATAVERSE, help="Dataverse server holding doi:10.7910/DVN/DBW86T")


def run_command(name: str, args) -> int:
    """Download, verify and extract; print the ingest command to run next."""
    try:
        dest = download_ham10000(args.dest, url_base=args.url_base, checksums=args.checksums,
                                 with_masks=args.with_masks, keep_archives=args.keep_archives, server=args.dataverse)
    except (DownloadError, urllib.error.URLError) as exc:
        print(f"lesion download: error: {exc}", file=sys.stderr)
        return 1
    print(f"HAM10000 is in {dest} (licence CC BY-NC 4.0: non-commercial use, with attribution).")
    print(f"next: lesion ingest --source ham10000 --root {dest} --run RUN_DIR")
    return 0
