"""Slide quality before analysis: non-bright-field slides are refused with one line, and the
stain a slide carries (H&E, PAS, DAB IHC) is told from its own colours.

Real data under ../shared/data (tests skip without it): the fluorescence NDPI and Vectra
QPTIFF, CMU-1, the H&E normalisation targets, MoNuSAC (H&E), the histolab tissue tiles and
thumbnails, and the AIDPATH PAS kidney tiles and glomerulus crops.
"""

from __future__ import annotations

import csv
import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from conftest import SHARED_DATA, shared

from wsi_pipeline import quality, stain
from wsi_pipeline.cli import main

needs_data = pytest.mark.skipif(not SHARED_DATA.is_dir(),
                                reason=f"real test data absent: {SHARED_DATA}")

# H-DAB vectors of Ruifrok & Johnston (2001), as in scikit-image's rgb_from_hed
RUIFROK_H = np.array([0.650, 0.704, 0.286])
RUIFROK_DAB = np.array([0.268, 0.570, 0.776])


def run_cli(capsys, *argv: object) -> tuple[int, str, str]:
    code = main([*map(str, argv), "--quiet"])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("wsi-run: error: ") and "Traceback" not in err
    return lines[0]


def read_rgb(path: Path, *, bgr: bool = False) -> np.ndarray:
    from PIL import Image

    image = Image.open(path)
    if image.mode == "RGBA":  # transparent pixels are glass
        rgba = np.asarray(image)
        rgb = rgba[..., :3].copy()
        rgb[rgba[..., 3] == 0] = 255
    else:
        rgb = np.asarray(image.convert("RGB"))
    return np.ascontiguousarray(rgb[..., ::-1]) if bgr else rgb


def identify(rgb: np.ndarray) -> dict:
    px = stain.stain_pixels(rgb)
    return quality.stain_identity(px, stain.fit_vahadane(px, max_pixels=10_000))


# -- bright field ------------------------------------------------------------------------------
@needs_data
@pytest.mark.parametrize("name", ["fluorescence-TRITC.ndpi", "vectra-multiplex.qptiff"])
@pytest.mark.parametrize("task, stain_name", [("fls", "H&E"), ("kidney-layer", "PAS")])
def test_fluorescence_slide_is_refused_with_one_line(capsys, tmp_path, name, task, stain_name):
    """Both real non-bright-field files open (openslide: NDPI; tiffslide: QPTIFF channel
    planes) and are refused for what they are, not as 'no tissue'."""
    path = shared("formats", name)
    code, _, err = run_cli(capsys, path, "--task", task, "--out", tmp_path, "--until", "stain")
    line = one_error_line(err)
    print(line)
    assert code == 1
    assert (f"fluorescence or dark-field slide: task {task} needs a brightfield {stain_name} "
            "slide") in line
    assert "no tissue" not in line
    report = json.loads((tmp_path / path.stem / "report.json").read_text())
    assert report["complete"] is False and report["stages_completed"] == ["tissue"]
    assert report["quality"]["brightfield"] is False
    assert report["quality"]["brightfield_evidence"]["median_lstar"] < 5
    assert report["quality"]["no_tissue"] is None
    assert "fluorescence" in report["diagnosis"]["note"]
    assert (tmp_path / path.stem / "overlay.png").is_file()


@needs_data
def test_real_brightfield_slide_is_not_refused(capsys, tmp_path):
    code, _, err = run_cli(capsys, shared("slides", "CMU-1-Small-Region.svs"), "--task", "fls",
                           "--out", tmp_path, "--until", "tissue")
    assert code == 0, err
    report = json.loads((tmp_path / "CMU-1-Small-Region" / "report.json").read_text())
    assert report["quality"]["brightfield"] is True and report["quality"]["no_tissue"] is False


def test_synthetic_slides_are_brightfield(capsys, tmp_path, fls_slide, glass_slide):
    path, _ = fls_slide
    code, _, err = run_cli(capsys, path, "--task", "fls", "--out", tmp_path, "--until",
                           "tissue")
    assert code == 0, err
    report = json.loads((tmp_path / path.stem / "report.json").read_text())
    assert report["quality"]["brightfield"] is True
    # blank glass is bright field too: refused as no tissue, as before
    code, _, err = run_cli(capsys, glass_slide, "--task", "fls", "--out", tmp_path)
    assert code == 1 and "no tissue found" in one_error_line(err)


def test_is_brightfield_on_arrays():
    rng = np.random.default_rng(0)
    glass = rng.integers(230, 250, (200, 300, 3), dtype=np.uint8)
    glass[50:150, 50:150] = (150, 60, 140)  # a purple section
    assert quality.is_brightfield(glass)[0]
    dark = rng.integers(0, 12, (200, 300, 3), dtype=np.uint8)
    dark[60:120, 60:160, 0] = 180  # emitting tissue on black
    ok, evidence = quality.is_brightfield(dark)
    assert not ok and evidence["median_lstar"] < 5 and evidence["dark_fraction"] > 0.85
    # a bright-field tile entirely covered by dark tissue is still bright field
    assert quality.is_brightfield(np.full((64, 64, 3), (110, 50, 120), np.uint8))[0]
    # scanner padding (pure black) is not counted; nothing else: no reason to refuse
    padded = np.zeros((100, 100, 3), np.uint8)
    padded[:, :30] = 240
    assert quality.is_brightfield(padded)[0]
    assert quality.is_brightfield(np.zeros((10, 10, 3), np.uint8))[0]


@needs_data
def test_real_brightfield_fixtures_and_thumbnails_are_brightfield():
    """Pen, blank glass, scanner line, almost-white and tissue tiles and two whole-slide
    thumbnails (histolab's fixtures): none is taken for fluorescence."""
    paths = sorted(shared("tissue").glob("*/*.png"))
    assert len(paths) >= 9
    for path in paths:
        ok, evidence = quality.is_brightfield(read_rgb(path))
        assert ok, (path.name, evidence)


# -- stain identity: real images -----------------------------------------------------------
# Calibration (quality.EOSIN_SHARE_THRESHOLD) used the even-indexed MoNuSAC and sclerosis
# slide ids (sorted) and the two kidney-pas tiles; everything else here is held out.
def _split(ids: list[str]) -> dict[str, str]:
    return {s: ("calibration" if i % 2 == 0 else "held-out") for i, s in enumerate(sorted(ids))}


def _monusac() -> dict[str, list[np.ndarray]]:
    """MoNuSAC regions pooled per TCGA slide. The files are stored BGR (as written by
    OpenCV): read as RGB, red blood cells are blue and haematoxylin nuclei brown; their
    channels are reversed back here."""
    slides: dict[str, list[np.ndarray]] = defaultdict(list)
    for path in sorted(shared("lymphocytes-monusac", "images").glob("*.jpg")):
        slides[path.stem.rsplit("_", 1)[0]].append(read_rgb(path, bgr=True))
    return slides


def _sclerosis() -> dict[str, list[np.ndarray]]:
    folder = shared("glomeruli-sclerosis")
    slides: dict[str, list[np.ndarray]] = defaultdict(list)
    with open(folder / "labels.csv", newline="") as f:
        for row in csv.DictReader(f):
            slides[row["slide_id"]].append(read_rgb(folder / row["image"]))
    return slides


def _pooled(images: list[np.ndarray]) -> np.ndarray:
    return np.concatenate([im.reshape(-1, 3) for im in images])[:, None, :]


@pytest.fixture(scope="module")
def real_results() -> list[tuple[str, str, str, str, dict]]:
    """(source, image or slide, split, true stain, identity) for every real image."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real test data absent: {SHARED_DATA}")
    from wsi_pipeline.slide import open_slide

    rows = []
    for path in sorted(shared("stain").iterdir()):
        rows.append(("stain targets", path.name, "held-out", "H&E", identify(read_rgb(path))))
    with open_slide(shared("slides", "CMU-1-Small-Region.svs")) as slide:
        cmu = slide.read_level(0, 0, 0, *slide.dimensions)
    rows.append(("CMU-1", "CMU-1", "held-out", "H&E", identify(cmu)))
    for path in sorted(shared("tissue").glob("*/*.png")):
        if path.stem.startswith(("tissue-", "high-nuclei", "tcga-", "wsi-")):
            rows.append(("histolab H&E", path.name, "held-out", "H&E",
                         identify(read_rgb(path))))
    for folder, split in (("kidney-pas", "calibration"), ("glomeruli-pas", "held-out")):
        for path in sorted(shared(folder, "images").glob("*.png")):
            rows.append((folder, path.name, split, "PAS", identify(read_rgb(path))))
    for source, slides, truth in (("MoNuSAC slides", _monusac(), "H&E"),
                                  ("sclerosis slides", _sclerosis(), "PAS")):
        split = _split(list(slides))
        for slide_id, images in sorted(slides.items()):
            rows.append((source, slide_id, split[slide_id], truth,
                         identify(_pooled(images))))
    table = defaultdict(lambda: [0, 0, 0])  # right, unknown, wrong
    for source, name, split, truth, ident in rows:
        cell = table[source, split]
        cell[0 if ident["label"] == truth else 1 if ident["label"] == "unknown" else 2] += 1
        if ident["label"] != truth:
            print(f"  {source} {name} ({split}): {truth} -> {ident}")
    for (source, split), (right, unknown, wrong) in sorted(table.items()):
        print(f"{source:18s} {split:11s} right {right:3d}  unknown {unknown:2d}  wrong {wrong:2d}")
    return rows


def _count(rows, source: str, split: str | None = None) -> tuple[int, int, int, int]:
    sel = [(t, i["label"]) for s, _, sp, t, i in rows if s == source and split in (None, sp)]
    right = sum(label == t for t, label in sel)
    unknown = sum(label == "unknown" for _, label in sel)
    return right, unknown, len(sel) - right - unknown, len(sel)


@needs_data
def test_real_pas_images_and_slides_are_pas(real_results):
    for source in ("kidney-pas", "glomeruli-pas"):
        right, _, _, n = _count(real_results, source)
        assert right == n == (2 if source == "kidney-pas" else 12), source
    # 19 AIDPATH slides, 548 glomerulus crops pooled per slide: none taken for H&E; one
    # held-out slide of silver-dark crops (SESCAM_3_0) sits in the unknown band
    right, unknown, wrong, n = _count(real_results, "sclerosis slides")
    assert n == 19 and wrong == 0 and right >= 18
    right, unknown, wrong, n = _count(real_results, "sclerosis slides", "held-out")
    assert wrong == 0 and right >= n - 1


@needs_data
def test_real_he_images_and_slides_are_he(real_results):
    assert _count(real_results, "CMU-1")[0] == 1
    right, _, _, n = _count(real_results, "histolab H&E")
    assert n == 4 and right >= 3  # the pale blue-pen thumbnail reads as PAS
    right, _, _, n = _count(real_results, "stain targets")
    assert n == 4 and right >= 3  # torchstain's source image has magenta 'eosin'
    # 12 TCGA slides (45 regions): all six held-out slides right; two calibration slides
    # read as PAS: TCGA-A2-A04X (breast, purple eosin, eosin share 0.13) and TCGA-49-6743
    # (0.31 pooled over its five regions, 0.30-0.50 as they are weighted)
    right, _, _, n = _count(real_results, "MoNuSAC slides", "held-out")
    assert right == n == 6
    right, _, _, n = _count(real_results, "MoNuSAC slides")
    assert n == 12 and right >= 10


@needs_data
def test_no_real_image_is_taken_for_ihc(real_results):
    assert not [name for _, name, _, _, ident in real_results if ident["label"] == "IHC"]
    assert max(ident["dab_share"] for *_, ident in real_results) < quality.DAB_SHARE_THRESHOLD


# -- stain identity: DAB ---------------------------------------------------------------------
def _beer_lambert(rows: np.ndarray, n: int = 40_000, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    c = rng.gamma(2.0, 0.4, size=(n, 2))
    c[rng.random(n) < 0.4, 1] = 0.0
    c[rng.random(n) < 0.2, 0] = 0.0
    m = rows / np.linalg.norm(rows, axis=1, keepdims=True)
    return np.clip(np.rint(255 * np.exp(-c @ m)), 0, 255).astype(np.uint8)[:, None, :]


def test_haematoxylin_dab_image_is_ihc():
    """Haematoxylin + DAB mixed with Ruifrok & Johnston's vectors: brown chromogen -> IHC;
    the same mixes with eosin or PAS magenta instead are H&E and PAS."""
    ident = identify(_beer_lambert(np.stack([RUIFROK_H, RUIFROK_DAB])))
    assert ident["label"] == "IHC" and ident["dab_share"] > 0.95 and ident["confidence"] > 0.9
    he, pas = stain.REFERENCES["he"].matrix, stain.REFERENCES["pas"].matrix
    assert identify(_beer_lambert(he))["label"] == "H&E"
    assert identify(_beer_lambert(pas))["label"] == "PAS"


@needs_data
def test_real_tiles_recoloured_with_dab_are_ihc():
    """A real H&E and a real PAS tile unmixed with their own fit and recomposed with the
    Ruifrok haematoxylin and DAB vectors (real structure, DAB colour)."""
    for path in (shared("stain", "slideflow-norm-tile.jpg"),
                 shared("kidney-pas", "images", "10025.png")):
        rgb = read_rgb(path)
        fit = stain.fit_vahadane(rgb)
        c = stain.concentrations(stain.rgb_to_od(rgb.reshape(-1, 3)), fit.matrix)
        m = np.stack([RUIFROK_H, RUIFROK_DAB])
        m /= np.linalg.norm(m, axis=1, keepdims=True)
        dab = np.clip(np.rint(255 * np.exp(-c @ m)), 0, 255).astype(np.uint8)
        assert identify(dab.reshape(rgb.shape))["label"] == "IHC", path.name
        assert identify(rgb)["label"] != "IHC"


# -- stain identity through the pipeline -----------------------------------------------------
@needs_data
@pytest.mark.parametrize("task, warned", [("fls", False), ("liver", False),
                                          ("kidney-layer", True)])
def test_cmu1_stain_identity_in_the_report(capsys, tmp_path, task, warned):
    """CMU-1 (H&E): no warning under the H&E tasks, a warning naming both stains under a
    PAS task (the old stain-vector check had it the other way round)."""
    code, _, err = run_cli(capsys, shared("slides", "CMU-1-Small-Region.svs"), "--task", task,
                           "--out", tmp_path, "--until", "stain")
    assert code == 0, err
    report = json.loads((tmp_path / "CMU-1-Small-Region" / "report.json").read_text())
    identity = report["quality"]["stain_identity"]
    assert identity["label"] == "H&E"
    assert identity["expected"] == ("PAS" if task == "kidney-layer" else "H&E")
    assert 0.0 <= identity["confidence"] <= 1.0
    warning = report["quality"]["stain_warning"]
    if warned:
        assert "H&E" in warning and "PAS" in warning and "kidney-layer" in warning
    else:
        assert warning is None
    # the blue-green marking dye on CMU-1 is left out of the fit
    assert report["provenance"]["stain"]["excluded_pixels"]["non_stain"] > 0
    h = np.asarray(report["provenance"]["stain"]["fit"]["matrix"][0])
    assert h[0] < h[1]  # haematoxylin absorbs less red than green


@pytest.mark.xfail(strict=False, reason=(
    "the synthetic generator's H&E and PAS stain vectors overlap: base pinks r=0.10 vs "
    "0.18 with a per-slide jitter of sd 0.04 per component (LDA on the true vectors errs on "
    "~5 % of slides), and they sit off the real eosin-PAS axis; with the real references as "
    "base vectors 18 of 20 synthetic slides are classified right and none wrong"))
def test_synthetic_slides_of_every_task(tmp_path):
    from wsi_pipeline.synth import write_slide

    wrong = []
    for task, truth in (("fls", "H&E"), ("liver", "H&E"), ("kidney-layer", "PAS"),
                        ("mesangial", "PAS"), ("glomerular-dx", "PAS")):
        for seed in (7, 8):
            path = tmp_path / f"{task}_{seed}.svs"
            write_slide(task, path, width=2048, height=2048, seed=seed)
            from wsi_pipeline.slide import open_slide

            with open_slide(path) as slide:
                rgb = slide.read_level(0, 0, 0, *slide.dimensions)
            ident = identify(rgb)
            if ident["label"] != truth:
                wrong.append((task, seed, ident))
    assert not wrong, wrong
