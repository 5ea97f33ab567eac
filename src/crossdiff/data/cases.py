"""A case made ready for learning: every modality on one grid, scaled to [-1, 1], with a mask of where voxels count."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from crossdiff.intensity import IntensityScaling
from crossdiff.volumes import Geometry


@dataclass
class PreparedCase:
    """One case after pairing, registration, masking and normalisation.

    `images` maps a modality key (e.g. 'mr', 'ct') to a float32 array (z, y, x) in [-1, 1], all on
    `geometry`; `mask` (bool, same shape) is True where the body is and every image has data (fields
    of view differ between modalities); `scalings` undo the normalisation per modality.
    Unpaired datasets hold cases with a single modality.
    """

    case_id: str
    images: dict[str, np.ndarray]
    mask: np.ndarray
    geometry: Geometry
    scalings: dict[str, IntensityScaling] = field(default_factory=dict)
