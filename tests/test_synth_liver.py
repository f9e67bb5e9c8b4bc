"""Synthetic H&E liver slides (`wsi-synth --task liver`) and liver cohorts (small slides)."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import tifffile
import zarr

from wsi_pipeline.errors import UsageError
from wsi_pipeline.stain import rgb_to_od
from wsi_pipeline.synth import liver, truth_paths, write_slide
from wsi_pipeline.synth.cli import main as synth_main

openslide = pytest.importorskip("openslide")

W, H = 2048, 1536  # 1 x 0.77 mm at 0.5 um/px
LIVER, HCC, CCA = 1, 2, 3


@pytest.fixture(scope="module")
def slides(tmp_path_factory):
    """One HCC and one CCA slide: {label: (path, truth)}."""
    folder = tmp_path_factory.mktemp("liver")
    out = {}
    for label, seed in (("HCC", 5), ("CCA", 6)):
        path = folder / f"{label.lower()}.svs"
        out[label] = path, write_slide("liver", path, width=W, height=H, seed=seed,
                                       label=label)
    return out


def _labels(path) -> np.ndarray:
    return zarr.open_group(str(truth_paths(path)[1]), mode="r")["labels"]


@pytest.mark.parametrize("label", ["HCC", "CCA"])
def test_opens_as_aperio_with_mpp(slides, label):
    path, truth = slides[label]
    s = openslide.OpenSlide(str(path))
    assert s.properties["openslide.vendor"] == "aperio"
    assert float(s.properties["openslide.mpp-x"]) == 0.5 == truth["generator"]["mpp"]
    assert s.dimensions == (W, H)
    rgb = np.asarray(s.read_region((0, 0), 1, s.level_dimensions[1]).convert("RGB"))
    assert rgb.std() > 15  # tissue and glass, not a blank level


@pytest.mark.parametrize("label", ["HCC", "CCA"])
def test_label_mask_areas_agree_with_truth(slides, label):
    path, truth = slides[label]
    arr = _labels(path)
    assert arr.attrs["mpp"] == 0.5
    assert arr.attrs["legend"] == {"0": "background", "1": "non_tumour", "2": "hcc",
                                   "3": "cca", "7": "pen"}
    counts = np.bincount(np.asarray(arr[:]).ravel(), minlength=8)
    mm2 = counts * 0.5 * 0.5 / 1e6
    areas = truth["areas_mm2"]
    assert areas["non_tumour"] == pytest.approx(mm2[LIVER], abs=1e-5)
    assert areas["hcc"] == pytest.approx(mm2[HCC], abs=1e-5)
    assert areas["cca"] == pytest.approx(mm2[CCA], abs=1e-5)
    assert areas["tissue"] == pytest.approx(mm2[1:4].sum(), abs=1e-4)
    assert truth["diagnosis"]["label"] == label and truth["task"] == "liver"
    # one tumour type per slide, r = A_HCC / (A_HCC + A_CCA)
    own, other = (HCC, CCA) if label == "HCC" else (CCA, HCC)
    assert counts[own] > 0 and counts[other] == 0 and counts[LIVER] > 0
    assert truth["scores"]["hcc_fraction"] == (1.0 if label == "HCC" else 0.0)
    # the tumour covers the drawn share of the tissue (0.2-0.6)
    frac = truth["scores"]["tumour_fraction"]
    assert frac == pytest.approx(counts[own] / counts[1:4].sum(), abs=1e-4)
    assert frac == pytest.approx(truth["generator"]["options"]["tumour_fraction_target"],
                                 abs=0.03)
    assert 0.17 <= frac <= 0.63


def _region_stats(path, truth) -> dict:
    """Per-class stats at 1 um/px (2 x 2 means of level 0), away from region borders:
    nuclear area fraction (haematoxylin > 0.8), mean eosin, median cytoplasm RGB."""
    from scipy.ndimage import binary_erosion

    rgb = np.asarray(openslide.OpenSlide(str(path)).read_region((0, 0), 0, (W, H))
                     .convert("RGB"))
    rgb = rgb.reshape(H // 2, 2, W // 2, 2, 3).mean((1, 3)).astype(np.uint8)
    lab = np.asarray(_labels(path)[:])[::2, ::2]
    g = truth["generator"]
    stains = np.array(g["stain_matrix"]) * np.array(g["stain_intensity"])[:, None]
    od = rgb_to_od(rgb) - np.array(g["glass_od"], np.float32)
    conc = od @ np.linalg.pinv(stains)  # (h, w, 2): haematoxylin, eosin
    out = {}
    for value in (LIVER, HCC, CCA):
        m = binary_erosion(lab == value, iterations=25)
        if m.sum() < 20000:
            continue
        h, e = conc[..., 0][m], conc[..., 1][m]
        cyto = rgb[m][(h < 0.5) & (e > 0.4)]
        out[value] = {"nuclear": float((h > 0.8).mean()), "eosin": float(e.mean()),
                      "cytoplasm": np.median(cyto, axis=0)}
    return out


def test_texture_at_1um_separates_liver_hcc_cca(slides):
    hcc = _region_stats(*slides["HCC"])
    cca = _region_stats(*slides["CCA"])
    assert {LIVER, HCC} <= set(hcc) and {LIVER, CCA} <= set(cca)
    # measured on these seeds: liver ~0.045, HCC ~0.085, CCA ~0.06 nuclear area fraction;
    # eosin ~0.65 (liver, HCC) vs ~0.33 (pale desmoplastic CCA stroma)
    assert hcc[HCC]["nuclear"] > 1.5 * hcc[LIVER]["nuclear"]
    assert hcc[HCC]["nuclear"] > 1.5 * cca[LIVER]["nuclear"]
    assert cca[CCA]["eosin"] < 0.7 * min(cca[LIVER]["eosin"], hcc[HCC]["eosin"])
    assert cca[CCA]["nuclear"] < 0.8 * hcc[HCC]["nuclear"]
    # HCC is not told from liver by colour: their cytoplasm has the same median colour
    diff = np.abs(hcc[HCC]["cytoplasm"] - hcc[LIVER]["cytoplasm"])
    assert diff.max() <= 12, diff


def test_same_seed_same_pixels(tmp_path):
    kw = dict(width=768, height=768, seed=9, label="CCA")
    t1 = write_slide("liver", tmp_path / "a.svs", **kw)
    t2 = write_slide("liver", tmp_path / "b.svs", **kw)
    write_slide("liver", tmp_path / "c.svs", **{**kw, "seed": 10})
    a, b, c = (tifffile.imread(tmp_path / f"{n}.svs", key=0) for n in "abc")
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert t1["areas_mm2"] == t2["areas_mm2"]


def test_tiles_render_alone_without_seams():
    """A tile rendered alone matches the same area inside a larger render (up to noise)."""
    from scipy.ndimage import uniform_filter

    s = liver.build("liver", 3, 4096, 3072, 0.5, "HCC", False, False)
    big = liver.render_tile(s, 1536, 1024, 1024)[:512, 512:].astype(float)
    alone = liver.render_tile(s, 2048, 1024, 512).astype(float)
    assert big.std() > 20
    diff = np.abs(uniform_filter(big, (5, 5, 1)) - uniform_filter(alone, (5, 5, 1)))
    assert diff.mean() < 4 and np.percentile(diff, 99.9) < 30


def test_cohort_writes_csv_and_masks_only_for_annotated(tmp_path):
    rows = liver.write_liver_cohort(tmp_path / "cohort", 4, 1, seed=3, width=768, height=512)
    with open(tmp_path / "cohort" / "cohort.csv", newline="") as fh:
        table = list(csv.DictReader(fh))
    assert [list(r) for r in table][0] == ["patient_id", "slide", "diagnosis", "annotated"]
    assert len(table) == len(rows) and 4 <= len(rows) <= 8
    dx = {}
    for r in table:
        dx.setdefault(r["patient_id"], set()).add(r["diagnosis"])
    assert len(dx) == 4 and all(len(v) == 1 for v in dx.values())  # one diagnosis a patient
    assert sorted(v.pop() for v in dx.values()) == ["CCA", "CCA", "HCC", "HCC"]
    assert len({r["patient_id"] for r in table if r["annotated"] == "1"}) == 1
    for r in table:
        slide = tmp_path / "cohort" / r["slide"]
        assert slide.parent.name == r["patient_id"] and slide.exists()
        json_path, zarr_path = truth_paths(slide)
        truth = json.loads(json_path.read_text())
        assert truth["diagnosis"]["label"] == r["diagnosis"]
        assert truth["annotated"] == (r["annotated"] == "1")
        assert zarr_path.exists() == truth["annotated"]
        own = "hcc" if r["diagnosis"] == "HCC" else "cca"
        assert truth["areas_mm2"][own] > 0 and truth["areas_mm2"]["tumour"] == \
            truth["areas_mm2"][own]
    # the same seed writes the same cohort
    again = liver.write_liver_cohort(tmp_path / "again", 4, 1, seed=3, width=768, height=512)
    assert again == rows


def test_cli_liver_slide_and_cohort(tmp_path, capsys):
    out = tmp_path / "one.svs"
    assert synth_main(["--task", "liver", "--label", "HCC", "--out", str(out), "--width",
                       "640", "--height", "512", "--seed", "1"]) == 0
    assert "diagnosis HCC" in capsys.readouterr().out
    assert json.loads(truth_paths(out)[0].read_text())["diagnosis"]["label"] == "HCC"
    folder = tmp_path / "co"
    assert synth_main(["--task", "liver", "--cohort", "2", "--annotated", "0", "--out",
                       str(folder), "--width", "512", "--height", "512", "--quiet"]) == 0
    rows = list(csv.DictReader(open(folder / "cohort.csv", newline="")))
    assert {r["diagnosis"] for r in rows} == {"HCC", "CCA"}
    assert not list(folder.rglob("*.truth.zarr"))
    for bad in (["--label", "positive"], ["--cohort", "2", "--label", "HCC"],
                ["--cohort", "2", "--annotated", "3"], ["--annotated", "1"]):
        assert synth_main(["--task", "liver", "--out", str(tmp_path / "x"), *bad]) == 2
    assert synth_main(["--task", "fls", "--cohort", "2", "--out", str(tmp_path / "y")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 5 and all(line.startswith("wsi-synth: error:") for line in err)
    with pytest.raises(UsageError):
        liver.write_liver_cohort(tmp_path / "z", 0, 0)
