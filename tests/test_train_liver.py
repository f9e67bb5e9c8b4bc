"""The liver task's pieces that need no network: the weak-label cohort list, the
supervised + complementary loss wiring, weak-share sampling, the r rule for a slide and
for a patient, and ``cases.csv``."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from wsi_pipeline.batch import expand_inputs, write_cases, write_summary
from wsi_pipeline.errors import UsageError
from wsi_pipeline.tasks import get_task, liver
from wsi_pipeline.train.data import TrainSlide, read_cohort, sample_mixed, split_slides
from wsi_pipeline.train.loop import _complementary_loss

TASK = get_task("liver")


def _cohort(folder: Path, rows: list[tuple[str, str, str]]) -> Path:
    """Slide placeholders and a cohort list (slide, diagnosis, annotated): read_cohort
    only lists files and looks for annotations beside them."""
    for name, _, annotated in rows:
        (folder / name).write_bytes(b"")
        if annotated == "1":
            (folder / name.replace(".svs", ".truth.zarr")).mkdir()
    path = folder / "cohort.csv"
    path.write_text("patient_id,slide,diagnosis,annotated\n" + "".join(
        f"p{i},{n},{d},{a}\n" for i, (n, d, a) in enumerate(rows)))
    return path


def test_read_cohort_gives_weak_slides_the_other_tumour_as_complementary_label(tmp_path):
    csv_path = _cohort(tmp_path, [("a.svs", "HCC", "1"), ("b.svs", "HCC", "0"),
                                  ("c.svs", "CCA", "0"), ("d.svs", "cca", "")])
    paths, comps, groups = read_cohort(csv_path, TASK)
    assert [p.name for p in paths] == ["a.svs", "b.svs", "c.svs", "d.svs"]
    assert groups == [("p0", "HCC"), ("p1", "HCC"), ("p2", "CCA"), ("p3", "CCA")]
    hcc, cca = TASK.model.classes.index("hcc"), TASK.model.classes.index("cca")
    # annotated -> -1; an HCC patient's slide cannot show CCA and vice versa; no
    # 'annotated' value and no annotations beside it -> weak
    assert comps == [-1, cca, hcc, hcc]


def test_read_cohort_refuses_an_unknown_diagnosis_and_a_missing_slide(tmp_path):
    csv_path = _cohort(tmp_path, [("a.svs", "normal", "0")])
    with pytest.raises(UsageError, match="diagnosis 'NORMAL'.*HCC, CCA"):
        read_cohort(csv_path, TASK)
    (tmp_path / "a.svs").unlink()
    with pytest.raises(UsageError, match="no such slide"):
        read_cohort(csv_path, TASK)
    with pytest.raises(UsageError, match="does not train from weak labels"):
        read_cohort(csv_path, get_task("fls"))


def test_supervised_plus_complementary_loss_by_hand():
    # 3 patches of 1 pixel over the 4 liver classes: patch 0 annotated, patches 1 and 2
    # weak with complementary labels cca (3) and hcc (2)
    logits = torch.log(torch.tensor([[0.1, 0.2, 0.3, 0.4],
                                     [0.1, 0.2, 0.3, 0.4],
                                     [0.25, 0.25, 0.25, 0.25]])).reshape(3, 4, 1, 1)
    comp = torch.tensor([-1, 3, 2])
    loss = _complementary_loss(4, weight=0.5)
    # special-case Q: q = 1 - p_excluded; per patch -(1 - q)^2 log q, then the mean
    # patch 1: q = 0.6 -> -(0.4^2) ln 0.6 = 0.081732; patch 2: q = 0.75 -> 0.017982
    expected_weak = (0.16 * -math.log(0.6) + 0.0625 * -math.log(0.75)) / 2
    got = loss(logits, comp, torch.tensor(2.0))
    assert float(got) == pytest.approx(2.0 + 0.5 * expected_weak, rel=1e-5)
    # a batch of annotated patches only is the supervised loss; weight 0 drops L_compl
    assert float(loss(logits[:1], comp[:1], torch.tensor(2.0))) == pytest.approx(2.0)
    assert float(_complementary_loss(4, 0.0)(logits, comp, torch.tensor(2.0))) == 2.0
    # weak patches only: the supervised term (empty) does not count
    assert float(loss(logits[1:], comp[1:], torch.tensor(7.0))) == pytest.approx(
        0.5 * expected_weak, rel=1e-5)


def test_a_gradient_step_on_a_weak_patch_lowers_the_excluded_class():
    logits = torch.zeros(1, 4, 4, 4, requires_grad=True)
    loss = _complementary_loss(4, 1.0)(logits, torch.tensor([3]), torch.tensor(0.0))
    loss.backward()
    with torch.no_grad():
        after = torch.softmax(logits - 1.0 * logits.grad, 1)
    assert float(after[0, 3].mean()) < 0.25 < float(after[0, 2].mean())


def test_weak_share_of_each_plan_is_fixed():
    tiles = np.stack([np.zeros(4, int), np.arange(4)], 1)
    slides = [TrainSlide(f"s{i}", Path("s.svs"), Path("s.zarr"), None, tiles,
                         np.zeros((0, 2), int), (512, 2048), 512, "human", comp)
              for i, comp in enumerate([-1, 3, 2, 3, 2])]
    plan = sample_mixed(slides, 1000, 64, np.random.default_rng(0), 0.0, 0.25,
                        lambda s: s.weak)
    assert (plan[:, 0] == 0).sum() == 750


def test_validation_split_keeps_patients_whole_and_takes_each_diagnosis():
    # 6 annotated patients (3 HCC, 3 CCA; two of them with two slides) and 2 weak slides
    tiles = np.stack([np.zeros(4, int), np.arange(4)], 1)
    positives = np.ones((5, 2), int)
    rows = [("a1", "pa", "HCC"), ("a2", "pa", "HCC"), ("b", "pb", "HCC"), ("c", "pc", "HCC"),
            ("d1", "pd", "CCA"), ("e", "pe", "CCA"), ("d2", "pd", "CCA"), ("f", "pf", "CCA")]
    slides = [TrainSlide(n, Path("s.svs"), Path("s.zarr"), None, tiles, positives,
                         (512, 2048), 512) for n, _, _ in rows]
    slides += [TrainSlide(f"w{i}", Path("s.svs"), Path("s.zarr"), None, tiles,
                          np.zeros((0, 2), int), (512, 2048), 512, "human", 3) for i in range(2)]
    groups = [(p, d) for _, p, d in rows] + [("pw", "HCC")] * 2
    patient = {n: p for n, p, _ in rows}
    diagnosis = {p: d for _, p, d in rows}
    for seed in range(20):
        train, val = split_slides(slides, 0.2, seed, groups)
        assert sorted(s.slide_id for s in train + val) == sorted(s.slide_id for s in slides)
        val_patients = {patient[s.slide_id] for s in val}
        # one patient of each diagnosis (round(0.2 * 3) = 1), with all of its slides
        assert sorted(diagnosis[p] for p in val_patients) == ["CCA", "HCC"], seed
        assert not val_patients & {patient.get(s.slide_id) for s in train}, seed
        assert {"w0", "w1"} <= {s.slide_id for s in train}  # weak slides always train
    # without groups: slide-level, as before
    train, val = split_slides(slides, 0.2, 0)
    assert len(val) == 2 and not {s.slide_id for s in val} & {"w0", "w1"}


def test_slide_and_patient_rule_by_hand():
    p = liver.LiverParams()
    assert liver.score(0.6, 0.2, p)["scores"]["hcc_fraction"] == 0.75
    assert liver.score(0.6, 0.2, p)["diagnosis"]["label"] == "HCC"
    assert liver.score(0.2, 0.2, p)["diagnosis"]["label"] == "CCA"   # r = 0.5 is not > 0.5
    assert liver.score(0.02, 0.02, p)["diagnosis"]["label"] == "no-tumour"
    # two slides of one patient: HCC 0.1 + 0.1, CCA 0.3 + 0.0 -> r = 0.4: CCA, although
    # the second slide alone is HCC
    reports = [{"areas_mm2": {"hcc": 0.1, "cca": 0.3}}, {"areas_mm2": {"hcc": 0.1, "cca": 0}}]
    case = liver.case_rule(reports)
    assert case == {"slides": 2, "hcc_mm2": 0.2, "cca_mm2": 0.3, "hcc_fraction": 0.4,
                    "diagnosis": "CCA"}


def _done(out: Path, slide_id: str, patient: str, hcc: float, cca: float,
          complete: bool = True, task: str = "liver") -> dict:
    (out / slide_id).mkdir(parents=True)
    (out / slide_id / "report.json").write_text(json.dumps(
        {"task": task, "complete": complete, "areas_mm2": {"hcc": hcc, "cca": cca}}))
    return {"slide_id": slide_id, "path": f"{slide_id}.svs", "task": task,
            "status": "ok", "patient_id": patient}


def test_cases_csv_groups_slides_by_patient_and_never_shows_a_partial_patient(tmp_path):
    rows = [_done(tmp_path, "a1", "A", 0.5, 0.1), _done(tmp_path, "a2", "A", 0.0, 0.2),
            _done(tmp_path, "b1", "B", 0.0, 0.4),
            _done(tmp_path, "c1", "C", 0.3, 0.0, complete=False),
            _done(tmp_path, "lone", "", 0.3, 0.0),
            _done(tmp_path, "fls1", "A", 9.0, 0.0, task="fls")]  # another task: never counted
    write_summary(tmp_path, rows)
    write_cases(tmp_path, liver.PLUGIN.patient_rule, "liver")
    with open(tmp_path / "cases.csv", newline="") as f:
        cases = {r["patient_id"]: r for r in csv.DictReader(f)}
    assert set(cases) == {"A", "B", "C", "lone"}
    assert {c["task"] for c in cases.values()} == {"liver"}
    assert (cases["A"]["diagnosis"], cases["A"]["slides"]) == ("HCC", "2")
    assert float(cases["A"]["hcc_fraction"]) == pytest.approx(0.5 / 0.8, abs=1e-5)
    assert cases["B"]["diagnosis"] == "CCA"
    assert (cases["C"]["status"], cases["C"]["diagnosis"]) == ("incomplete", "")
    assert "c1" in cases["C"]["error"]
    assert cases["lone"]["diagnosis"] == "HCC"


def test_patients_come_from_the_list_or_the_folder(tmp_path):
    for patient in ("P1", "P2"):
        (tmp_path / patient).mkdir()
        (tmp_path / patient / f"{patient}_s.svs").write_bytes(b"x")
    listed = tmp_path / "list.csv"
    listed.write_text("path,patient_id\nP1/P1_s.svs,case-7\nP2/P2_s.svs,\n")
    assert [j.patient_id for j in expand_inputs([str(listed)])] == ["case-7", ""]
    jobs = expand_inputs([str(tmp_path / "P1"), str(tmp_path / "P2")], patient_from="folder")
    assert [j.patient_id for j in jobs] == ["P1", "P2"]
