"""``python -m wsi_pipeline.train``: the same as ``wsi-train``."""

import sys

from .cli import main

sys.exit(main())
