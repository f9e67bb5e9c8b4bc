"""Annotation sources: truth.zarr, QuPath GeoJSON and label masks, read onto pixel grids."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr
from conftest import write_generic_tiff
from PIL import Image

from wsi_pipeline.annotations import (
    GeoJsonSource,
    LabelMaskSource,
    TruthZarrSource,
    find_annotations,
)
from wsi_pipeline.errors import UsageError
from wsi_pipeline.tasks import get_task

CLASSES = get_task("fls").model.annotations   # focus <- focus, aggregate, ...
LEGEND = {"0": "background", "1": "stroma", "5": "focus", "6": "Aggregate", "7": "pen"}


def _labels() -> np.ndarray:
    """(30, 40) labels: focus block, aggregate block, pen stripe, on stroma."""
    lab = np.ones((30, 40), np.uint8)
    lab[5:10, 5:15] = 5
    lab[20:25, 30:36] = 6
    lab[:, 38:] = 7
    lab[0, :] = 0
    return lab


def _slide(tmp: Path, name: str = "s", w: int = 512, h: int = 384, mpp: float = 0.5) -> Path:
    rgb = np.full((h, w, 3), 230, np.uint8)
    return write_generic_tiff(tmp / f"{name}.tiff", rgb, mpp=mpp, tile=128, levels=1)


def _truth_zarr(path: Path, labels: np.ndarray, mpp: float) -> Path:
    root = zarr.open_group(str(path), mode="w")
    arr = root.create_array("labels", shape=labels.shape, chunks=(16, 16), dtype="uint8")
    arr[...] = labels
    arr.attrs.update({"mpp": mpp, "legend": LEGEND})
    return path


def test_truth_zarr_crop_nearest_and_validity(tmp_path):
    lab = _labels()
    src = find_annotations(_truth_zarr(tmp_path / "s.truth.zarr", lab, 2.0).parent / "s.svs")
    assert isinstance(src, TruthZarrSource) and src.extent_um == (80.0, 60.0)
    # same grid: an exact copy
    target, valid = src.crop(0.0, 0.0, 40, 30, 2.0, CLASSES)
    assert target.shape == (1, 30, 40) and target.dtype == np.float32 and valid.dtype == bool
    np.testing.assert_array_equal(target[0], np.isin(lab, (5, 6)))
    np.testing.assert_array_equal(valid, lab != 7)
    # 1 um/px, shifted by 3 um: pixel centre (x + 0.5) * 1 + 3 -> label column floor(. / 2)
    target, valid = src.crop(3.0, 3.0, 90, 70, 1.0, CLASSES)
    idx = (np.arange(90) + 3.5) // 2
    rows, cols = idx[:70].astype(int), idx.astype(int)
    inside = (rows < 30)[:, None] & (cols < 40)[None, :]
    expect = np.zeros((70, 90), bool)
    expect[inside] = np.isin(lab[np.ix_(rows[rows < 30], cols[cols < 40])], (5, 6)).ravel()
    np.testing.assert_array_equal(target[0], expect)
    assert not valid[~inside].any()           # outside the slide
    assert valid.sum() == inside.sum() - (lab[np.ix_(rows[rows < 30], cols[cols < 40])] == 7).sum()


def test_truth_zarr_positive_points_and_pickle(tmp_path):
    lab = _labels()
    src = TruthZarrSource(_truth_zarr(tmp_path / "s.truth.zarr", lab, 2.0))
    pts = src.positive_points_um(CLASSES, stride_um=4.0)   # every 2nd label pixel
    assert len(pts) == 3 * 5 + 2 * 3      # odd rows/cols of the 5x10 and 5x6 blocks
    r, c = (pts[:, 1] // 2).astype(int), (pts[:, 0] // 2).astype(int)
    assert np.isin(lab[r, c], (5, 6)).all()
    src.crop(0, 0, 4, 4, 2.0, CLASSES)                      # opens the array, then pickles
    again = pickle.loads(pickle.dumps(src))
    np.testing.assert_array_equal(again.crop(0, 0, 40, 30, 2.0, CLASSES)[0],
                                  src.crop(0, 0, 40, 30, 2.0, CLASSES)[0])
    assert len(src.positive_points_um({"duct": ("duct",)})) == 0


def _feature(kind: str, coords, name: str | None) -> dict:
    props = {"objectType": "annotation"}
    if name is not None:
        props["classification"] = {"name": name, "color": [255, 0, 0]}
    return {"type": "Feature", "geometry": {"type": kind, "coordinates": coords},
            "properties": props}


def _square(x0, y0, x1, y1) -> list:
    return [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]


def test_geojson_rasterises_classes_holes_and_ignore(tmp_path):
    slide = _slide(tmp_path)                               # 512 x 384 px at 0.5 um/px
    features = [
        _feature("Polygon", [_square(100, 40, 140, 80)], "Focus"),
        _feature("Polygon", [_square(200, 200, 260, 260), _square(220, 220, 240, 240)],
                 "lymphocytic AGGREGATE"),
        _feature("MultiPolygon", [[_square(300, 40, 320, 60)], [_square(400, 40, 410, 50)]],
                 "focus"),
        _feature("Polygon", [_square(0, 300, 50, 350)], "Ignore*"),
        _feature("Polygon", [_square(300, 300, 350, 350)], "Tumor"),
        _feature("Polygon", [_square(60, 300, 90, 350)], None),
        _feature("Point", [10, 10], "Focus"),
    ]
    (tmp_path / "s.geojson").write_text(json.dumps({"type": "FeatureCollection",
                                                    "features": features}))
    src = find_annotations(slide)
    assert isinstance(src, GeoJsonSource) and src.skipped == 1
    assert src.class_names() == ["focus", "ignore*", "lymphocytic aggregate", "tumor"]
    # the whole slide at its own resolution (plus 40 px beyond its right edge)
    target, valid = src.crop(0.0, 0.0, 552, 384, 0.5, CLASSES)
    expect = np.zeros((384, 552), bool)
    expect[40:80, 100:140] = True
    expect[200:260, 200:260] = True
    expect[220:240, 220:240] = False                       # the hole
    expect[40:60, 300:320] = True
    expect[40:50, 400:410] = True
    np.testing.assert_array_equal(target[0].astype(bool), expect)
    ignored = np.zeros((384, 552), bool)
    ignored[300:350, 0:50] = True
    ignored[:, 512:] = True                                # beyond the slide
    np.testing.assert_array_equal(valid, ~ignored)
    # 1 um/px from x = 45 um, y = 15 um: the focus square spans 50-70 um, 20-40 um
    target, _ = src.crop(45.0, 15.0, 30, 30, 1.0, CLASSES)
    expect = np.zeros((30, 30), bool)
    expect[5:25, 5:25] = True
    np.testing.assert_array_equal(target[0].astype(bool), expect)


def test_geojson_positive_points(tmp_path):
    slide = _slide(tmp_path)
    features = [_feature("Polygon", [_square(200, 200, 264, 264), _square(216, 216, 248, 248)],
                         "aggregate"),
                _feature("Polygon", [_square(10, 10, 12, 12)], "focus"),   # 1 um: tiny
                _feature("Polygon", [_square(300, 300, 364, 364)], "tumor")]
    (tmp_path / "s.geojson").write_text(json.dumps(features))   # a bare list of features
    src = find_annotations(slide)
    pts = src.positive_points_um(CLASSES, stride_um=4.0)
    px = pts / 0.5
    in_ring = ((px >= 200) & (px <= 264)).all(1) & ~((px > 216) & (px < 248)).all(1)
    tiny = ((px >= 10) & (px <= 12)).all(1)
    assert (in_ring | tiny).all() and tiny.sum() >= 1
    assert in_ring.sum() == 8 * 8 - 4 * 4                  # 32 um square, 16 um hole, 4 um grid


def test_label_mask_tiff_png_and_mpp_sources(tmp_path):
    lab = _labels()
    slide = _slide(tmp_path, "a", w=320, h=240)            # 160 x 120 um
    # TIFF with resolution tags (2 um/px); legend file without mpp
    tifffile.imwrite(tmp_path / "a.labels.tif", lab, resolution=(1e4 / 2.0, 1e4 / 2.0),
                     resolutionunit="CENTIMETER", tile=(16, 16))
    (tmp_path / "a.labels.json").write_text(json.dumps(LEGEND))
    src = find_annotations(slide)
    assert isinstance(src, LabelMaskSource) and src.mpp == pytest.approx(2.0)
    target, valid = src.crop(0, 0, 40, 30, 2.0, CLASSES)
    np.testing.assert_array_equal(target[0], np.isin(lab, (5, 6)))
    np.testing.assert_array_equal(valid, lab != 7)
    # PNG, mpp given in the legend file
    slide_b = _slide(tmp_path, "b", w=320, h=240)
    Image.fromarray(lab).save(tmp_path / "b.labels.png")
    (tmp_path / "b.labels.json").write_text(json.dumps({"legend": LEGEND, "mpp": 4.0}))
    src = find_annotations(slide_b)
    assert src.mpp == 4.0 and src.extent_um == (160.0, 120.0)
    target, _ = src.crop(0, 0, 80, 60, 2.0, CLASSES)
    np.testing.assert_array_equal(target[0], np.isin(lab, (5, 6)).repeat(2, 0).repeat(2, 1))
    # PNG, no mpp anywhere: the mask covers the slide (160 um / 40 px = 4 um/px)
    (tmp_path / "b.labels.json").write_text(json.dumps(LEGEND))
    assert find_annotations(slide_b).mpp == pytest.approx(4.0)
    with pytest.raises(UsageError, match="aspect"):
        Image.fromarray(lab[:, :20]).save(tmp_path / "b.labels.png")
        find_annotations(slide_b)
    # a mask without its legend file
    (tmp_path / "b.labels.json").unlink()
    with pytest.raises(UsageError, match="legend"):
        find_annotations(slide_b)


def test_find_annotations_names_what_it_looked_for(tmp_path):
    slide = _slide(tmp_path, "lonely")
    with pytest.raises(UsageError) as err:
        find_annotations(slide)
    message = str(err.value)
    assert "\n" not in message
    for name in ("lonely.truth.zarr", "lonely.geojson", "lonely.labels.tif",
                 "lonely.labels.png"):
        assert name in message


def test_real_synthetic_truth(fls_slide):
    path, truth = fls_slide
    src = find_annotations(path)
    assert isinstance(src, TruthZarrSource)
    foci = [o for o in truth["objects"] if o["type"] in ("focus", "aggregate")]
    assert foci
    for o in foci:                                         # each object's centre is positive
        target, valid = src.crop(o["x_um"] - 4, o["y_um"] - 4, 8, 8, 1.0, CLASSES)
        assert target[0].mean() == 1.0 and valid.all()
    pts = src.positive_points_um(CLASSES)
    centres = np.array([[o["x_um"], o["y_um"]] for o in foci])
    radius = max(max(o["semi_axes_um"]) for o in foci)
    nearest = np.linalg.norm(pts[:, None] - centres[None], axis=2).min(1)
    assert len(pts) > 10 * len(foci) and (nearest <= radius + 16).all()
    # the positive area agrees with the truth's object areas (ellipses; 16 um grid)
    area = len(pts) * 16.0**2
    assert area == pytest.approx(sum(o["area_um2"] for o in foci), rel=0.25)


def test_malformed_annotations_fail_with_one_line(tmp_path):
    from wsi_pipeline.errors import WsiError

    slide = _slide(tmp_path, "m")
    (tmp_path / "m.geojson").write_text('{"type": "FeatureCollection", "features": [')
    with pytest.raises(WsiError, match="unreadable GeoJSON") as err:
        find_annotations(slide)
    assert "\n" not in str(err.value)
    (tmp_path / "m.geojson").write_text(json.dumps({"type": "Topology"}))
    with pytest.raises(WsiError, match="FeatureCollection"):
        find_annotations(slide)
    (tmp_path / "m.truth.zarr").mkdir()                   # takes precedence, but empty
    with pytest.raises(WsiError, match="labels"):
        find_annotations(slide)
