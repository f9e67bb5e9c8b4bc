"""Slides read over HTTP (fsspec + tiffslide) from a real server on 127.0.0.1, with byte
ranges as object stores and web servers serve them."""

from __future__ import annotations

import json
import os
import re
import shutil
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import zarr

from wsi_pipeline.cli import main

pytest.importorskip("aiohttp", reason="fsspec's HTTP file system needs aiohttp "
                                      "(pip install 'wsi_pipeline[remote]')")


class RangeHandler(SimpleHTTPRequestHandler):
    """The standard library's file server plus ``Range: bytes=a-b`` (206 responses)."""

    requests_seen: list[str] = []

    def send_head(self):  # noqa: D102 - http.server's hook
        match = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        path = Path(self.translate_path(self.path))
        if match is None or not path.is_file():
            return super().send_head()
        size = path.stat().st_size
        start = int(match[1])
        end = min(int(match[2]) if match[2] else size - 1, size - 1)
        if start >= size:
            self.send_error(416)
            return None
        f = open(path, "rb")  # noqa: SIM115 - http.server closes it after copyfile
        f.seek(start)
        self.send_response(206)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.send_header("Content-Length", str(end - start + 1))
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Last-Modified", self.date_time_string(int(path.stat().st_mtime)))
        self.end_headers()
        RangeHandler.requests_seen.append(f"{start}-{end}")
        return _Limited(f, end - start + 1)

    def log_message(self, *args):  # keep the test output clean
        pass


class _Limited:
    """A file object that ends after ``n`` bytes (the requested range)."""

    def __init__(self, f, n):
        self.f, self.left = f, n

    def read(self, size=-1):
        size = self.left if size < 0 else min(size, self.left)
        data = self.f.read(size)
        self.left -= len(data)
        return data

    def close(self):
        self.f.close()


@pytest.fixture(scope="module")
def server(fls_slide, tmp_path_factory):
    root = tmp_path_factory.mktemp("www")
    shutil.copy(fls_slide[0], root / "fls small.svs")
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), partial(RangeHandler, directory=str(root)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_a_slide_over_http_gives_the_same_pyramid_as_the_local_file(server, fls_slide,
                                                                      tmp_path, capsys):
    _, base = server
    RangeHandler.requests_seen.clear()
    url = f"{base}/fls%20small.svs"
    assert main([url, "--task", "fls", "--out", str(tmp_path / "remote"), "--until",
                 "pyramid", "--quiet"]) == 0
    assert main([str(fls_slide[0]), "--task", "fls", "--out", str(tmp_path / "local"),
                 "--until", "pyramid", "--quiet", "--backend", "tiffslide"]) == 0
    remote = json.loads((tmp_path / "remote" / "fls_20small" / "report.json").read_text())
    local = json.loads((tmp_path / "local" / "fls_small" / "report.json").read_text())
    assert remote["slide"]["path"] == url and remote["provenance"]["backend"] == "tiffslide"
    assert remote["slide"]["fingerprint"]["size"] == str(os.path.getsize(fls_slide[0]))
    assert remote["areas_mm2"] == local["areas_mm2"]
    assert remote["counts"] == local["counts"]
    a = zarr.open_group(str(tmp_path / "remote" / "fls_20small" / "store.zarr"), mode="r")
    b = zarr.open_group(str(tmp_path / "local" / "fls_small" / "store.zarr"), mode="r")
    np.testing.assert_array_equal(a["image/0"][...], b["image/0"][...])
    # read with byte-range requests (fsspec fetches 5 MB blocks, so a slide this small
    # comes in one block per open handle; a gigapixel slide only in the blocks it touches)
    assert 0 < len(RangeHandler.requests_seen) <= 8


def test_a_changed_remote_slide_is_recomputed(server, tmp_path):
    root, base = server
    shutil.copy(root / "fls small.svs", root / "copy.svs")
    argv = [f"{base}/copy.svs", "--task", "fls", "--out", str(tmp_path), "--until",
            "tissue", "--quiet"]
    assert main(argv) == 0
    assert main(argv) == 0
    report = json.loads((tmp_path / "copy" / "report.json").read_text())
    assert report["provenance"]["stage_timings"]["tissue"]["reused"] is True
    with open(root / "copy.svs", "ab") as f:  # the object changes on the server
        f.write(b"\0" * 1024)
    assert main(argv) == 0
    report = json.loads((tmp_path / "copy" / "report.json").read_text())
    assert report["provenance"]["stage_timings"]["tissue"]["reused"] is False


def test_a_missing_url_is_one_error_line(server, tmp_path, capsys):
    _, base = server
    code = main([f"{base}/nothing.svs", "--task", "fls", "--out", str(tmp_path), "--quiet"])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "nothing.svs" in lines[0] and "cannot open slide" in lines[0]
