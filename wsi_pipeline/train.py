"""``wsi-train``: train or fine-tune a task's model.

No task has a trainable model in this version: the models arrive with the inference issues
(``fls`` first). The command exists so that scripts and workflows can name it already, and
it says so plainly instead of pretending to train.
"""

from __future__ import annotations

import argparse
import sys

from .tasks import TASK_NAMES


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="wsi-train", description=__doc__.split("\n\n")[0])
    p.add_argument("--task", required=True, choices=TASK_NAMES)
    args = p.parse_args(argv)
    print(f"wsi-train: error: no trainable model for task {args.task!r} in this version",
          file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
