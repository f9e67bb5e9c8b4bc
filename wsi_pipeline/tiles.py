"""Annotated image tiles (PNG/JPEG crops with a mask each) as small slides for training.

Public datasets and lab exports often hold fields of view, not slides: ``images/NAME.png``
with ``masks/NAME.png`` whose colours mark classes, at a known MPP. `tiles_to_slides`
writes each as a tiled, pyramidal TIFF with its MPP in the resolution tags (openslide
opens it as a generic TIFF) plus ``NAME.labels.png`` / ``NAME.labels.json`` (class ids and
their legend), the label-mask format `wsi_pipeline.annotations` reads, so ``wsi-train
--data`` takes them like any annotated slide.

>>> tiles_to_slides("kidney-pas", "/tmp/kpas", mpp=0.5,      # doctest: +SKIP
...                 colours={(255, 0, 0): "glomerulus"})
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from PIL import Image

from .errors import UsageError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")


def tiles_to_slides(folder: str | Path, out: str | Path, *, mpp: float,
                    colours: Mapping[tuple[int, int, int], str]) -> list[Path]:
    """Convert ``folder/images/*`` with ``folder/masks/<same stem>.*`` into slides under
    ``out`` (see the module docstring); returns the slide paths, sorted.

    ``colours`` maps a mask colour (R, G, B) to a class name; every other colour is
    background. ``mpp`` is the tiles' resolution in um/px.
    """
    import tifffile

    folder, out = Path(folder), Path(out)
    images = sorted(p for p in (folder / "images").glob("*") if p.suffix.lower() in
                    IMAGE_SUFFIXES)
    if not images:
        raise UsageError(f"{folder}/images: no image tiles")
    if not 0.05 <= mpp <= 20:
        raise UsageError(f"tile resolution {mpp} um/px is outside 0.05-20")
    out.mkdir(parents=True, exist_ok=True)
    legend = {0: "background", **{i + 1: name for i, name in enumerate(colours.values())}}
    written = []
    for image_path in images:
        masks = [p for p in (folder / "masks").glob(image_path.stem + ".*")
                 if p.suffix.lower() in IMAGE_SUFFIXES]
        if not masks:
            raise UsageError(f"{image_path.name}: no mask in {folder / 'masks'}")
        rgb = np.asarray(Image.open(image_path).convert("RGB"))
        mask_rgb = np.asarray(Image.open(masks[0]).convert("RGB"))
        if mask_rgb.shape[:2] != rgb.shape[:2]:
            raise UsageError(f"{masks[0].name}: mask {mask_rgb.shape[:2]} and image "
                             f"{rgb.shape[:2]} differ in size")
        labels = np.zeros(rgb.shape[:2], np.uint8)
        for i, colour in enumerate(colours, start=1):
            labels[(mask_rgb == np.asarray(colour, np.uint8)).all(-1)] = i
        slide = out / f"{image_path.stem}.tiff"
        per_cm = 1e4 / mpp
        with tifffile.TiffWriter(slide) as tif:
            options = {"tile": (256, 256), "photometric": "rgb", "compression": "jpeg",
                       "resolutionunit": "CENTIMETER"}
            levels = [rgb]
            while max(levels[-1].shape[:2]) > 512:
                h, w = levels[-1].shape[:2]
                levels.append(np.asarray(Image.fromarray(levels[-1]).resize(
                    (w // 2, h // 2), Image.Resampling.BOX)))
            tif.write(rgb, subifds=len(levels) - 1, resolution=(per_cm, per_cm), **options)
            for k, level in enumerate(levels[1:], start=1):
                scale = per_cm / 2**k
                tif.write(level, subfiletype=1, resolution=(scale, scale), **options)
        Image.fromarray(labels).save(out / f"{image_path.stem}.labels.png")
        (out / f"{image_path.stem}.labels.json").write_text(json.dumps(
            {"legend": {str(k): v for k, v in legend.items()}, "mpp": mpp}, indent=1))
        written.append(slide)
    return written
