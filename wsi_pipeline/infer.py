"""Batched inference over a slide's zarr pyramid, the same for every task.

The engine cuts the working level into overlapping square *windows* (those touching a
tissue tile), reads each window and its concentric context patches from the pyramid
levels a model asks for, runs the model in batches and hands the probabilities, pooled
to the output resolution, to a `BandStitcher`. It knows nothing about a task: the model
says which levels it reads (``model.levels``) and how many classes it predicts.

Reading overlaps computing: a torch DataLoader whose workers each open their own handle
on the store. The network is `wsi_pipeline.runtime.prepare`-d (BatchNorm folded,
channels-last, no autograd state) and, on a CPU, run by the fastest installed runtime
(OpenVINO, ONNX Runtime, else eager torch). On a GPU: pinned host memory and non-blocking
copies, autocast (bf16 where supported, else fp16). Always ``torch.inference_mode``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr
from torch.nn import functional as F

from .blend import BandStitcher, ramp_weights
from .runtime import choose_runtime, compile_runtime, prepare
from .slide import GLASS
from .store import SlideStore


@dataclass(frozen=True)
class EngineOptions:
    """How to run a model: ``device`` "cpu" or "cuda" (already resolved), batch size,
    DataLoader worker processes, mixed precision on the GPU, channels-last layout, and the
    CPU ``runtime`` (`wsi_pipeline.runtime.RUNTIMES`; "auto" takes the fastest installed)."""

    device: str = "cpu"
    batch_size: int = 8
    workers: int = 2
    amp: bool = True
    channels_last: bool = True
    runtime: str = "auto"


def window_grid(tiles: np.ndarray, tile_px: int, level0_hw: tuple[int, int],
                overlap_px: int, align_px: int = 4) -> np.ndarray:
    """Top-left corners (y, x) in level-0 pixels of overlapping ``tile_px`` windows that
    touch a tissue tile, in raster order; (M, 2) int64.

    ``tiles`` are the (row, col) tissue tiles of the ``tile_px`` grid. Windows step by
    ``tile_px - overlap_px`` from ``-overlap_px // 2``, so every tissue pixel lies at
    least half an overlap inside some window. Corners are multiples of ``align_px`` so a
    window's centre falls on a whole pixel of every context level (x2, x4).
    """
    stride = tile_px - overlap_px
    start = -(overlap_px // 2)
    if stride <= 0 or stride % align_px or start % align_px:
        raise ValueError(f"tile {tile_px} px and overlap {overlap_px} px must give a positive "
                         f"stride and offsets that are multiples of {align_px}")
    height, width = level0_hw
    occupied = np.zeros((-(-height // tile_px), -(-width // tile_px)), bool)
    if len(tiles):
        occupied[tiles[:, 0], tiles[:, 1]] = True
    ys = np.arange(start, height, stride)
    xs = np.arange(start, width, stride)
    # a window's first and last tile index along each axis
    ry0, ry1 = np.maximum(ys, 0) // tile_px, np.minimum(ys + tile_px, height) - 1
    rx0, rx1 = np.maximum(xs, 0) // tile_px, np.minimum(xs + tile_px, width) - 1
    ry1, rx1 = ry1 // tile_px, rx1 // tile_px
    counts = np.pad(occupied.cumsum(0).cumsum(1), ((1, 0), (1, 0)))  # summed-area table
    a = counts[ry1[:, None] + 1, rx1[None, :] + 1] - counts[ry0[:, None], rx1[None, :] + 1]
    hit = a - counts[ry1[:, None] + 1, rx0[None, :]] + counts[ry0[:, None], rx0[None, :]]
    iy, ix = np.nonzero(hit > 0)
    return np.stack([ys[iy], xs[ix]], axis=1).astype(np.int64)


def read_patch(array: zarr.Array, y0: int, x0: int, size_px: int) -> np.ndarray:
    """(size_px, size_px, 3) uint8 RGB from a (3, H, W) level, top-left (y0, x0) in that
    level's pixels; the part outside the level is glass white."""
    out = np.full((size_px, size_px, 3), GLASS, np.uint8)
    _, height, width = array.shape
    ys, ye = max(y0, 0), min(y0 + size_px, height)
    xs, xe = max(x0, 0), min(x0 + size_px, width)
    if ye > ys and xe > xs:
        out[ys - y0:ye - y0, xs - x0:xe - x0] = np.moveaxis(array[:, ys:ye, xs:xe], 0, -1)
    return out


def read_context(levels: list[zarr.Array], factors: tuple[int, ...], y0: int, x0: int,
                 size_px: int) -> np.ndarray:
    """(L, size_px, size_px, 3) uint8: the window at level-0 corner (y0, x0) and the
    patches of the same pixel size around the same centre on each context level
    (``factors`` = downsample of each level, e.g. (1, 2, 4))."""
    cy, cx = y0 + size_px // 2, x0 + size_px // 2
    return np.stack([read_patch(arr, cy // f - size_px // 2, cx // f - size_px // 2, size_px)
                     for arr, f in zip(levels, factors, strict=True)])


class WindowDataset(torch.utils.data.Dataset):
    """Windows of a store as (L, H, W, 3) uint8 tensors; each worker process opens its own
    handle on the store the first time it reads."""

    def __init__(self, store_path: str | Path, windows: np.ndarray, size_px: int,
                 levels: tuple[int, ...], factors: tuple[int, ...]) -> None:
        self.store_path = str(store_path)
        self.windows = windows
        self.size_px = size_px
        self.levels = levels
        self.factors = factors
        self._arrays: list[zarr.Array] | None = None

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        if self._arrays is None:
            image = zarr.open_group(self.store_path, mode="r")["image"]
            self._arrays = [image[str(k)] for k in self.levels]
        y0, x0 = (int(v) for v in self.windows[i])
        patch = read_context(self._arrays, self.factors, y0, x0, self.size_px)
        return torch.from_numpy(patch), i

    def __getstate__(self) -> dict[str, Any]:
        return self.__dict__ | {"_arrays": None}   # handles never cross processes


Sink = Callable[[np.ndarray, np.ndarray], None]


def pool_factor(model: torch.nn.Module, out_downsample: int) -> int:
    """How much the model's logits (at its ``output_stride``, default 1) are average-pooled
    to reach the stored resolution ``out_downsample``."""
    stride = int(getattr(model, "output_stride", 1))
    if out_downsample % stride:
        raise ValueError(f"the model predicts at stride {stride}, which does not divide the "
                         f"task's output downsample {out_downsample}")
    return out_downsample // stride


def predict_windows(model: torch.nn.Module, store_path: str | Path, windows: np.ndarray, *,
                    size_px: int, context: tuple[int, ...], out_downsample: int,
                    options: EngineOptions, sink: Sink, base_level: int = 0,
                    progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Run ``model`` over ``windows`` ((M, 2) corners in pixels of level ``base_level``)
    of the store and call ``sink(corners (B, 2), probs (B, C, size/d, size/d) float32)``
    per batch, in order.

    ``context`` is the store's level downsamples (e.g. (1, 2, 4)); the model's ``levels``
    count from ``base_level``. Probabilities are sigmoid (1 class) or softmax (several),
    average-pooled on the device from the model's ``output_stride`` to ``out_downsample``.
    Returns timing figures.
    """
    device = torch.device(options.device)
    pool = pool_factor(model, out_downsample)
    levels = tuple(base_level + k for k in getattr(model, "levels", (0,)))
    factors = tuple(context[k] // context[base_level] for k in levels)
    dataset = WindowDataset(store_path, windows, size_px, levels, factors)
    on_gpu = device.type == "cuda"
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=options.batch_size, shuffle=False, num_workers=options.workers,
        pin_memory=on_gpu, persistent_workers=False,
        prefetch_factor=4 if options.workers else None)
    model = prepare(model.to(device))
    if not options.channels_last:
        model = model.to(memory_format=torch.contiguous_format)
    runtime = choose_runtime(options.runtime, device.type)
    notes: list[str] = []
    if runtime != "torch":
        example = torch.rand(1, len(levels), 3, size_px, size_px)
        run, runtime = compile_runtime(model, runtime, example, log=notes.append)
    else:
        run = model
    amp_dtype = (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
                 ) if on_gpu else None
    started = time.perf_counter()
    model_s = 0.0
    n = 0
    with torch.inference_mode():
        for batch, index in loader:
            t0 = time.perf_counter()
            x = batch.to(device, non_blocking=on_gpu)
            # (B, L, H, W, 3) uint8 -> (B, L, 3, H, W) float, each level channels-last in memory
            x = x.permute(0, 1, 4, 2, 3).float().div_(255)
            with torch.autocast(device.type, dtype=amp_dtype,
                                enabled=options.amp and amp_dtype is not None):
                logits = run(x)
            logits = logits.float()
            probs = torch.sigmoid(logits) if logits.shape[1] == 1 else logits.softmax(1)
            if pool > 1:
                probs = F.avg_pool2d(probs, pool)
            probs = probs.cpu().numpy()
            model_s += time.perf_counter() - t0
            sink(windows[index.numpy()], probs)
            n += len(index)
            if progress:
                progress(len(index))
    total = time.perf_counter() - started
    return {"windows": int(n), "seconds": round(total, 3),
            "model_seconds": round(model_s, 3),
            "windows_per_s": round(n / total, 2) if total > 0 else None,
            "device": str(device), "batch_size": options.batch_size,
            "workers": options.workers, "amp": str(amp_dtype) if options.amp and amp_dtype
            else None, "runtime": runtime, **({"runtime_note": notes[-1]} if notes else {})}


def infer_to_store(model: torch.nn.Module, store: SlideStore, name: str, windows: np.ndarray,
                   *, size_px: int, overlap_px: int, context: tuple[int, ...],
                   level0_hw: tuple[int, int], out_downsample: int, options: EngineOptions,
                   inputs: str, attrs: dict[str, Any] | None = None, chunk_px: int = 512,
                   base_level: int = 0,
                   progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Predict ``windows`` and stitch them into ``pred/<name>`` ((C, H/d, W/d) uint8,
    probability x 255, chunks of ``chunk_px``) of ``store``, resuming an interrupted run with
    the same ``inputs`` at band (chunk-row) granularity.

    With ``base_level`` k > 0 the network reads level k and coarser: ``windows`` and
    ``level0_hw`` are then in level-k pixels, and (H, W) is level k's size.
    """
    out_px = size_px // out_downsample
    classes = int(getattr(model, "classes", 1))
    shape = (classes, -(-level0_hw[0] // out_downsample), -(-level0_hw[1] // out_downsample))
    out = _prediction_array(store, name, shape, chunk_px=chunk_px, inputs=inputs,
                            attrs=attrs or {})
    ramp = overlap_px // out_downsample
    stitcher = BandStitcher(out, ramp_weights(out_px, ramp, margin_px=ramp // 4),
                            marks=store.progress_dir(f"infer-{name}"))
    todo = np.array([w for w in windows if stitcher.needed(int(w[0]) // out_downsample, out_px)],
                    np.int64).reshape(-1, 2)
    if progress and len(windows) > len(todo):
        progress(len(windows) - len(todo))

    def sink(corners: np.ndarray, probs: np.ndarray) -> None:
        for (y0, x0), p in zip(corners.tolist(), probs, strict=True):
            stitcher.add(y0 // out_downsample, x0 // out_downsample, p)

    stats = predict_windows(model, store.path, todo, size_px=size_px, context=context,
                            out_downsample=out_downsample, options=options, sink=sink,
                            base_level=base_level, progress=progress)
    stitcher.close()
    return stats | {"windows_total": int(len(windows)),
                    "windows_skipped": int(len(windows) - len(todo)),
                    "bands": stitcher.n_bands, "shape": list(shape)}


def _prediction_array(store: SlideStore, name: str, shape: tuple[int, int, int], *,
                      chunk_px: int, inputs: str, attrs: dict[str, Any]) -> zarr.Array:
    """``pred/<name>``: reopened when it was made for the same ``inputs``, otherwise made
    anew after its band markers are dropped (so none can vouch for the new array)."""
    group = store.root.require_group("pred")
    if name in group and group[name].attrs.get("inputs") == inputs:
        return group[name]
    if name in group:
        group[name].attrs["inputs"] = None
    store.forget(f"infer-{name}")
    from zarr.codecs import ZstdCodec

    array = group.create_array(name, shape=shape, dtype="uint8", chunks=(1, chunk_px, chunk_px),
                               fill_value=0, overwrite=True, compressors=ZstdCodec(level=1),
                               dimension_names=("c", "y", "x"))
    array.attrs.update(attrs | {"inputs": inputs, "scale": 1 / 255,
                                "description": "probability x 255"})
    return array
