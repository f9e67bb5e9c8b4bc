"""One exception hierarchy for every expected failure.

The CLI maps each to one clear line on stderr and an exit code; anything that is not a
`WsiError` is a bug and keeps its traceback.
"""


class WsiError(Exception):
    """Base of every expected failure (bad input, missing metadata, unwritable output)."""

    exit_code = 1


class UsageError(WsiError):
    """The command line itself is wrong (unknown task, bad option value)."""

    exit_code = 2


class SlideNotFound(WsiError):
    """A path given on the command line does not exist."""


class NoSlidesFound(WsiError):
    """A folder was given but holds no slide files."""


class UnreadableSlide(WsiError):
    """The file exists but no backend can open it as a slide (not a TIFF, corrupt, truncated)."""


class TileReadError(WsiError):
    """The slide opened but reading pixels from it failed (corrupt tile data)."""


class MissingMpp(WsiError):
    """The slide carries no microns-per-pixel and none was given with --mpp."""


class NoTissue(WsiError):
    """Tissue detection found nothing to analyse (blank glass, or thresholds too strict)."""


class NotBrightfield(WsiError):
    """The slide is not a bright-field scan (fluorescence, dark-field, multiplex
    fluorescence): its background is dark, and the tasks analyse stained bright-field
    slides."""


class StainFitError(WsiError):
    """Too few usable stained pixels to estimate a stain matrix."""


class OutputNotWritable(WsiError):
    """The output folder cannot be created or written."""


class CheckpointError(WsiError):
    """A model checkpoint is missing, corrupt, pickled, or for another task/architecture."""


class StoreError(WsiError):
    """The per-slide zarr store is inconsistent with the current run and cannot be reused."""


class SlideLocked(WsiError):
    """Another live process is writing this slide's output folder."""


class InputListError(WsiError):
    """A CSV slide list or a --config file is malformed."""


class CaseIncomplete(WsiError):
    """A glomerular-dx case folder lacks a modality (om/ slide, im/ or tem/ images)."""


class CaseImageError(WsiError):
    """An IM or TEM image of a case cannot be read, or is not greyscale/RGB (e.g. 2 or 4+
    channels, a transparent alpha, float pixels, a stack of pages without an RGB page)."""


class TaskConflict(WsiError):
    """The slide's output folder holds another task's results (never replaced silently)."""
