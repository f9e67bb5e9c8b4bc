"""The per-slide zarr store and its manifest of finished stages.

Layout of ``OUT/<slide-id>/store.zarr`` (zarr v3)::

    image/0, image/1, image/2   normalised RGB, (3, H, W) uint8, chunked (3, tile, tile);
                                OME-Zarr 0.5 multiscales on ``image`` (scale in um)
    tissue/mask                 (H, W) uint8 tissue mask at the thumbnail MPP
    tissue/thumbnail            (H, W, 3) uint8 thumbnail it was found on
    tiles                       (N, 2) int32 (row, col) of the tissue tiles of level 0
    manifest.json               finished stages: parameters, input checksum, results, time
    .progress/<stage>/          one empty marker file per finished unit of work (resume)

Every file is written to a temporary name and renamed, so a killed run leaves either the
old or the new version, never half of one. Zarr's local store writes chunks the same way.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from .errors import OutputNotWritable, StoreError, UsageError

MANIFEST = "manifest.json"
PROGRESS = ".progress"


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same folder and a rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "xb") as f:  # unlike mkstemp, honours the umask (0644 files)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_bytes(path, json.dumps(obj, indent=2, default=_json_default).encode())


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def checksum(*parts: Any) -> str:
    """Short stable hash of JSON-able parts (parameters, upstream checksums)."""
    blob = json.dumps(parts, sort_keys=True, default=_json_default).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def file_fingerprint(path: str | os.PathLike) -> dict[str, Any]:
    """Identity of a slide file: size, mtime and a hash of its first and last MiB.

    Cheap on gigapixel files, and changes when the file is replaced or truncated.
    """
    if "://" in str(path):
        return _remote_fingerprint(str(path))
    p = Path(path)
    st = p.stat()
    h = hashlib.sha256()
    with p.open("rb") as f:
        h.update(f.read(1 << 20))
        if st.st_size > 2 << 20:
            f.seek(-(1 << 20), os.SEEK_END)
            h.update(f.read(1 << 20))
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256_ends": h.hexdigest()[:16]}


def _remote_fingerprint(url: str) -> dict[str, Any]:
    """A URL's identity from its server: size plus ETag / modification time where the
    file system reports them (HTTP headers, S3 object metadata)."""
    import fsspec

    try:
        fs, where = fsspec.core.url_to_fs(url)
        info = fs.info(where)
    except Exception:  # the slide opened a moment ago; fingerprint what can be seen
        return {"url": url}
    keep = ("size", "ETag", "etag", "Last-Modified", "LastModified", "mtime", "created")
    return {"url": url, **{k: str(info[k]) for k in keep if info.get(k) is not None}}


def prepare_output(out_dir: str | os.PathLike) -> Path:
    """Create ``out_dir`` if needed and check that it is writable."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out}: is a file; give a folder (it is created if needed)")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=out, prefix=".write-test-", delete=True)
        probe.close()
    except OSError as exc:
        raise OutputNotWritable(f"{out}: output folder is not writable ({exc.strerror or exc})"
                                ) from exc
    return out


class SlideStore:
    """A slide's zarr store plus its manifest; one instance per slide and process."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            self.root = zarr.open_group(str(self.path), mode="a", zarr_format=3)
        except OSError as exc:
            raise OutputNotWritable(f"{self.path}: cannot create the store ({exc})") from exc
        except Exception as exc:  # an older or foreign layout at this path
            raise StoreError(f"{self.path}: not a usable zarr store ({exc}); remove it or use "
                             "--force") from exc

    # -- manifest -----------------------------------------------------------------------------
    def manifest(self) -> dict[str, Any]:
        path = self.path / MANIFEST
        if not path.exists():
            return {"stages": {}}
        try:
            return json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise StoreError(f"{path}: unreadable manifest ({exc}); rerun with --force") from exc

    def finished(self, stage: str, inputs: str) -> dict[str, Any] | None:
        """The manifest entry of ``stage`` if it finished with the same input checksum."""
        entry = self.manifest()["stages"].get(stage)
        return entry if entry is not None and entry.get("inputs") == inputs else None

    def record(self, stage: str, inputs: str, params: dict[str, Any], result: dict[str, Any],
               seconds: float) -> dict[str, Any]:
        """Mark ``stage`` finished; call only once its data are on disk."""
        manifest = self.manifest()
        entry = {"inputs": inputs, "params": params, "result": result,
                 "seconds": round(seconds, 3), "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        manifest["stages"][stage] = entry
        atomic_write_json(self.path / MANIFEST, manifest)
        return entry

    def invalidate(self, *stages: str) -> None:
        """Drop the manifest entries of ``stages`` (their data are about to be rewritten);
        progress markers stay, so an interrupted stage still resumes."""
        manifest = self.manifest()
        dropped = [manifest["stages"].pop(stage, None) for stage in stages]
        if any(entry is not None for entry in dropped):
            atomic_write_json(self.path / MANIFEST, manifest)

    def forget(self, *stages: str) -> None:
        """Drop manifest entries (and progress markers) of ``stages`` so they are recomputed."""
        manifest = self.manifest()
        for stage in stages:
            manifest["stages"].pop(stage, None)
            shutil.rmtree(self.path / PROGRESS / stage, ignore_errors=True)
        atomic_write_json(self.path / MANIFEST, manifest)

    # -- per-unit progress markers (chunk-level resume) --------------------------------------
    def progress_dir(self, stage: str) -> Path:
        d = self.path / PROGRESS / stage
        d.mkdir(parents=True, exist_ok=True)
        return d

    # -- arrays --------------------------------------------------------------------------------
    def write_array(self, name: str, data: np.ndarray, attrs: dict[str, Any] | None = None,
                    chunks: tuple[int, ...] | None = None) -> zarr.Array:
        """Write a small whole array (masks, tile index), replacing any earlier one."""
        arr = self.root.create_array(name, shape=data.shape, dtype=data.dtype,
                                     chunks=chunks or _default_chunks(data.shape),
                                     overwrite=True)
        arr[...] = data
        if attrs:
            arr.attrs.update(attrs)
        return arr

    def read_array(self, name: str) -> np.ndarray:
        return np.asarray(self.root[name][...])


def _default_chunks(shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(max(1, min(s, 1024) if i < 2 else s) for i, s in enumerate(shape)) or (1,)
