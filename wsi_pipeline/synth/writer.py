"""The task-independent slide writer: from a `SynthSpec` to the SVS, the truth JSON and the
truth zarr.

Rendering runs tile by tile, optionally in worker processes (each holds one copy of the
spec and the scene, sent once at start-up); results come back in order through a bounded
window, so memory does not grow with the slide.

It knows no task by name, so the task modules can use it (liver cohorts, glomerular-dx
cases) while `generate`, the registry of task names behind `write_slide`, imports them.
"""

from __future__ import annotations

import json
import os
import shutil
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import numpy as np

from ..errors import OutputNotWritable, UsageError
from ..version import __version__
from . import scene as sc
from .common import SynthSpec
from .tiff_writer import Level0Tile, downsample4, jpeg_tile, write_aperio

TILE_PX = 512
JPEG_QUALITY = 80
LABEL_CHUNK_PX = 1024
LABEL_SUBTILE_PX = 256
LABEL_MAX_PIXELS = 128 * 1024 * 1024  # label mask at most ~128 Mpx: coarser MPP beyond
GENERATOR_VERSION = "1"


def truth_paths(path: str | os.PathLike) -> tuple[Path, Path]:
    """(<stem>.truth.json, <stem>.truth.zarr) beside the slide at `path`."""
    p = Path(path)
    return p.with_name(p.stem + ".truth.json"), p.with_name(p.stem + ".truth.zarr")


def truth_labels_on_grid(path: str | os.PathLike, shape: tuple[int, int], mpp: float
                         ) -> np.ndarray:
    """The truth label mask of the slide at ``path`` sampled at the pixel centres of a
    (H, W) = ``shape`` grid of ``mpp`` um/px from the slide origin (nearest label pixel):
    (H, W) uint8 legend values, e.g. to score a prediction map against the truth."""
    import zarr

    labels = zarr.open_group(str(truth_paths(path)[1]), mode="r")["labels"]
    step = mpp / float(labels.attrs["mpp"])
    rows = np.minimum(((np.arange(shape[0]) + 0.5) * step).astype(int), labels.shape[0] - 1)
    cols = np.minimum(((np.arange(shape[1]) + 0.5) * step).astype(int), labels.shape[1] - 1)
    return np.asarray(labels.get_orthogonal_selection((rows, cols)))


def label_downsample(width_px: int, height_px: int) -> int:
    """Power-of-two factor between slide and label-mask pixels (1 for ordinary slides)."""
    f = 1
    while (width_px / f) * (height_px / f) > LABEL_MAX_PIXELS:
        f *= 2
    return f


# ----------------------------------------------------------------------------- workers

_WORKER: dict = {}


def _single_thread_blas():
    """Limit BLAS to one thread (its small matmuls only contend with our processes)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # optional: only a speed matter
        from contextlib import nullcontext

        return nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


def _init_worker(spec: SynthSpec, scene) -> None:
    _WORKER["spec"] = spec
    _WORKER["scene"] = scene
    _WORKER["blas"] = _single_thread_blas()


def _render_job(args: tuple[int, int, int, int]) -> Level0Tile | None:
    x0, y0, size, quality = args
    rgb = _WORKER["spec"].render_tile(_WORKER["scene"], x0, y0, size)
    if rgb is None:
        return None
    return Level0Tile(jpeg_tile(rgb, quality), downsample4(rgb))


def _raw_level0(path: str) -> np.ndarray:
    """The randomised slide's rendered level 0 (a memory map, opened once per process)."""
    raw = _WORKER.get("raw")
    if raw is None or _WORKER.get("raw_path") != path:
        raw = _WORKER["raw"] = np.lib.format.open_memmap(path, mode="r+")
        _WORKER["raw_path"] = path
    return raw


def _render_raw_job(args: tuple[int, int, int, str]) -> None:
    """Randomised slides, pass 1: render a tile into the level-0 memory map."""
    x0, y0, size, path = args
    _raw_level0(path)[y0:y0 + size, x0:x0 + size] = _WORKER["spec"].render_tile(
        _WORKER["scene"], x0, y0, size)


def _scan_job(args: tuple[int, int, int, int, str]) -> Level0Tile:
    """Randomised slides, pass 2: the scanner's view of a tile, JPEG-encoded."""
    x0, y0, size, quality, path = args
    rgb = _WORKER["scene"].randomise.scanner.apply(_raw_level0(path), x0, y0, size)
    return Level0Tile(jpeg_tile(rgb, quality), downsample4(rgb))


def _label_job(args: tuple[float, float, float, int, int, int]):
    x0_um, y0_um, px_um, size, h, w = args
    lab = np.zeros((size, size), np.uint8)
    sub = LABEL_SUBTILE_PX  # bounded temporaries whatever the chunk size
    for y in range(0, h, sub):
        for x in range(0, w, sub):
            lab[y:y + sub, x:x + sub] = _WORKER["spec"].label_tile(
                _WORKER["scene"], x0_um + x * px_um, y0_um + y * px_um, px_um, sub)
    lab = lab[:h, :w]
    counts = np.bincount(lab.ravel(), minlength=256)
    return (lab if counts[0] < lab.size else None), counts


def _ordered_map(fn: Callable, jobs: Iterable, pool: ProcessPoolExecutor | None,
                 window: int = 16) -> Iterator:
    """Map in order with at most `window` jobs in flight (inline without a pool)."""
    if pool is None:
        for job in jobs:
            yield fn(job)
        return
    pending: deque = deque()
    for job in jobs:
        pending.append(pool.submit(fn, job))
        if len(pending) >= window:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


# ----------------------------------------------------------------------------- outputs


def _label_image(task: str, seed: int, stem: str) -> np.ndarray:
    """Slide label (387 x 463 px): text and a pseudo 2D barcode."""
    from PIL import Image, ImageDraw

    im = Image.new("RGB", (387, 463), (236, 236, 230))
    d = ImageDraw.Draw(im)
    for k, line in enumerate(("wsi-synth", f"task {task}", f"seed {seed}", stem[:28])):
        d.text((24, 24 + 26 * k), line, fill=(20, 20, 20))
    bits = sc.hash_uniform(seed, np.arange(24)[:, None], np.arange(24)[None, :]) > 0.5
    for (i, j) in zip(*np.nonzero(bits), strict=True):
        d.rectangle([90 + 9 * j, 160 + 9 * i, 98 + 9 * j, 168 + 9 * i], fill=(0, 0, 0))
    return np.asarray(im)


def _macro_image(label_rgb: np.ndarray, thumb: np.ndarray) -> np.ndarray:
    """Macro photo of the whole glass slide (1280 x 431): label at left, tissue area right."""
    from PIL import Image

    im = Image.new("RGB", (1280, 431), (205, 205, 200))
    lab = Image.fromarray(label_rgb).resize((340, 400))
    im.paste(lab, (15, 15))
    t = Image.fromarray(thumb)
    t.thumbnail((880, 400))
    im.paste(t, (380 + (880 - t.width) // 2, 15 + (400 - t.height) // 2))
    return np.asarray(im)


def _write_labels(zpath: Path, spec: SynthSpec, scene, pool, f: int, progress) -> dict:
    """Label mask chunk by chunk into <stem>.truth.zarr; returns areas in mm2 by name."""
    import zarr

    w, h = -(-scene.width_px // f), -(-scene.height_px // f)
    px_um = scene.mpp * f
    C = LABEL_CHUNK_PX
    root = zarr.open_group(str(zpath), mode="w")
    arr = root.create_array("labels", shape=(h, w), chunks=(C, C), dtype="uint8",
                            fill_value=0)
    arr.attrs.update({
        "mpp": px_um, "downsample": f,
        "legend": {str(k): v for k, v in spec.legend.items()},
        "tissue_classes": list(spec.tissue_classes),
        "description": "truth label mask; tissue = label not in (background, pen)",
    })
    jobs = [(cx * C * px_um, cy * C * px_um, px_um, C, min(C, h - cy * C), min(C, w - cx * C))
            for cy in range(-(-h // C)) for cx in range(-(-w // C))]
    counts = np.zeros(256, np.int64)
    bar = progress(total=len(jobs), desc="labels") if progress else None
    for job, (lab, cnt) in zip(jobs, _ordered_map(_label_job, jobs, pool), strict=True):
        counts += cnt
        if lab is not None:
            y0, x0 = round(job[1] / px_um), round(job[0] / px_um)
            arr[y0:y0 + lab.shape[0], x0:x0 + lab.shape[1]] = lab
        if bar:
            bar.update(1)
    if bar:
        bar.close()
    return {name: float(counts[k]) * px_um * px_um / 1e6 for k, name in spec.legend.items()}


def _write_arrays(zpath: Path, arrays: dict) -> None:
    import zarr

    root = zarr.open_group(str(zpath), mode="a")
    for name, (data, attrs) in arrays.items():
        data = np.asarray(data)
        chunks = (min(max(len(data), 1), 1 << 18),) + data.shape[1:]
        a = root.create_array(name, shape=data.shape, chunks=chunks, dtype=data.dtype,
                              fill_value=0)
        if data.size:
            a[...] = data
        a.attrs.update(attrs)


def _raw_file(folder: Path, height: int, width: int) -> str:
    """A new (height, width, 3) uint8 .npy memory map in `folder` (removed by the caller)."""
    import tempfile

    fd, name = tempfile.mkstemp(dir=folder, prefix=".wsi-synth-raw-", suffix=".npy")
    os.close(fd)
    np.lib.format.open_memmap(name, mode="w+", dtype=np.uint8, shape=(height, width, 3))
    return name


def check_writable(path: Path) -> None:
    """Create the folder of `path`; OutputNotWritable if it cannot be written into."""
    folder = path.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputNotWritable(f"cannot create output folder {folder}: {e.strerror}") from e
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OutputNotWritable(f"output folder {folder} is not writable")
    if path.is_dir():
        raise OutputNotWritable(f"output path {path} is a folder, not a slide file name")


def resolve_mpp(spec: SynthSpec, mpp: float | None) -> float:
    """`mpp` (um/px) or the task's default; UsageError outside the plausible range."""
    mpp = float(mpp or spec.default_mpp)
    if not 0.05 <= mpp <= 20:
        raise UsageError(f"mpp {mpp} um/px is outside the plausible range 0.05-20")
    return mpp


def write_spec_slide(spec: SynthSpec, path: str | os.PathLike, *, width: int | None = None,
                     height: int | None = None, mpp: float | None = None, seed: int = 0,
                     label: str | None = None, pen: bool | str = False,
                     fold: bool = False, workers: int | None = None,
                     progress: Callable | None = None, tile: int = TILE_PX,
                     quality: int = JPEG_QUALITY, build_kw: dict | None = None,
                     randomise: bool = False) -> dict:
    """Write a synthetic slide of `spec`'s task; return the truth dict.

    `generate.write_slide` with the task given as its SynthSpec (see there for the
    arguments); ``pen`` True draws a stroke in an ink drawn from the seed, a colour name
    (a key of `scene.PEN_INKS`) one in that ink; build_kw: extra keyword arguments of
    `spec.build` (e.g. species); randomise: domain-randomised stains, section, nuclei,
    artefacts and scanner (`randomise`), the JPEG quality included (`quality` is then
    ignored); it needs width x height x 3 bytes of temporary disk beside the slide.
    """
    task = spec.name
    mpp = resolve_mpp(spec, mpp)
    width = int(width or spec.default_size_px[0])
    height = int(height or spec.default_size_px[1])
    if width < 64 or height < 64:
        raise UsageError(f"slide size {width}x{height} px is too small (at least 64x64)")
    if label is not None and label not in spec.labels:
        raise UsageError(f"label {label!r} is not valid for task {task!r}; choose one of "
                         f"{', '.join(spec.labels)}")
    if tile % 64 or tile < 128:
        raise UsageError("tile size must be a multiple of 64, at least 128")
    path = Path(path)
    check_writable(path)
    json_path, zarr_path = truth_paths(path)

    with _single_thread_blas():
        try:
            return _write(spec, task, path, json_path, zarr_path, width, height, mpp, seed,
                          label, pen, fold, workers, progress, tile, quality, build_kw or {},
                          bool(randomise))
        except OSError as e:
            raise OutputNotWritable(f"cannot write {path}: {e.strerror or e}") from e


def _write(spec, task, path, json_path, zarr_path, width, height, mpp, seed, label, pen, fold,
           workers, progress, tile, quality, build_kw, randomise=False) -> dict:
    from .scene import pen_ink

    with pen_ink(pen if isinstance(pen, str) else None):   # the ink is chosen at build time
        scene = spec.build(task, int(seed), width, height, mpp, label, bool(pen), bool(fold),
                           **build_kw)
    if randomise:
        from .randomise import attach

        attach(spec, scene)
        quality = scene.randomise.scanner.jpeg_quality
    n_tiles = -(-width // tile) * -(-height // tile)
    if workers is None:
        workers = min(2, os.cpu_count() or 1) if n_tiles > 64 else 0
    pool = None
    if workers and workers > 0:
        pool = ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn"),
                                   initializer=_init_worker, initargs=(spec, scene))
    else:
        _init_worker(spec, scene)
    raw_path = None
    try:
        if zarr_path.exists():
            shutil.rmtree(zarr_path)
        f = label_downsample(width, height)
        areas = _write_labels(zarr_path, spec, scene, pool, f, progress)
        _write_arrays(zarr_path, spec.arrays(scene))

        cols, rows = -(-width // tile), -(-height // tile)
        origins = [(tx * tile, ty * tile) for ty in range(rows) for tx in range(cols)]
        bar = progress(total=n_tiles, desc="level 0") if progress else None
        if randomise:  # render all of level 0 first: the scanner's blur reads across tiles
            raw_path = _raw_file(path.parent, rows * tile, cols * tile)
            bar1 = progress(total=n_tiles, desc="render") if progress else None
            for _ in _ordered_map(_render_raw_job, [(x, y, tile, raw_path) for x, y in origins],
                                  pool, window=4 * max(workers, 1)):
                if bar1:
                    bar1.update(1)
            if bar1:
                bar1.close()
            fn, jobs = _scan_job, [(x, y, tile, quality, raw_path) for x, y in origins]
        else:
            fn, jobs = _render_job, ((x, y, tile, quality) for x, y in origins)

        def level0():
            for item in _ordered_map(fn, jobs, pool, window=4 * max(workers, 1)):
                if bar:
                    bar.update(1)
                yield item

        rng = np.random.default_rng([seed, 7])
        label_rgb = _label_image(task, seed, path.stem)
        info = write_aperio(
            path, level0(), width=width, height=height, mpp=mpp, tile=tile, quality=quality,
            glass_rgb=lambda k: sc.glass_tile(scene.stains, tile, rng),
            label_rgb=label_rgb, macro_rgb=lambda th: _macro_image(label_rgb, th),
        )
        if bar:
            bar.close()
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
        _WORKER.pop("raw", None)
        if raw_path is not None:
            os.remove(raw_path)

    part = spec.truth(scene, areas)
    truth = {
        "task": task,
        **({"species": part["species"]} if "species" in part else {}),
        "diagnosis": part["diagnosis"],
        "scores": part["scores"],
        "counts": part["counts"],
        "areas_mm2": part["areas_mm2"],
        "objects": part["objects"],
        "generator": {
            "name": "wsi-synth", "version": f"{__version__}+synth{GENERATOR_VERSION}",
            "seed": int(seed), "width": width, "height": height, "mpp": mpp,
            "stain_matrix": [[round(float(v), 5) for v in row] for row in scene.stains.matrix],
            "stain_names": list(scene.stains.names),
            "stain_intensity": [round(float(v), 4) for v in scene.stains.intensity],
            "glass_od": [round(float(v), 4) for v in scene.stains.glass_od],
            "options": {"label": scene.label, "pen": pen if isinstance(pen, str) else bool(pen),
                        "fold": bool(fold),
                        **scene.options},
            **({"randomise": scene.randomise.record()} if randomise else {}),
            "tile": tile, "jpeg_quality": quality,
            "levels": [list(s) for s in info["levels"]],
            "label_mpp": mpp * label_downsample(width, height),
            "legend": {str(k): v for k, v in spec.legend.items()},
            "truth_zarr": zarr_path.name,
        },
    }
    json_path.write_text(json.dumps(truth, indent=1))
    return truth
