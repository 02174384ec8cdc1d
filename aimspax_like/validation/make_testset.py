"""``aimspax-like testset``: a held-out test set as an extxyz file, outside any campaign.

The campaign's built-in test set (``aimspax_like.testset``) takes every ``stride``-th frame of
MD. This command makes a test set that a user can keep, share and feed to ``validate --test``:

1. MD at each temperature from the campaign's start structures, driven by the reference
   (``sampler="reference"``: every frame carries its reference label already) or by a MACE
   model (``sampler="model"``: MD is cheap, and the model's MD is where the model will be
   used); frames ``stride`` steps apart, ``pool`` times as many candidates as wanted;
2. per temperature, ``frames`` candidates picked by farthest point sampling on MACE descriptors
   (``fps``), so a few labels cover the sampled region instead of its most crowded part;
3. model-driven frames (and, for cells whose stress is wanted, reference-driven ones) labelled by
   the reference through the execution layer: the config's ``cluster`` section gives the label
   executor, a ``Labeller`` gives retries and the stop rule, exactly as in a campaign;
4. written atomically as extxyz with ``energy``/``forces`` (``stress``) and
   ``info["temperature_K"]``, which ``validate --test FILE`` reads with its default keys.

Model-driven MD may leave the physical region; a frame that fails the stability criterion
(``stability``) is never a candidate: its trajectory restarts from its last good frame with
fresh velocities, so the reference is never asked to label an exploded geometry.

Everything is checked before any MD runs (config, structures, reference elements, model files,
output path); a problem is a ``SetupError`` and nothing is written. Label scratch and Parsl's
logs go to a temporary folder that is removed at the end.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from ase import Atoms

from aimspax_like.data.xyz import check_new_file, write_images
from aimspax_like.errors import SetupError

SEED_OFFSET = 7001  # MD seeds apart from IDG's (seed) and the campaign test set's (seed + 99 + i)


@dataclass
class TestsetOptions:
    output: Path
    sampler: str = "reference"  # "reference" | "model"
    model: Path | None = None  # the MD model (sampler "model") and the descriptor model; default RUN's best.model
    temperatures: list[float] | None = None  # default: the campaign's test temperatures
    stride: int | None = None  # default: test_set.stride
    frames: int | None = None  # per temperature; default: test_set.size
    pool: int = 4  # candidates per wanted frame for farthest point sampling (1: no picking)
    seed: int | None = None  # default: the config's seed
    overwrite: bool = False
    on_progress: Callable[[str], None] | None = None


@dataclass
class TestsetResult:
    path: Path
    per_temperature: list[dict[str, Any]]  # temperature_K, candidates, frames, labels_failed
    notes: list[str] = field(default_factory=list)

    def render(self) -> str:
        lines = [f"{'temperature':<14}{'candidates':>11}{'frames':>8}{'failed':>8}"]
        for row in self.per_temperature:
            lines.append(f"{row['temperature_K']:g} K".ljust(14) + f"{row['candidates']:>11}{row['frames']:>8}"
                         f"{row['labels_failed']:>8}")
        lines += [f"note        {n}" for n in self.notes]
        total = sum(r["frames"] for r in self.per_temperature)
        lines.append(f"wrote       {total} frames to {self.path}")
        return "\n".join(lines)


@dataclass
class _Plan:
    config: Any
    structures: list[Atoms]
    temperatures: list[float]
    stride: int
    frames: int
    candidates: int
    seed: int
    md_model: Path | None
    descriptor_model: Path | None
    label_on_workers: bool


# --------------------------------------------------------------------------- checks


def plan(source: Path, options: TestsetOptions) -> _Plan:
    """Read and check every input (nothing is written); a problem is a ``SetupError``."""
    from aimspax_like.campaign import check_inputs
    from aimspax_like.config import load_config
    from aimspax_like.testset import temperatures_of

    source = Path(source)
    run_model: Path | None = None
    if source.is_dir():
        if not (source / "campaign.yaml").is_file():
            raise SetupError(f"{source}: neither a campaign YAML nor a run directory (no campaign.yaml)")
        config = load_config(source / "campaign.yaml")
        best = source / "models" / "best.model"
        run_model = best if best.is_file() else None
    elif source.is_file():
        config = load_config(source)
    else:
        raise SetupError(f"{source}: no such file or run directory")
    if options.sampler not in ("reference", "model"):
        raise SetupError(f"--sampler: must be 'reference' or 'model', not {options.sampler!r}")
    structures = check_inputs(config)
    temperatures = [float(t) for t in (options.temperatures or temperatures_of(config))]
    if any(not (math.isfinite(t) and t > 0) for t in temperatures):
        raise SetupError(f"--temperatures: must be positive numbers, got {temperatures}")
    stride = int(options.stride if options.stride is not None else config.test_set.stride)
    frames = int(options.frames if options.frames is not None else config.test_set.size)
    for name, value in (("--stride", stride), ("--frames", frames), ("--pool", options.pool)):
        if value < 1:
            raise SetupError(f"{name}: must be at least 1, got {value}")
    model = Path(options.model) if options.model is not None else run_model
    if model is not None and not model.is_file():
        raise SetupError(f"{model}: model file not found")
    if options.sampler == "model" and model is None:
        raise SetupError(f"{source}: --sampler model needs a MACE model: pass --model PATH "
                         "(or give a run directory that has models/best.model)")
    if options.pool > 1 and model is None:
        raise SetupError(f"{source}: farthest point sampling needs a MACE model for its descriptors: pass --model "
                         "PATH, or --pool 1 to keep every strided frame")
    if model is not None:
        _check_model(model, structures)
    check_new_file(Path(options.output), options.overwrite, "(FILE.xyz)")
    label = options.sampler == "model" or bool(config.reference.compute_stress)
    seed = int(options.seed if options.seed is not None else config.seed)
    return _Plan(config, structures, temperatures, stride, frames, frames * options.pool, seed,
                 model if options.sampler == "model" else None, model if options.pool > 1 else None, label)


def _check_model(path: Path, structures: list[Atoms]) -> None:
    from aimspax_like.validation.predict import load_model

    model = load_model(path, device="cpu", dtype="float64")
    unknown = sorted({int(z) for a in structures for z in a.numbers} - {int(z) for z in model.z_table.zs})
    if unknown:
        raise SetupError(f"{path}: the model has no elements {unknown} of the start structures")


# --------------------------------------------------------------------------- the command


def make_test_set(source: Path, options: TestsetOptions, executor: Any = None) -> TestsetResult:
    """Sample, pick, label and write the test set (see the module docstring).

    ``executor``: a started label executor to use (tests); by default one is made from the
    config's ``cluster`` section when labels are needed, and shut down at the end.
    """
    say = options.on_progress or (lambda message: None)
    p = plan(source, options)
    notes: list[str] = []
    with tempfile.TemporaryDirectory(prefix="aimspax_testset_") as scratch:
        say(f"{options.sampler} MD: {p.candidates} candidates per temperature, every {p.stride} steps")
        if options.sampler == "reference":
            candidates = _reference_candidates(p, scratch, say)
        else:
            candidates = _model_candidates(p, notes)
        picked = _pick(p, candidates, say)
        labelled = _label(p, picked, scratch, executor, notes, say) if p.label_on_workers else picked
    rows = []
    images: list[Atoms] = []
    for t in p.temperatures:
        mine = [a for a in labelled.get(t, []) if a is not None]
        failed = sum(1 for a in labelled.get(t, []) if a is None)
        rows.append({"temperature_K": t, "candidates": len(candidates.get(t, [])), "frames": len(mine),
                     "labels_failed": failed})
        images.extend(mine)
    write_images(Path(options.output), images)
    return TestsetResult(Path(options.output), rows, notes)


def _md_config(p: _Plan, temperature: float) -> Any:
    return p.config.test_set.md.model_copy(update={"temperature_K": float(temperature)})


def _labelled(atoms: Atoms, energy: float, forces: np.ndarray, stress: np.ndarray | None, temperature: float) -> Atoms:
    from ase.calculators.singlepoint import SinglePointCalculator

    frame = atoms.copy()
    frame.arrays.pop("momenta", None)  # MD state, not part of a test frame
    results: dict[str, Any] = {"energy": float(energy), "forces": np.asarray(forces, dtype=float)}
    if stress is not None:
        results["stress"] = np.asarray(stress, dtype=float)
    frame.calc = SinglePointCalculator(frame, **results)
    frame.info["temperature_K"] = float(temperature)
    return frame


def _reference_candidates(p: _Plan, scratch: str, say: Callable[[str], None]) -> dict[float, list[Atoms]]:
    """Reference-driven MD per temperature; every frame keeps the reference's energy and forces."""
    from aimspax_like.reference.calculators import make_calculator
    from aimspax_like.sampling.ase_md import StridedSampler

    spec = p.config.reference.model_dump(mode="json")
    out: dict[float, list[Atoms]] = {}
    for index, temperature in enumerate(p.temperatures):
        say(f"reference MD at {temperature:g} K")
        sampler = StridedSampler(p.structures, lambda: make_calculator(spec, scratch), _md_config(p, temperature),
                                 p.stride, seed=p.seed + SEED_OFFSET + index)
        out[temperature] = []
        for _ in range(p.candidates):
            s = sampler.next_frame()
            out[temperature].append(_labelled(s.atoms, s.energy, s.forces, None, temperature))
    return out


def _model_candidates(p: _Plan, notes: list[str]) -> dict[float, list[Atoms]]:
    """Model-driven MD, all temperatures and structures in one batch; unstable frames are dropped."""
    from aimspax_like.sampling.dynamics import MDState, maxwell_boltzmann, step_batch
    from aimspax_like.validation.predict import force_fn, load_model
    from aimspax_like.validation.stability import StabilityCriterion

    device = "cpu" if p.config.model.device == "auto" else str(p.config.model.device)
    model = load_model(p.md_model, device=device, dtype=str(p.config.model.dtype))
    forces = force_fn(model)
    states, temps, checks, last_good = [], [], [], []
    for index, temperature in enumerate(p.temperatures):
        md = _md_config(p, temperature)
        for k, start in enumerate(p.structures):
            rng = np.random.default_rng([p.seed + SEED_OFFSET, index, k])
            atoms = start.copy()
            atoms.calc = None
            atoms.set_momenta(maxwell_boltzmann(atoms, temperature, rng))
            states.append(MDState(atoms, md, rng))
            temps.append(temperature)
            checks.append(StabilityCriterion.from_start(start))
            last_good.append(atoms.copy())
    out: dict[float, list[Atoms]] = {t: [] for t in p.temperatures}
    restarts = 0
    limit = 50 * p.candidates * p.stride  # MD steps; a model that never holds a trajectory together stops here
    step = 0
    while any(len(out[t]) < p.candidates for t in p.temperatures) and step < limit:
        running = [a for a in range(len(states)) if len(out[temps[a]]) < p.candidates]
        step_batch([states[a] for a in running], forces)
        step += 1
        for a in running:
            state = states[a]
            if checks[a].check(state.atoms, state.atoms.get_momenta(), state.member_forces):
                restarts += 1
                state.atoms.set_positions(last_good[a].get_positions())
                state.atoms.set_momenta(maxwell_boltzmann(state.atoms, temps[a], state.rng))
                state.invalidate_forces()
                continue
            if step % p.stride == 0:
                frame = state.atoms.copy()
                frame.calc = None
                frame.info["temperature_K"] = temps[a]
                last_good[a] = frame.copy()
                out[temps[a]].append(frame)
    if restarts:
        notes.append(f"model MD failed the stability criterion {restarts} times; those trajectories restarted "
                     "from their last good frame and no unstable frame was kept")
    for t in p.temperatures:
        del out[t][p.candidates:]
        if len(out[t]) < p.candidates:
            notes.append(f"{t:g} K: only {len(out[t])} of {p.candidates} candidates within {limit} MD steps")
    return out


def _pick(p: _Plan, candidates: dict[float, list[Atoms]], say: Callable[[str], None]) -> dict[float, list[Atoms]]:
    """Farthest point sampling per temperature (all candidates when there are no more than wanted)."""
    from aimspax_like.validation.fps import (
        descriptor_calculator,
        farthest_point_sampling,
        frame_vectors,
        mace_descriptors,
        standardise,
    )

    picked: dict[float, list[Atoms]] = {}
    calculator = None
    elements = sorted({int(z) for frames in candidates.values() for a in frames for z in a.numbers})
    for t, frames in candidates.items():
        if len(frames) <= p.frames or p.descriptor_model is None:
            picked[t] = frames[:p.frames]
            continue
        say(f"farthest point sampling at {t:g} K: {p.frames} of {len(frames)}")
        if calculator is None:
            calculator = descriptor_calculator(str(p.descriptor_model))
        descriptors = mace_descriptors(calculator, frames)
        vectors = standardise(frame_vectors(descriptors, [a.numbers for a in frames], elements))
        picked[t] = [frames[i] for i in sorted(farthest_point_sampling(vectors, p.frames))]
    return picked


def _label(p: _Plan, picked: dict[float, list[Atoms]], scratch: str, executor: Any, notes: list[str],
           say: Callable[[str], None]) -> dict[float, list[Atoms | None]]:
    """Reference labels from the workers (``Labeller.label_all``); a failed label is ``None``."""
    from aimspax_like.events import EventLog
    from aimspax_like.labelling import Labeller

    flat = [(t, a) for t, frames in picked.items() for a in frames]
    say(f"labelling {len(flat)} frames with {p.config.reference.kind}")
    events = EventLog(Path(scratch) / "events.jsonl")
    owned = executor is None
    if owned:
        from aimspax_like.execution import make_label_executor

        executor = make_label_executor(p.config.cluster, scratch)
        executor.start()
    try:
        labeller = Labeller.for_campaign(p.config, executor, Path(scratch) / "labels", events)
        bare = []
        for _, atoms in flat:
            copy = atoms.copy()
            copy.calc = None
            bare.append(copy)
        fields = [{"temperature_K": t} for t, _ in flat]
        results = labeller.label_all("test", bare, 0, fields)
    finally:
        events.close()
        if owned:
            executor.shutdown()
    out: dict[float, list[Atoms | None]] = {t: [] for t in picked}
    for (t, atoms), result in zip(flat, results, strict=True):
        out[t].append(None if result is None else _labelled(atoms, result.energy, result.forces, result.stress, t))
    failed = sum(1 for r in results if r is None)
    if failed:
        notes.append(f"{failed} labels failed after their retries and were left out")
    return out
