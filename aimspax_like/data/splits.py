"""Deterministic train/validation assignment by ratio.

The k-th labelled point (k = 0, 1, ...) goes to validation exactly when the running count of
validation points must grow to keep ``n_valid = floor((k + 1) * ratio)``. With ratio 0.1 every
10th point is a validation point; the split is reproducible and never drifts from the ratio.
"""

from __future__ import annotations

import math


def is_validation(k: int, ratio: float) -> bool:
    if not 0.0 < ratio < 1.0:
        raise ValueError(f"valid ratio must lie in (0, 1), got {ratio}")
    return math.floor((k + 1) * ratio + 1e-12) > math.floor(k * ratio + 1e-12)


class SplitCounter:
    """Hands out 'train' / 'valid' for successive points of one phase."""

    def __init__(self, ratio: float, start: int = 0) -> None:
        self.ratio = ratio
        self.k = start

    def next(self) -> str:
        split = "valid" if is_validation(self.k, self.ratio) else "train"
        self.k += 1
        return split
