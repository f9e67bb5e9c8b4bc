"""Scale-out: the slides of a batch as tasks on a dask distributed cluster.

``wsi-run ... --scheduler tcp://host:8786`` sends one task per slide (each calls
:func:`wsi_pipeline.batch.run_job` on a worker, under the slide's lock) and collects the
summary rows in this process as they finish. When some workers advertise a ``GPU``
resource (``dask worker --resources GPU=1``) and the run goes past the pyramid, a slide
becomes two chained tasks: the CPU stages on any worker, then the model stages on a GPU
worker. A slide whose worker dies is run again elsewhere by the scheduler, and the
manifest makes that rerun skip every stage the dead worker had finished.
"""

from __future__ import annotations

import json
import os
import sys
import uuid
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from .batch import SUMMARY_FIELDS, Job, run_job
from .errors import UsageError
from .pipeline.options import MODEL_STAGES, RunOptions
from .slide import is_url

Row = dict[str, Any]
RETRIES = 2  # reruns of a task that raised on its worker (worker deaths are counted apart)
DAEMON_HINT = ("the dask worker runs as a daemon process and cannot start data-loader "
               "processes: start workers with --no-nanny or DASK_DISTRIBUTED__WORKER__DAEMON"
               "=False (see docs/cluster.md)")


def run_on_cluster(jobs: list[Job], task_name: str, opts: RunOptions, address: str, *,
                   on_row: Callable[[Row], None], lock_wait_s: float = 0.0,
                   log: Callable[[Row], None] | None = None) -> None:
    """Run ``jobs`` on the dask scheduler at ``address``; call ``on_row`` (here, in this
    process) with each slide's summary row as it finishes, in finishing order.

    Raises :class:`UsageError` when the scheduler cannot be reached. A slide whose
    workers kept dying, or whose task was lost with the scheduler, becomes a failed row.
    """
    from distributed import Client, as_completed

    try:
        _check_address(address)  # a Client half-made from a bad address hangs on exit
        # the connect timeout is dask's distributed.comm.timeouts.connect (30 s by default)
        client = Client(address, set_as_default=False)
    except (OSError, ValueError) as exc:  # TimeoutError is an OSError
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UsageError(f"cannot reach the dask scheduler at {address}: {first}") from None
    with client:
        workers = client.scheduler_info(n_workers=-1)["workers"]
        gpus = sum(1 for w in workers.values() if w.get("resources", {}).get("GPU", 0) > 0)
        split = gpus > 0 and opts.until in MODEL_STAGES
        verbose = log is not None
        if log:
            log({"scheduler": address, "workers": len(workers), "gpu_workers": gpus,
                 "slides": len(jobs), "gpu_split": split})
        token = uuid.uuid4().hex[:8]  # keys unique between runs sharing a scheduler
        opts = replace(opts, show_progress=False)  # workers have no terminal
        futures = {}
        for job in jobs:
            if job.error is not None:  # a bad PATH: nothing to ship, its row is immediate
                on_row(run_job(job, task_name, opts))
                continue
            remote = job if is_url(job.path) else replace(job, path=os.path.abspath(job.path))
            common = {"pure": False, "retries": RETRIES}
            if split:
                cpu = client.submit(_run_part, remote, task_name,
                                    replace(opts, until="pyramid"), lock_wait_s, verbose,
                                    key=f"wsi-cpu-{job.slide_id}-{token}", **common)
                future = client.submit(_run_part, remote, task_name, opts, lock_wait_s,
                                       verbose, cpu, key=f"wsi-gpu-{job.slide_id}-{token}",
                                       resources={"GPU": 1}, **common)
            else:
                future = client.submit(_run_part, remote, task_name, opts, lock_wait_s,
                                       verbose, key=f"wsi-{job.slide_id}-{token}", **common)
            futures[future] = job
        for done, future in enumerate(as_completed(futures, loop=client.loop), start=1):
            job = futures[future]
            row = _collect(future, job, task_name, address)
            row["path"] = job.path  # as the user gave it, like a local run
            if log:
                log({"slide": job.slide_id, "status": row["status"], "done": done,
                     "of": len(futures), "worker": row.get("_worker"),
                     "seconds": row["seconds"]})
            on_row(row)


def _check_address(address: str) -> None:
    """ValueError unless ``address`` names a known protocol and, for tcp, a host:port."""
    from distributed.comm import get_address_host_port, parse_address
    from distributed.comm.registry import get_backend

    scheme, _ = parse_address(address, strict=False)
    get_backend(scheme)
    if scheme in ("tcp", "tls", "ws", "wss"):
        get_address_host_port(address)


def _collect(future: Any, job: Job, task_name: str, address: str) -> Row:
    """The finished task's row; a failed row when the cluster, not the slide, failed."""
    from concurrent.futures import CancelledError

    from distributed import KilledWorker

    try:
        return dict(future.result())
    except KilledWorker as exc:
        reason = (f"{job.path}: the dask workers running this slide died "
                  f"{exc.allowed_failures + 1} times (distributed.scheduler.allowed-failures"
                  f"); rerun to resume")
    except CancelledError:
        reason = (f"{job.path}: lost the dask scheduler at {address} before this slide "
                  "finished; rerun to resume")
    return _failed_row(job, task_name, reason)


def _failed_row(job: Job, task_name: str, reason: str) -> Row:
    row: Row = dict.fromkeys(SUMMARY_FIELDS, "")
    row.update(slide_id=job.slide_id, path=job.path, task=task_name, status="failed",
               error=reason)
    return row


def _run_part(job: Job, task_name: str, opts: RunOptions, lock_wait_s: float,
              verbose: bool, before: Row | None = None) -> Row:
    """On a worker: one slide up to ``opts.until``. ``before`` is the row of the CPU part
    when this is the GPU part: a slide that failed there is not run again."""
    from distributed import get_worker

    if before is not None and not before["status"].startswith("ok"):
        return before
    try:
        row = run_job(job, task_name, opts, log=_print_event if verbose else None,
                      lock_wait_s=lock_wait_s)
    except AssertionError as exc:  # torch DataLoader processes in a nanny's daemon worker
        if "daemonic" not in str(exc):
            raise
        row = _failed_row(job, task_name, f"{job.path}: {DAEMON_HINT}")
    if before is not None and row["seconds"] != "":
        row["seconds"] = round(row["seconds"] + before["seconds"], 1)
    row["_worker"] = get_worker().address
    return row


def _print_event(event: Row) -> None:
    """Stage events go to the worker's own log (stderr)."""
    print(json.dumps(event), file=sys.stderr, flush=True)
