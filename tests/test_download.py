"""`lesion download`: full download, resume from a .part file, checksum mismatch, file:// URLs and the Dataverse API
path, against a loopback HTTP server started by the test."""

from __future__ import annotations

import hashlib
import io
import json
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from PIL import Image

from lesion.data.download import DownloadError, RemoteFile, download_file, download_ham10000, read_checksums
from lesion.data.sources import read_ham10000

METADATA = "image_id,lesion_id,dx,dx_type,age,sex,localization\n" \
           "ISIC_0000001,HAM_1,nv,histo,40,male,back\nISIC_0000002,HAM_2,mel,histo,60,female,face\n"


def jpeg(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (30, 40, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG")
    return buffer.getvalue()


def zip_of(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as bundle:
        for name, data in files.items():
            bundle.writestr(name, data)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def files() -> dict[str, bytes]:
    return {
        "HAM10000_metadata.csv": METADATA.encode(),
        "HAM10000_images_part_1.zip": zip_of({"ISIC_0000001.jpg": jpeg(1)}),
        "HAM10000_images_part_2.zip": zip_of({"ISIC_0000002.jpg": jpeg(2)}),
    }


class Server:
    """A loopback HTTP server with Range support; ``routes`` maps URL paths to bytes; requests are recorded."""

    def __init__(self, routes: dict[str, bytes]):
        self.routes, self.requests = routes, []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                outer.requests.append((self.path, self.headers.get("Range")))
                body = outer.routes.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                start = 0
                if self.headers.get("Range"):
                    start = int(self.headers["Range"].split("=")[1].split("-")[0])
                    if start >= len(body):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(body)}")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(body) - start))
                self.end_headers()
                self.wfile.write(body[start:])

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server(files):
    srv = Server({f"/mirror/{name}": data for name, data in files.items()})
    yield srv
    srv.close()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_full_download_extracts_a_readable_ham10000(tmp_path, server, files):
    manifest = tmp_path / "SHA256SUMS"
    manifest.write_text("".join(f"{sha256(data)}  {name}\n" for name, data in files.items()))
    dest = download_ham10000(tmp_path / "ham", url_base=f"{server.url}/mirror", checksums=manifest)
    assert (dest / "HAM10000_metadata.csv").read_bytes() == files["HAM10000_metadata.csv"]
    assert (dest / "HAM10000_images_part_1" / "ISIC_0000001.jpg").is_file()
    assert not list(dest.glob("*.zip")) and not list(dest.glob("*.part"))
    records, rejected = read_ham10000(dest)
    assert sorted(r["dx"] for r in records) == ["mel", "nv"] and rejected == []
    # A second run fetches nothing: extracted archives and verified files are kept.
    server.requests.clear()
    download_ham10000(dest, url_base=f"{server.url}/mirror", checksums=manifest)
    assert server.requests == []


def test_resume_from_a_truncated_part_file(tmp_path, server, files):
    name = "HAM10000_images_part_1.zip"
    data = files[name]
    (tmp_path / f"{name}.part").write_bytes(data[:100])
    remote = RemoteFile(name, f"{server.url}/mirror/{name}", len(data), ("sha256", sha256(data)))
    path = download_file(remote, tmp_path)
    assert path.read_bytes() == data
    assert server.requests == [(f"/mirror/{name}", "bytes=100-")]  # only the missing bytes were asked for
    assert not (tmp_path / f"{name}.part").exists()


def test_checksum_mismatch_leaves_no_file(tmp_path, server, files):
    name = "HAM10000_metadata.csv"
    remote = RemoteFile(name, f"{server.url}/mirror/{name}", None, ("sha256", "0" * 64))
    with pytest.raises(DownloadError, match="sha256 checksum .* does not match"):
        download_file(remote, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_wrong_size_is_refused(tmp_path, server, files):
    name = "HAM10000_metadata.csv"
    remote = RemoteFile(name, f"{server.url}/mirror/{name}", len(files[name]) + 5)
    with pytest.raises(DownloadError, match="expected"):
        download_file(remote, tmp_path)
    assert not (tmp_path / name).exists()


def test_file_url_mirror_with_resume(tmp_path, files):
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    for name, data in files.items():
        (mirror / name).write_bytes(data)
    dest = tmp_path / "ham"
    dest.mkdir()
    (dest / "HAM10000_metadata.csv.part").write_bytes(files["HAM10000_metadata.csv"][:10])
    download_ham10000(dest, url_base=mirror.as_uri())
    assert (dest / "HAM10000_metadata.csv").read_bytes() == files["HAM10000_metadata.csv"]
    assert (dest / "HAM10000_images_part_2" / "ISIC_0000002.jpg").read_bytes() == jpeg(2)


def test_dataverse_api_listing_gives_urls_sizes_and_checksums(tmp_path, files):
    listing = {"status": "OK", "data": {"latestVersion": {"files": [
        {"dataFile": {"id": 11, "filename": "HAM10000_metadata.tab", "originalFileName": "HAM10000_metadata.csv",
                      "originalFileFormat": "text/csv", "originalFileSize": len(files["HAM10000_metadata.csv"])}},
        *({"dataFile": {"id": 12 + i, "filename": name, "filesize": len(files[name]),
                        "checksum": {"type": "MD5", "value": hashlib.md5(files[name]).hexdigest()}}}
          for i, name in enumerate(["HAM10000_images_part_1.zip", "HAM10000_images_part_2.zip"])),
    ]}}}
    routes = {"/api/datasets/:persistentId/?persistentId=doi:10.7910/DVN/DBW86T": json.dumps(listing).encode(),
              "/api/access/datafile/11?format=original": files["HAM10000_metadata.csv"],
              "/api/access/datafile/12": files["HAM10000_images_part_1.zip"],
              "/api/access/datafile/13": b"corrupted" + files["HAM10000_images_part_2.zip"][9:]}
    srv = Server(routes)
    try:
        with pytest.raises(DownloadError, match="md5 checksum"):
            download_ham10000(tmp_path, server=srv.url)
        assert (tmp_path / "HAM10000_images_part_1" / "ISIC_0000001.jpg").is_file()
        assert not (tmp_path / "HAM10000_images_part_2.zip").exists()
        assert not (tmp_path / "HAM10000_images_part_2.zip.part").exists()
        srv.routes["/api/access/datafile/13"] = files["HAM10000_images_part_2.zip"]
        download_ham10000(tmp_path, server=srv.url)
        assert len(read_ham10000(tmp_path)[0]) == 2
    finally:
        srv.close()


def test_checksum_manifest_format_is_checked(tmp_path):
    good = tmp_path / "sums"
    good.write_text(f"{'a' * 64}  x.zip\n{'b' * 32} *y.csv\n")
    assert read_checksums(good) == {"x.zip": ("sha256", "a" * 64), "y.csv": ("md5", "b" * 32)}
    bad = tmp_path / "bad"
    bad.write_text("not-a-digest x.zip\n")
    with pytest.raises(ValueError, match="line 1"):
        read_checksums(bad)


def test_cli_reports_a_failed_download(tmp_path, capsys):
    from pipelines.cli import main

    code = main(["download", "ham10000", "--dest", str(tmp_path / "ham"), "--url-base", (tmp_path / "none").as_uri()])
    assert code == 1
    assert "HAM10000_metadata.csv" in capsys.readouterr().err
