"""The BBBC021 downloader against a local HTTP server on 127.0.0.1 (never the network)."""

import hashlib
import io
import json
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pandas as pd
import pytest
import tifffile

from morphoprof.datasets.download import download_bbbc021, fetch, load_checksums
from morphoprof.errors import DownloadError
from morphoprof.index.bbbc021 import import_bbbc021

PLATES = ["Week1_22123", "Week2_24121"]


def _tiff_bytes(value):
    buf = io.BytesIO()
    tifffile.imwrite(buf, np.full((6, 8), value, np.uint16))
    return buf.getvalue()


def _collection():
    """Tiny BBBC021: image/compound/moa tables and one zip per plate (<plate>/<file>.tif)."""
    rows, files = [], {}
    k = 0
    for plate in PLATES:
        week = plate.split("_")[0]
        zbuf = io.BytesIO()
        with zipfile.ZipFile(zbuf, "w") as zf:
            for well, cpd, conc in (("B02", "DMSO", 0.0), ("C05", "taxol", 0.3)):
                for site in (1, 2):
                    k += 1
                    rec = {"TableNumber": 1, "ImageNumber": k, "Replicate": 1,
                           "Image_Metadata_Plate_DAPI": plate, "Image_Metadata_Well_DAPI": well,
                           "Image_Metadata_Compound": cpd, "Image_Metadata_Concentration": conc}
                    for w, ch in enumerate(("DAPI", "Tubulin", "Actin"), start=1):
                        name = f"{well}_s{site}_w{w}{k:04d}.tif"
                        zf.writestr(f"{plate}/{name}", _tiff_bytes(k * 10 + w))
                        rec[f"Image_FileName_{ch}"] = name
                        rec[f"Image_PathName_{ch}"] = f"{week}/{plate}"
                    rows.append(rec)
        files[f"BBBC021_v1_images_{plate}.zip"] = zbuf.getvalue()
    files["BBBC021_v1_image.csv"] = pd.DataFrame(rows).to_csv(index=False).encode()
    files["BBBC021_v1_compound.csv"] = b"compound,smiles\ntaxol,C\n"
    files["BBBC021_v1_moa.csv"] = (b"compound,concentration,moa\n"
                                   b"taxol,0.3,Microtubule stabilizers\nDMSO,0,DMSO\n")
    return files


class Server:
    """Serves ``files`` with HTTP Range support; can cut a transfer short or corrupt a file."""

    def __init__(self, files):
        self.files = dict(files)
        self.requests = []  # (name, Range header or None)
        self.cut_once = set()  # names whose next full GET stops halfway
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                name = self.path.rsplit("/", 1)[-1]
                rng = self.headers.get("Range")
                server.requests.append((name, rng))
                data = server.files.get(name)
                if data is None:
                    self.send_error(404)
                    return
                start = 0
                if rng:
                    start = int(rng.split("=")[1].split("-")[0])
                    if start >= len(data):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(data)}")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range",
                                     f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                body = data[start:]
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if name in server.cut_once and not rng:
                    server.cut_once.discard(name)
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    self.connection.shutdown(2)  # drop the connection mid-transfer
                    return
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/bbbc/BBBC021/"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = Server(_collection())
    yield s
    s.close()


def test_download_all_then_import(tmp_path, server):
    summary = download_bbbc021(tmp_path, base_url=server.url)
    assert list(summary.fetched) == PLATES
    saved = json.loads((tmp_path / ".morphoprof" / "last_download.json").read_text())
    assert saved == summary.to_json() and saved["plates"] == PLATES
    assert not list((tmp_path / "zips").glob("*"))  # zips removed after unpacking
    index = import_bbbc021(tmp_path, check_shapes=True)
    assert len(index) == 8 and index.table["Metadata_batch"].nunique() == 2
    taxol = index.table[index.table["Metadata_compound"] == "taxol"]
    assert (taxol["Metadata_moa"] == "Microtubule stabilizers").all()
    img = index.read(0)
    assert img.shape == (3, 6, 8) and img[0, 0, 0] % 10 == 1  # DAPI is w1
    # a re-run skips finished plates and asks the server for no zip
    server.requests.clear()
    again = download_bbbc021(tmp_path, base_url=server.url)
    assert list(again.skipped) == PLATES and again.fetched == ()
    assert not any(name.endswith(".zip") for name, _ in server.requests)


def test_plate_subset_and_unknown_plate(tmp_path, server):
    summary = download_bbbc021(tmp_path, plates=["Week2_24121"], base_url=server.url,
                               keep_zips=True)
    assert summary.fetched == ("Week2_24121",)
    assert (tmp_path / "Week2" / "Week2_24121").is_dir()
    assert not (tmp_path / "Week1").exists()
    assert (tmp_path / "zips" / "BBBC021_v1_images_Week2_24121.zip").is_file()
    with pytest.raises(DownloadError, match=r"unknown plate\(s\) \['Week9_99999'\]"):
        download_bbbc021(tmp_path, plates=["Week9_99999"], base_url=server.url)


def test_done_record_holds_the_zip_sha256_with_or_without_a_checksum(tmp_path, server):
    # a sha256 checksum is recorded as given (pooch checked the bytes against it); an md5 one,
    # or none, leaves the record to be read from the file: the same digest either way
    a, b = "BBBC021_v1_images_Week1_22123.zip", "BBBC021_v1_images_Week2_24121.zip"
    sha = {n: hashlib.sha256(server.files[n]).hexdigest() for n in (a, b)}
    download_bbbc021(tmp_path, plates=["Week1_22123", "Week2_24121"], base_url=server.url,
                     checksums={a: f"SHA256:{sha[a].upper()}",
                                b: "md5:" + hashlib.md5(server.files[b]).hexdigest()})
    for name, plate in ((a, "Week1_22123"), (b, "Week2_24121")):
        done = json.loads((tmp_path / ".morphoprof" / f"{plate}.done.json").read_text())
        assert done["sha256"] == sha[name] and done["zip"] == name


def test_resume_partial_download_with_range(tmp_path, server):
    name = "BBBC021_v1_images_Week1_22123.zip"
    data = server.files[name]
    part = tmp_path / (name + ".part")
    part.write_bytes(data[:1000])  # what an interrupted run left behind
    fetch(server.url + name, tmp_path / name)
    assert (tmp_path / name).read_bytes() == data
    assert server.requests == [(name, "bytes=1000-")]
    assert not part.exists()


def test_dropped_connection_is_resumed(tmp_path, server):
    name = "BBBC021_v1_images_Week1_22123.zip"
    server.cut_once.add(name)
    sha = hashlib.sha256(server.files[name]).hexdigest()
    fetch(server.url + name, tmp_path / name, checksum=f"sha256:{sha}")
    assert (tmp_path / name).read_bytes() == server.files[name]
    ranges = [r for n, r in server.requests if n == name]
    assert ranges[0] is None and ranges[1].startswith("bytes=")  # second request resumed


def test_checksum_mismatch_is_rejected(tmp_path, server):
    name = "BBBC021_v1_images_Week1_22123.zip"
    with pytest.raises(DownloadError, match=f"{name}: sha256 checksum mismatch"):
        fetch(server.url + name, tmp_path / name, checksum="sha256:" + "0" * 64)
    assert not (tmp_path / name).exists() and not (tmp_path / (name + ".part")).exists()
    md5 = hashlib.md5(server.files[name]).hexdigest()
    (tmp_path / "sums.md5").write_text(f"{md5}  {name}\n")
    assert load_checksums(tmp_path / "sums.md5") == {name: md5}
    fetch(server.url + name, tmp_path / name, checksum=md5)


def test_corrupt_zip_is_refetched_then_reported(tmp_path, server):
    name = "BBBC021_v1_images_Week1_22123.zip"
    good = server.files[name]
    bad = bytearray(good)
    i = good.index(b"II*\x00") + 40  # inside the first TIFF member's data
    bad[i] ^= 0xFF
    server.files[name] = bytes(bad)
    with pytest.raises(DownloadError, match="fails its CRC check"):
        download_bbbc021(tmp_path, plates=["Week1_22123"], base_url=server.url)
    assert sum(n == name for n, _ in server.requests) == 2  # fetched twice, then gave up
    assert not (tmp_path / "Week1" / "Week1_22123").exists()  # nothing half-unpacked
    server.files[name] = good
    summary = download_bbbc021(tmp_path, plates=["Week1_22123"], base_url=server.url)
    assert summary.fetched == ("Week1_22123",)


def test_missing_file_on_server(tmp_path, server):
    del server.files["BBBC021_v1_moa.csv"]
    with pytest.raises(DownloadError, match="BBBC021_v1_moa.csv: HTTP 404"):
        download_bbbc021(tmp_path, base_url=server.url)


def test_a_first_download_that_fails_leaves_no_empty_folder(tmp_path, server):
    """No network or the first table refused: the folders made for the download are removed
    again (they were left empty, as if something had been fetched)."""
    server.files.clear()
    with pytest.raises(DownloadError, match="HTTP 404"):
        download_bbbc021(tmp_path / "new" / "bbbc021", base_url=server.url)
    assert list(tmp_path.iterdir()) == []
    # a host that does not resolve (no network; .invalid never resolves) is named as such
    with pytest.raises(DownloadError, match="the host no-such-host.invalid cannot be resolved"):
        fetch("http://no-such-host.invalid/x.csv", tmp_path / "new" / "x.csv", retries=0)
    assert list(tmp_path.iterdir()) == []


def test_a_present_file_is_kept_unless_its_checksum_differs(tmp_path, server):
    """pooch's rule: a file already there is not fetched again, unless an expected checksum
    says it is not the right one (then it is replaced, verified)."""
    name = "BBBC021_v1_moa.csv"
    data = server.files[name]
    (tmp_path / name).write_bytes(b"an older table\n")
    fetch(server.url + name, tmp_path / name)
    assert server.requests == [] and (tmp_path / name).read_bytes() == b"an older table\n"
    fetch(server.url + name, tmp_path / name, checksum=hashlib.sha256(data).hexdigest())
    assert server.requests == [(name, None)] and (tmp_path / name).read_bytes() == data


def test_a_killed_runs_empty_temporary_is_cleared_and_the_user_file_kept(tmp_path, server):
    name = "BBBC021_v1_moa.csv"
    (tmp_path / "tmpab12cd_9").write_bytes(b"")  # pooch's temporary, left by a killed run
    (tmp_path / "tmpnotes123").write_bytes(b"x")  # pooch's pattern, but it holds data
    (tmp_path / "tmp_keepme.txt").write_bytes(b"")  # not pooch's name pattern
    fetch(server.url + name, tmp_path / name)
    assert (tmp_path / name).read_bytes() == server.files[name]
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == [name, "tmp_keepme.txt", "tmpnotes123"]
