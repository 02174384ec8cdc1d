"""Data efficiency: does the engine's active learning beat plain reference MD, per label and per call?

The engine's claim is accuracy per reference call. This study puts it to the test against the two
naive ways of getting training data, at equal training-set size and at equal reference calls:

* ``al``: one engine campaign per (system, seed) (``run_campaign``, quickstart-like settings,
  IDG driven by the reference itself). For each size n the prefix of ``dataset.h5`` in storage
  order that holds n training frames (and the validation frames stored among them) is the data
  set. Its reference calls are the IDG reference-MD steps (every MD step is one reference call
  with ``sampler: reference``; a prefix that ends inside IDG counts the steps up to its last IDG
  frame, otherwise the ``phase_end`` event's ``md_steps``) + the AL labels in the prefix (those
  the engine's energy gate holds out of training included: they were paid for) + the
  failed AL labels (``label_failed`` events) that came back before the prefix's last frame was
  stored (exact, by time stamp, not a proportional estimate).
* ``uniform``: reference MD (Langevin 500 K, 1 fs, friction 0.001/fs, the engine's IDG MD) of
  one structure, every ``sample_stride``-th (20th) frame; the first frames that hold n training
  frames. Reference calls = the MD steps up to the last frame used (20 per frame).
* ``random``: frames drawn at random (seeded) from the every-``random_stride``-th (5th) frame of
  that same reference MD, which is long enough to hold the uniform set of the largest size.
  Reference calls = the MD steps up to the latest frame drawn.

Every split follows the engine's rule (``data.splits.is_validation`` with ``valid_ratio`` 0.2:
every 5th frame is a validation frame, so n training frames come with about n/4 validation
frames), and every data set is trained the same way: a fresh single MACE model of the campaign's
architecture, seeded by the study seed, trained to convergence with patience on its validation
loss, its E0s refitted to its training energies (as the engine's convergence phase does). Test
sets are reference MD at 300, 500 and 700 K after an equilibration, from seeds no training set
uses: no model ever picks a test frame. ``al_campaign`` is an extra line: the campaign's own
converged best member (warm-started by continual learning) on the whole AL data set.

An independent physical check of the AL labels, separate from the engine's guards: a labelled
frame fails when two atoms are closer than 0.7 A or its energy per atom lies outside the 700 K
test set's [min, max] widened by ``energy_margin`` (1.0) times that range on each side.

Everything is cached in ``--out`` (test sets and MD pools as extxyz, campaigns as run
directories, every (system, method, size, seed) result in ``results.json`` with a fingerprint of
the settings it depends on), so an interrupted study continues where it stopped::

    .venv/bin/python workflows/data_efficiency.py --quick --systems ethanol   # smoke run
    .venv/bin/python workflows/data_efficiency.py --systems ethanol           # one system
"""

from __future__ import annotations

import os

# One OpenMP thread before torch loads: reference MD (xTB) and torch in one process fight over
# the cores otherwise (see aimspax_like.cli._default_threads).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse
import hashlib
import json
import logging
import math
import shlex
import sys
import time
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from ase import Atoms
from ase.io import read, write

from aimspax_like.config import (
    MDConfig,
    ModelConfig,
    TrainingConfig,
    config_from_dict,
    dotted_settings,
    merge_settings,
)
from aimspax_like.data import DatasetStore, LabelledFrame
from aimspax_like.data.splits import is_validation
from aimspax_like.reference.calculators import make_calculator
from aimspax_like.sampling.ase_md import StridedSampler

if TYPE_CHECKING:
    from aimspax_like.models.training import EnsembleTrainer

# torch, MACE and Parsl load inside the functions that train or run a campaign, after main() has
# quietened them; the rest of this module (data sets, checks, tables) needs none of them.

ROOT = Path(__file__).resolve().parents[1]
XTB = {"kind": "xtb", "method": "GFN2-xTB"}
EMT = {"kind": "emt"}
# Event names that mean "the engine's guards stopped, skipped or set aside a frame": an MD step
# that failed a physical check (md_unstable), a frame too uncertain to label (trust_exceeded), a
# label kept out of training as an energy outlier (label_held; label_released when the data
# later reach it). Any other name containing 'guard' or 'quarantin' is counted too: the
# engine's guards are still growing.
GUARD_EVENTS = ("guard_rejected", "md_unstable", "trust_exceeded", "label_held", "label_released",
                "label_quarantined")
METHODS = ("uniform", "random", "al", "al_campaign")
QUICKSTART_MODEL: dict[str, Any] = {
    "channels": 16, "max_L": 1, "r_max": 5.0, "radial_mlp": [32, 32], "dtype": "float32", "device": "auto",
}


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# --------------------------------------------------------------------------- systems


@dataclass(frozen=True)
class SystemSpec:
    name: str
    build: Callable[[], Atoms]
    reference: dict[str, Any]
    note: str = ""


def _ethanol() -> Atoms:
    return read(ROOT / "configs/structures/ethanol.xyz")


def _methyl_ethyl_ether() -> Atoms:
    from ase.build import molecule

    return molecule("CH3CH2OCH3")  # 12 atoms, ASE's g2 set; xTB MD at 700 K checked stable


def _cu13() -> Atoms:
    from ase.cluster import Icosahedron

    return Icosahedron("Cu", 2)  # 13 atoms, open boundaries


SYSTEMS: dict[str, SystemSpec] = {
    "ethanol": SystemSpec("ethanol", _ethanol, XTB, "C2H5OH, GFN2-xTB"),
    "methyl_ethyl_ether": SystemSpec("methyl_ethyl_ether", _methyl_ethyl_ether, XTB, "CH3CH2OCH3, GFN2-xTB"),
    "cu13": SystemSpec("cu13", _cu13, EMT, "icosahedral Cu13 cluster, EMT"),
}


# --------------------------------------------------------------------------- settings


@dataclass
class Settings:
    sizes: list[int]
    seeds: list[int]
    test_temperatures: list[float] = field(default_factory=lambda: [300.0, 500.0, 700.0])
    test_size: int = 40
    patience: int = 15
    max_epochs: int = 60  # measured: patience 15 never stops a run before 150 epochs (n = 25, 100)
    idg_frames_per_member: int = 12  # quickstart: 60 IDG frames = 48 train = 12 per member
    temperature_K: float = 500.0
    sample_stride: int = 20
    random_stride: int = 5
    equilibration_steps: int = 200
    valid_ratio: float = 0.2
    energy_margin: float = 1.0
    min_distance: float = 0.7
    ensemble_size: int = 4
    model: dict[str, Any] = field(default_factory=lambda: dict(QUICKSTART_MODEL))
    training: dict[str, Any] = field(default_factory=dict)
    campaign_converge: bool = True
    al_max_md_steps: int = 10000  # the engine default; ~2000 per trajectory reached 100 (ethanol)
    workers: int = 2
    campaign_overrides: dict[str, Any] = field(default_factory=dict)  # deep-merged last (tests)

    def fingerprint(self, method: str) -> str:
        """Hash of every setting a (method, size, seed) result depends on: a change recomputes it."""
        keys = ["model", "training", "patience", "max_epochs", "test_temperatures", "test_size",
                "sample_stride", "equilibration_steps", "valid_ratio", "temperature_K"]
        if method == "random":
            keys.append("random_stride")
        if method.startswith("al"):
            keys += ["idg_frames_per_member", "ensemble_size", "campaign_overrides", "al_max_md_steps",
                     "campaign_converge"]
        data = {k: getattr(self, k) for k in keys}
        if method == "random":
            data["max_size"] = max(self.sizes)  # the pool, hence the draw, depends on it
        return hashlib.sha1(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:12]


# --------------------------------------------------------------------------- reference MD


def frames_needed(n_train: int, ratio: float) -> int:
    """Frames, split by the engine's rule, until ``n_train`` of them are training frames."""
    k = train = 0
    while train < n_train:
        train += not is_validation(k, ratio)
        k += 1
    return k


def split_frames(frames: Sequence[Atoms], n_train: int, ratio: float) -> tuple[list[Atoms], list[Atoms]] | None:
    """The first frames that hold ``n_train`` training frames, dealt as the engine deals them."""
    count = frames_needed(n_train, ratio)
    if count > len(frames):
        return None
    train = [a for k, a in enumerate(frames[:count]) if not is_validation(k, ratio)]
    valid = [a for k, a in enumerate(frames[:count]) if is_validation(k, ratio)]
    return train, valid


def reference_md(atoms: Atoms, reference: dict[str, Any], temperature_K: float, stride: int, n_frames: int,
                 seed: int, skip_steps: int, workdir: Path) -> list[Atoms]:
    """Every ``stride``-th frame of reference MD (the engine's Langevin), labelled as it runs.

    The first ``skip_steps`` steps (rounded up to whole strides) are equilibration and dropped.
    Frames carry REF_energy / REF_forces and their MD step (``md_step``).
    """
    sampler = StridedSampler([atoms], lambda: make_calculator(reference, workdir),
                             MDConfig(temperature_K=temperature_K), stride, seed=seed)
    skip = math.ceil(skip_steps / stride)
    frames = []
    for i in range(skip + n_frames):
        sampled = sampler.next_frame()
        if i < skip:
            continue
        frame = sampled.atoms.copy()
        frame.info = {"REF_energy": sampled.energy, "md_step": sampled.md_step}
        frame.arrays["REF_forces"] = np.array(sampled.forces)
        frames.append(frame)
    return frames


def _cached(path: Path, n_frames: int, make: Callable[[], list[Atoms]]) -> tuple[list[Atoms], float | None]:
    """Frames from ``path`` when it holds at least ``n_frames``, else made and written there.

    Returns the frames and the seconds it took to make them (None when read from the cache).
    """
    if path.exists():
        frames = read(path, ":")
        if len(frames) >= n_frames:
            return list(frames[:n_frames]), None
    start = time.perf_counter()
    frames = make()
    tmp = path.with_suffix(".tmp.extxyz")
    write(tmp, frames, format="extxyz")
    tmp.replace(path)
    return frames, time.perf_counter() - start


def test_sets(spec: SystemSpec, atoms: Atoms, settings: Settings, folder: Path) -> tuple[dict[str, list[Atoms]], float]:
    """One reference-MD test set per temperature, seeds no training set uses (9000 + T)."""
    sets, seconds = {}, 0.0
    for temperature in settings.test_temperatures:
        path = folder / f"test_{temperature:g}K_n{settings.test_size}_s{settings.sample_stride}.extxyz"
        frames, made = _cached(path, settings.test_size, lambda t=temperature: reference_md(
            atoms, spec.reference, t, settings.sample_stride, settings.test_size, 9000 + int(t),
            settings.equilibration_steps, folder / "scratch"))
        sets[f"{temperature:g}"] = frames
        seconds += made or 0.0
    return sets, seconds


def md_pool(spec: SystemSpec, atoms: Atoms, settings: Settings, seed: int, folder: Path) -> tuple[list[Atoms], float]:
    """Every ``random_stride``-th frame of one reference MD long enough for the largest uniform set.

    Seed 1000 + study seed: independent of the campaign (its IDG MD uses the study seed) and of
    the test sets.
    """
    if settings.sample_stride % settings.random_stride:
        raise ValueError("sample_stride must be a multiple of random_stride")
    steps = frames_needed(max(settings.sizes), settings.valid_ratio) * settings.sample_stride
    n_frames = steps // settings.random_stride
    frames, made = _cached(folder / f"pool_seed{seed}_s{settings.random_stride}.extxyz", n_frames, lambda: reference_md(
        atoms, spec.reference, settings.temperature_K, settings.random_stride, n_frames, 1000 + seed, 0,
        folder / "scratch"))
    return frames, made or 0.0


@dataclass
class DataSet:
    train: list[Atoms]
    valid: list[Atoms]
    calls: int


def uniform_set(pool: Sequence[Atoms], n_train: int, settings: Settings) -> DataSet | None:
    strided = [a for a in pool if a.info["md_step"] % settings.sample_stride == 0]
    split = split_frames(strided, n_train, settings.valid_ratio)
    if split is None:
        return None
    used = frames_needed(n_train, settings.valid_ratio)
    return DataSet(*split, calls=int(strided[used - 1].info["md_step"]))


def random_set(pool: Sequence[Atoms], n_train: int, settings: Settings, seed: int) -> DataSet | None:
    """A seeded random draw from the pool; sizes of one seed are nested (one permutation)."""
    order = np.random.default_rng(2000 + seed).permutation(len(pool))
    drawn = [pool[i] for i in order]
    split = split_frames(drawn, n_train, settings.valid_ratio)
    if split is None:
        return None
    used = drawn[: frames_needed(n_train, settings.valid_ratio)]
    return DataSet(*split, calls=max(int(a.info["md_step"]) for a in used))


# --------------------------------------------------------------------------- the AL campaign


def campaign_dict(spec: SystemSpec, structure: Path, settings: Settings, seed: int, run_dir: Path) -> dict[str, Any]:
    """Quickstart-like campaign; IDG collects ``idg_frames_per_member`` training frames per member."""
    per_member = settings.idg_frames_per_member
    rounds = math.ceil(per_member / 5)
    idg_frames = round(per_member * settings.ensemble_size / (1 - settings.valid_ratio))
    md = {"temperature_K": settings.temperature_K}
    config = {
        "system": {"structures": str(structure)},
        "reference": dict(spec.reference),
        "model": {**settings.model, "ensemble_size": settings.ensemble_size},
        "training": dict(settings.training),
        "idg": {"sampler": "reference", "stride": settings.sample_stride, "points_per_member": min(5, per_member),
                "intermediate_epochs": 8, "valid_ratio": settings.valid_ratio, "max_epochs": 8 * rounds,
                "max_set_size": idg_frames, "md": md},
        "al": {"mode": "parallel", "num_trajectories": 4, "check_every": 10, "valid_ratio": settings.valid_ratio,
               "max_train_set_size": max(settings.sizes), "max_epochs_per_point": 1,
               "max_md_steps": settings.al_max_md_steps, "md": md},
        "converge": {"enabled": settings.campaign_converge, "members": "best", "patience": settings.patience,
                     "max_epochs": settings.max_epochs},
        "test_set": {"size": 0},
        "cluster": {"kind": "local", "max_workers": settings.workers},
        "output": {"directory": str(run_dir)},
        "seed": seed,
    }
    return merge_settings(config, settings.campaign_overrides)


class _CampaignProgress:
    """A line at each phase change and each tenth of the AL target: a long campaign shows life."""

    def __init__(self, tag: str, target: int) -> None:
        self.tag, self.target, self.phase, self.next_train = tag, target, None, 0

    def __call__(self, status: dict[str, Any]) -> None:
        phase = status.get("phase")
        if phase != self.phase:
            self.phase = phase
            log(f"{self.tag}: phase {phase}")
        if phase == "al" and status.get("train", 0) >= self.next_train:
            log(f"{self.tag}: al train {status['train']}/{self.target}, md steps {status['steps']}, "
                f"valid F MAE {1000 * status['valid_mae']:.1f} meV/A")
            self.next_train = status["train"] + max(1, self.target // 10)


def run_al_campaign(spec: SystemSpec, structure: Path, settings: Settings, seed: int, run_dir: Path,
                    executor: Any = None) -> float | None:
    """Run (or resume, or find finished) the campaign; returns its wall time if it ran now.

    A finished campaign is used as it stands, without asking the engine: its config may no
    longer match the engine's defaults (a new key), which would make a resume refuse it.
    """
    from aimspax_like.campaign import run_campaign
    from aimspax_like.errors import ConfigError

    phases = run_dir / "state/phases.json"
    if phases.exists() and "converge" in json.loads(phases.read_text()).get("done", []):
        return None
    config = config_from_dict(campaign_dict(spec, structure, settings, seed, run_dir))
    start = time.perf_counter()
    try:
        summary = run_campaign(config, resume=True, executor=executor, on_progress=_CampaignProgress(
            f"{spec.name} campaign seed {seed}", max(settings.sizes)))
    except ConfigError as exc:
        raise SystemExit(f"error: cannot resume {run_dir} ({exc}); delete it to run that campaign afresh") from exc
    return None if summary.get("already_finished") else time.perf_counter() - start


def read_events(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "logs/events.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def _al_failure_times(events: Sequence[dict[str, Any]]) -> list[float]:
    # AL's label_failed events carry no 'phase'; IDG (foundation sampler) and test-set ones do.
    return [e["t"] for e in events if e["event"] == "label_failed" and e.get("phase", "al") == "al"]


def prefix_calls(prefix: Sequence[LabelledFrame], idg_md_steps: int, failure_times: Sequence[float]) -> int:
    """Reference calls behind a dataset prefix (reference-driven IDG: one call per MD step).

    Every AL frame in the prefix counts, 'held' ones too (labels the energy gate kept out of
    training were paid for all the same).
    """
    idg_steps: dict[int, int] = {}
    for frame in prefix:
        if frame.origin == "idg":
            idg_steps[frame.trajectory] = max(idg_steps.get(frame.trajectory, 0), frame.md_step)
    al = [f for f in prefix if f.origin == "al"]
    idg = max(idg_md_steps, sum(idg_steps.values())) if al else sum(idg_steps.values())
    failed = sum(t <= al[-1].created for t in failure_times) if al else 0
    return idg + len(al) + failed


def al_sets(run_dir: Path, sizes: Sequence[int]) -> dict[int, DataSet]:
    """Per size, the storage-order prefix of the campaign's dataset holding that many training frames.

    Held labels stay in the prefix for its cost and out of its data. A held label released to
    training later keeps its storage position (the store rewrites its split in place), so it
    counts from where it was labelled: that is when it was paid for.
    """
    frames = [f for f in DatasetStore.open(run_dir / "data/dataset.h5").frames() if f.origin in ("idg", "al")]
    events = read_events(run_dir)
    idg_ends = [int(e.get("md_steps", 0)) for e in events if e["event"] == "phase_end" and e.get("phase") == "idg"]
    failures = _al_failure_times(events)
    sets, n_train = {}, 0
    for end, frame in enumerate(frames, start=1):
        n_train += frame.split == "train"
        if n_train in sizes and frame.split == "train" and n_train not in sets:
            prefix = frames[:end]
            sets[n_train] = DataSet([f.to_atoms() for f in prefix if f.split == "train"],
                                    [f.to_atoms() for f in prefix if f.split == "valid"],
                                    prefix_calls(prefix, idg_ends[-1] if idg_ends else 0, failures))
    return sets


# --------------------------------------------------------------------------- physical check


def energy_window(frames: Sequence[Atoms], margin: float) -> tuple[float, float]:
    """[min, max] of REF energy per atom, widened by ``margin`` times its range on each side."""
    per_atom = [a.info["REF_energy"] / len(a) for a in frames]
    low, high = min(per_atom), max(per_atom)
    return low - margin * (high - low), high + margin * (high - low)


def physical_problems(atoms: Atoms, energy: float, window: tuple[float, float], min_distance: float) -> list[str]:
    """Why a labelled frame is unphysical ([] when it passes): fused atoms, energy out of range."""
    problems = []
    if len(atoms) > 1:
        distances = atoms.get_all_distances(mic=bool(atoms.pbc.any()))
        if distances[np.triu_indices(len(atoms), 1)].min() <= min_distance:
            problems.append("fused")
    if not window[0] <= energy / len(atoms) <= window[1]:
        problems.append("energy")
    return problems


def label_health(run_dir: Path, test_700: Sequence[Atoms], settings: Settings) -> dict[str, Any]:
    """The campaign's AL labels: engine guard events and the independent check's verdicts."""
    frames = DatasetStore.open(run_dir / "data/dataset.h5").frames(origin="al")
    events = read_events(run_dir)
    counts = Counter(e["event"] for e in events)
    guards = {name: n for name, n in counts.items()
              if name in GUARD_EVENTS or "guard" in name or "quarantin" in name}
    window = energy_window(test_700, settings.energy_margin)
    reasons = Counter()
    failing = failing_trained = 0
    for frame in frames:
        problems = physical_problems(frame.to_atoms(), frame.energy, window, settings.min_distance)
        failing += bool(problems)
        failing_trained += bool(problems) and frame.split in ("train", "valid")
        reasons.update(problems)
    return {"al_labels": len(frames), "held": sum(f.split == "held" for f in frames),
            "label_failed": len(_al_failure_times(events)), "rewinds": counts.get("rewind", 0),
            "guard_events": guards, "check_failing": failing, "check_failing_trained": failing_trained,
            "check_reasons": dict(reasons), "energy_window_eV_per_atom": [float(w) for w in window]}


# --------------------------------------------------------------------------- training


def train_and_test(data: DataSet, tests: dict[str, list[Atoms]], settings: Settings, seed: int) -> dict[str, Any]:
    """A fresh single MACE trained to convergence on ``data``, E0s refitted, errors on every test set."""
    from aimspax_like.models.calibration import refit_atomic_energies
    from aimspax_like.models.ensemble import MACEEnsemble, atomic_energies_from_data, average_neighbors, force_scale
    from aimspax_like.models.training import EnsembleTrainer

    model_cfg = ModelConfig(**{**settings.model, "ensemble_size": 1, "seeds": None})
    labelled = data.train + data.valid
    numbers = sorted({int(z) for a in [*labelled, *next(iter(tests.values()))] for z in a.numbers})
    ensemble = MACEEnsemble.build(
        model_cfg, [seed], atomic_numbers=numbers, atomic_energies=atomic_energies_from_data(labelled, numbers),
        avg_num_neighbors=average_neighbors(labelled, model_cfg.r_max), scale=force_scale(labelled),
    )
    trainer = EnsembleTrainer(ensemble, TrainingConfig(**settings.training), reset_after=None)
    start = time.perf_counter()
    best = trainer.train_to_convergence(0, data.train, data.valid, patience=settings.patience,
                                        max_epochs=settings.max_epochs)
    refit_atomic_energies(ensemble, 0, data.train)
    result = _errors(trainer, tests)
    return {**result, "calls": data.calls, "n_train": len(data.train), "n_valid": len(data.valid),
            "epochs": best.epoch, "valid_force_mae": 1000 * best.valid_force_mae,
            "train_s": round(time.perf_counter() - start, 2)}


def _errors(trainer: EnsembleTrainer, tests: dict[str, list[Atoms]]) -> dict[str, Any]:
    errors = {t: trainer.evaluate(0, frames) for t, frames in tests.items()}
    return {"force_mae": {t: 1000 * e["force_mae"] for t, e in errors.items()},
            "energy_mae": {t: 1000 * e["energy_mae_per_atom"] for t, e in errors.items()}}


def campaign_model_errors(run_dir: Path, tests: dict[str, list[Atoms]], settings: Settings) -> dict[str, Any] | None:
    """The campaign's converged best member on the test sets (None if it has none)."""
    from aimspax_like.models.ensemble import MACEEnsemble
    from aimspax_like.models.training import EnsembleTrainer

    path = run_dir / "models/best.model"
    if not path.exists():
        return None
    ensemble = MACEEnsemble.load([path], device="cpu", dtype=settings.model.get("dtype", "float64"))
    return _errors(EnsembleTrainer(ensemble, TrainingConfig(**settings.training), reset_after=None), tests)


# --------------------------------------------------------------------------- the study


def run_key(system: str, method: str, size: int, seed: int) -> str:
    return f"{system}|{method}|{size}|{seed}"


def empty_results() -> dict[str, Any]:
    return {"meta": {}, "runs": {}, "health": {}, "campaigns": {}, "parts": {}}


def load_results(path: Path) -> dict[str, Any]:
    return {**empty_results(), **json.loads(path.read_text())} if path.exists() else empty_results()


def save_results(results: dict[str, Any], path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=1, default=float))
    tmp.replace(path)


def _train_cached(results: dict[str, Any], key: str, fingerprint: str, data: DataSet | None,
                  tests: dict[str, list[Atoms]], settings: Settings, seed: int, save: Callable[[], None]) -> None:
    done = results["runs"].get(key)
    if done is not None and done.get("fingerprint") == fingerprint:
        return
    if data is None:
        log(f"{key}: not enough data, skipped")
        return
    log(f"{key}: training on {len(data.train)}+{len(data.valid)} frames ({data.calls} reference calls)")
    entry = train_and_test(data, tests, settings, seed)
    results["runs"][key] = {**entry, "fingerprint": fingerprint}
    forces = ", ".join(f"{t} K {v:.1f}" for t, v in entry["force_mae"].items())
    log(f"{key}: {entry['epochs']} epochs in {entry['train_s']:.0f} s; test F MAE (meV/A) {forces}")
    save()


def run_system(spec: SystemSpec, settings: Settings, out: Path, results: dict[str, Any],
               executor: Any = None, save: Callable[[], None] = lambda: None) -> None:
    """Every part of the study for one system, skipping whatever ``results`` already holds."""
    folder = out / spec.name
    folder.mkdir(parents=True, exist_ok=True)
    atoms = spec.build()
    structure = folder / "structure.xyz"
    write(structure, atoms)
    parts = results["parts"].setdefault(spec.name, {})
    log(f"{spec.name}: test sets at {settings.test_temperatures} K")
    tests, seconds = test_sets(spec, atoms, settings, folder)
    if seconds:
        parts["test_sets_s"] = round(seconds, 1)
    hottest = tests[f"{max(settings.test_temperatures):g}"]
    for seed in settings.seeds:
        log(f"{spec.name} seed {seed}: reference MD pool")
        pool, seconds = md_pool(spec, atoms, settings, seed, folder)
        if seconds:
            parts[f"pool_seed{seed}_s"] = round(seconds, 1)
        for size in settings.sizes:
            for method, data in (("uniform", uniform_set(pool, size, settings)),
                                 ("random", random_set(pool, size, settings, seed))):
                _train_cached(results, run_key(spec.name, method, size, seed), settings.fingerprint(method),
                              data, tests, settings, seed, save)
        run_dir = out / "campaigns" / f"{spec.name}_idg{settings.idg_frames_per_member}_seed{seed}"
        log(f"{spec.name} seed {seed}: AL campaign in {run_dir}")
        wall = run_al_campaign(spec, structure, settings, seed, run_dir, executor)
        campaign = results["campaigns"].setdefault(f"{spec.name}|{seed}", {})
        if wall is not None:
            campaign["wall_s"] = round(wall, 1)
        log(f"{spec.name} seed {seed}: campaign done ({campaign.get('wall_s', '?')} s)")
        sets = al_sets(run_dir, settings.sizes)
        for size in settings.sizes:
            _train_cached(results, run_key(spec.name, "al", size, seed), settings.fingerprint("al"),
                          sets.get(size), tests, settings, seed, save)
        results["health"][f"{spec.name}|{seed}"] = label_health(run_dir, hottest, settings)
        key = run_key(spec.name, "al_campaign", max(settings.sizes), seed)
        errors = campaign_model_errors(run_dir, tests, settings) if settings.campaign_converge else None
        if errors is not None:
            stored = DatasetStore.open(run_dir / "data/dataset.h5").frames()
            full = al_sets(run_dir, [sum(f.split == "train" and f.origin in ("idg", "al") for f in stored)])
            calls = next(iter(full.values())).calls if full else math.nan
            results["runs"][key] = {**errors, "calls": calls, "fingerprint": settings.fingerprint("al_campaign")}
        save()


# --------------------------------------------------------------------------- tables


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    arr = np.asarray(values, dtype=float)
    return float(arr.mean()), float(arr.std(ddof=1)) if len(arr) > 1 else math.nan


def _pm(values: Sequence[float]) -> str:
    mean, std = _mean_std(values)
    return f"{mean:.1f}" if math.isnan(std) else f"{mean:.1f} ± {std:.1f}"


def _entries(results: dict[str, Any], system: str, method: str, size: int, seeds: Sequence[int]) -> list[dict]:
    found = (results["runs"].get(run_key(system, method, size, s)) for s in seeds)
    return [e for e in found if e is not None]


def _energy_temperature(settings: Settings) -> str:
    return f"{min(settings.test_temperatures, key=lambda t: abs(t - 500)):g}"


def table_equal_size(results: dict[str, Any], systems: Sequence[str], settings: Settings) -> list[list[str]]:
    temps = [f"{t:g}" for t in settings.test_temperatures]
    e_temp = _energy_temperature(settings)
    header = ["system", "method", "size", *(f"F MAE {t} K (meV/A)" for t in temps),
              f"E MAE {e_temp} K (meV/atom)", "ref calls", "seeds"]
    rows = [header]
    for system in systems:
        for method in METHODS:
            sizes = [max(settings.sizes)] if method == "al_campaign" else settings.sizes
            for size in sizes:
                found = _entries(results, system, method, size, settings.seeds)
                if not found:
                    if method != "al_campaign":
                        rows.append([system, method, str(size), *(["not reached"] * len(temps)), "", "", "0"])
                    continue
                rows.append([system, method, str(size), *(_pm([e["force_mae"][t] for e in found]) for t in temps),
                             _pm([e["energy_mae"][e_temp] for e in found]),
                             f"{np.mean([e['calls'] for e in found]):.0f}", str(len(found))])
    return rows


def table_equal_calls(results: dict[str, Any], systems: Sequence[str], settings: Settings) -> list[list[str]]:
    temps = [f"{t:g}" for t in settings.test_temperatures if t in (500, 700)] or [f"{settings.test_temperatures[-1]:g}"]
    rows = [["system", "T (K)", "uniform size", "uniform F MAE", "uniform calls", "AL size reaching it",
             "AL F MAE", "AL calls", "AL / uniform calls"]]
    for system in systems:
        for t in temps:
            uniform = [(n, _entries(results, system, "uniform", n, settings.seeds)) for n in settings.sizes]
            uniform = [(n, found) for n, found in uniform if found]
            if not uniform:
                continue
            n_u, found_u = max(uniform, key=lambda item: item[0])
            mae_u = float(np.mean([e["force_mae"][t] for e in found_u]))
            calls_u = float(np.mean([e["calls"] for e in found_u]))
            row = [system, t, str(n_u), f"{mae_u:.1f}", f"{calls_u:.0f}"]
            for n in sorted(settings.sizes):
                found = _entries(results, system, "al", n, settings.seeds)
                if found and np.mean([e["force_mae"][t] for e in found]) <= mae_u:
                    calls = float(np.mean([e["calls"] for e in found]))
                    row += [str(n), f"{np.mean([e['force_mae'][t] for e in found]):.1f}", f"{calls:.0f}",
                            f"{calls / calls_u:.2f}"]
                    break
            else:
                row += ["not reached", "", "", ""]
            rows.append(row)
    return rows


def table_health(results: dict[str, Any], systems: Sequence[str], settings: Settings) -> list[list[str]]:
    rows = [["system", "seeds", "AL labels", "still held", "failed labels", "rewinds", "guard events",
             "failing independent check", "of them trained on", "reasons", "energy window (eV/atom)"]]
    for system in systems:
        found = [results["health"][f"{system}|{s}"] for s in settings.seeds if f"{system}|{s}" in results["health"]]
        if not found:
            continue
        labels = sum(h["al_labels"] for h in found)
        failing = sum(h["check_failing"] for h in found)
        guards, reasons = Counter(), Counter()
        for h in found:
            guards.update(h["guard_events"])
            reasons.update(h["check_reasons"])
        window = found[0]["energy_window_eV_per_atom"]
        fraction = f"{failing}/{labels} ({100 * failing / labels:.1f} %)" if labels else "no AL labels"
        rows.append([system, str(len(found)), str(labels), str(sum(h.get("held", 0) for h in found)),
                     str(sum(h["label_failed"] for h in found)),
                     str(sum(h["rewinds"] for h in found)),
                     ", ".join(f"{k}: {v}" for k, v in sorted(guards.items())) or "none", fraction,
                     str(sum(h.get("check_failing_trained", 0) for h in found)),
                     ", ".join(f"{k}: {v}" for k, v in sorted(reasons.items())) or "-",
                     f"[{window[0]:.3f}, {window[1]:.3f}]"])
    return rows


def markdown(rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows[1:]])


def render(results: dict[str, Any], systems: Sequence[str], settings: Settings) -> str:
    meta = results.get("meta", {})
    lines = ["# Data efficiency: active learning vs reference MD", "",
             f"command: `{meta.get('command', '')}`",
             f"seeds {settings.seeds}, sizes {settings.sizes}, test sets {settings.test_size} frames at "
             f"{settings.test_temperatures} K, patience {settings.patience}, max_epochs {settings.max_epochs}, "
             f"IDG {settings.idg_frames_per_member} training frames per member",
             f"this invocation: {meta.get('wall_s', math.nan):.0f} s wall", "",
             "wall time of each part (s, when computed):"]
    for system in systems:
        parts = results["parts"].get(system, {})
        campaigns = [results["campaigns"].get(f"{system}|{s}", {}).get("wall_s") for s in settings.seeds]
        by_method = {m: sum(e.get("train_s", 0.0) for k, e in results["runs"].items()
                            if k.startswith(f"{system}|{m}|")) for m in ("uniform", "random", "al")}
        lines.append(f"- {system}: test sets {parts.get('test_sets_s', 0):.0f}, pools "
                     f"{sum(v for k, v in parts.items() if k.startswith('pool')):.0f}, campaigns "
                     f"{[c for c in campaigns if c is not None]}, training "
                     + ", ".join(f"{m} {v:.0f}" for m, v in by_method.items()))
    lines += ["", "## Table 1: equal training-set size (force MAE mean ± std over seeds)", "",
              markdown(table_equal_size(results, systems, settings)), "",
              "`al_campaign`: the campaign's own converged best member on its whole dataset.", "",
              "## Table 2: equal reference calls (the smallest AL size whose mean force MAE is at or below "
              "uniform's at its largest size)", "", markdown(table_equal_calls(results, systems, settings)), "",
              "## Table 3: AL label health (all seeds together)", "",
              markdown(table_health(results, systems, settings)), "",
              f"independent check: a frame fails when two atoms are within {settings.min_distance} A or its "
              f"energy per atom lies outside the 700 K test set's range widened by {settings.energy_margin} x that "
              "range on each side."]
    return "\n".join(lines)


# --------------------------------------------------------------------------- command line


def _numbers(text: str, kind: type = int) -> list:
    return [kind(x) for x in text.split(",") if x.strip()]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--systems", default=",".join(SYSTEMS), help=f"comma list of {', '.join(SYSTEMS)}")
    parser.add_argument("--sizes", help="training-set sizes (default 25,50,100,200)")
    parser.add_argument("--seeds", help="seeds (default 0,1,2)")
    parser.add_argument("--test-temperatures", default="300,500,700", help="K, comma list")
    parser.add_argument("--test-size", type=int, help="frames per test set (default 40)")
    parser.add_argument("--patience", type=int, help="epochs without improvement (default 15; quick 10)")
    parser.add_argument("--max-epochs", type=int, help="per training and the campaign's converge (default 60)")
    parser.add_argument("--idg-frames-per-member", type=int,
                        help="IDG training frames per member, 5 per round (default 12, the quickstart's 60 frames)")
    parser.add_argument("--weak-start", action="store_true", help="one IDG round of 5 frames per member")
    parser.add_argument("--campaign", action="append", default=[], metavar="KEY=VALUE",
                        help="a campaign setting for the AL runs, dotted key and YAML value (repeatable), "
                        "e.g. al.guards.energy_outlier=12")
    parser.add_argument("--unguarded", action="store_true",
                        help="the engine as it was before guards: no guards, no energy gate, no IDG probe")
    parser.add_argument("--al-max-md-steps", type=int, default=10000, help="AL MD steps per trajectory")
    parser.add_argument("--no-campaign-converge", action="store_true", help="skip the campaign's own converge")
    parser.add_argument("--energy-margin", type=float, default=1.0, help="independent check's energy margin")
    parser.add_argument("--workers", type=int, default=2, help="label workers of each campaign")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: sizes 8,16, seed 0, test size 8, patience 10, max 30 epochs, IDG 1/member")
    parser.add_argument("--out", type=Path, help="output folder (default runs/data_efficiency[_weak|_quick])")
    return parser


# The engine with every safeguard of the exploration switched off (for before/after comparisons).
UNGUARDED = {"al": {"guards": {"enabled": False, "energy_outlier": None}}, "idg": {"probe_steps": 0}}


def settings_from_args(args: argparse.Namespace) -> Settings:
    quick = args.quick
    per_member = 5 if args.weak_start else args.idg_frames_per_member or (1 if quick else 12)
    return Settings(
        sizes=_numbers(args.sizes or ("8,16" if quick else "25,50,100,200")),
        seeds=_numbers(args.seeds or ("0" if quick else "0,1,2")),
        test_temperatures=_numbers(args.test_temperatures, float),
        test_size=args.test_size or (8 if quick else 40),
        patience=args.patience or (10 if quick else 15),
        max_epochs=args.max_epochs or (30 if quick else 60),
        idg_frames_per_member=per_member,
        energy_margin=args.energy_margin,
        campaign_converge=not args.no_campaign_converge,
        al_max_md_steps=args.al_max_md_steps,
        workers=args.workers,
        campaign_overrides=merge_settings(UNGUARDED if args.unguarded else {}, dotted_settings(args.campaign)),
    )


def _quiet() -> None:
    """As the engine's CLI: no torch.load nag (mace sets TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD, torch
    then warns at every load), and Parsl's DEBUG log stays in its own file, off the terminal."""
    warnings.filterwarnings("ignore", message=".*TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD.*")
    for name in ("parsl", "concurrent.futures"):
        logging.getLogger(name).propagate = False


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    _quiet()
    systems = [s for s in args.systems.split(",") if s]
    unknown = [s for s in systems if s not in SYSTEMS]
    if unknown:
        print(f"error: unknown system(s) {unknown}; choose from {list(SYSTEMS)}", file=sys.stderr)
        return 2
    settings = settings_from_args(args)
    suffix = ("_quick" if args.quick else "_weak" if args.weak_start else "") + ("_unguarded" if args.unguarded else "")
    out = args.out or Path("runs/data_efficiency" + suffix)
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.json"
    results = load_results(results_path)
    command = shlex.join([Path(sys.executable).name, *sys.argv]) if argv is None else shlex.join(argv)
    results["meta"] = {"command": command, "settings": asdict(settings), "systems": systems}
    log(f"{command}\nseeds {settings.seeds}, sizes {settings.sizes}, systems {systems}, out {out}")
    start = time.perf_counter()
    for name in systems:
        run_system(SYSTEMS[name], settings, out, results, save=lambda: save_results(results, results_path))
        log(f"{name}: done after {time.perf_counter() - start:.0f} s")
    results["meta"]["wall_s"] = round(time.perf_counter() - start, 1)
    save_results(results, results_path)
    text = render(results, systems, settings)
    (out / "tables.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
