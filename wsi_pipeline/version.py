"""The installed package's version (``0.0.0+src`` in a source tree that is not installed)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("wsi_pipeline")
except PackageNotFoundError:
    __version__ = "0.0.0+src"
