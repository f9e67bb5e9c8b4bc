"""Peer benchmark (issue 17): the same smp U-Net over the same synthetic slide through
TIAToolbox's semantic segmentation engine and through ours, both on CPU, from slide file
to a stitched probability map. Prints windows/s, window Mpx/s and wall seconds of each and
the throughput ratio ours / theirs (goal >= 2).

    python benchmarks/bench_peers.py [--slide PATH] [--size 8192] [--mpp 0.5]
        [--tile-px 512] [--overlap 128] [--output-stride 2] [--out-downsample 2]
        [--classes 1] [--batch-size 8] [--workers 2] [--repeats 2] [--runtime auto]
        [--peer-mask ours|auto] [--stain] [--out DIR]

TIAToolbox is optional: without it (``import tiatoolbox`` fails) only our figures are
printed, with the reason. It pins older torch/numpy/zarr than ours; install it beside our
venv, not into it, reusing our packages::

    /work/main/.venv/bin/python -m venv /tmp/peers-venv
    echo "import site; site.addsitedir('$PWD/.venv/lib/python3.11/site-packages')" \\
        > /tmp/peers-venv/lib/python3.11/site-packages/main-venv.pth
    /work/main/.venv/bin/pip freeze | grep -v '^-e\\|@' > /tmp/peers-constraints.txt
    /tmp/peers-venv/bin/pip install --no-deps tiatoolbox==2.1.3
    /tmp/peers-venv/bin/pip install -c /tmp/peers-constraints.txt shapely pandas \\
        umap-learn SimpleITK defusedxml "universal_pathlib<0.3" transformers
    /tmp/peers-venv/bin/python benchmarks/bench_peers.py

One U-Net (``wsi_pipeline.models.UNet``, random weights, ``--output-stride`` where the
model takes it; the script reads ``getattr(model, "output_stride", 1)`` either way) is
built once; each run gets a deep copy, so our engine's in-place preparation never reaches
theirs. Each side, timed from the slide path to a probability map on disk:

* ours: open the slide, tissue detection on the thumbnail and the tile grid (as the
  tissue stage), the level-0 zarr pyramid (as the pyramid stage; no stain normalisation
  unless ``--stain``, which adds the stain stage's Vahadane fit on 16 tiles and the
  normalisation), ``window_grid`` and ``infer_to_store`` (windows read from the store,
  model, pooling from the model's stride to ``--out-downsample``, ramp-blended stitching
  into ``pred/prob``, uint8);
* theirs: ``tiatoolbox.models.engine.semantic_segmentor.SemanticSegmentor(model).run(
  [slide], patch_mode=False, ioconfig=IOSegmentorConfig(...), output_type="zarr",
  return_probabilities=True)`` -- the 2.x engine (EngineABC / PatchPredictor). It reads
  ``--tile-px`` patches at ``--mpp`` with stride tile - overlap through its WSIReader
  (OpenSlide), runs the model's ``infer_batch``, merges rows and columns by averaging and
  writes ``probabilities`` (float32, at the input resolution: its merge cannot stitch at a
  coarser one, so ``infer_batch`` upsamples a strided output bilinearly, as TIAToolbox's
  own U-Net does). The argmax ``predictions`` it would also save are dropped
  (``drop_keys``, as its DeepFeatureExtractor does); torch.compile is off
  (``rcParam["torch_compile_mode"] = "disable"``; our engine does not compile either).

Same windows for both: 512 px at the same MPP, the same overlap, over the same tissue.
With ``--peer-mask ours`` (default) TIAToolbox is handed our tissue tiles as its mask
(computed before the clock starts, so its run does no tissue detection at all: this errs
in its favour); ``--peer-mask auto`` lets it find tissue itself (Otsu at 1.25x). Its grid
starts at 0, ours half an overlap before, so the counts can differ by a row or column:
the ratio is taken on windows/s. The CPU may be shared: the sides run alternately
``--repeats`` times after a warm-up forward, and the median of the per-round ratios is
reported. DataLoader workers: 0 on a machine with <= 2 cores (as the pipeline), for both.
"""

from __future__ import annotations

import argparse
import copy
import inspect
import logging
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from wsi_pipeline.infer import EngineOptions, infer_to_store, window_grid
from wsi_pipeline.models import UNet
from wsi_pipeline.pyramid import PyramidSpec, write_pyramid
from wsi_pipeline.slide import open_slide
from wsi_pipeline.store import SlideStore
from wsi_pipeline.synth import write_slide
from wsi_pipeline.tissue import detect_tissue, thumbnail_mpp, tile_grid

MIN_TILE_TISSUE = 0.01   # RunOptions.min_tile_tissue
STAIN_SAMPLE_TILES = 16  # RunOptions.stain_sample_tiles
MASK_CELL_PX = 16        # level-0 pixels per cell of the mask handed to TIAToolbox


def build_unet(classes: int, output_stride: int) -> nn.Module:
    """Our U-Net with random weights; at ``output_stride`` when this version takes one."""
    kwargs: dict[str, Any] = {"classes": classes}
    if "output_stride" in inspect.signature(UNet).parameters:
        kwargs["output_stride"] = output_stride
    torch.manual_seed(0)
    return UNet(**kwargs).eval()


def stride_of(model: nn.Module) -> int:
    return int(getattr(model, "output_stride", 1))


def find_tissue(slide_path: Path, tile_px: int, mpp: float) -> np.ndarray:
    """(N, 2) tissue tiles (row, col) of the ``tile_px`` grid at ``mpp``, as the tissue stage."""
    with open_slide(slide_path) as slide:
        thumb_mpp = thumbnail_mpp(slide.size_um, slide.mpp)
        found = detect_tissue(slide.thumbnail(thumb_mpp), thumb_mpp)
        return tile_grid(found.mask, thumb_mpp, slide.size_um, tile_px * mpp, MIN_TILE_TISSUE)


def tile_mask(tiles: np.ndarray, tile_px: int, level_hw: tuple[int, int]) -> np.ndarray:
    """The tissue tiles as a uint8 mask, one cell per ``MASK_CELL_PX`` level-0 pixels."""
    rows, cols = -(-level_hw[0] // tile_px), -(-level_hw[1] // tile_px)
    grid = np.zeros((rows, cols), np.uint8)
    grid[tiles[:, 0], tiles[:, 1]] = 1
    cells = tile_px // MASK_CELL_PX
    mask = np.kron(grid, np.ones((cells, cells), np.uint8))
    return mask[:-(-level_hw[0] // MASK_CELL_PX), :-(-level_hw[1] // MASK_CELL_PX)]


def stain_normaliser(slide: Any, tiles: np.ndarray, tile_px: int, mpp: float) -> Any:
    """The stain stage's fit (``STAIN_SAMPLE_TILES`` tissue tiles) and its normaliser to H&E."""
    from wsi_pipeline import stain

    rng = np.random.default_rng(0)
    pick = np.sort(rng.choice(len(tiles), min(len(tiles), STAIN_SAMPLE_TILES), replace=False))
    pixels = [stain.tissue_pixels(slide.read(c * tile_px * mpp, r * tile_px * mpp,
                                             tile_px, tile_px, mpp)) for r, c in tiles[pick]]
    fit = stain.fit_vahadane(np.concatenate(pixels), seed=0)
    return stain.make_normaliser(fit, "he")


def loader_workers(workers: int) -> int:
    """DataLoader processes, as the pipeline's infer stage picks them on a CPU."""
    return 0 if (os.cpu_count() or 1) <= 2 else workers


# -- ours ------------------------------------------------------------------------------------
def run_ours(slide_path: Path, model: nn.Module, args: argparse.Namespace, out: Path
             ) -> dict[str, Any]:
    t0 = time.perf_counter()
    with open_slide(slide_path) as slide:
        thumb_mpp = thumbnail_mpp(slide.size_um, slide.mpp)
        found = detect_tissue(slide.thumbnail(thumb_mpp), thumb_mpp)
        tiles = tile_grid(found.mask, thumb_mpp, slide.size_um, args.tile_px * args.mpp,
                          MIN_TILE_TISSUE)
        t_tissue = time.perf_counter()
        normalise = stain_normaliser(slide, tiles, args.tile_px, args.mpp) if args.stain \
            else None
        store = SlideStore(out / "store.zarr")
        write_pyramid(slide, store, tiles, PyramidSpec(mpp=args.mpp, tile_px=args.tile_px,
                                                       context=(1,)),
                      normalise, inputs="bench", workers=args.workers)
    t_pyramid = time.perf_counter()
    hw = tuple(store.root["image/0"].shape[1:])
    runtime = {"runtime": args.runtime} if "runtime" in EngineOptions.__dataclass_fields__ else {}
    windows = window_grid(tiles, args.tile_px, hw, args.overlap)
    stats = infer_to_store(
        model, store, "prob", windows, size_px=args.tile_px, overlap_px=args.overlap,
        context=(1,), level0_hw=hw, out_downsample=args.out_downsample,
        options=EngineOptions(device="cpu", batch_size=args.batch_size,
                              workers=loader_workers(args.workers), **runtime), inputs="bench")
    t_end = time.perf_counter()
    return {"wall_s": t_end - t0, "windows": len(windows),
            "parts": {"tissue": t_tissue - t0, "pyramid": t_pyramid - t_tissue,
                      "infer+stitch": t_end - t_pyramid},
            "map": store.root["pred/prob"], "map_scale": args.out_downsample,
            "runtime": stats.get("runtime", "torch")}


# -- theirs ----------------------------------------------------------------------------------
def tiatoolbox_missing() -> str | None:
    """Why TIAToolbox cannot run here (None: it can)."""
    try:
        import tiatoolbox  # noqa: F401
        from tiatoolbox.models.engine.semantic_segmentor import SemanticSegmentor  # noqa: F401
    except Exception as exc:  # ImportError, or a dependency of it that breaks on import
        return f"{type(exc).__name__}: {exc}"
    return None


def tia_model(net: nn.Module) -> nn.Module:
    """``net`` under TIAToolbox's ModelABC: NHWC uint8 patches in, NHWC probabilities out at
    the patch's own resolution (a strided output upsampled bilinearly)."""
    from tiatoolbox.models.models_abc import ModelABC

    class Segmenter(ModelABC):
        def __init__(self, net: nn.Module) -> None:
            super().__init__()
            self.net = net
            self.stride = stride_of(net)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

        @staticmethod
        def infer_batch(model: nn.Module, batch_data: torch.Tensor, *, device: str
                        ) -> np.ndarray:
            model.eval()
            x = batch_data.to(device).permute(0, 3, 1, 2).float().div(255).unsqueeze(1)
            with torch.inference_mode():
                logits = model(x).float()
                probs = torch.sigmoid(logits) if logits.shape[1] == 1 else logits.softmax(1)
                stride = getattr(model, "module", model).stride
                if stride > 1:
                    probs = F.interpolate(probs, scale_factor=stride, mode="bilinear",
                                          align_corners=False)
            return probs.permute(0, 2, 3, 1).cpu().numpy()

        @staticmethod
        def postproc(image: np.ndarray) -> np.ndarray:  # TIAToolbox's U-Net: argmax
            return image.argmax(axis=-1) if image.shape[-1] > 1 else image[..., 0] > 0.5

    return Segmenter(net)


def run_theirs(slide_path: Path, model: nn.Module, mask: np.ndarray | None,
               args: argparse.Namespace, out: Path) -> dict[str, Any]:
    import zarr
    from tiatoolbox import logger, rcParam
    from tiatoolbox.models.engine.io_config import IOSegmentorConfig
    from tiatoolbox.models.engine.semantic_segmentor import SemanticSegmentor

    rcParam["torch_compile_mode"] = "disable"
    logger.setLevel(logging.WARNING)
    resolution = [{"units": "mpp", "resolution": args.mpp}]
    shape = (args.tile_px, args.tile_px)
    stride = args.tile_px - args.overlap
    t0 = time.perf_counter()
    engine = SemanticSegmentor(model=tia_model(model), batch_size=args.batch_size,
                               num_workers=loader_workers(args.workers), device="cpu",
                               verbose=False)
    engine.drop_keys.append("predictions")   # the probability map only, as ours
    timed: dict[str, float] = {}
    infer_wsi = engine.infer_wsi

    def timed_infer_wsi(**kwargs: Any) -> Any:
        t = time.perf_counter()
        try:
            return infer_wsi(**kwargs)
        finally:
            timed["infer+merge"] = time.perf_counter() - t

    engine.infer_wsi = timed_infer_wsi
    ioconfig = IOSegmentorConfig(input_resolutions=resolution, output_resolutions=resolution,
                                 patch_input_shape=shape, patch_output_shape=shape,
                                 stride_shape=(stride, stride))
    result = engine.run([slide_path], masks=None if mask is None else [mask],
                        ioconfig=ioconfig, patch_mode=False, save_dir=out / "tia",
                        overwrite=True, output_type="zarr", return_probabilities=True,
                        auto_get_mask=mask is None, device="cpu")
    wall = time.perf_counter() - t0
    path = next(iter(result.values()))
    windows = len(engine.dataloader.dataset)
    return {"wall_s": wall, "windows": windows,
            "parts": {"infer+merge": timed["infer+merge"],
                      "open, mask, grid, save": wall - timed["infer+merge"]},
            "map": zarr.open_group(str(path), mode="r")["probabilities"], "map_scale": 1}


# -- report ----------------------------------------------------------------------------------
def agreement(ours: dict[str, Any], theirs: dict[str, Any]) -> str:
    """Mean |p_ours - p_theirs| where both wrote a probability, theirs sampled at our grid
    (different blending: ramps vs averages, so not 0)."""
    d = ours["map_scale"]
    mine = np.asarray(ours["map"][0], np.float32) / 255.0
    peer = np.asarray(theirs["map"][d // 2::d, d // 2::d, 0], np.float32)
    h, w = min(mine.shape[0], peer.shape[0]), min(mine.shape[1], peer.shape[1])
    mine, peer = mine[:h, :w], peer[:h, :w]
    both = (mine > 0) & (peer > 0)
    if not both.any():
        return "no common pixels"
    return (f"mean |ours - theirs| {np.abs(mine - peer)[both].mean():.4f} over "
            f"{both.mean():.0%} of the map (class 0)")


def line(name: str, r: dict[str, Any], tile_px: int) -> str:
    mpx = r["windows"] * tile_px**2 / 1e6
    parts = ", ".join(f"{k} {v:.1f}" for k, v in r["parts"].items())
    return (f"  {name:<6} {r['wall_s']:7.1f} s  {r['windows']:5d} windows  "
            f"{r['windows'] / r['wall_s']:6.2f} windows/s  {mpx / r['wall_s']:6.2f} Mpx/s  "
            f"({parts}; map {tuple(r['map'].shape)})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--slide", type=Path, help="a slide (default: synthesise one)")
    ap.add_argument("--size", type=int, default=8192, help="synthetic slide edge, px")
    ap.add_argument("--mpp", type=float, default=0.5, help="working (and synthetic) um/px")
    ap.add_argument("--tile-px", type=int, default=512)
    ap.add_argument("--overlap", type=int, default=128, help="window overlap, px")
    ap.add_argument("--output-stride", type=int, default=2)
    ap.add_argument("--out-downsample", type=int, default=2,
                    help="our stored map's downsample (theirs is always 1)")
    ap.add_argument("--classes", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--runtime", default="auto",
                    help="our engine's CPU runtime where it has a choice (auto, torch, ...)")
    ap.add_argument("--peer-mask", choices=("ours", "auto"), default="ours")
    ap.add_argument("--stain", action="store_true", help="ours also fits and normalises stain")
    ap.add_argument("--out", type=Path, help="work folder (default: a temporary one)")
    args = ap.parse_args()

    work = args.out or Path(tempfile.mkdtemp(prefix="bench_peers."))
    work.mkdir(parents=True, exist_ok=True)
    slide = args.slide
    if slide is None:
        slide = work / f"liver_{args.size}.svs"
        if not slide.with_suffix(".truth.json").exists():
            print(f"synthesising {slide} ({args.size} px square at {args.mpp} um/px)",
                  flush=True)
            write_slide("liver", slide, width=args.size, height=args.size, mpp=args.mpp,
                        seed=3, label="HCC")
    net = build_unet(args.classes, args.output_stride)
    missing = tiatoolbox_missing()
    peer = "absent" if missing else f"TIAToolbox {__import__('tiatoolbox').__version__}"
    print(f"U-Net output stride {stride_of(net)}, {args.classes} class(es); {args.tile_px} px "
          f"windows at {args.mpp} um/px, overlap {args.overlap} (stride "
          f"{args.tile_px - args.overlap}); batch {args.batch_size}; torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads; peer: {peer}", flush=True)

    # untimed: the page cache holds the slide, the mask is ours, the first forward is paid
    tiles = find_tissue(slide, args.tile_px, args.mpp)
    with open_slide(slide) as s:
        w_um, h_um = s.size_um
    level_hw = (round(h_um / args.mpp), round(w_um / args.mpp))
    mask = tile_mask(tiles, args.tile_px, level_hw) if args.peer_mask == "ours" else None
    with torch.inference_mode():
        net(torch.rand(args.batch_size, 1, 3, args.tile_px, args.tile_px))

    rounds: list[tuple[dict[str, Any], dict[str, Any] | None]] = []
    for k in range(args.repeats):
        out = work / f"round{k}"
        shutil.rmtree(out, ignore_errors=True)
        ours = run_ours(slide, copy.deepcopy(net), args, out)
        print(line("ours", ours, args.tile_px), flush=True)
        theirs = None
        if not missing:
            theirs = run_theirs(slide, copy.deepcopy(net), mask, args, out)
            print(line("theirs", theirs, args.tile_px), flush=True)
        rounds.append((ours, theirs))

    ours = [o for o, _ in rounds]
    print(f"\nours, median of {len(ours)}: "
          f"{statistics.median(o['windows'] / o['wall_s'] for o in ours):.2f} windows/s, "
          f"{statistics.median(o['wall_s'] for o in ours):.1f} s wall "
          f"(runtime {ours[0]['runtime']}, map downsample {args.out_downsample})")
    if missing:
        print(f"TIAToolbox skipped: {missing}")
        return
    theirs = [t for _, t in rounds]
    ratios = [(o["windows"] / o["wall_s"]) / (t["windows"] / t["wall_s"]) for o, t in rounds]
    walls = [t["wall_s"] / o["wall_s"] for o, t in rounds]
    print(f"theirs, median of {len(theirs)}: "
          f"{statistics.median(t['windows'] / t['wall_s'] for t in theirs):.2f} windows/s, "
          f"{statistics.median(t['wall_s'] for t in theirs):.1f} s wall "
          f"(SemanticSegmentor.run, patch_mode=False, mask {args.peer_mask})")
    print(f"agreement: {agreement(ours[-1], theirs[-1])}")
    ratio = statistics.median(ratios)
    print(f"throughput ours / theirs (windows/s, file to map): {ratio:.2f} "
          f"[{', '.join(f'{r:.2f}' for r in ratios)}]; wall theirs / ours "
          f"{statistics.median(walls):.2f}  (goal >= 2: {'met' if ratio >= 2 else 'NOT met'})")


if __name__ == "__main__":
    main()
