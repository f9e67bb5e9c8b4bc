"""Synthetic glomerular-dx cases: folder layout, OM slide, IF and TEM patterns by class."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy.ndimage import gaussian_filter

from wsi_pipeline.errors import OutputNotWritable, UsageError
from wsi_pipeline.synth import cases as C

OM_SIZE = (2048, 1536)  # 1 x 0.77 mm at 0.5 um/px: small, still >= 3 glomeruli
NOT_WEAK = {"om": False, "im": False, "tem": False}
DARK = 60  # deposits are near black; GBM and nuclei stay above ~75 after a 1.5 px blur


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> tuple[Path, list[dict]]:
    folder = tmp_path_factory.mktemp("cohort")
    truths = C.write_case_cohort(folder, 3, seed=1, om_size_px=OM_SIZE, weak=NOT_WEAK)
    return folder, truths


def _by_label(cohort, label: str) -> tuple[Path, dict]:
    folder, truths = cohort
    t = next(t for t in truths if t["diagnosis"]["label"] == label)
    return folder / t["case"], t


# ----------------------------------------------------------------------------- case folders


def test_cohort_layout_and_csv(cohort):
    folder, truths = cohort
    assert sorted(t["diagnosis"]["label"] for t in truths) == ["IgAN", "LN", "MN"]
    rows = list(csv.DictReader(open(folder / "cases.csv")))
    assert [(r["case_id"], r["diagnosis"]) for r in rows] == [
        (t["case"], t["diagnosis"]["label"]) for t in truths]
    assert [r["case_id"] for r in rows] == ["case_001", "case_002", "case_003"]
    for t in truths:
        case = folder / t["case"]
        assert sorted(p.name for p in case.iterdir()) == ["im", "om", "tem", "truth.json"]
        assert json.loads((case / "truth.json").read_text()) == t
        assert (case / "om" / f"{t['case']}.svs").is_file()
        assert (case / "om" / f"{t['case']}.truth.json").is_file()
        assert (case / "om" / f"{t['case']}.truth.zarr").is_dir()
        assert [p.name for p in (case / "im").iterdir()] == ["if.png"]
        assert t["task"] == "glomerular-dx" and t["weak"] == NOT_WEAK
        assert t["scores"] == {f"p_{c}": float(c == t["diagnosis"]["label"])
                               for c in C.CLASSES}


def test_tem_bags_sizes_formats_and_files(cohort):
    folder, truths = cohort
    formats = set()
    for t in truths:
        bag = t["modalities"]["tem"]["images"]
        files = sorted((folder / t["case"] / "tem").iterdir())
        assert [f"tem/{f.name}" for f in files] == [b["path"] for b in bag]
        assert 3 <= len(bag) <= 15 and t["counts"]["tem_images"] == len(bag)
        assert 1 <= t["counts"]["tem_informative"] == sum(b["informative"] for b in bag)
        for b in bag:
            formats.add(b["format"])
            img = np.asarray(Image.open(folder / t["case"] / b["path"]))
            assert img.dtype == np.uint8 and img.shape == tuple(b["shape_px"])
            assert all(384 <= v <= 768 for v in img.shape)
    assert formats == {"png", "tif", "jpg"}


def test_tem_plans_and_weak_draws_over_many_seeds():
    sizes, uninf, shapes = [], [], set()
    weak = np.zeros(3)
    labels = []
    for seed in range(400):
        plan = C._tem_plan(seed)
        sizes.append(len(plan))
        uninf.append(sum(not p["informative"] for p in plan))
        assert any(p["informative"] for p in plan)
        shapes.update(p["shape"][0] == p["shape"][1] for p in plan)
        label, flags = C._case_plan(seed, None, None)
        labels.append(label)
        weak += [flags["om"], flags["im"], flags["tem"]]
    assert min(sizes) == 3 and max(sizes) == 15
    assert 0.1 < sum(uninf) / sum(sizes) < 0.35  # TEM_UNINFORMATIVE 0.15-0.4, rounded
    assert False in shapes  # not always square
    assert np.all((weak / 400 > 0.14) & (weak / 400 < 0.26))  # WEAK_PROBABILITY 0.2
    assert all(90 < labels.count(c) < 180 for c in C.CLASSES)
    assert C._case_plan(7, "MN", {"im": True})[0] == "MN"
    assert C._case_plan(7, "MN", {"im": True})[1]["im"] is True


def test_same_seed_same_files(cohort, tmp_path):
    folder, truths = cohort
    t = truths[0]
    again = tmp_path / t["case"]  # same case name: the SVS label image carries it
    t2 = C.write_case(again, t["diagnosis"]["label"], t["generator"]["seed"], OM_SIZE,
                      weak=NOT_WEAK)
    assert t2 == t
    a = sorted(p.relative_to(folder / t["case"]) for p in (folder / t["case"]).rglob("*")
               if p.is_file())
    b = sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    assert a == b
    for rel in a:
        assert (folder / t["case"] / rel).read_bytes() == (again / rel).read_bytes(), rel
    other = C._tem_render(np.random.default_rng(1), "MN", True, (400, 420))[0]
    assert not np.array_equal(other, C._tem_render(np.random.default_rng(2), "MN", True,
                                                   (400, 420))[0])


def test_bad_inputs_give_clear_errors(tmp_path):
    with pytest.raises(UsageError, match="IgAN"):
        C.write_case(tmp_path / "c", label="FSGS")
    with pytest.raises(UsageError, match="too small"):
        C.write_case(tmp_path / "c", om_size_px=(100, 100))
    with pytest.raises(UsageError, match="weak"):
        C.write_case(tmp_path / "c", weak={"xray": True})
    with pytest.raises(UsageError):
        C.write_case_cohort(tmp_path / "k", 0)
    with pytest.raises(UsageError):
        C.if_image(np.random.default_rng(0), "M1")
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputNotWritable):
        C.write_case(tmp_path / "file" / "case", label="MN", om_size_px=(512, 512))


# ----------------------------------------------------------------------------- OM slide


def test_om_slide_is_aperio_with_glomeruli(cohort):
    import openslide
    import zarr

    case, t = _by_label(cohort, "IgAN")
    slide = openslide.OpenSlide(str(case / "om" / f"{t['case']}.svs"))
    assert slide.properties["openslide.vendor"] == "aperio"
    assert float(slide.properties["openslide.mpp-x"]) == pytest.approx(0.5)
    assert slide.dimensions == OM_SIZE
    om = json.loads((case / "om" / f"{t['case']}.truth.json").read_text())
    assert om["diagnosis"]["label"] == "IgAN" and om["generator"]["mpp"] == 0.5
    n = om["counts"]["glomeruli"]
    assert n >= 3 and len(om["objects"]) == n == t["counts"]["glomeruli"] == len(t["objects"])
    labels = zarr.open_group(str(case / "om" / f"{t['case']}.truth.zarr"), mode="r")["labels"]
    found = set(np.unique(labels[:]).tolist())
    assert {1, 3, 4} <= found  # cortex, normal and hypercellular glomeruli
    assert om["scores"]["hypercellular_fraction"] > 0.5  # IgAN: most glomeruli


def _wall_fraction(slide_path: Path, objects: list[dict]) -> float:
    """Mean fraction of PAS-bright magenta pixels inside the tufts (rho < 0.75)."""
    import openslide

    slide = openslide.OpenSlide(str(slide_path))
    fr = []
    for o in objects:
        r_px = o["diameter_um"] / 2 / 0.5
        x0, y0 = int(o["x_um"] / 0.5 - r_px), int(o["y_um"] / 0.5 - r_px)
        size = int(2 * r_px)
        rgb = np.asarray(slide.read_region((x0, y0), 0, (size, size)).convert("RGB"), float)
        yy, xx = np.mgrid[0:size, 0:size]
        rho = np.hypot(xx + x0 + 0.5 - o["x_um"] / 0.5, yy + y0 + 0.5 - o["y_um"] / 0.5) / r_px
        wall = (rgb[..., 0] - rgb[..., 1] > 110) & (rgb[..., 0] > 150)
        fr.append(wall[rho < 0.75].mean())
    return float(np.mean(fr))


def test_om_mn_walls_thicker_than_igan(cohort):
    fractions = {}
    for label in ("IgAN", "MN", "LN"):
        case, t = _by_label(cohort, label)
        fractions[label] = _wall_fraction(case / "om" / f"{t['case']}.svs", t["objects"])
        factors = [o["gbm_thickness_factor"] for o in t["objects"]]
        assert (min(factors) > 1.8) == (label != "IgAN"), (label, factors)
    assert fractions["MN"] > 2 * fractions["IgAN"], fractions
    assert fractions["LN"] > 1.5 * fractions["IgAN"], fractions
    _, mn = _by_label(cohort, "MN")
    assert mn["modalities"]["om"]["hypercellular_fraction"] < 0.5


# ----------------------------------------------------------------------------- IF image


def _if_stats(img: np.ndarray, rho: np.ndarray) -> tuple[float, float]:
    """(central / peripheral mean green, mean green of the tuft)."""
    g = img[..., 1].astype(float)
    return g[rho < 0.45].mean() / g[(rho > 0.6) & (rho < 0.98)].mean(), g[rho < 1].mean()


def test_if_pattern_follows_class():
    for seed in range(3):
        stats = {}
        for label in C.CLASSES:
            img, geom = C._if_render(np.random.default_rng([seed, 1]), label, False)
            assert img.shape == (512, 512, 3) and img.dtype == np.uint8
            assert img[..., 1].mean() > 2 * img[..., 0].mean()  # green fluorescence
            assert img[geom["rho"] > 1.4, 1].mean() < 15  # dark background
            stats[label] = _if_stats(img, geom["rho"])
        assert stats["IgAN"][0] > 1.5, stats  # mesangial: central stalks
        assert stats["MN"][0] < 0.8, stats  # capillary walls: periphery of the lobules
        assert stats["LN"][1] > 1.25 * max(stats["IgAN"][1], stats["MN"][1]), stats


def test_if_file_in_case_matches_truth_geometry(cohort):
    ratios = {}
    for label in ("IgAN", "MN"):
        case, t = _by_label(cohort, label)
        img = np.asarray(Image.open(case / "im" / "if.png"))
        im = t["modalities"]["im"]
        yy, xx = np.mgrid[0:512, 0:512]
        cx, cy = im["tuft_centre_px"]
        rho = np.hypot(xx + 0.5 - cx, yy + 0.5 - cy) / im["tuft_radius_px"]
        ratios[label] = _if_stats(img, rho)[0]
    assert ratios["IgAN"] > 1.5 > 0.8 > ratios["MN"], ratios


def test_weak_if_is_dimmer_and_public_renderer_matches():
    for label in C.CLASSES:
        strong = [C._if_render(np.random.default_rng([s, 1]), label, False)
                  for s in range(2)]
        weak = [C._if_render(np.random.default_rng([s, 1]), label, True) for s in range(2)]
        assert np.mean([_if_stats(i, g["rho"])[1] for i, g in weak]) < np.mean(
            [_if_stats(i, g["rho"])[1] for i, g in strong])
    a = C.if_image(np.random.default_rng(5), "LN")
    assert np.array_equal(a, C._if_render(np.random.default_rng(5), "LN", False)[0])


# ----------------------------------------------------------------------------- TEM images


def _zones(img: np.ndarray, geom: dict) -> dict[str, int]:
    """Dark (deposit) pixels by place relative to the GBM band and the mesangium."""
    dark = gaussian_filter(img.astype(float), 1.5) < DARK
    d, ht, mes = geom["d_px"], geom["gbm_half_px"], geom["mesangium"]
    return {"dark": int(dark.sum()),
            "mesangial": int((dark & mes).sum()),
            "subepithelial": int((dark & (d > ht - 4) & (d < ht + 45)).sum()),
            "subendothelial": int((dark & (d < -ht + 4) & (d > -ht - 40) & ~mes).sum())}


def test_tem_deposits_where_the_class_puts_them():
    totals = {}
    for label in C.CLASSES:
        tot = dict.fromkeys(("dark", "mesangial", "subepithelial", "subendothelial"), 0)
        for seed in range(3):
            img, geom = C._tem_render(np.random.default_rng([seed, 2]), label, True, (400, 520))
            assert img.shape == (400, 520) and img.dtype == np.uint8
            z = _zones(img, geom)
            assert z["dark"] > 300, (label, seed, z)  # every informative image shows some
            for k in tot:
                tot[k] += z[k]
        totals[label] = tot
    ig, mn, ln = totals["IgAN"], totals["MN"], totals["LN"]
    assert ig["mesangial"] > 0.9 * ig["dark"] and ig["subepithelial"] < 0.05 * ig["dark"]
    assert mn["subepithelial"] > 0.9 * mn["dark"] and mn["mesangial"] == 0
    assert mn["subendothelial"] < 0.05 * mn["dark"]
    for site in ("mesangial", "subepithelial", "subendothelial"):
        assert ln[site] > 0.1 * ln["dark"], ln  # several sites


def test_tem_mn_gbm_spikes_and_thicker_band():
    img, geom = C._tem_render(np.random.default_rng([0, 2]), "MN", True, (400, 520))
    assert geom["deposits"]["subepithelial"] >= 2
    assert 300 * 1.1 < geom["gbm_thickness_nm"] < 500 * 1.4 + 1
    ig = C._tem_render(np.random.default_rng([0, 2]), "IgAN", True, (400, 520))[1]
    assert 300 <= ig["gbm_thickness_nm"] <= 500


def test_uninformative_and_weak_tem():
    kinds = set()
    for seed in range(6):
        img, geom = C._tem_render(np.random.default_rng([seed, 3]), "LN", False, (384, 448))
        kinds.add(geom["kind"])
        dark = gaussian_filter(img.astype(float), 1.5) < DARK
        assert not dark.any() and not geom["deposit"].any(), geom["kind"]
    assert kinds == {"tubule", "out_of_focus"}
    strong = sum(C._tem_render(np.random.default_rng([s, 4]), "MN", True, (384, 448))[1]
                 ["deposit"].sum() for s in range(3))
    weak = sum(C._tem_render(np.random.default_rng([s, 4]), "MN", True, (384, 448), True)[1]
               ["deposit"].sum() for s in range(3))
    assert weak < 0.5 * strong
    a = C.tem_image(np.random.default_rng(9), "IgAN", True, (384, 500))
    assert np.array_equal(a, C._tem_render(np.random.default_rng(9), "IgAN", True,
                                           (384, 500))[0])


def test_tem_files_in_case_show_deposits_only_when_informative(cohort):
    case, t = _by_label(cohort, "MN")
    for b in t["modalities"]["tem"]["images"]:
        img = np.asarray(Image.open(case / b["path"])).astype(float)
        dark = int((gaussian_filter(img, 1.5) < DARK).sum())
        if b["informative"]:
            assert b["deposits"]["subepithelial"] > 0 and dark > 100, b
        else:
            assert dark == 0 and sum(b["deposits"].values()) == 0, b
