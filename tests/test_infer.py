"""Inference engine and stitching: window grid, seam-free blending, resume, workers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import zarr
from scipy import ndimage

from wsi_pipeline.blend import ramp_weights
from wsi_pipeline.infer import EngineOptions, infer_to_store, read_context, window_grid
from wsi_pipeline.labelmaps import connected_components
from wsi_pipeline.store import SlideStore


class TinyConv(torch.nn.Module):
    """Three 3x3 convolutions: a receptive field of 7 px, so padding reaches 3 px in."""

    levels = (0,)
    classes = 1

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(
            torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.Tanh(),
            torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.Tanh(),
            torch.nn.Conv2d(8, 1, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 3 * self.net(x[:, 0] - 0.5)


class ContextProbe(torch.nn.Module):
    """Outputs, per pixel, the mean of each level's patch: shows which field each level saw."""

    levels = (0, 2)
    classes = 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        means = x.mean(dim=(2, 3, 4))                      # (B, L)
        return means[:, :, None, None].expand(-1, -1, *x.shape[-2:]) * 10


def _store(tmp_path, height=600, width=700, seed=0) -> tuple[SlideStore, np.ndarray]:
    """A store with a smooth random level 0 and its x2, x4 levels."""
    rng = np.random.default_rng(seed)
    rgb = ndimage.gaussian_filter(rng.uniform(0, 255, (3, height, width)), (0, 4, 4))
    rgb = np.clip((rgb - rgb.mean()) * 8 + 128, 0, 255).astype(np.uint8)
    store = SlideStore(tmp_path / "store.zarr")
    image = store.root.require_group("image")
    level = rgb
    for k in range(3):
        arr = image.create_array(str(k), shape=level.shape, dtype="uint8",
                                 chunks=(3, 128, 128), fill_value=255, overwrite=True)
        arr[...] = level
        h, w = level.shape[1] // 2 * 2, level.shape[2] // 2 * 2
        level = level[:, :h, :w].reshape(3, h // 2, 2, w // 2, 2).mean((2, 4)).astype(np.uint8)
    return store, rgb


def _all_tiles(height, width, tile):
    rows, cols = np.mgrid[0:-(-height // tile), 0:-(-width // tile)]
    return np.stack([rows.ravel(), cols.ravel()], axis=1)


def test_window_grid_covers_tissue_tiles_and_only_them():
    tiles = np.array([[0, 0], [2, 3]])
    windows = window_grid(tiles, 128, (512, 512), overlap_px=32)
    assert (windows % 4 == 0).all()
    assert windows.tolist() == sorted(windows.tolist())          # raster order
    covered = np.zeros((512 + 64, 512 + 64), bool)               # offset by 32 (grid start -16)
    for y, x in windows:
        covered[y + 16:y + 16 + 128, x + 16:x + 16 + 128] = True
    for r, c in tiles:
        assert covered[r * 128 + 16:(r + 1) * 128 + 16, c * 128 + 16:(c + 1) * 128 + 16].all()
    # tile (1, 1) is glass, and no window lies wholly inside tiles that are all glass
    for y, x in windows:
        rows = range(max(y, 0) // 128, (min(y + 128, 512) - 1) // 128 + 1)
        cols = range(max(x, 0) // 128, (min(x + 128, 512) - 1) // 128 + 1)
        assert any((r, c) in {(0, 0), (2, 3)} for r in rows for c in cols)


def test_ramp_weights_fall_to_the_floor_at_the_edge():
    w = ramp_weights(64, 16, margin_px=4)
    assert w[32, 32] == 1.0 and w[0, 0] == pytest.approx(1e-6)
    assert np.allclose(w, w.T) and np.allclose(w, w[::-1, ::-1])
    assert w[32, 4] < w[32, 8] < w[32, 12] < w[32, 16]


def test_context_patches_share_one_centre(tmp_path):
    store, rgb = _store(tmp_path)
    levels = [store.root["image"][k] for k in ("0", "1", "2")]
    patches = read_context(levels, (1, 2, 4), 100, 200, 64)
    assert patches.shape == (3, 64, 64, 3)
    assert np.array_equal(patches[0], np.moveaxis(rgb[:, 100:164, 200:264], 0, -1))
    # the level-2 patch is centred on (132, 232) / 4 = (33, 58) in that level
    lv2 = np.asarray(levels[2][:, 1:65, 26:90])
    assert np.array_equal(patches[2], np.moveaxis(lv2, 0, -1))
    # outside the slide it is glass
    corner = read_context(levels, (1, 2, 4), -64, -64, 64)
    assert (corner[0] == 255).all()


def test_tiled_prediction_matches_whole_image_prediction(tmp_path):
    """Seam-free: blending overlapping windows gives the model's whole-image output, within
    1/255 quantisation plus 0.5/255, once the overlap exceeds the receptive field."""
    store, rgb = _store(tmp_path)
    model = TinyConv()
    windows = window_grid(_all_tiles(600, 700, 128), 128, (600, 700), overlap_px=32)
    stats = infer_to_store(model, store, "prob", windows, size_px=128, overlap_px=32,
                           context=(1, 2, 4), level0_hw=(600, 700), out_downsample=1,
                           options=EngineOptions(batch_size=4, workers=0), inputs="a")
    tiled = np.asarray(store.root["pred/prob"][0]) / 255
    with torch.inference_mode():  # the slide is surrounded by glass, as windows see it
        x = torch.from_numpy(np.pad(rgb, ((0, 0), (8, 8), (8, 8)), constant_values=255))
        whole = torch.sigmoid(model(x.float().div(255)[None, None]))[0, 0, 8:-8, 8:-8].numpy()
    assert stats["windows"] == len(windows)
    assert np.abs(tiled - whole).max() <= 1.5 / 255
    # without blending (each pixel from one window, edges included) seams do appear
    seams = np.zeros_like(whole)
    with torch.inference_mode():
        for y in range(0, 600, 128):
            for x0 in range(0, 700, 128):
                patch = torch.from_numpy(rgb[:, y:y + 128, x0:x0 + 128]).float().div(255)
                seams[y:y + 128, x0:x0 + 128] = torch.sigmoid(model(patch[None, None]))[0, 0]
    assert np.abs(seams - whole)[8:-8, 8:-8].max() > 10 / 255


def test_multiresolution_inputs_reach_the_model(tmp_path):
    store, rgb = _store(tmp_path)
    windows = np.array([[0, 0], [256, 256]])
    seen = []
    from wsi_pipeline.infer import predict_windows

    predict_windows(ContextProbe(), store.path, windows, size_px=64, context=(1, 2, 4),
                    out_downsample=4, options=EngineOptions(batch_size=2, workers=0),
                    sink=lambda corners, probs: seen.append((corners.copy(), probs.copy())))
    corners, probs = seen[0]
    assert probs.shape == (2, 2, 16, 16)
    lv2 = np.asarray(store.root["image/2"])
    mean0 = rgb[:, 256:320, 256:320].mean() / 255
    mean2 = lv2[:, 72 - 32:72 + 32, 72 - 32:72 + 32].mean() / 255   # centre 288 / 4 = 72
    expected = np.exp(np.array([mean0, mean2]) * 10)
    assert np.allclose(probs[1, :, 0, 0], expected / expected.sum(), atol=1e-4)


def test_interrupted_inference_resumes_to_the_same_map(tmp_path):
    store, _ = _store(tmp_path)
    model = TinyConv()
    windows = window_grid(_all_tiles(600, 700, 128), 128, (600, 700), overlap_px=32)
    kwargs = dict(size_px=128, overlap_px=32, context=(1, 2, 4), level0_hw=(600, 700),
                  out_downsample=2, options=EngineOptions(batch_size=4, workers=0), chunk_px=64)
    infer_to_store(model, store, "full", windows, inputs="x", **kwargs)
    full = np.asarray(store.root["pred/full"])

    class Boom(Exception):
        pass

    calls = []

    def crash(n):
        calls.append(n)
        if len(calls) == 8:
            raise Boom

    with pytest.raises(Boom):
        infer_to_store(model, store, "resumed", windows, inputs="x", progress=crash, **kwargs)
    marks = list(store.progress_dir("infer-resumed").iterdir())
    assert 0 < len(marks) < 5
    stats = infer_to_store(model, store, "resumed", windows, inputs="x", **kwargs)
    assert stats["windows_skipped"] > 0
    assert np.array_equal(np.asarray(store.root["pred/resumed"]), full)
    # other inputs: the old bands are not trusted
    stats = infer_to_store(model, store, "resumed", windows, inputs="y", **kwargs)
    assert stats["windows_skipped"] == 0


def test_dataloader_workers_give_the_same_map(tmp_path):
    store, _ = _store(tmp_path)
    model = TinyConv()
    windows = window_grid(_all_tiles(600, 700, 128), 128, (600, 700), overlap_px=32)
    kwargs = dict(size_px=128, overlap_px=32, context=(1, 2, 4), level0_hw=(600, 700),
                  out_downsample=2, inputs="x")
    infer_to_store(model, store, "a", windows, options=EngineOptions(workers=0), **kwargs)
    infer_to_store(model, store, "b", windows, options=EngineOptions(workers=2), **kwargs)
    assert np.array_equal(np.asarray(store.root["pred/a"]), np.asarray(store.root["pred/b"]))


def test_connected_components_across_bands_match_whole_array_labelling(tmp_path):
    rng = np.random.default_rng(4)
    mask = ndimage.binary_opening(rng.random((700, 300)) > 0.55, iterations=1)
    mask[100:400, 50:60] = True                                 # spans three bands
    arr = zarr.open_array(str(tmp_path / "m.zarr"), mode="w", shape=mask.shape,
                          chunks=(128, 128), dtype="bool")
    arr[...] = mask
    comps = connected_components(arr, lambda band: band)
    labels, n = ndimage.label(mask, structure=np.ones((3, 3)))
    assert len(comps) == n
    rebuilt = np.zeros(mask.shape, int)
    for (y0, x0, y1, x1), m in comps:
        assert not (rebuilt[y0:y1, x0:x1][m]).any()             # no pixel in two components
        rebuilt[y0:y1, x0:x1][m] += 1
    assert np.array_equal(rebuilt > 0, mask)
    sizes = sorted(int(m.sum()) for _, m in comps)
    assert sizes == sorted(np.bincount(labels.ravel())[1:].tolist())


def test_count_regions_counts_every_region_across_bands(tmp_path):
    from wsi_pipeline.labelmaps import count_regions

    a = np.zeros((300, 200), np.uint8)
    a[10:20, 10:20] = 2            # a region
    a[90:130, 50:60] = 2           # one region across the band border at 100 (chunks 100)
    a[200, 150] = 2                # a single pixel is a region too
    a[250:260, 10:190] = 1         # another class
    labels = zarr.create_array(store=str(tmp_path / "l.zarr"), shape=a.shape, dtype="uint8",
                               chunks=(100, 100))
    labels[...] = a
    assert count_regions(labels, 2) == 3 and count_regions(labels, 1) == 1
    assert count_regions(labels, 5) == 0
