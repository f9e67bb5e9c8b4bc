"""Run a folder of slides on a dask distributed cluster (here a LocalCluster; on SLURM a
dask-jobqueue cluster, see docs/cluster.md): one task per slide, the same outputs and
summary.csv as a local run.

    python examples/dask_cluster.py [FOLDER] [--task fls] [--out wsi-out]
"""

import argparse
from pathlib import Path

from dask.distributed import LocalCluster

from wsi_pipeline.cli import main as wsi_run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", nargs="?", type=Path)
    ap.add_argument("--task", default="fls")
    ap.add_argument("--out", type=Path, default=Path("wsi-out"))
    ap.add_argument("--tiny", action="store_true", help="very small slides (for tests)")
    args = ap.parse_args()
    folder = args.folder
    if folder is None:
        from wsi_pipeline.synth import write_slide

        folder = args.out / "cluster_slides"
        folder.mkdir(parents=True, exist_ok=True)
        size = (2400, 2000) if args.tiny else (6000, 4500)
        for i in range(2):
            write_slide("fls", folder / f"slide_{i + 1}.svs", width=size[0], height=size[1],
                        seed=70 + i, label="positive")
    mode = ["--model", "classical"] if args.task == "fls" else []
    # processes=False keeps the example light; a real cluster runs one worker per node
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False,
                      dashboard_address=None) as cluster:
        code = wsi_run([str(folder), "--task", args.task, "--out", str(args.out), *mode,
                        "--workers", "1", "--scheduler", cluster.scheduler_address])
    print(f"summary: {args.out / 'summary.csv'} (exit code {code})")
    raise SystemExit(code)


if __name__ == "__main__":
    main()
