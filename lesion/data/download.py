"""Download HAM10000 from its official source, resumably and atomically, with size and checksum checks.

The official source is the Harvard Dataverse dataset doi:10.7910/DVN/DBW86T (Tschandl, Rosendahl & Kittler, 2018;
licence CC BY-NC 4.0). Its file list, sizes and checksums are not hard-coded here: they are read at download time from
Dataverse's native API (``/api/datasets/:persistentId/?persistentId=...``), and each file is fetched from its access
URL (``/api/access/datafile/<id>``). A file Dataverse has converted to its tabular format (the metadata CSV is stored
as ``.tab``) is fetched in its original format (``?format=original``) and checked against its original size only,
since the published checksum may not describe the original bytes.

With ``url_base`` the files are fetched from ``<url_base>/<file name>`` instead (a mirror, or a local copy as a
``file://`` URL); sizes then come from the server's Content-Length, and checksums only from a manifest the user
passes (``sha256sum`` format: ``<hex digest>  <file name>``, the algorithm told by the digest's length).

Every file is written to ``<name>.part`` and renamed when complete and verified; an interrupted download resumes from
the ``.part`` file with an HTTP Range request. Zip archives are extracted into a folder of the same name (through a
temporary folder, renamed when complete), laid out as the ``ham10000`` source expects.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

DATAVERSE = "https://dataverse.harvard.edu"
HAM10000_DOI = "doi:10.7910/DVN/DBW86T"
# Local name of each wanted file, keyed by its name on Dataverse without extension.
HAM10000_FILES = {
    "HAM10000_metadata": "HAM10000_metadata.csv",
    "HAM10000_images_part_1": "HAM10000_images_part_1.zip",
    "HAM10000_images_part_2": "HAM10000_images_part_2.zip",
}
HAM10000_MASKS = {"HAM10000_segmentations_lesion_tschandl": "HAM10000_segmentations_lesion_tschandl.zip"}
CHUNK = 1 << 20
_DIGEST_LENGTHS = {32: "md5", 40: "sha1", 64: "sha256", 128: "sha512"}
_EXTRACTED = ".extracted"  # marker file written inside a folder once its archive is fully extracted


class DownloadError(RuntimeError):
    """A download that failed or did not verify; the message names the file and what was expected."""


class _ShortTransfer(DownloadError):
    """The connection ended before the whole file arrived (worth a resumed retry)."""


@dataclass
class RemoteFile:
    """One file to fetch: local ``name``, ``url``, expected ``size`` and ``checksum`` (algorithm, hex) when known."""

    name: str
    url: str
    size: int | None = None
    checksum: tuple[str, str] | None = None


def read_checksums(path: str | Path) -> dict[str, tuple[str, str]]:
    """A ``sha256sum``-style manifest (``<hex>  <name>`` per line) -> name -> (algorithm, hex)."""
    checksums = {}
    for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if not line.strip() or line.startswith("#"):
            continue
        parts = line.split(maxsplit=1)
        digest = parts[0].lower()
        if len(parts) != 2 or len(digest) not in _DIGEST_LENGTHS or any(c not in "0123456789abcdef" for c in digest):
            raise ValueError(f"{path} line {number}: expected '<hex digest>  <file name>', got {line!r}")
        checksums[parts[1].strip().lstrip("*")] = (_DIGEST_LENGTHS[len(digest)], digest)
    return checksums


def dataverse_files(wanted: dict[str, str], server: str = DATAVERSE, doi: str = HAM10000_DOI) -> list[RemoteFile]:
    """The ``wanted`` files (Dataverse name without extension -> local name) of a Dataverse dataset, with their access
    URLs, sizes and published checksums, from the native API."""
    api = f"{server.rstrip('/')}/api/datasets/:persistentId/?persistentId={urllib.parse.quote(doi, safe=':/')}"
    try:
        with urllib.request.urlopen(api, timeout=60) as response:
            listing = json.load(response)
        files = listing["data"]["latestVersion"]["files"]
    except (urllib.error.URLError, TimeoutError, ValueError, KeyError, TypeError) as exc:
        raise DownloadError(f"cannot read the file list of {doi} from {api}: {exc}") from exc
    found = {}
    for entry in files:
        data = entry.get("dataFile", {})
        name = data.get("originalFileName") or data.get("filename", "")
        stem = name.rsplit(".", 1)[0]
        if stem not in wanted:
            continue
        url = f"{server.rstrip('/')}/api/access/datafile/{data['id']}"
        if data.get("originalFileFormat") or data.get("originalFileName"):  # ingested tabular file
            found[stem] = RemoteFile(wanted[stem], url + "?format=original", data.get("originalFileSize"))
            continue
        checksum = data.get("checksum") or {}
        algorithm = str(checksum.get("type", "")).lower().replace("-", "")
        known = algorithm in hashlib.algorithms_guaranteed and checksum.get("value")
        found[stem] = RemoteFile(wanted[stem], url, data.get("filesize"),
                                 (algorithm, checksum["value"].lower()) if known else None)
    missing = sorted(set(wanted) - set(found))
    if missing:
        names = sorted((e.get("dataFile", {}).get("filename", "?") for e in files))
        raise DownloadError(f"{doi} on {server} has no file named {', '.join(missing)}; it lists: {', '.join(names)}")
    return [found[stem] for stem in wanted]


def download_file(remote: RemoteFile, folder: str | Path, retries: int = 3) -> Path:
    """Fetch ``remote`` into ``folder/remote.name`` via ``.part`` (resumed when present), verify, rename; returns the
    path. An existing final file is kept when it verifies; a checksum mismatch removes the ``.part`` and raises."""
    target = Path(folder) / remote.name
    if target.is_file():
        _verify(target, remote, delete=False)
        log.info("%s: already downloaded", target)
        return target
    part = target.with_name(target.name + ".part")
    target.parent.mkdir(parents=True, exist_ok=True)
    for attempt in range(1, retries + 1):
        try:
            _fetch(remote, part)
            break
        except (urllib.error.URLError, ConnectionError, TimeoutError, _ShortTransfer) as exc:
            if isinstance(exc, urllib.error.HTTPError) and exc.code < 500 or attempt == retries:
                raise DownloadError(f"{remote.url}: download of {remote.name} failed: {exc} "
                                    f"(run again to resume from {part})") from exc
            log.warning("%s: %s; retrying (%d/%d)", remote.name, exc, attempt, retries)
            time.sleep(attempt)
    _verify(part, remote, delete=True)
    os.replace(part, target)
    log.info("%s: downloaded and verified", target)
    return target


def _fetch(remote: RemoteFile, part: Path) -> None:
    """Append the missing bytes of ``remote`` to ``part``; raises DownloadError when the transfer ends short."""
    from tqdm import tqdm

    offset = part.stat().st_size if part.exists() else 0
    if remote.size is not None and offset > remote.size:
        part.unlink()
        offset = 0
    if remote.size is not None and offset == remote.size:
        return
    parsed = urllib.parse.urlparse(remote.url)
    if parsed.scheme == "file":
        source = Path(urllib.request.url2pathname(parsed.path))
        if not source.is_file():
            raise DownloadError(f"{remote.url}: no such file")
        total = source.stat().st_size
        stream = source.open("rb")
        stream.seek(offset)
    else:
        request = urllib.request.Request(remote.url, headers={"Range": f"bytes={offset}-"} if offset else {})
        try:
            stream = urllib.request.urlopen(request, timeout=60)
        except urllib.error.HTTPError as exc:
            if exc.code == 416 and offset:  # nothing left to send: the .part file is already complete
                return
            raise
        length = stream.headers.get("Content-Length")
        if offset and stream.status != 206:  # the server ignored the range: start over
            log.info("%s: server does not resume downloads; starting from the beginning", remote.name)
            offset = 0
        total = offset + int(length) if length is not None else None
        content_range = stream.headers.get("Content-Range", "")
        if stream.status == 206 and "/" in content_range and content_range.rsplit("/", 1)[1].isdigit():
            total = int(content_range.rsplit("/", 1)[1])
    if remote.size is not None and total is not None and total != remote.size:
        stream.close()
        raise DownloadError(f"{remote.url}: server reports {total} bytes for {remote.name}, expected {remote.size}")
    expected = remote.size if remote.size is not None else total
    received = offset
    with stream, part.open("ab" if offset else "wb") as out, tqdm(
        total=expected, initial=offset, unit="B", unit_scale=True, desc=remote.name, disable=None
    ) as progress:
        while chunk := stream.read(CHUNK):
            out.write(chunk)
            received += len(chunk)
            progress.update(len(chunk))
    if expected is not None and received != expected:
        raise _ShortTransfer(f"{remote.url}: transfer of {remote.name} ended at {received} of {expected} bytes")


def _verify(path: Path, remote: RemoteFile, delete: bool) -> None:
    size = path.stat().st_size
    if remote.size is not None and size != remote.size:
        if delete:
            path.unlink()
        raise DownloadError(f"{path}: {size} bytes, expected {remote.size}")
    if remote.checksum is None:
        return
    algorithm, expected = remote.checksum
    digest = hashlib.new(algorithm)
    with path.open("rb") as stream:
        while chunk := stream.read(CHUNK):
            digest.update(chunk)
    if digest.hexdigest() != expected:
        if delete:
            path.unlink()
        action = "the download was deleted" if delete else "delete it to download again"
        raise DownloadError(f"{path}: {algorithm} checksum {digest.hexdigest()} does not match the expected "
                            f"{expected}; {action}")


def extract_zip(archive: Path, folder: Path | None = None) -> Path:
    """Extract ``archive`` into ``folder`` (default: beside it, named after it), via a temporary folder renamed when
    complete; members that would land outside the folder are refused."""
    folder = folder or archive.with_suffix("")
    if (folder / _EXTRACTED).is_file():
        return folder
    temporary = folder.with_name(folder.name + ".extracting")
    shutil.rmtree(temporary, ignore_errors=True)
    try:
        with zipfile.ZipFile(archive) as bundle:
            for member in bundle.namelist():
                target = (temporary / member).resolve()
                if not target.is_relative_to(temporary.resolve()):
                    raise DownloadError(f"{archive}: member {member!r} would be written outside {folder}")
            bundle.extractall(temporary)
    except zipfile.BadZipFile as exc:
        shutil.rmtree(temporary, ignore_errors=True)
        raise DownloadError(f"{archive}: not a valid zip archive: {exc}") from exc
    (temporary / _EXTRACTED).write_text(archive.name)
    shutil.rmtree(folder, ignore_errors=True)
    temporary.rename(folder)
    return folder


def download_ham10000(dest: str | Path, url_base: str | None = None, checksums: str | Path | None = None,
                      with_masks: bool = False, keep_archives: bool = False, server: str = DATAVERSE) -> Path:
    """Download (and extract) HAM10000 into ``dest``: ``HAM10000_metadata.csv`` and ``HAM10000_images_part_1/``,
    ``_part_2/`` (plus the lesion segmentation masks with ``with_masks``). Returns ``dest``, ready for
    ``lesion ingest --source ham10000 --root DEST``. Archives already extracted are not fetched again."""
    dest = Path(dest).expanduser()
    dest.mkdir(parents=True, exist_ok=True)
    wanted = {**HAM10000_FILES, **(HAM10000_MASKS if with_masks else {})}
    if url_base:
        remotes = [RemoteFile(name, f"{url_base.rstrip('/')}/{urllib.parse.quote(name)}") for name in wanted.values()]
    else:
        remotes = dataverse_files(wanted, server)
    manifest = read_checksums(checksums) if checksums else {}
    for remote in remotes:
        remote.checksum = manifest.get(remote.name, remote.checksum)
        is_zip = remote.name.endswith(".zip")
        if is_zip and (dest / Path(remote.name).stem / _EXTRACTED).is_file():
            log.info("%s: already extracted", dest / Path(remote.name).stem)
            continue
        path = download_file(remote, dest)
        if is_zip:
            extract_zip(path)
            if not keep_archives:
                path.unlink()
    return dest
