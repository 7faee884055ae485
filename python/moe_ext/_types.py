"""Result types shared by the kernels' API and the NumPy reference."""
from typing import NamedTuple

import numpy as np


class PermuteResult(NamedTuple):
    """What `permute` returns: unpacks as (x_perm, expert_offsets, perm_rows)."""

    x_perm: np.ndarray
    expert_offsets: np.ndarray
    perm_rows: np.ndarray

    @property
    def num_dropped(self) -> int:
        """Copies dropped by the capacity limit: T*k minus the rows kept."""
        return int(self.perm_rows.size - self.expert_offsets[-1])
