"""wsi_pipeline: from a gigapixel slide to a diagnosis-level report."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("wsi_pipeline")
except PackageNotFoundError:  # running from a source tree without install
    __version__ = "0.0.0+src"
