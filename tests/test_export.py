"""Exports: mask.ome.tif (tifffile, openslide, optionally Bio-Formats), GeoJSON, polygons,
overlay PNG, and atomic writes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import openslide
import pytest
import tifffile
import zarr
from PIL import Image

from wsi_pipeline.errors import OutputNotWritable, UsageError
from wsi_pipeline.export import (
    INK_OUTLINE_RGB,
    OKABE_ITO,
    TISSUE_OUTLINE_RGB,
    class_colors,
    mask_contours,
    mode2x2,
    nice_length_um,
    polygons_from_mask,
    read_mask_legend,
    sample_labels,
    write_geojson,
    write_mask_ome_tiff,
    write_overlay,
)

LEGEND = {0: "background", 1: "focus", 2: "gland", 3: "fat"}


def label_map(height: int = 1100, width: int = 900) -> np.ndarray:
    """Rectangles of classes 1-3 on background, one class-3 speck of 1 px, odd features."""
    a = np.zeros((height, width), np.uint8)
    a[100:601, 201:700] = 1
    a[650:1001, 50:403] = 2
    a[301:320, 300:311] = 3
    a[5, 7] = 3
    return a


def zarr_labels(path: Path, a: np.ndarray, chunk: int = 256) -> zarr.Array:
    """A zarr copy of ``a`` whose all-zero chunks stay unwritten (read as fill value 0)."""
    arr = zarr.create_array(store=str(path), shape=a.shape, chunks=(chunk, chunk), dtype="uint8",
                            fill_value=0)
    arr[...] = a
    return arr


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# -- mask.ome.tif ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mask_file(tmp_path_factory) -> tuple[Path, np.ndarray, dict]:
    """The label map at 0.5 um/px written at 0.25 um/px (2x upsampled), 512-px tiles."""
    folder = tmp_path_factory.mktemp("mask")
    a = label_map()
    labels = zarr_labels(folder / "labels.zarr", a)
    assert labels.nchunks_initialized < labels.nchunks  # some chunks are really unwritten
    info = write_mask_ome_tiff(folder / "mask.ome.tif", labels, 0.5, out_mpp=0.25, legend=LEGEND)
    return folder / "mask.ome.tif", a, info


def test_mode2x2_majority_and_ties():
    a = np.array([[1, 2, 3, 3, 5],
                  [2, 2, 3, 4, 5],
                  [6, 1, 7, 7, 6]], np.uint8)
    # block (0,0): 2 wins 3-1; (0,1): 3 wins 2-1-1; the 6-1 tie of the odd last row (padded
    # by repeating it) goes to the top-left pixel; the odd last column repeats itself
    assert mode2x2(a).tolist() == [[2, 3, 5], [6, 7, 6]]
    assert mode2x2(np.array([[4, 3], [2, 1]], np.uint8)).tolist() == [[4]]
    assert mode2x2(np.array([[5, 5], [2, 2]], np.uint8)).tolist() == [[5]]


def test_mask_ome_tiff_reads_back_with_tifffile(mask_file):
    path, a, info = mask_file
    up = a.repeat(2, axis=0).repeat(2, axis=1)
    assert info["shape"] == up.shape == (2200, 1800)
    assert info["levels"] == 4 and info["mpp"] == 0.25
    assert info["bytes"] == path.stat().st_size < up.nbytes // 20  # deflate on flat labels
    with tifffile.TiffFile(path) as tif:
        assert tif.is_ome and len(tif.series) == 1
        levels = tif.series[0].levels
        assert [lv.shape for lv in levels] == [(2200, 1800), (1100, 900), (550, 450), (275, 225)]
        data = [lv.asarray() for lv in levels]
        page = tif.pages[0]
        assert page.is_tiled and (page.tilelength, page.tilewidth) == (512, 512)
        assert page.compression == tifffile.COMPRESSION.ADOBE_DEFLATE
        assert len(page.tags["SubIFDs"].value) == 3
        px_per_cm = page.tags["XResolution"].value
        assert page.tags["ResolutionUnit"].value == tifffile.RESUNIT.CENTIMETER
        assert 1e4 * px_per_cm[1] / px_per_cm[0] == pytest.approx(0.25, rel=1e-9)
        pixels = next(e for e in ET.fromstring(tif.ome_metadata).iter()
                      if e.tag.endswith("Pixels"))
    assert float(pixels.get("PhysicalSizeX")) == float(pixels.get("PhysicalSizeY")) == 0.25
    assert pixels.get("PhysicalSizeXUnit") == "µm"
    np.testing.assert_array_equal(data[0], up)
    np.testing.assert_array_equal(data[1], a)  # the 2x2 majority of an upsampled map is itself
    np.testing.assert_array_equal(data[2], mode2x2(a))
    np.testing.assert_array_equal(data[3], mode2x2(mode2x2(a)))
    assert (data[3] == 3).any()  # a 19 x 11 px object survives 3 halvings; no averaging:
    assert set(np.unique(data[3])) <= set(LEGEND)
    assert read_mask_legend(path) == LEGEND


def test_mask_ome_tiff_opens_in_openslide_with_every_level(mask_file):
    path, a, _ = mask_file
    palette = np.zeros((256, 3), np.uint8)
    palette[0] = 255
    for class_id, rgb in class_colors(LEGEND).items():
        if class_id:
            palette[class_id] = rgb
    assert len({tuple(palette[k]) for k in LEGEND}) == len(LEGEND)   # distinct colours
    with tifffile.TiffFile(path) as tif:
        data = [lv.asarray() for lv in tif.series[0].levels]
    slide = openslide.OpenSlide(str(path))
    try:
        assert slide.level_dimensions == ((1800, 2200), (900, 1100), (450, 550), (225, 275))
        assert float(slide.properties["openslide.mpp-x"]) == pytest.approx(0.25, rel=1e-6)
        assert float(slide.properties["openslide.mpp-y"]) == pytest.approx(0.25, rel=1e-6)
        for level, (x, y, w, h) in [(0, (350, 150, 600, 700)), (1, (0, 0, 900, 1100)),
                                    (3, (0, 0, 225, 275))]:
            scale = 2**level
            rgba = np.asarray(slide.read_region((x * scale, y * scale), level, (w, h)))
            assert (rgba[..., 3] == 255).all()
            # openslide shows each class in its palette colour (background white)
            np.testing.assert_array_equal(rgba[..., :3],
                                          palette[data[level][y:y + h, x:x + w]])
    finally:
        slide.close()


def test_mask_ome_tiff_default_mpp_and_bad_arguments(tmp_path):
    a = label_map(300, 200)
    labels = zarr_labels(tmp_path / "labels.zarr", a, chunk=64)
    info = write_mask_ome_tiff(tmp_path / "m.ome.tif", labels, 0.5, legend=LEGEND, tile_px=128)
    assert info["shape"] == (300, 200) and info["mpp"] == 0.5 and info["levels"] == 3
    with tifffile.TiffFile(tmp_path / "m.ome.tif") as tif:
        np.testing.assert_array_equal(tif.series[0].levels[0].asarray(), a)
        assert [lv.shape for lv in tif.series[0].levels] == [(300, 200), (150, 100), (75, 50)]
    with pytest.raises(UsageError, match="divided by a whole number"):
        write_mask_ome_tiff(tmp_path / "x.ome.tif", labels, 0.5, out_mpp=0.3, legend=LEGEND)
    with pytest.raises(UsageError, match="multiple of 16"):
        write_mask_ome_tiff(tmp_path / "x.ome.tif", labels, 0.5, legend=LEGEND, tile_px=100)
    assert not (tmp_path / "x.ome.tif").exists()


@pytest.mark.skipif(not os.environ.get("BIOFORMATS_JAR") or not shutil.which("java"),
                    reason="set BIOFORMATS_JAR to a bioformats_package.jar to check QuPath's "
                           "reader")
def test_mask_ome_tiff_bioformats_sees_the_pyramid(mask_file):
    path, _, _ = mask_file
    out = subprocess.run(["java", "-Djava.awt.headless=true", "-cp", os.environ["BIOFORMATS_JAR"],
                          "loci.formats.tools.ImageInfo", "-nopix", "-noflat", "-omexml",
                          str(path)], capture_output=True, text=True, timeout=120).stdout
    assert "Series count = 1" in out and "Resolutions = 4" in out
    assert 'PhysicalSizeX="0.25"' in out and '<M K="1">focus</M>' in out


# -- polygons -------------------------------------------------------------------------------


def test_polygon_of_a_square_lies_on_pixel_edges():
    mpp, k = 0.5, 12
    mask = np.zeros((40, 50), bool)
    mask[10:10 + k, 20:20 + k] = True
    (obj,) = polygons_from_mask(mask, mpp, origin_um=(1000.0, 2000.0))
    ring = obj["polygon_um"]
    assert (ring[0] == ring[-1]).all()
    # pixel (r, c) covers [c, c+1) * mpp: the square spans x 20..32 px, y 10..22 px
    assert ring[:, 0].min() == 1000.0 + 20 * mpp and ring[:, 0].max() == 1000.0 + 32 * mpp
    assert ring[:, 1].min() == 2000.0 + 10 * mpp and ring[:, 1].max() == 2000.0 + 22 * mpp
    assert obj["area_um2"] == k * k * mpp**2
    polygon_area = shoelace(ring)
    assert polygon_area > 0 and obj["holes_um"] == []
    # marching squares cuts each corner by 1/8 px^2; well within one pixel of perimeter
    assert polygon_area == pytest.approx((k * k - 0.5) * mpp**2)
    assert abs(polygon_area - obj["area_um2"]) <= 4 * k * mpp**2
    assert obj["centroid_um"] == pytest.approx((1000 + 26 * mpp, 2000 + 16 * mpp))


def test_polygons_holes_islands_and_4_connectivity():
    mpp = 2.0
    mask = np.zeros((60, 60), bool)
    mask[5:35, 5:35] = True
    mask[12:24, 12:26] = False      # a 12 x 14 hole
    mask[16:19, 16:19] = True       # a 3 x 3 island inside the hole
    mask[50, 50] = mask[51, 51] = True  # touching diagonally only: two components
    objects = polygons_from_mask(mask, mpp)
    assert len(objects) == 4
    frame, island = objects[0], objects[1]
    assert frame["area_um2"] == (30 * 30 - 12 * 14) * mpp**2
    assert island["area_um2"] == 9 * mpp**2 and island["holes_um"] == []
    (hole,) = frame["holes_um"]
    assert shoelace(hole) < 0 and (hole[0] == hole[-1]).all()
    assert hole[:, 0].min() == 12 * mpp and hole[:, 0].max() == 26 * mpp
    polygon_area = shoelace(frame["polygon_um"]) + shoelace(hole)
    perimeter_px = 4 * 30 + 2 * (12 + 14)
    assert abs(polygon_area - frame["area_um2"]) <= perimeter_px * mpp**2
    assert [o["area_um2"] for o in objects[2:]] == [mpp**2, mpp**2]


def test_simplification_reduces_vertices_within_tolerance():
    mpp = 0.5
    yy, xx = np.mgrid[:200, :200]
    disc = (yy - 100) ** 2 + (xx - 100) ** 2 < 80**2
    (full,) = polygons_from_mask(disc, mpp)
    (simple,) = polygons_from_mask(disc, mpp, simplify_um=1.0)
    assert len(simple["polygon_um"]) < len(full["polygon_um"]) / 4
    assert simple["area_um2"] == full["area_um2"] == disc.sum() * mpp**2
    # Douglas-Peucker: every point of the full ring within 1 um of the simplified one
    assert distance_to_ring(full["polygon_um"], simple["polygon_um"]).max() <= 1.0 + 1e-9
    perimeter_um = 2 * np.pi * 80 * mpp
    assert abs(shoelace(simple["polygon_um"]) - shoelace(full["polygon_um"])) <= perimeter_um


def distance_to_ring(points: np.ndarray, ring: np.ndarray) -> np.ndarray:
    """Distance of each (x, y) point to the closed polyline ``ring``."""
    a, b = ring[:-1][None], ring[1:][None]
    p = points[:, None]
    t = np.clip(((p - a) * (b - a)).sum(-1) / ((b - a) ** 2).sum(-1), 0, 1)
    return np.linalg.norm(a + t[..., None] * (b - a) - p, axis=-1).min(axis=1)


def shoelace(ring: np.ndarray) -> float:
    x, y = ring[:, 0], ring[:, 1]
    return 0.5 * float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))


# -- GeoJSON --------------------------------------------------------------------------------


def test_geojson_qupath_layout_and_round_trip(tmp_path):
    slide_mpp = 0.25
    mask = np.zeros((80, 80), bool)
    mask[10:50, 10:50] = True
    mask[20:30, 20:30] = False
    (focus,) = polygons_from_mask(mask, 0.5, origin_um=(123.4, 567.8))
    objects = [
        {"polygon_um": focus["polygon_um"], "holes_um": focus["holes_um"], "name": "Focus",
         "color": (213, 94, 0), "measurements": {"area_um2": focus["area_um2"],
                                                 "lymphocyte_count": np.int64(57),
                                                 "score": float("nan")},
         "id": "focus-1", "properties": {"source": "test", "objectType": "ignored"}},
        {"polygon_um": [(0, 0), (1e-3, 0), (0, 1e-3)], "name": "Focus", "color": (1, 2, 3)},
        {"point_um": (10.0, 20.0), "name": "Lymphocyte", "color": (0, 114, 178)},
    ]
    with pytest.warns(UserWarning, match="1 degenerate polygon"):
        n = write_geojson(tmp_path / "objects.geojson", objects, slide_mpp=slide_mpp)
    assert n == 2
    doc = json.loads((tmp_path / "objects.geojson").read_text())
    assert doc["type"] == "FeatureCollection" and len(doc["features"]) == 2
    poly, point = doc["features"]
    assert poly["type"] == "Feature" and poly["id"] == "focus-1"
    props = poly["properties"]
    assert props["objectType"] == "annotation" and props["isLocked"] is False
    assert props["classification"] == {"name": "Focus", "color": [213, 94, 0]}
    assert props["measurements"] == {"area_um2": focus["area_um2"], "lymphocyte_count": 57,
                                     "score": None}
    assert props["source"] == "test"
    geometry = poly["geometry"]
    assert geometry["type"] == "Polygon" and len(geometry["coordinates"]) == 2
    for ring_px, ring_um in zip(geometry["coordinates"],
                                [focus["polygon_um"], *focus["holes_um"]], strict=True):
        ring_px = np.array(ring_px)
        assert (ring_px[0] == ring_px[-1]).all()
        np.testing.assert_array_equal(ring_px, np.round(ring_px, 2))
        # um -> level-0 px -> um within the 0.005 px rounding
        np.testing.assert_allclose(ring_px * slide_mpp, ring_um, atol=0.005 * slide_mpp + 1e-9)
    x_px = np.array(geometry["coordinates"][0])[:, 0]
    assert x_px.min() == pytest.approx((123.4 + 10 * 0.5) / slide_mpp)
    assert point["geometry"] == {"type": "Point", "coordinates": [40.0, 80.0]}
    assert point["properties"]["objectType"] == "detection"
    assert point["properties"]["classification"]["name"] == "Lymphocyte"
    assert point["id"] != poly["id"] and len(point["id"]) == 36  # a uuid
    try:
        from shapely.geometry import shape
    except ImportError:  # optional: only where shapely happens to be installed
        return
    polygon = shape(geometry)
    assert polygon.is_valid
    assert polygon.area * slide_mpp**2 == pytest.approx(focus["area_um2"], rel=0.02)


def test_geojson_refuses_bad_objects_and_leaves_nothing(tmp_path):
    good = {"polygon_um": [(0, 0), (10, 0), (10, 10)], "name": "Focus", "color": (1, 2, 3)}
    bad = {**good, "measurements": {"count": "many"}}
    with pytest.raises(UsageError, match="measurement 'count' is not a number"):
        write_geojson(tmp_path / "objects.geojson", [good] * 5 + [bad], slide_mpp=0.5)
    with pytest.raises(UsageError, match="object_type"):
        write_geojson(tmp_path / "objects.geojson", [{**good, "object_type": "cell"}],
                      slide_mpp=0.5)
    assert leftovers(tmp_path) == []
    assert write_geojson(tmp_path / "empty.geojson", [], slide_mpp=0.5) == 0
    assert json.loads((tmp_path / "empty.geojson").read_text())["features"] == []


# -- overlay --------------------------------------------------------------------------------


def test_overlay_tints_labels_draws_outline_and_polygons(tmp_path):
    thumb_mpp, label_mpp = 8.0, 0.5  # 16 label px per thumbnail px
    thumb = np.full((60, 80, 3), 200, np.uint8)
    a = np.zeros((60 * 16, 80 * 16), np.uint8)
    a[160:480, 320:640] = 1            # thumbnail rows 10..29, cols 20..39
    a[640:800, 960:1120] = 7           # a class without a given colour: palette default
    labels = zarr_labels(tmp_path / "labels.zarr", a, chunk=128)
    tissue = np.zeros((60, 80), bool)
    tissue[2:58, 2:78] = True
    square_um = np.array([(50, 3), (70, 3), (70, 8), (50, 8)], float) * thumb_mpp
    out = tmp_path / "overlay.png"
    write_overlay(out, thumb, thumb_mpp, labels=labels, label_mpp=label_mpp,
                  colors={1: (255, 0, 0)}, alpha=0.5, tissue_outline=tissue,
                  polygons_um=[(square_um, (0, 0, 255))])
    png = np.asarray(Image.open(out))
    assert png.shape == (60, 80, 3)
    red = np.broadcast_to([228, 100, 100], (20, 20, 3))  # round(0.5 * grey + 0.5 * red)
    np.testing.assert_array_equal(png[10:30, 20:40], red)
    # class 7 is not among the given colours: it stays as the thumbnail
    np.testing.assert_array_equal(png[40:50, 60:70], np.full((10, 10, 3), 200))
    np.testing.assert_array_equal(png[35, 10], [200, 200, 200])  # class 0 stays transparent
    assert (png[2, 30] == TISSUE_OUTLINE_RGB).all() and (png[57, 30] == TISSUE_OUTLINE_RGB).all()
    blue = (0, 0, 255)
    # 2 px along each edge (x = 50, 70 px; y = 3, 8 px), within a pixel of it
    for edge in (png[5, 49:52], png[5, 69:72], png[2:5, 60], png[7:10, 60]):
        assert (edge == blue).all(axis=1).sum() == 2
    assert (png[5, 48] == 200).all() and (png[5, 52:68] == 200).all()  # outline only
    assert [p.name for p in tmp_path.iterdir() if p.name != "labels.zarr"] == ["overlay.png"]


def test_overlay_key_title_legend_and_scale_bar(tmp_path):
    thumb = np.full((120, 400, 3), 230, np.uint8)
    tissue = np.zeros((120, 400), bool)
    tissue[20:100, 30:200] = True
    ink = np.zeros((120, 400), bool)
    ink[40:60, 300:380] = True
    out = tmp_path / "overlay.png"
    write_overlay(out, thumb, 10.0, tissue_outline=tissue, ink_outline=ink,
                  title="slide-1 | fls | positive",
                  legend=[("focus", (230, 159, 0)), ("tissue outline", TISSUE_OUTLINE_RGB)],
                  scale_bar=True)
    png = np.asarray(Image.open(out).convert("RGB"))
    assert png.shape[1] == 400 and png.shape[0] > 120 + 40   # a key band below the image
    key = png[120:]
    assert (np.abs(key.astype(int) - (230, 159, 0)).sum(-1) == 0).sum() >= 100  # a swatch
    # the scale bar: 400 px x 10 um = 4 mm wide image -> 1/5 of it rounds down to 0.5 mm
    assert nice_length_um(4000 / 5) == 500 and nice_length_um(7.3) == 5
    dark = (key.sum(-1) == 0).sum(0)
    assert (dark > 0).sum() >= 50 - 2   # 500 um = 50 px of black bar (plus text)
    image = png[:120]
    assert (image[20:100, 30:200] == TISSUE_OUTLINE_RGB).all(-1).sum() > 200
    assert (image == INK_OUTLINE_RGB).all(-1).sum() > 100
    assert (image[60, 60:170] == 230).all()    # outlines only, the inside untouched


def test_mask_contours_follow_the_shape_not_the_pixels():
    yy, xx = np.mgrid[:80, :80]
    disk = (yy - 40) ** 2 + (xx - 40) ** 2 <= 30 ** 2
    (ring,) = mask_contours(disk)
    radius = np.hypot(ring[:, 0] - 40.5, ring[:, 1] - 40.5)   # pixel-edge coordinates
    assert np.abs(radius - 30.5).max() < 1.0   # on the circle, not a pixel staircase
    steps = np.diff(ring, axis=0)
    assert np.abs(steps).max() <= 1.0 and not np.all(np.isin(steps, (-1.0, 0.0, 1.0)))


def test_sample_labels_reads_only_chunks_holding_sample_centres(tmp_path):
    a = np.arange(64 * 64, dtype=np.uint32).reshape(64, 64) % 251
    labels = zarr_labels(tmp_path / "labels.zarr", a.astype(np.uint8), chunk=8)
    # thumbnail pixel centres fall on label rows/cols 8, 24, 40, 56: chunk 0 is never needed
    (tmp_path / "labels.zarr" / "c" / "0" / "0").write_bytes(b"not a chunk")
    grid = sample_labels(labels, 0.5, (4, 4), 8.0)
    np.testing.assert_array_equal(grid, a[8::16, 8::16])
    with pytest.raises(Exception):  # noqa: B017 - the corrupt chunk is real and unreadable
        sample_labels(labels, 0.5, (64, 64), 0.5)


def test_class_colors_fixed_distinct_and_stable():
    legend = {i: f"c{i}" for i in range(12)}
    colours = class_colors(legend)
    assert colours[0] == OKABE_ITO[0] and colours[1] == (213, 94, 0)
    assert len(set(colours.values())) == 12
    assert class_colors({5: "other name"})[5] == colours[5]
    assert all(len(c) == 3 and all(0 <= v <= 255 for v in c) for c in colours.values())


# -- atomic writes --------------------------------------------------------------------------


def test_unwritable_folder_raises_and_leaves_nothing(tmp_path):
    a = label_map(300, 200)
    labels = zarr_labels(tmp_path / "labels.zarr", a, chunk=64)
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    with pytest.raises(OutputNotWritable):
        write_mask_ome_tiff(blocker / "mask.ome.tif", labels, 0.5, legend=LEGEND)
    with pytest.raises(OutputNotWritable):
        write_geojson(blocker / "objects.geojson", [], slide_mpp=0.5)
    with pytest.raises(OutputNotWritable):
        write_overlay(blocker / "overlay.png", np.zeros((4, 4, 3), np.uint8), 8.0)
    assert leftovers(tmp_path) == ["labels.zarr", "not-a-folder"]


def test_failure_mid_mask_write_leaves_no_partial_file(tmp_path):
    a = label_map(1100, 900)
    labels = zarr_labels(tmp_path / "labels.zarr", a, chunk=256)
    (tmp_path / "labels.zarr" / "c" / "2" / "1").write_bytes(b"truncated chunk")
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(Exception):  # noqa: B017 - whatever zarr raises on a corrupt chunk
        write_mask_ome_tiff(out / "mask.ome.tif", labels, 0.5, legend=LEGEND)
    assert leftovers(out) == []  # neither the final name, the temp file nor the level store
