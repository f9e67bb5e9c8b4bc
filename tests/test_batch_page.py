"""OUT/index.html in a real browser: headless Chromium (Debian's package) loads the page
from disk; the test reads the DOM it built (a row per input, thumbnails that loaded,
warnings, the score plot), takes a screenshot, and checks the console stayed clean. Skips
with a reason where Chromium is absent."""

from __future__ import annotations

import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

from wsi_pipeline.cli import main

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed "
                                "(apt-get install chromium) to check the page in a browser")


def chromium(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu",
                           "--enable-logging=stderr", "--v=0", "--virtual-time-budget=5000",
                           *args], capture_output=True, text=True, timeout=120)


class Rows(HTMLParser):
    """Each table row's data attributes and the classes of its cells."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[dict] = []
        self.svg_rects = 0

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "tr" and "data-slide" in attrs:
            self.rows.append({"slide": attrs["data-slide"], "status": attrs["data-status"],
                              "cells": [], "img": 0})
        elif tag == "td" and self.rows:
            self.rows[-1]["cells"].append(attrs.get("class") or "")
        elif tag == "img" and self.rows:
            self.rows[-1]["img"] += 1
        elif tag == "rect":
            self.svg_rects += 1


def test_batch_page_in_a_browser(tmp_path, fls_slide):
    path, _ = fls_slide
    slides = tmp_path / "slides"
    slides.mkdir()
    for name in ("biopsy_a", "biopsy_b"):
        shutil.copy(path, slides / f"{name}.svs")
    out = tmp_path / "out"
    assert main([str(slides), str(tmp_path / "missing.svs"), "--task", "fls", "--model",
                 "classical", "--out", str(out), "--quiet", "--workers", "1"]) == 1
    page = out / "index.html"
    assert page.is_file()

    shot = tmp_path / "page.png"
    done = chromium(f"--screenshot={shot}", "--window-size=1200,900", page.as_uri())
    assert shot.is_file() and shot.stat().st_size > 10_000, done.stderr
    console = [line for line in done.stderr.splitlines() if "CONSOLE" in line
               or "Uncaught" in line]
    assert console == []

    dom = chromium("--dump-dom", page.as_uri()).stdout
    rows = Rows()
    rows.feed(dom)
    assert [(r["slide"], r["status"]) for r in rows.rows] == [
        ("biopsy_a", "ok"), ("biopsy_b", "ok"), ("missing", "failed")]
    ok = [r for r in rows.rows if r["status"] == "ok"]
    assert all(r["img"] == 1 and "missing" not in r["cells"][0] for r in ok)  # loaded
    assert "missing" in rows.rows[2]["cells"][0]
    assert rows.svg_rects == 2                              # focus score of each finished slide
    text = re.sub(r"<[^>]+>", " ", dom)
    assert "no such file" in text and "demo weights" not in text   # classical: no weights
    assert "focus_score" in text and "3 inputs (2 ok, 1 failed)" in text

    # an overlay that has gone: the browser's failed load marks its row, nothing breaks
    (out / "biopsy_b" / "overlay.png").unlink()
    rows = Rows()
    rows.feed(chromium("--dump-dom", page.as_uri()).stdout)
    assert "missing" in rows.rows[1]["cells"][0] and "missing" not in rows.rows[0]["cells"][0]
    assert Path(page).read_text().count("http") == 1   # only the SVG namespace: no network
