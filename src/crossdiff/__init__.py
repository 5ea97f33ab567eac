"""crossdiff: translate one medical imaging modality into another with diffusion models."""

from crossdiff.errors import CrossdiffError, InputError
from crossdiff.readers import read_mask, read_volume
from crossdiff.volumes import Geometry, Volume, coverage, resample_to, write_volume

__all__ = [
    "CrossdiffError",
    "Geometry",
    "InputError",
    "Volume",
    "coverage",
    "read_mask",
    "read_volume",
    "resample_to",
    "write_volume",
]
__version__ = "0.1.0"
