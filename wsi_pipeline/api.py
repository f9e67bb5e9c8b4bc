"""The Python API: the pipeline from a notebook or a script.

`analyse` runs what ``wsi-run`` runs (same stages, same outputs, same resume) and returns
`Report` objects; `read_pyramid`, `normalise_stain` and `predict_region` are the stage
functions a user calls on their own arrays, beside `wsi_pipeline.open_slide`,
`wsi_pipeline.detect_tissue` and `wsi_pipeline.fit_vahadane`.
"""

from __future__ import annotations

import copy
import json
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .batch import expand_inputs, run_job, write_cases, write_summary
from .batch_page import write_index
from .errors import UsageError
from .pipeline import STAGES, RunOptions
from .stain import REFERENCES, StainFit, fit_vahadane, make_normaliser, tissue_pixels
from .store import prepare_output
from .tasks import get_plugin

if TYPE_CHECKING:
    import dask.array

__all__ = ["PyramidLevel", "Report", "analyse", "normalise_stain", "predict_region",
           "read_pyramid"]


@dataclass(frozen=True)
class Report:
    """One input's result: what ``OUT/<slide-id>/report.json`` holds, plus where it is.

    Attributes
    ----------
    slide_id : str
        The input's id, the name of its output folder.
    task : str
        The task that made it.
    status : str
        ``"ok"``; ``"ok (until STAGE)"`` for a run stopped early; ``"failed"``,
        ``"skipped"`` or ``"locked"`` with ``error`` saying why.
    error : str
        One line, empty when the input finished.
    folder : pathlib.Path
        ``OUT/<slide-id>``.
    """

    slide_id: str
    task: str
    status: str
    error: str
    folder: Path
    data: Mapping[str, Any] = field(default_factory=dict, repr=False)

    @property
    def ok(self) -> bool:
        """True when the input finished (``status`` starts with "ok")."""
        return self.status.startswith("ok")

    @property
    def complete(self) -> bool:
        """True when every stage ran (a diagnosis exists)."""
        return bool(self.data.get("complete"))

    @property
    def diagnosis(self) -> dict[str, Any]:
        """``label``, ``adequate`` and ``note`` (and a task's extra keys)."""
        return dict(self.data.get("diagnosis") or {})

    @property
    def scores(self) -> dict[str, Any]:
        return dict(self.data.get("scores") or {})

    @property
    def counts(self) -> dict[str, Any]:
        return dict(self.data.get("counts") or {})

    @property
    def areas_mm2(self) -> dict[str, Any]:
        """Areas in mm2 (``tissue`` and the task's classes)."""
        return dict(self.data.get("areas_mm2") or {})

    @property
    def objects(self) -> list[dict[str, Any]]:
        """One dict per object (focus, glomerulus, region): ``class``, ``centroid_um`` and
        its measurements."""
        return list(self.data.get("objects") or [])

    @property
    def quality(self) -> dict[str, Any]:
        return dict(self.data.get("quality") or {})

    @property
    def files(self) -> dict[str, Path]:
        """The output files that exist, by name (report.json, mask.ome.tif, ...)."""
        names = ("report.json", "objects.geojson", "mask.ome.tif", "overlay.png")
        return {n: self.folder / n for n in names if (self.folder / n).is_file()}

    def to_dict(self) -> dict[str, Any]:
        """A deep copy of report.json (empty for an input that did not run)."""
        return copy.deepcopy(dict(self.data))


def analyse(paths: str | Path | Sequence[str | Path], task: str, out: str | Path = "wsi-out",
            *, until: str = "export", weights: str | Path | None = None,
            model: str = "network", mpp: float | None = None, backend: str = "auto",
            stain_backend: str = "numpy", device: str = "auto", batch_size: int = 8,
            workers: int = 2, recursive: bool = False, patient_from: str = "list",
            force: bool = False, lock_wait_s: float = 0.0, progress: bool = False
            ) -> Report | list[Report]:
    """Run ``task`` on slides, as ``wsi-run`` does, and return their reports.

    Parameters
    ----------
    paths : str, Path or sequence of them
        A slide, a folder of slides, a glob pattern, a CSV slide list or a URL (a case
        folder for a case task); or a list of these.
    task : str
        An installed task (`wsi_pipeline.tasks.task_names`), e.g. ``"fls"``.
    out : str or Path
        Output folder; each input gets ``out/<slide-id>/`` and the run updates
        ``out/summary.csv`` (and ``out/cases.csv`` for a task with a patient rule).
    until : str
        Last stage to run (``"tissue"`` ... ``"export"``).
    weights : str or Path, optional
        A checkpoint (.safetensors with its sidecar, or a folder); default: the task's
        bundled demo weights.
    model : str
        ``"network"`` or one of the task's alternative modes (fls: ``"classical"``).
    mpp : float, optional
        Level-0 microns per pixel, overriding the slide's metadata.
    backend, stain_backend, device, batch_size, workers, recursive, patient_from, force
        As the ``wsi-run`` options of the same names.
    lock_wait_s : float
        Seconds to wait for a slide another process is writing (0: skip it).
    progress : bool
        Progress bars on stderr.

    Returns
    -------
    Report or list of Report
        One `Report` when ``paths`` is a single slide or case; a list (one per input, in
        order) for a folder, pattern, list or several paths. A failed input's report has
        ``status == "failed"`` and the reason in ``error``.

    Raises
    ------
    wsi_pipeline.errors.WsiError
        For bad options, and, when ``paths`` is one slide, for that slide's failure (the
        exception ``wsi-run`` would print as one line).

    Examples
    --------
    >>> import wsi_pipeline as w
    >>> r = w.analyse("slide.svs", task="fls", out="wsi-out")    # doctest: +SKIP
    >>> r.diagnosis["label"], r.scores["focus_score"]            # doctest: +SKIP
    ('positive', 1.8)
    """
    plugin = get_plugin(task)
    if until not in STAGES:
        raise UsageError(f"until={until!r}: choose one of {', '.join(STAGES)}")
    if model != "network" and model not in plugin.modes:
        raise UsageError(f"model={model!r}: task {task} runs "
                         f"{', '.join(('network', *plugin.modes))}")
    single = isinstance(paths, str | Path)
    items = [str(paths)] if single else [str(p) for p in paths]
    folder = prepare_output(out)
    opts = RunOptions(out=folder.resolve(), until=until, mpp=mpp, backend=backend,
                      stain_backend=stain_backend, device=device, workers=workers,
                      batch_size=batch_size, model=model, force=force,
                      weights=Path(weights).resolve() if weights is not None else None,
                      show_progress=progress, argv=("analyse", *items, "--task", task))
    jobs = expand_inputs(items, plugin.spec.input_kind, recursive, patient_from)
    rows = []
    for job in jobs:
        rows.append(run_job(job, plugin.name, opts, lock_wait_s=lock_wait_s))
        write_summary(folder, rows)
    if plugin.patient_rule is not None:
        write_cases(folder, plugin.patient_rule, plugin.name)
    write_index(folder)
    reports = [_report(row, folder) for row in rows]
    if single and len(rows) == 1:
        if "_exception" in rows[0]:
            raise rows[0]["_exception"]
        return reports[0]
    return reports


def _report(row: dict[str, Any], out: Path) -> Report:
    folder = out / row["slide_id"]
    data = None   # as written: JSON types, the same as a later read of report.json
    if row["status"].startswith("ok") and (folder / "report.json").is_file():
        data = json.loads((folder / "report.json").read_text())
    return Report(slide_id=row["slide_id"], task=row["task"], status=row["status"],
                  error=row.get("error") or "", folder=folder, data=data or {})


@dataclass(frozen=True)
class PyramidLevel:
    """One level of a run's normalised image.

    Attributes
    ----------
    mpp : float
        Microns per pixel of this level.
    image : dask.array.Array
        (H, W, 3) uint8 RGB, read lazily chunk by chunk from the store.
    """

    mpp: float
    image: dask.array.Array


def read_pyramid(folder: str | Path) -> list[PyramidLevel]:
    """The stain-normalised multiscale image a run wrote, finest level first.

    Parameters
    ----------
    folder : str or Path
        A slide's output folder (``OUT/<slide-id>``) or its ``store.zarr``.

    Returns
    -------
    list of PyramidLevel
        Each level as a lazy (H, W, 3) uint8 dask array with its MPP (um/px).

    Examples
    --------
    >>> levels = read_pyramid("wsi-out/slide")                   # doctest: +SKIP
    >>> levels[0].mpp, levels[0].image.shape                      # doctest: +SKIP
    (0.5, (9000, 12000, 3))
    """
    import dask.array as da
    import zarr

    path = Path(folder)
    store = path if path.name == "store.zarr" else path / "store.zarr"
    if not (store / "zarr.json").is_file():
        raise UsageError(f"{folder}: no store.zarr here (run the pipeline to the pyramid "
                         "stage first)")
    group = zarr.open_group(str(store), mode="r")
    if "image" not in group:
        raise UsageError(f"{folder}: the store has no pyramid yet (run --until pyramid)")
    image = group["image"]
    datasets = image.attrs["ome"]["multiscales"][0]["datasets"]
    levels = []
    for ds in datasets:
        scale = next(t["scale"] for t in ds["coordinateTransformations"] if t["type"] == "scale")
        levels.append(PyramidLevel(mpp=float(scale[-1]),
                                   image=da.from_zarr(image[ds["path"]]).transpose(1, 2, 0)))
    return levels


def normalise_stain(rgb: np.ndarray, reference: str | StainFit = "he", *,
                    fit: StainFit | None = None, seed: int = 0) -> np.ndarray:
    """Vahadane stain normalisation of an RGB image to a reference stain.

    Parameters
    ----------
    rgb : (H, W, 3) uint8 ndarray
        The image (a region of a slide, a tile).
    reference : str or StainFit
        ``"he"``, ``"pas"`` (`wsi_pipeline.stain.REFERENCES`) or a fit of your own.
    fit : StainFit, optional
        The image's own stain matrices (e.g. fitted once on a whole slide with
        `wsi_pipeline.fit_vahadane`); default: fitted on this image's tissue pixels.
    seed : int
        Seed of the dictionary learning when ``fit`` is fitted here.

    Returns
    -------
    (H, W, 3) uint8 ndarray
        The normalised image; glass stays near white.

    Examples
    --------
    >>> out = normalise_stain(tile, "he")                         # doctest: +SKIP
    """
    rgb = np.ascontiguousarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise UsageError(f"rgb must be (H, W, 3) uint8, got {rgb.shape} {rgb.dtype}")
    if fit is None:
        fit = fit_vahadane(tissue_pixels(rgb), seed=seed)
    if isinstance(reference, str) and reference not in REFERENCES:
        raise UsageError(f"reference {reference!r}: choose one of {', '.join(REFERENCES)}")
    return make_normaliser(fit, reference)(rgb)


def predict_region(rgb: np.ndarray, task: str, *, weights: str | Path | None = None,
                   normalise: bool = True, device: str = "cpu", batch_size: int = 8
                   ) -> np.ndarray:
    """Run a task's network on an image region, with the pipeline's own engine
    (overlapping windows, context levels, ramp blending).

    Parameters
    ----------
    rgb : (H, W, 3) uint8 ndarray
        The region at the task's working resolution (``get_task(task).mpp`` um/px, e.g.
        0.5 for fls); its coarser context levels are made from it (outside it is glass).
    task : str
        An installed task with a network.
    weights : str or Path, optional
        A checkpoint; default: the task's bundled demo weights.
    normalise : bool
        Fit the region's stain and normalise it to the task's reference first, as the
        pipeline does (False: ``rgb`` is already normalised).
    device : str
        ``"cpu"`` or ``"cuda"``.
    batch_size : int
        Windows per forward pass.

    Returns
    -------
    (C, H // d, W // d) float32 ndarray
        Per-class probabilities in [0, 1] (quantised to 1/255) at the task's prediction
        resolution (``d`` = the model's output downsample relative to the level it reads).

    Examples
    --------
    >>> prob = predict_region(region, "fls")                      # doctest: +SKIP
    >>> prob.shape                                                # doctest: +SKIP
    (1, 512, 512)
    """
    from .checkpoint import load_task_model
    from .infer import EngineOptions, infer_to_store, window_grid
    from .pipeline import resolve_device
    from .pyramid import PyramidSpec, create_levels, halve
    from .store import SlideStore

    plugin = get_plugin(task)
    spec = plugin.spec
    if spec.model is None:
        raise UsageError(f"task {task} has no network")
    rgb = np.ascontiguousarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise UsageError(f"rgb must be (H, W, 3) uint8, got {rgb.shape} {rgb.dtype}")
    if normalise:
        rgb = normalise_stain(rgb, spec.stain)
    network, _ = load_task_model(plugin, spec.model,
                                 Path(weights) if weights is not None else None)
    device = resolve_device(device)
    height, width = rgb.shape[:2]
    pyramid = PyramidSpec(mpp=spec.mpp, tile_px=spec.tile_px, context=spec.context)
    with tempfile.TemporaryDirectory(prefix="wsi_region.") as tmp:
        store = SlideStore(Path(tmp) / "store.zarr")
        size_um = (width * spec.mpp, height * spec.mpp)
        levels = create_levels(store, pyramid, size_um, inputs="region")
        level = rgb
        for k, array in enumerate(levels):
            if k:   # the pyramid's own 2 x 2 mean; odd edges padded with glass
                h, w = level.shape[:2]
                level = halve(np.pad(level, ((0, h % 2), (0, w % 2), (0, 0)),
                                     constant_values=255))
            _, h, w = array.shape
            array[:, :min(h, level.shape[0]), :min(w, level.shape[1])] = np.moveaxis(
                level[:h, :w], -1, 0)
        model = spec.model
        base = levels[model.level]
        _, base_h, base_w = base.shape
        rows, cols = -(-base_h // spec.tile_px), -(-base_w // spec.tile_px)
        tiles = np.stack(np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij"),
                         -1).reshape(-1, 2)
        windows = window_grid(tiles, spec.tile_px, (base_h, base_w), model.overlap_px)
        infer_to_store(network, store, "prob", windows, size_px=spec.tile_px,
                       overlap_px=model.overlap_px, context=spec.context,
                       level0_hw=(base_h, base_w), out_downsample=model.out_downsample,
                       options=EngineOptions(device=device, batch_size=batch_size, workers=0),
                       inputs="region", base_level=model.level)
        return np.asarray(store.root["pred/prob"][...], np.float32) / 255.0
