"""Deep equality of saved state (checkpoint payloads, state dicts), shared by the resume tests."""

from __future__ import annotations

import math
from typing import Any

import numpy as np


def assert_same_state(a: Any, b: Any, where: str = "state") -> None:
    """Containers key by key and item by item, tensors and arrays exactly, NaN equal to NaN;
    a failure names the path to the first difference (``state.trajectories[0].rng``)."""
    import torch

    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for key in a:
            assert_same_state(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, list | tuple):
        assert isinstance(b, list | tuple) and len(a) == len(b), where
        for k, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same_state(x, y, f"{where}[{k}]")
    elif isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a.cpu(), b.cpu()), where
    elif isinstance(a, np.ndarray):
        np.testing.assert_array_equal(a, b, err_msg=where)
    elif isinstance(a, float) and math.isnan(a):
        assert isinstance(b, float) and math.isnan(b), where
    else:
        assert a == b, where
