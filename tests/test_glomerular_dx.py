"""glomerular-dx: case folders (case.py), the measure stage's rules, CMUS-Net without SMIL,
patient-level folds, and held-out synthetic cases through ``wsi-run`` with the demo
weights (one per class, a batch, bad input)."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

from wsi_pipeline.case import MAX_TEM, load_image, read_case, resize_square, stack_tem
from wsi_pipeline.cli import main
from wsi_pipeline.errors import CaseImageError, CaseIncomplete
from wsi_pipeline.tasks.glomerular_dx import GlomerularDxParams, diagnose
from wsi_pipeline.train.cases import patient_folds

OM_SIZE = (2048, 1536)  # as the demo weights' cohort: >= 3 glomeruli, fast to write
NOT_WEAK = {"om": False, "im": False, "tem": False}
# held-out seeds (the demo cohort's case seeds come from SeedSequence([2000, i]))
HELD_OUT = {"IgAN": 11, "MN": 12, "LN": 13}


# ----------------------------------------------------------------------------- case folders
def _case(root: Path, n_tem: int = 3, im: np.ndarray | None = None) -> Path:
    """A hand-made case folder: an (unopened) om/ slide file, im/if.png, n_tem TEM PNGs."""
    case = root / "case_a"
    for sub in ("om", "im", "tem"):
        (case / sub).mkdir(parents=True, exist_ok=True)
    (case / "om" / "case_a.svs").write_bytes(b"not opened by read_case")
    img = im if im is not None else np.full((40, 50, 3), (0, 120, 0), np.uint8)
    Image.fromarray(img).save(case / "im" / "if.png")
    for k in range(n_tem):
        Image.fromarray(np.full((30 + k, 20 + 2 * k), 10 * k, np.uint8)).save(
            case / "tem" / f"t{k:02d}.png")
    return case


def test_read_case_twelve_tem_images_of_mixed_sizes_and_formats(tmp_path):
    case = _case(tmp_path, n_tem=0)
    rng = np.random.default_rng(0)
    shapes = {}
    for k in range(12):  # sorted names t00..t11; formats and sizes rotate
        h, w = 20 + 7 * k, 60 - 3 * k
        name = f"t{k:02d}." + ("png", "jpg", "tif", "bmp", "jpeg", "tiff")[k % 6]
        grey = rng.integers(0, 256, (h, w), dtype=np.uint8)
        if name.endswith("tif"):  # 16-bit greyscale TIFF
            tifffile.imwrite(case / "tem" / name, grey.astype(np.uint16) * 257)
        elif name.endswith("tiff"):  # RGB TIFF
            tifffile.imwrite(case / "tem" / name, np.dstack([grey] * 3), photometric="rgb")
        else:
            Image.fromarray(grey).save(case / "tem" / name)
        shapes[name] = (h, w)
    (case / "tem" / "notes.txt").write_text("not an image")
    (case / "tem" / ".hidden.png").write_bytes(b"")
    c = read_case(case / "om" / "case_a.svs")  # the om slide path finds its case too
    assert c.folder == case and c.case_id == "case_a"
    assert [p.name for p in c.tem_paths] == [f"t{k:02d}" + Path(n).suffix
                                             for k, n in enumerate(sorted(shapes))][:10]
    assert [p.name for p in c.tem_skipped] == ["t10.jpeg", "t11.tiff"]
    assert len(c.tem) == MAX_TEM == 10
    for p, t in zip(c.tem_paths, c.tem, strict=True):
        assert t.dtype == np.uint8 and t.shape == (*shapes[p.name], 3)
        assert (t[..., 0] == t[..., 1]).all() and (t[..., 1] == t[..., 2]).all()
    assert c.describe()["tem"]["skipped"] == ["tem/t10.jpeg", "tem/t11.tiff"]
    assert any("2 skipped" in n for n in c.notes)
    # 16-bit TEM: value * 257 comes back as value
    t02 = np.asarray(Image.open(case / "tem" / "t00.png"))
    assert t02.shape == c.tem[0].shape[:2]
    assert (c.tem[2][..., 0] == tifffile.imread(case / "tem" / "t02.tif") // 257).all()
    # the fingerprint follows the files (here: one TEM file replaced)
    before = c.fingerprint
    Image.fromarray(np.zeros((5, 5), np.uint8)).save(case / "tem" / "t00.png")
    assert read_case(case).fingerprint != before


def test_im_greyscale_goes_to_green_and_extra_images_are_unused(tmp_path):
    grey = np.arange(40 * 50, dtype=np.uint16).reshape(40, 50) * 20
    case = _case(tmp_path)
    (case / "im" / "if.png").unlink()
    tifffile.imwrite(case / "im" / "a_if.tif", grey)  # 16-bit greyscale, first in order
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(case / "im" / "b_other.png")
    c = read_case(case)
    assert c.im_path.name == "a_if.tif" and [p.name for p in c.im_unused] == ["b_other.png"]
    assert c.im.shape == (40, 50, 3)
    assert (c.im[..., 0] == 0).all() and (c.im[..., 2] == 0).all()
    assert (c.im[..., 1] == (grey.astype(np.uint32) + 128) // 257).all()
    assert c.im[0, 1, 1] == 0 and c.im[-1, -1, 1] == round(1999 * 20 / 257)


def test_image_modes(tmp_path):
    rgba = np.zeros((6, 7, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 255
    Image.fromarray(rgba).save(tmp_path / "opaque.png")
    assert (load_image(tmp_path / "opaque.png", "im") == [200, 0, 0]).all()
    rgba[0, 0, 3] = 10
    Image.fromarray(rgba).save(tmp_path / "alpha.png")
    with pytest.raises(CaseImageError, match=r"alpha.png.*transparent alpha"):
        load_image(tmp_path / "alpha.png", "im")
    Image.fromarray(np.zeros((6, 7, 2), np.uint8), mode="LA").save(tmp_path / "two.png")
    with pytest.raises(CaseImageError, match=r"two.png.*shape \(6, 7, 2\).*2 channels"):
        load_image(tmp_path / "two.png", "im")
    tifffile.imwrite(tmp_path / "five.tif", np.zeros((6, 7, 5), np.uint8), planarconfig="contig")
    with pytest.raises(CaseImageError, match=r"five.tif.*5 channels"):
        load_image(tmp_path / "five.tif", "im")
    tifffile.imwrite(tmp_path / "float.tif", np.zeros((6, 7), np.float32))
    with pytest.raises(CaseImageError, match=r"float.tif.*float32 pixels"):
        load_image(tmp_path / "float.tif", "tem")
    stack = np.zeros((3, 6, 7), np.uint8)  # three greyscale pages (e.g. one per channel)
    with tifffile.TiffWriter(tmp_path / "stack.tif") as tif:
        for page in stack:
            tif.write(page, photometric="minisblack")
    with pytest.raises(CaseImageError, match=r"stack.tif.*3 pages.*no RGB page"):
        load_image(tmp_path / "stack.tif", "im")
    with tifffile.TiffWriter(tmp_path / "second.tif") as tif:  # a grey page, then an RGB one
        tif.write(np.zeros((6, 7), np.uint8), photometric="minisblack")
        tif.write(np.full((4, 5, 3), (1, 2, 3), np.uint8), photometric="rgb")
    assert (load_image(tmp_path / "second.tif", "im") == [1, 2, 3]).all()
    tifffile.imwrite(tmp_path / "planar.tif", np.stack([np.full((4, 5), v, np.uint8)
                                                        for v in (7, 8, 9)]),
                     photometric="rgb", planarconfig="separate")
    assert (load_image(tmp_path / "planar.tif", "im") == [7, 8, 9]).all()
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(CaseImageError, match=r"broken.png: cannot read the TEM image"):
        load_image(tmp_path / "broken.png", "tem")


@pytest.mark.parametrize("remove, message", [
    ("im", r"no immunofluorescence \(IM\) image: im/ is missing"),
    ("tem", r"no electron-microscopy \(TEM\) image: tem/ holds no"),
    ("om", r"no light-microscopy \(OM\) slide in om/"),
])
def test_missing_modality_names_it(tmp_path, remove, message):
    case = _case(tmp_path)
    if remove == "im":
        shutil.rmtree(case / "im")
    elif remove == "tem":
        for p in (case / "tem").iterdir():
            p.unlink()
    else:
        (case / "om" / "case_a.svs").unlink()
    with pytest.raises(CaseIncomplete, match=message):
        read_case(case)


def test_resize_and_bag():
    img = np.zeros((30, 60, 3), np.uint8)
    img[:, 30:] = 200
    out = resize_square(img, 16)
    assert out.shape == (16, 16, 3) and out[:, :7].max() == 0 and out[:, 9:].min() == 200
    bag, mask = stack_tem([img, img[:10]], 16, max_tem=4)
    assert bag.shape == (4, 16, 16, 3) and mask.tolist() == [True, True, False, False]
    assert bag[2:].max() == 0 and (bag[0] == out).all()


# ----------------------------------------------------------------------------- rules
def test_diagnose_fusion_and_degraded():
    names = ("MN", "IgAN", "LN")
    pred = {"fusion": np.array([0.1, 0.7, 0.2]), "om": np.array([0.2, 0.5, 0.3]),
            "im": np.array([0.6, 0.1, 0.3]), "tem": np.array([0.2, 0.2, 0.6]),
            "kept": np.array([0, 2]), "weights": np.array([1.0, 0.5]), "medoid": 0}
    out = diagnose(pred, names, 3, GlomerularDxParams())
    assert out["diagnosis"]["label"] == "IgAN" and out["diagnosis"]["adequate"]
    assert out["scores"] == {"p_IgAN": 0.7, "p_MN": 0.1, "p_LN": 0.2}
    assert "2 images kept by SMIL" in out["diagnosis"]["note"]
    # no glomerulus: mean of the IM and TEM heads, (0.4, 0.15, 0.45) -> LN, not adequate
    out = diagnose(pred | {"fusion": None, "om": None}, names, 0, GlomerularDxParams())
    assert out["diagnosis"]["label"] == "LN" and not out["diagnosis"]["adequate"]
    assert out["diagnosis"]["degraded"] and "no glomerulus found" in out["diagnosis"]["note"]
    assert out["scores"] == {"p_IgAN": 0.15, "p_MN": 0.4, "p_LN": 0.45}


def test_patient_folds_are_grouped_and_stratified():
    labels = [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2]
    patients = ["a", "a", "b", "c", "d", "e", "f", "g", "h", "i", "j", "k"]
    folds = patient_folds(labels, patients, 2, seed=3)
    assert folds[0] == folds[1]  # patient a's two cases stay together
    for lab in (1, 2):  # 4 single-case patients per class: 2 in each fold
        assert sorted(folds[np.array(labels) == lab].tolist()) == [0, 0, 1, 1]
    assert set(folds.tolist()) == {0, 1}
    with pytest.raises(Exception, match="5 folds need at least 5 patients"):
        patient_folds([0, 1, 2], ["a", "b", "c"], 5)


def test_cmus_net_without_smil_is_the_bag_mean():
    from wsi_pipeline.models.cmus_net import CMUSNet

    torch.manual_seed(0)
    net = CMUSNet("tu-mobilenetv3_small_050", 5, width=8, heads=2, image_px=32, max_tem=4,
                  smil=False).eval()
    assert net.arch_kwargs["smil"] is False
    tem = torch.rand(1, 4, 3, 32, 32)
    mask = torch.tensor([[True, True, True, False]])
    with torch.no_grad():
        out = net(torch.rand(1, 3, 32, 32), torch.rand(1, 3, 32, 32), tem, mask)
        tokens = net.enc_tem(tem[0, :3])  # (3, N, C)
        expected = net.head_tem(tokens.mean(0).mean(0))
    assert out["kept"][0].tolist() == [0, 1, 2] and out["medoid"] == [-1]
    assert out["weights"][0].tolist() == [1.0, 1.0, 1.0]
    assert torch.allclose(out["tem"][0], expected, atol=1e-5)


# ----------------------------------------------------------------------------- wsi-run
@pytest.fixture(scope="module")
def held_out(tmp_path_factory) -> tuple[Path, Path, int, dict[str, dict]]:
    """Three held-out synthetic cases (one per class, no weak modality) in one folder, run
    as a folder of cases by ``wsi-run`` with the bundled demo weights."""
    from wsi_pipeline.synth.cases import write_case

    root = tmp_path_factory.mktemp("gdx")
    cohort = root / "cases"
    truths = {label: write_case(cohort / f"case_{label}", label, seed, OM_SIZE, weak=NOT_WEAK)
              for label, seed in HELD_OUT.items()}
    out = root / "out"
    code = main([str(cohort), "--task", "glomerular-dx", "--out", str(out), "--quiet",
                 "--device", "cpu"])
    return cohort, out, code, truths


def test_held_out_cases_are_diagnosed_right(held_out):
    cohort, out, code, truths = held_out
    assert code == 0
    rows = list(csv.DictReader(open(out / "summary.csv")))
    assert sorted(r["slide_id"] for r in rows) == ["case_IgAN", "case_LN", "case_MN"]
    for row in rows:
        label = row["slide_id"].split("_")[1]
        assert row["status"] == "ok" and row["diagnosis"] == label, row
        report = json.loads((out / row["slide_id"] / "report.json").read_text())
        scores = report["scores"]
        assert set(scores) == {"p_IgAN", "p_MN", "p_LN"}
        assert abs(sum(scores.values()) - 1) < 1e-3
        assert max(scores, key=scores.get) == f"p_{label}"
        assert report["diagnosis"]["adequate"] and not report["diagnosis"]["degraded"]
        assert "DEMO weights" in report["diagnosis"]["note"]
        assert report["provenance"]["classifier"]["demo"] is True


def test_report_records_heads_smil_and_files(held_out):
    cohort, out, _, truths = held_out
    for label, truth in truths.items():
        report = json.loads((out / f"case_{label}" / "report.json").read_text())
        case = report["case"]
        names = sorted(t["path"] for t in truth["modalities"]["tem"]["images"])
        assert case["tem"]["used"] == names[:10] and case["tem"]["skipped"] == names[10:]
        assert report["counts"]["tem_skipped"] == max(len(names) - 10, 0)
        assert case["im"]["file"] == "im/if.png" and case["om"] == f"om/case_{label}.svs"
        for head in ("fusion", "om", "im", "tem"):
            assert abs(sum(case["heads"][head].values()) - 1) < 1e-3
        kept = case["tem_kept"]
        assert 1 <= len(kept) == report["counts"]["tem_kept"] <= len(case["tem"]["used"])
        assert {k["file"] for k in kept} <= set(case["tem"]["used"])
        assert sum(k["medoid"] for k in kept) == 1
        assert all(0 <= k["weight"] <= 1 for k in kept)
        # the glomeruli used are objects with outlines, exported to GeoJSON
        n = report["counts"]["glomeruli_classified"]
        assert 1 <= n <= report["counts"]["glomeruli"] <= truth["counts"]["glomeruli"] + 1
        geo = json.loads((out / f"case_{label}" / "objects.geojson").read_text())
        used = [f for f in geo["features"] if f["properties"]["measurements"]["used"] == 1]
        assert len(used) == n and len(geo["features"]) == report["counts"]["glomeruli"]
        assert all(f["geometry"]["type"] == "Polygon" for f in geo["features"])


def _copy_case(held_out, tmp_path: Path, label: str = "MN") -> Path:
    cohort = held_out[0]
    case = tmp_path / f"case_{label}"
    shutil.copytree(cohort / f"case_{label}", case)
    return case


def test_missing_im_fails_with_one_line(held_out, tmp_path, capsys):
    case = _copy_case(held_out, tmp_path)
    shutil.rmtree(case / "im")
    code = main([str(case), "--task", "glomerular-dx", "--out", str(tmp_path / "out"),
                 "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1
    assert "no immunofluorescence (IM) image: im/ is missing" in err[0]
    assert "Traceback" not in err[0]


def test_two_channel_im_fails_with_one_line(held_out, tmp_path, capsys):
    case = _copy_case(held_out, tmp_path)
    Image.fromarray(np.zeros((64, 64, 2), np.uint8), mode="LA").save(case / "im" / "if.png")
    code = main([str(case), "--task", "glomerular-dx", "--out", str(tmp_path / "out"),
                 "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1
    assert "if.png: unsupported IM image (shape (64, 64, 2)" in err[0]
    assert "2 channels" in err[0]


def test_changed_tem_image_reruns_the_measure_stage_only(held_out, tmp_path):
    _, out, _, _ = held_out
    case = _copy_case(held_out, tmp_path, "IgAN")  # same slide bytes and mtimes
    out2 = tmp_path / "out"
    shutil.copytree(out / "case_IgAN", out2 / "case_IgAN")
    args = [str(case), "--task", "glomerular-dx", "--out", str(out2), "--quiet"]

    def reused() -> dict[str, bool]:
        report = json.loads((out2 / "case_IgAN" / "report.json").read_text())
        return {s: t["reused"] for s, t in report["provenance"]["stage_timings"].items()
                if s != "open"}

    assert main(args) == 0 and all(reused().values())
    first = sorted((case / "tem").iterdir())[0]
    Image.fromarray(np.full((300, 400), 128, np.uint8)).save(first)
    assert main(args) == 0
    assert reused() == {"tissue": True, "stain": True, "pyramid": True, "infer": True,
                        "stitch": True, "measure": False, "export": False}


def test_predict_case_averages_the_crops_and_runs_without_om():
    from wsi_pipeline.models.cmus_net import CMUSNet
    from wsi_pipeline.tasks.glomerular_dx import predict_case

    torch.manual_seed(1)
    net = CMUSNet("tu-mobilenetv3_small_050", 5, width=8, heads=2, image_px=32,
                  max_tem=3).eval()
    rng = np.random.default_rng(0)
    om = rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    im = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    tem = rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    mask = np.array([True, True, False])
    pred = predict_case(net, om, im, tem, mask, batch_size=2)  # two chunks: 2 + 1 crops
    singles = [predict_case(net, om[i:i + 1], im, tem, mask)["fusion"] for i in range(3)]
    assert np.allclose(pred["per_crop"], np.stack(singles), atol=1e-5)
    assert np.allclose(pred["fusion"], np.mean(singles, 0), atol=1e-5)
    for head in ("fusion", "om", "im", "tem"):
        assert pred[head].shape == (3,) and abs(pred[head].sum() - 1) < 1e-5
    assert set(pred["kept"].tolist()) <= {0, 1} and pred["medoid"] in (0, 1)
    alone = predict_case(net, None, im, tem, mask)
    assert alone["om"] is None and alone["per_crop"].shape == (0, 3)
    # the IM and TEM heads do not read OM: the same without it (the degraded mode's inputs)
    assert np.allclose(alone["im"], pred["im"], atol=1e-5)
    assert np.allclose(alone["tem"], pred["tem"], atol=1e-5)
