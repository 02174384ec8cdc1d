"""Foundation-model calculators for sampling the initial dataset (``idg.sampler: foundation``).

A foundation model only drives the IDG dynamics; it never labels data. It can be a local MACE
model file (works offline and on clusters without internet), one of the MACE-MP-0 checkpoints
that mace downloads and caches on first use, or CHGNet when that package is installed. Every
failure becomes a one-line ``ConfigError`` on ``idg.foundation_model`` so the CLI can tell the
user what to change before a campaign starts.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from ase.calculators.calculator import Calculator

from aimspax_like.errors import ConfigError

KEY = "idg.foundation_model"

# Our names -> mace_mp's ``model`` argument. 'mace-mp-0' is the original medium model.
MACE_MP_NAMES = {
    "mace-mp-0": "medium",
    "mace-mp-0-small": "small",
    "mace-mp-0-medium": "medium",
    "mace-mp-0-large": "large",
    "mace-mpa-0": "medium-mpa-0",
}

_OFFLINE_HINT = "a path to a local MACE model file works offline"


def idg_foundation_calculator(config: Any) -> Calculator:
    """``idg.foundation_model`` as the calculator that drives IDG and foundation test-set MD.

    ``model.device: auto`` runs it on the CPU; an explicit ``cpu`` or ``cuda`` is used as given.
    """
    device = "cpu" if config.model.device == "auto" else config.model.device
    return load_foundation_calculator(str(config.idg.foundation_model), device=device, dtype=config.model.dtype)


def load_foundation_calculator(name_or_path: str, device: str = "cpu", dtype: str = "float64") -> Calculator:
    """An ASE calculator for the named foundation model or model file.

    Resolution order: an existing file path; a MACE-MP name from ``MACE_MP_NAMES``; 'chgnet'.
    Anything else, a missing file or a failed download raises ``ConfigError(KEY, ...)``.
    """
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return _mace_file(path, device, dtype)
    key = name_or_path.strip().lower()
    if key in MACE_MP_NAMES:
        return _mace_mp(key, device, dtype)
    if key == "chgnet":
        return _chgnet(device)
    if path.suffix or "/" in name_or_path or "\\" in name_or_path:
        raise ConfigError(KEY, f"model file {str(path)!r} not found")
    known = ", ".join([*MACE_MP_NAMES, "chgnet"])
    raise ConfigError(KEY, f"unknown foundation model {name_or_path!r}; use one of {known}, or a model file")


def _mace_file(path: Path, device: str, dtype: str) -> Calculator:
    from mace.calculators import MACECalculator

    from aimspax_like.models.torch_utils import quiet_torchscript

    try:
        with quiet_torchscript():
            return MACECalculator(model_paths=str(path), device=device, default_dtype=dtype)
    except Exception as exc:  # a corrupt or foreign file: say so in one line
        raise ConfigError(KEY, f"could not load MACE model {str(path)!r}: {_one_line(exc)}") from exc


def _mace_mp(name: str, device: str, dtype: str) -> Calculator:
    from mace.calculators import mace_mp

    from aimspax_like.models.torch_utils import quiet_torchscript

    try:
        with quiet_torchscript():
            return mace_mp(model=MACE_MP_NAMES[name], device=device, default_dtype=dtype)
    except Exception as exc:  # mace_mp wraps download errors in RuntimeError
        cause = exc.__cause__ or exc
        raise ConfigError(
            KEY, f"could not download or load {name!r} ({_one_line(cause)}); {_OFFLINE_HINT}"
        ) from exc


def _chgnet(device: str) -> Calculator:
    if importlib.util.find_spec("chgnet") is None:
        raise ConfigError(KEY, f"'chgnet' needs the chgnet package (pip install chgnet); {_OFFLINE_HINT}")
    from chgnet.model.dynamics import CHGNetCalculator

    try:
        return CHGNetCalculator(use_device=device)
    except Exception as exc:
        raise ConfigError(KEY, f"could not load CHGNet: {_one_line(exc)}; {_OFFLINE_HINT}") from exc


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
