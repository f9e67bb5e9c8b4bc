"""The Python API: `analyse` on a real slide and on a synthetic one, its `Report`, and the
stage functions on arrays (`read_pyramid`, `normalise_stain`, `predict_region`)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from conftest import shared

import wsi_pipeline as w
from wsi_pipeline.errors import SlideNotFound

CMU1 = shared("slides", "CMU-1-Small-Region.svs")


def test_public_names_resolve_and_are_documented():
    for name in w.__all__:
        obj = getattr(w, name)
        if callable(obj) and name != "__version__":
            assert (obj.__doc__ or "").strip(), name
    for name in ("analyse", "read_pyramid", "normalise_stain", "predict_region"):
        doc = getattr(w, name).__doc__
        assert "Parameters" in doc and "Returns" in doc and "Examples" in doc, name


@pytest.mark.skipif(not CMU1.is_file(), reason="../shared/data (CMU-1-Small-Region) absent")
def test_analyse_a_real_slide(tmp_path):
    report = w.analyse(CMU1, task="fls", out=tmp_path, model="classical")
    on_disk = json.loads((tmp_path / "CMU-1-Small-Region" / "report.json").read_text())
    assert report.ok and report.complete and report.to_dict() == on_disk
    assert report.slide_id == "CMU-1-Small-Region" and report.task == "fls"
    assert report.diagnosis == on_disk["diagnosis"] and report.scores == on_disk["scores"]
    assert report.areas_mm2["tissue"] == on_disk["areas_mm2"]["tissue"] > 0.5
    assert set(report.files) == {"report.json", "objects.geojson", "mask.ome.tif",
                                 "overlay.png"}
    levels = w.read_pyramid(report.folder)
    assert [lv.mpp for lv in levels] == [0.5, 1.0, 2.0]
    info = on_disk["slide"]
    for level in levels:   # the slide's extent in microns at each level's MPP
        assert level.image.shape == (math.ceil(info["height_px"] * info["mpp"] / level.mpp),
                                     math.ceil(info["width_px"] * info["mpp"] / level.mpp), 3)
    assert levels[2].image.dtype == np.uint8


def test_analyse_errors_one_slide_raises_a_batch_reports(tmp_path, fls_slide):
    with pytest.raises(SlideNotFound):
        w.analyse(tmp_path / "missing.svs", task="fls", out=tmp_path / "o")
    path, _ = fls_slide
    reports = w.analyse([path, tmp_path / "missing.svs"], task="fls", out=tmp_path / "o",
                        until="tissue")
    assert [r.status for r in reports] == ["ok (until tissue)", "failed"]
    assert "no such file" in reports[1].error and reports[1].to_dict() == {}
    assert reports[0].counts["tissue_tiles"] > 0 and not reports[0].complete
    with pytest.raises(w.WsiError, match="unknown task"):
        w.analyse(path, task="fsl", out=tmp_path / "o")


def test_stage_functions_on_arrays(tmp_path, fls_slide):
    path, _ = fls_slide
    slide = w.open_slide(path)
    region = slide.read(0, 0, 768, 768, 0.5)            # x, y um; w, h px; mpp
    assert region.shape == (768, 768, 3) and region.dtype == np.uint8
    normalised = w.normalise_stain(region, "he")
    assert normalised.shape == region.shape and normalised.dtype == np.uint8
    assert not np.array_equal(normalised, region)
    prob = w.predict_region(region, "fls", batch_size=4)
    assert prob.shape == (1, 192, 192) and prob.dtype == np.float32
    assert 0.0 <= prob.min() and prob.max() <= 1.0
    with pytest.raises(w.WsiError, match="uint8"):
        w.predict_region(region.astype(np.float32), "fls")
