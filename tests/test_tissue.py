"""Tissue detection and the tissue tile grid."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import shared

from wsi_pipeline.slide import open_slide
from wsi_pipeline.tissue import (
    detect_tissue,
    dice,
    thumbnail_mpp,
    tile_coverage,
    tile_grid,
)


def test_tile_coverage_counts_mask_pixels_per_tile():
    mask = np.zeros((40, 60), bool)      # 8 um/px -> 320 x 480 um
    mask[:20, :30] = True                # top-left 160 x 240 um
    cov = tile_coverage(mask, 8.0, (480.0, 320.0), tile_um=160.0)
    assert cov.shape == (2, 3)
    np.testing.assert_allclose(cov, [[1.0, 0.5, 0.0], [0.0, 0.0, 0.0]])
    grid = tile_grid(mask, 8.0, (480.0, 320.0), tile_um=160.0, min_fraction=0.5)
    assert grid.tolist() == [[0, 0], [0, 1]]


def test_thumbnail_mpp_is_physical():
    assert thumbnail_mpp((25_000.0, 20_000.0), 0.25) == pytest.approx(12.207, rel=1e-3)
    assert thumbnail_mpp((200_000.0, 80_000.0), 0.25) == 16.0
    # a 1 mm fragment keeps >= 512 px along its long side
    assert thumbnail_mpp((1000.0, 800.0), 0.5) == pytest.approx(1000 / 512)


def test_blank_glass_has_no_tissue():
    rng = np.random.default_rng(1)
    glass = np.clip(rng.normal(236, 4, (300, 400, 3)), 0, 255).astype(np.uint8)
    glass[100:103, 50:53] = 40            # a speck of dust
    result = detect_tissue(glass, 8.0)
    assert result.mask.sum() == 0


def test_real_he_slide_tissue_and_pen_exclusion():
    slide = open_slide(shared("slides", "CMU-1-Small-Region.svs"))
    mpp = thumbnail_mpp(slide.size_um, slide.mpp)
    thumb = slide.thumbnail(mpp)
    clean = detect_tissue(thumb, mpp)
    # the fragment covers roughly a third of this crop (checked by eye on overlay.png)
    assert 0.25 < clean.mask.mean() < 0.45
    assert clean.pen.sum() == 0

    inked = thumb.copy()
    h, w = inked.shape[:2]
    inked[h // 2 - 6:h // 2 + 6, :] = (40, 70, 170)  # a blue marker stroke across the slide
    result = detect_tissue(inked, mpp)
    stroke = np.zeros((h, w), bool)
    stroke[h // 2 - 6:h // 2 + 6, :] = True
    assert result.pen[stroke].mean() > 0.95
    assert not (result.mask & stroke).any()
    assert dice(result.mask | stroke, clean.mask | stroke) > 0.9   # tissue elsewhere intact


def test_dice():
    a = np.zeros((10, 10), bool)
    a[:5] = True
    b = np.zeros((10, 10), bool)
    b[:, :5] = True
    assert dice(a, b) == pytest.approx(0.5)
    assert dice(np.zeros((3, 3)), np.zeros((3, 3))) == 1.0
