"""The labelled frames a model is judged on: a run's own test set or a user's extxyz file.

A frame carries its reference label and the temperature it was sampled at (``None`` when the
source does not say), because errors grow with temperature and a single average hides whether a
model fails only where it was never trained.

Two sources:

* The run's held-out test set: frames of origin ``test`` in ``data/dataset.h5``. A stored frame
  has no temperature field; ``testset`` encodes it in ``trajectory`` (``temperature_index *
  n_structures + structure``), decoded with the temperatures the run recorded in
  ``state/results.json`` (or, for a run that never reached the test set, the ones its config
  implies).
* An extended-XYZ file. ASE's reader puts plain ``energy``/``forces``/``stress`` into a
  ``SinglePointCalculator`` and anything else into ``atoms.info`` (per frame) or
  ``atoms.arrays`` (per atom), so a key is looked up in info/arrays first and then among the
  calculator's results. A key that some frame lacks is a ``SetupError`` naming the key and the
  file, raised before anything is computed or written. ``stress`` is optional unless its key was
  named explicitly.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from ase import Atoms

from aimspax_like.errors import SetupError


@dataclass
class TestFrame:
    """A structure (without calculator) and its reference label, stress in Voigt order (eV/A^3)."""

    atoms: Atoms
    energy: float
    forces: np.ndarray
    stress: np.ndarray | None
    temperature_K: float | None


@dataclass
class TestSet:
    frames: list[TestFrame]
    source: str  # said in the report: where the frames came from
    sampler: str | None  # "reference" when the frames are reference-MD samples (usable for the RDF)
    label: str = ""  # a short name of the source, for figure titles


# --------------------------------------------------------------------------- the run's own test set


def run_test_set(run_dir: Path) -> TestSet:
    """The run's stored test frames with their temperatures (see the module docstring)."""
    from aimspax_like.config import load_config
    from aimspax_like.data import DatasetStore
    from aimspax_like.structures import read_structures
    from aimspax_like.testset import sampler_kind, temperature_of, temperatures_of

    config = load_config(run_dir / "campaign.yaml")
    frames = DatasetStore.open(run_dir / "data" / "dataset.h5").frames(origin="test")
    if not frames:
        raise SetupError(f"{run_dir / 'data' / 'dataset.h5'}: the run has no test frames; "
                         "pass --test FILE (an extxyz made by `aimspax-like testset`)")
    recorded = _recorded_test(run_dir)
    temperatures = [float(t) for t in recorded.get("temperatures_K") or temperatures_of(config)]
    n_structures = len(read_structures(config.system.structures, config.system.index))
    out = []
    for frame in frames:
        atoms = frame.to_atoms()
        atoms.calc = None
        index = frame.trajectory // n_structures
        temperature = temperature_of(frame.trajectory, temperatures, n_structures) if (
            0 <= index < len(temperatures)) else None
        out.append(TestFrame(atoms, frame.energy, frame.forces, frame.stress, temperature))
    sampler = str(recorded.get("sampler") or sampler_kind(config))
    source = f"{run_dir / 'data' / 'dataset.h5'} (origin test, {sampler} MD)"
    return TestSet(out, source, sampler, f"the run's test set, {sampler} MD")


def _recorded_test(run_dir: Path) -> dict[str, Any]:
    """The test-set entry of ``state/results.json`` (empty when the file or entry is missing)."""
    path = run_dir / "state" / "results.json"
    try:
        results = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    test = results.get("test") if isinstance(results, dict) else None
    return test if isinstance(test, dict) else {}


# --------------------------------------------------------------------------- a user's file


def read_test_file(
    path: Path,
    energy_key: str = "energy",
    forces_key: str = "forces",
    stress_key: str | None = None,
    temperature_key: str = "temperature_K",
) -> TestSet:
    """Labelled frames from an extxyz file; ``stress_key=None`` reads ``stress`` if every frame has it."""
    import ase.io

    try:
        images = ase.io.read(path, ":", format="extxyz")
    except FileNotFoundError:
        raise SetupError(f"{path}: test file not found") from None
    except Exception as exc:  # ASE raises many types for a damaged file
        detail = (str(exc).strip().splitlines() or [""])[0][:160]
        raise SetupError(f"{path}: not a readable extended XYZ file ({type(exc).__name__}: {detail})") from None
    images = [images] if isinstance(images, Atoms) else list(images)
    if not images:
        raise SetupError(f"{path}: no frames")
    optional_stress = stress_key is None
    stress_name = stress_key or "stress"
    if optional_stress and not all(_lookup(a, stress_name, per_atom=False) is not None for a in images):
        stress_name = ""
    frames = []
    for i, atoms in enumerate(images):
        energy = _required(atoms, energy_key, False, path, i)
        forces = np.asarray(_required(atoms, forces_key, True, path, i), dtype=float)
        stress = _voigt(_required(atoms, stress_name, False, path, i), stress_name, path, i) if stress_name else None
        if forces.shape != (len(atoms), 3):
            raise SetupError(f"{path}: frame {i}: {forces_key!r} has shape {forces.shape}, expected ({len(atoms)}, 3)")
        try:
            energy = float(np.asarray(energy).reshape(()))
        except (TypeError, ValueError):
            raise SetupError(f"{path}: frame {i}: {energy_key!r} is not one number") from None
        temperature = _temperature(atoms.info.get(temperature_key), temperature_key, path, i)
        if not (math.isfinite(energy) and np.isfinite(forces).all() and np.isfinite(atoms.positions).all()):
            raise SetupError(f"{path}: frame {i}: non-finite positions, energy or forces")
        bare = atoms.copy()
        bare.calc = None
        frames.append(TestFrame(bare, energy, forces, stress, temperature))
    return TestSet(frames, str(path), None, Path(path).name)


def _lookup(atoms: Atoms, key: str, per_atom: bool) -> Any | None:
    store = atoms.arrays if per_atom else atoms.info
    if key in store:
        return store[key]
    results = atoms.calc.results if atoms.calc is not None else {}
    return results.get(key)


def _required(atoms: Atoms, key: str, per_atom: bool, path: Path, index: int) -> Any:
    value = _lookup(atoms, key, per_atom)
    if value is None:
        where = "atoms.arrays" if per_atom else "atoms.info"
        raise SetupError(f"{path}: frame {index} has no {key!r} (looked in {where} and the calculator "
                         f"results); name the key with --{_option(key, per_atom)}-key")
    return value


def _option(key: str, per_atom: bool) -> str:
    if per_atom:
        return "forces"
    return "stress" if "stress" in key.lower() else "energy"


def _voigt(value: Any, key: str, path: Path, index: int) -> np.ndarray:
    from aimspax_like.data.frames import _voigt as to_voigt

    try:
        return to_voigt(value)
    except ValueError as exc:
        raise SetupError(f"{path}: frame {index}: {key!r}: {exc}") from None


def _temperature(value: Any, key: str, path: Path, index: int) -> float | None:
    if value is None:
        return None
    try:
        temperature = float(value)
    except (TypeError, ValueError):
        raise SetupError(f"{path}: frame {index}: {key!r} is not a number ({value!r})") from None
    return temperature if math.isfinite(temperature) else None
