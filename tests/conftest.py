"""Shared fixtures: paths to the real test data and small synthetic slides."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import tifffile

# Under pytest-xdist each worker shares the cores with the others: one torch/BLAS thread
# per worker (and per wsi-run it starts) instead of oversubscribed, spinning thread pools.
# Set before torch is imported.
if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
    os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def shared(*parts: str) -> Path:
    """Path under ../shared/data, skipping the test when that data is absent."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"real test data absent: {path} (see ../shared/data/SOURCES.md)")
    return path


def write_generic_tiff(path: Path, rgb: np.ndarray, mpp: float | None, tile: int = 256,
                       levels: int = 3) -> Path:
    """A generic tiled pyramidal TIFF (successive IFDs, 2x downsamples), MPP in the TIFF
    resolution tags (cm) or no resolution at all when ``mpp`` is None."""
    with tifffile.TiffWriter(path) as tif:
        image = rgb
        for _ in range(levels):
            kwargs = {}
            if mpp is not None:
                scale = mpp * rgb.shape[1] / image.shape[1]
                kwargs = {"resolution": (1e4 / scale, 1e4 / scale), "resolutionunit": "CENTIMETER"}
            else:
                kwargs = {"resolution": (1, 1), "resolutionunit": "NONE"}
            tif.write(image, tile=(tile, tile), photometric="rgb", compression="jpeg",
                      subfiletype=0 if image is rgb else 1, **kwargs)
            h, w = image.shape[0] // 2 * 2, image.shape[1] // 2 * 2
            image = image[:h, :w].reshape(h // 2, 2, w // 2, 2, 3).mean((1, 3)).astype(np.uint8)
            if min(image.shape[:2]) < tile:
                break
    return path


@pytest.fixture(scope="session")
def fls_slide(tmp_path_factory) -> tuple[Path, dict]:
    """A small synthetic H&E salivary-gland slide (positive) and its truth."""
    from wsi_pipeline.synth import write_slide

    path = tmp_path_factory.mktemp("synth") / "fls_small.svs"
    truth = write_slide("fls", path, width=4096, height=3072, mpp=0.5, seed=11, label="positive")
    return path, truth


@pytest.fixture(scope="session")
def glass_slide(tmp_path_factory) -> Path:
    """Blank glass with scanner noise, 0.5 um/px in the TIFF resolution tags."""
    rng = np.random.default_rng(3)
    rgb = np.clip(rng.normal(238, 3, (1536, 2048, 3)), 0, 255).astype(np.uint8)
    return write_generic_tiff(tmp_path_factory.mktemp("glass") / "glass.tiff", rgb, mpp=0.5)
