"""Synthetic mouse kidney sections for `kidney-layer` (coarse MPP, small slides)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tifffile
import zarr

from wsi_pipeline.errors import UsageError
from wsi_pipeline.synth import LEGENDS, truth_paths, write_slide
from wsi_pipeline.synth import kidney as K
from wsi_pipeline.synth.cli import main as synth_main

openslide = pytest.importorskip("openslide")

MPP = 4.0
SIZE = (1280, 1536)  # 5.1 x 6.1 mm: the papilla tip and the capsule above it both fit
MOUSE = {8: "mouse_cortex", 9: "mouse_outer_stripe", 10: "mouse_inner_stripe",
         11: "mouse_inner_medulla"}
RANK = {11: 0, 10: 1, 9: 2, 8: 3, 0: 4}  # papilla outwards


@pytest.fixture(scope="module")
def mouse(tmp_path_factory):
    path = tmp_path_factory.mktemp("mouse") / "mouse.svs"
    truth = write_slide("kidney-layer", path, width=SIZE[0], height=SIZE[1], mpp=MPP, seed=3,
                        species="mouse")
    lab = zarr.open_group(str(truth_paths(path)[1]), mode="r")["labels"]
    return path, truth, lab


def _tip(truth):
    (tip,) = [o for o in truth["objects"] if o["type"] == "papilla_tip"]
    return tip


def _ray(lab: np.ndarray, tip: dict, psi_deg: float, step_um: float = 1.0):
    """Labels along a ray from the papilla tip at `psi_deg` from its axis: (r_um, labels)."""
    axis = np.radians(tip["axis_deg"])
    ey = np.array([np.cos(axis), np.sin(axis)])
    ex = np.array([-ey[1], ey[0]])
    psi = np.radians(psi_deg)
    d = np.sin(psi) * ex + np.cos(psi) * ey
    r = np.arange(20.0, 8000.0, step_um)
    x = tip["x_um"] + r * d[0]
    y = tip["y_um"] + r * d[1]
    i, j = np.floor(y / MPP).astype(int), np.floor(x / MPP).astype(int)
    inside = (i >= 0) & (i < lab.shape[0]) & (j >= 0) & (j < lab.shape[1])
    vals = np.zeros(len(r), np.uint8)
    vals[inside] = lab[i[inside], j[inside]]
    return r, vals


def _runs(vals: np.ndarray, step_um: float, min_um: float = 0.0):
    """Run-length encoding [(label, length_um)], runs shorter than min_um dropped, merged."""
    cut = np.flatnonzero(np.diff(vals)) + 1
    starts = np.concatenate([[0], cut])
    ends = np.concatenate([cut, [len(vals)]])
    runs: list[list] = []
    for a, b in zip(starts, ends, strict=True):
        if (b - a) * step_um < min_um:
            continue
        if runs and runs[-1][0] == vals[a]:
            runs[-1][1] += (b - a) * step_um
        else:
            runs.append([int(vals[a]), (b - a) * step_um])
    return runs


def test_openslide_reads_mouse_slide(mouse):
    path, truth, _ = mouse
    s = openslide.OpenSlide(str(path))
    assert s.properties["openslide.vendor"] == "aperio"
    assert float(s.properties["openslide.mpp-x"]) == MPP
    assert float(s.properties["openslide.mpp-y"]) == MPP
    assert s.dimensions == SIZE
    rgb = np.asarray(s.read_region((0, 0), 0, SIZE).convert("RGB"))
    assert rgb.std() > 20  # tissue on the glass


def test_all_mouse_layers_present(mouse):
    _, truth, lab = mouse
    legend = {int(k): v for k, v in lab.attrs["legend"].items()}
    assert legend == LEGENDS["kidney-layer"] and all(legend[k] == v for k, v in MOUSE.items())
    assert legend[7] == "pen" and legend[1] == "cortex"  # human values kept
    present = set(np.unique(lab[:]).tolist())
    assert {8, 9, 10, 11} <= present and not present & {1, 2, 3, 4}
    assert set(lab.attrs["tissue_classes"]) >= {8, 9, 10, 11}


def test_truth_matches_label_mask(mouse):
    path, truth, lab = mouse
    assert json.loads(truth_paths(path)[0].read_text()) == json.loads(json.dumps(truth))
    assert truth["species"] == "mouse" and truth["task"] == "kidney-layer"
    assert truth["generator"]["options"]["species"] == "mouse"
    assert truth["diagnosis"] == {"label": "adequate", "adequate": True}
    counts = np.bincount(lab[:].ravel(), minlength=12)
    px_mm2 = MPP * MPP / 1e6
    a = truth["areas_mm2"]
    for k, name in MOUSE.items():
        assert a[name] == pytest.approx(counts[k] * px_mm2, abs=1e-5)
    assert a["cortex"] == a["mouse_cortex"] > 0
    medulla = sum(counts[k] for k in (9, 10, 11)) * px_mm2
    assert a["medulla"] == pytest.approx(medulla, abs=2e-5)
    assert a["tissue"] == pytest.approx(counts[8:12].sum() * px_mm2, abs=2e-5)
    assert a["pen"] == 0
    assert truth["scores"]["cortex_fraction"] == pytest.approx(
        counts[8] / counts[8:12].sum(), abs=1e-4)
    glom = [o for o in truth["objects"] if o["type"] == "glomerulus"]
    assert len(glom) == truth["counts"]["glomeruli"] > 20
    assert all(70 <= o["diameter_um"] <= 90 and not o["hypercellular"] for o in glom)
    # glomeruli lie in the cortex label (they are part of mouse_cortex)
    ij = np.array([[o["y_um"], o["x_um"]] for o in glom]) / MPP
    assert (lab[:][ij[:, 0].astype(int), ij[:, 1].astype(int)] == 8).all()


def test_layers_are_concentric_along_rays(mouse):
    _, truth, lab = mouse
    lab = lab[:]
    tip = _tip(truth)
    assert lab[int(tip["y_um"] / MPP), int(tip["x_um"] / MPP)] in (0, 11)  # papilla tip
    for psi in np.linspace(-25, 25, 11):  # through the papilla: every layer in order
        _, vals = _ray(lab, tip, psi)
        runs = _runs(vals, 1.0, min_um=6.0)
        assert [k for k, _ in runs] == [11, 10, 9, 8, 0], (psi, runs)
    for psi in (-70, -50, 50, 70):  # beside the pelvis: outwards never goes back inwards
        r, vals = _ray(lab, tip, psi)
        vals = vals[r > 1500]  # past the pelvis cavity
        ranks = [RANK[k] for k, _ in _runs(vals, 1.0, min_um=6.0)]
        assert ranks == sorted(ranks) and ranks[-1] == 4, (psi, ranks)


def test_layer_thickness_in_range(mouse):
    _, truth, lab = mouse
    lab = lab[:]
    tip = _tip(truth)
    t = tip["layer_thickness_um"]
    assert 1000 <= t["cortex"] <= 1300 and 300 <= t["outer_stripe"] <= 500
    assert 500 <= t["inner_stripe"] <= 800
    for psi in (-8, 0, 8):  # near the axis the rays cross the layers square on
        _, vals = _ray(lab, tip, psi)
        thick = dict(_runs(vals, 1.0, min_um=6.0)[:4])
        assert 1000 <= thick[8] <= 1300, thick
        assert 300 <= thick[9] <= 500, thick
        assert 500 <= thick[10] <= 800, thick
        assert thick[11] >= 800, thick  # the papilla is long in mouse


def test_small_slide_shows_the_centre(mouse, tmp_path):
    _, _, big = mouse
    w, h = 512, 384
    write_slide("kidney-layer", tmp_path / "c.svs", width=w, height=h, mpp=MPP, seed=3,
                species="mouse")
    small = zarr.open_group(str(truth_paths(tmp_path / "c.svs")[1]), mode="r")["labels"][:]
    y0, x0 = (SIZE[1] - h) // 2, (SIZE[0] - w) // 2
    crop = big[y0:y0 + h, x0:x0 + w]
    assert (small == crop).mean() > 0.999 and len(np.unique(small)) >= 2


def test_default_size_fits_the_section():
    assert K.default_size_px("mouse", 0.5) == (22000, 14000)
    assert K.default_size_px("mouse", 2.0) == (5500, 3500)
    assert K.default_size_px("human", 2.0) == K.LAYER_SPEC.default_size_px
    for seed in range(4):
        w, h = K.default_size_px("mouse", 2.0)
        s = K.build("kidney-layer", seed, w, h, 2.0, None, False, False, species="mouse")
        x0, y0, x1, y1 = s.section.bbox
        assert 0 < x0 and 0 < y0 and x1 < s.width_um and y1 < s.height_um
        m = s.section
        ox, oy = np.sin(m.psi_tab) * m.r_out, np.cos(m.psi_tab) * m.r_out
        assert 8800 <= np.ptp(ox) <= 10000 and 5000 <= np.ptp(oy) <= 6200  # ~9.5 x 5.5 mm


def test_seeded_determinism(tmp_path):
    kw = dict(width=512, height=512, mpp=MPP, species="mouse")
    t1 = write_slide("kidney-layer", tmp_path / "a.svs", seed=5, **kw)
    t2 = write_slide("kidney-layer", tmp_path / "b.svs", seed=5, **kw)
    t3 = write_slide("kidney-layer", tmp_path / "c.svs", seed=6, **kw)
    assert t1["objects"] == t2["objects"] and t1["areas_mm2"] == t2["areas_mm2"]
    assert t1["objects"] != t3["objects"]
    a, b, c = (tifffile.imread(tmp_path / f"{n}.svs", key=0) for n in "abc")
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_species_errors(tmp_path, capsys):
    assert synth_main(["--task", "mesangial", "--species", "mouse", "--out",
                       str(tmp_path / "m.svs")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("wsi-synth: error:") and "--species" in err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert synth_main(["--task", "kidney-layer", "--species", "rat", "--out",
                       str(tmp_path / "r.svs")]) == 2
    assert synth_main(["--task", "kidney-layer", "--species", "mouse", "--label",
                       "inadequate", "--out", str(tmp_path / "i.svs")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("wsi-synth: error:") for line in err)
    with pytest.raises(UsageError):
        write_slide("fls", tmp_path / "f.svs", species="mouse")
    with pytest.raises(UsageError):
        write_slide("kidney-layer", tmp_path / "k.svs", species="rat")
    assert not (tmp_path / "m.svs").exists()


def test_cli_writes_mouse_slide(tmp_path, capsys):
    out = tmp_path / "cli" / "mouse_001.svs"
    code = synth_main(["--task", "kidney-layer", "--species", "mouse", "--out", str(out),
                       "--mpp", "4", "--width", "768", "--height", "512", "--seed", "2"])
    assert code == 0 and out.exists()
    assert "wrote" in capsys.readouterr().out
    truth = json.loads(truth_paths(out)[0].read_text())
    assert truth["species"] == "mouse" and truth["generator"]["options"]["species"] == "mouse"
    assert truth["generator"]["mpp"] == 4.0 and truth["generator"]["width"] == 768
    assert truth["areas_mm2"]["mouse_inner_medulla"] > 0


def test_human_truth_names_its_species(tmp_path):
    truth = write_slide("kidney-layer", tmp_path / "h.svs", width=1024, height=768, seed=4,
                        label="inadequate")
    assert truth["species"] == "human" and truth["generator"]["options"]["species"] == "human"
    assert "mouse_cortex" not in truth["areas_mm2"]
