"""Checkpoints: safetensors + JSON sidecar, checked before use, never unpickled."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch

from wsi_pipeline.checkpoint import FORMAT, checkpoint_id, load_checkpoint, save_checkpoint
from wsi_pipeline.errors import CheckpointError
from wsi_pipeline.models import build_model, count_parameters

TINY = {"encoder_name": "tu-mobilenetv3_small_050", "encoder_depth": 3,
        "decoder_channels": (16, 8, 8)}
META = {"task": "fls", "classes": ["focus"], "mpp": 0.5, "tile_px": 512,
        "stain_reference": [[0.65, 0.70, 0.29], [0.07, 0.99, 0.11]], "demo": True,
        "training": {"data": "synthetic", "command": "wsi-train --task fls"},
        "metrics": {"dice": 0.9}}


def trained_like(arch: str = "m2cf_net", **kwargs) -> torch.nn.Module:
    """A tiny model whose BatchNorm statistics moved off their defaults."""
    torch.manual_seed(0)
    extra = {"fusion_channels": 16} if arch == "m2cf_net" else {}
    model = build_model(arch, **{**TINY, **extra, **kwargs}).train()
    with torch.no_grad():
        for seed in range(2):
            model(inputs(model, seed))
    return model.eval()


def inputs(model: torch.nn.Module, seed: int = 5) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(2, len(model.levels), 3, 64, 64, generator=g)


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> tuple[torch.nn.Module, Path]:
    model = trained_like()
    path = save_checkpoint(tmp_path_factory.mktemp("ckpt") / "fls_demo", model, META)
    return model, path


def copy_checkpoint(path: Path, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(path, folder / path.name)
    shutil.copy(path.with_suffix(".json"), folder / path.with_suffix(".json").name)
    return folder / path.name


def edit_sidecar(weights: Path, **changes) -> None:
    sidecar = weights.with_suffix(".json")
    meta = json.loads(sidecar.read_text())
    meta.update(changes)
    sidecar.write_text(json.dumps(meta))


def test_sidecar_holds_what_build_and_reports_need(saved):
    model, path = saved
    assert path.name == "fls_demo.safetensors" and path.with_suffix(".json").is_file()
    meta = json.loads(path.with_suffix(".json").read_text())
    assert meta["format"] == FORMAT and meta["task"] == "fls" and meta["demo"] is True
    assert meta["architecture"] == "m2cf_net" and meta["levels"] == [0, 1, 2]
    assert meta["arch_kwargs"] == {**TINY, "decoder_channels": [16, 8, 8],
                                   "fusion_channels": 16, "classes": 1, "output_stride": 1}
    assert meta["classes"] == ["focus"] and meta["mpp"] == 0.5 and meta["tile_px"] == 512
    assert meta["stain_reference"] == META["stain_reference"]
    assert meta["training"] == META["training"] and meta["metrics"] == {"dice": 0.9}
    assert meta["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert meta["parameters"] == count_parameters(model) and meta["weights_dtype"] == "float16"
    assert meta["weights"] == path.name and meta["created"].endswith("+00:00")
    assert checkpoint_id(meta) == meta["sha256"][:12]
    # float16 storage: about 2 bytes per parameter (BatchNorm statistics ride along)
    assert 2 * meta["parameters"] < path.stat().st_size < 2.6 * meta["parameters"] + 20_000
    assert not list(path.parent.glob(".*.tmp"))  # atomic writes leave no temporaries


def test_round_trip_float16_matches_a_model_rounded_the_same_way(saved):
    model, path = saved
    loaded, meta = load_checkpoint(path, task="fls")
    assert not loaded.training and meta["architecture"] == "m2cf_net"
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    rounded = build_model("m2cf_net", **meta["arch_kwargs"])
    rounded.load_state_dict({k: v.half().to(v.dtype) if v.is_floating_point() else v
                             for k, v in model.state_dict().items()})
    rounded.eval()
    x = inputs(model)
    with torch.no_grad():
        out = loaded(x)
        assert torch.equal(out, rounded(x))
        # and the rounding itself is harmless
        torch.testing.assert_close(out, model(x), rtol=0.02, atol=2e-3)
    # the sidecar and the folder reach the same checkpoint
    for other in (path.with_suffix(".json"), path.parent):
        again, _ = load_checkpoint(other, task="fls")
        with torch.no_grad():
            assert torch.equal(again(x), out)


@pytest.mark.parametrize("arch", ["unet", "hooknet"])
def test_round_trip_float32_is_bit_identical(tmp_path, arch):
    model = trained_like(arch)
    path = save_checkpoint(tmp_path / "model.v1", model, META, weights_dtype="float32")
    assert path.name == "model.v1.safetensors"  # dots in the name are kept
    loaded, meta = load_checkpoint(path, task="fls")
    assert meta["architecture"] == arch and meta["weights_dtype"] == "float32"
    x = inputs(model)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_wrong_task_names_both(saved):
    with pytest.raises(CheckpointError, match="checkpoint is for task fls, not liver"):
        load_checkpoint(saved[1], task="liver")
    with pytest.raises(CheckpointError, match=r"no checkpoint for task liver .*holds .*fls"):
        load_checkpoint(saved[1].parent, task="liver")


def test_folder_with_two_checkpoints_for_the_task_is_ambiguous(saved, tmp_path):
    copy_checkpoint(saved[1], tmp_path)
    save_checkpoint(tmp_path / "second", saved[0], META)
    with pytest.raises(CheckpointError, match=r"2 checkpoints for task fls .*name one"):
        load_checkpoint(tmp_path, task="fls")


def test_weights_of_another_architecture_are_refused(tmp_path):
    path = save_checkpoint(tmp_path / "unet", trained_like("unet"), META)
    # a doctored sidecar claims the (unchanged, correctly hashed) U-Net weights are M2CF-Net
    edit_sidecar(path, architecture="m2cf_net", levels=[0, 1, 2],
                 arch_kwargs={**TINY, "fusion_channels": 16, "classes": 1})
    with pytest.raises(CheckpointError, match=r"weights do not fit architecture m2cf_net\("
                       r"classes=1, decoder_channels=\[16, 8, 8\], .*missing .*unexpected"):
        load_checkpoint(path, task="fls")
    # same architecture, other arguments: shapes differ
    edit_sidecar(path, architecture="unet", levels=[0],
                 arch_kwargs={**TINY, "decoder_channels": [16, 8, 4], "classes": 1})
    with pytest.raises(CheckpointError, match=r"do not fit architecture unet\(.*of another shape"):
        load_checkpoint(path, task="fls")
    edit_sidecar(path, architecture="transunet")
    with pytest.raises(CheckpointError, match=r"'transunet' is unknown \(known: .*hooknet"):
        load_checkpoint(path, task="fls")
    edit_sidecar(path, architecture="unet", arch_kwargs={"encoder_depth": 3, "colour": "red"})
    with pytest.raises(CheckpointError, match=r"cannot build unet\(colour="):
        load_checkpoint(path, task="fls")


class Trap:
    """Unpickling this creates the marker file (pickle calls open(marker, 'w'))."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize("zip_format", [True, False])
@pytest.mark.parametrize("name", ["evil.safetensors", "evil.pt"])
def test_pickled_file_is_refused_without_unpickling(tmp_path, zip_format, name):
    marker = tmp_path / "unpickled.marker"
    path = tmp_path / name
    torch.save({"state_dict": {"w": torch.zeros(3)}, "trap": Trap(marker)}, path,
               _use_new_zipfile_serialization=zip_format)
    # the worst case: a sidecar that vouches for the file with its true sha256
    sidecar = {"format": FORMAT, "task": "fls", "architecture": "unet",
               "arch_kwargs": {**TINY, "classes": 1}, "classes": ["focus"], "levels": [0],
               "weights": name, "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    path.with_suffix(".json").write_text(json.dumps(sidecar))
    for target in (path, path.with_suffix(".json"), tmp_path):
        with pytest.raises(CheckpointError, match=r"refusing to unpickle .*evil"):
            load_checkpoint(target, task="fls")
    assert not marker.exists()
    # the trap is real: unpickling the file does create the marker (torch.load reads a
    # .safetensors name as safetensors, so unpickle a copy named .pt)
    torch.load(shutil.copy(path, tmp_path / "copy.pt"), weights_only=False)
    assert marker.exists()


def test_truncated_and_corrupt_weights(saved, tmp_path):
    path = copy_checkpoint(saved[1], tmp_path)
    blob = path.read_bytes()
    path.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(CheckpointError, match=r"not a safetensors file \(or truncated\)"):
        load_checkpoint(path, task="fls")
    path.write_bytes(blob[:5])
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint(path, task="fls")
    flipped = bytearray(blob)
    flipped[-3] ^= 0x40  # one bit of one weight
    path.write_bytes(bytes(flipped))
    with pytest.raises(CheckpointError, match="corrupt: sha256 .* does not match"):
        load_checkpoint(path, task="fls")
    # a valid safetensors header with garbage behind it, vouched for by the sidecar
    garbage = blob[:8] + b"{" + b"x" * 64
    path.write_bytes(garbage)
    edit_sidecar(path, sha256=hashlib.sha256(garbage).hexdigest())
    with pytest.raises(CheckpointError, match="not a safetensors file|not a valid safetensors"):
        load_checkpoint(path, task="fls")


def test_missing_files_and_bad_sidecars(saved, tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "nothing.safetensors", task="fls")
    path = copy_checkpoint(saved[1], tmp_path)
    sidecar = path.with_suffix(".json")
    sidecar.write_text("{not json")
    with pytest.raises(CheckpointError, match="sidecar unreadable"):
        load_checkpoint(path, task="fls")
    sidecar.write_text(json.dumps({"task": "fls"}))
    with pytest.raises(CheckpointError, match="not a wsi_pipeline checkpoint sidecar"):
        load_checkpoint(path, task="fls")
    sidecar.unlink()
    with pytest.raises(CheckpointError, match="sidecar missing"):
        load_checkpoint(path, task="fls")
    copy_checkpoint(saved[1], tmp_path)
    path.unlink()
    with pytest.raises(CheckpointError, match="weights missing"):
        load_checkpoint(sidecar, task="fls")


def test_save_checks_its_meta(tmp_path):
    model = build_model("unet", **TINY)
    with pytest.raises(ValueError, match="lacks mpp"):
        save_checkpoint(tmp_path / "m", model, {k: v for k, v in META.items() if k != "mpp"})
    with pytest.raises(ValueError, match="2 class names for a model with 1 output"):
        save_checkpoint(tmp_path / "m", model, {**META, "classes": ["a", "b"]})


def test_default_m2cf_checkpoint_is_a_few_megabytes(tmp_path):
    path = save_checkpoint(tmp_path / "demo", build_model("m2cf_net"), META)
    assert path.stat().st_size < 3_000_000
