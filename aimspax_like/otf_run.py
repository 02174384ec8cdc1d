"""``aimspax-like otf CONFIG``: one on-the-fly MD run in a run directory, resumable after a kill.

The committee drives the MD through ``OnTheFlyCalculator``; wherever it is unsure the reference
labels the step, the label is stored and the members train on it (FALCON's workflow on the
engine's committee). The MD runs on the engine's own integrators (``sampling.dynamics``: every
thermostat and barostat of the campaign's MD, with a temperature ramp on top), whose state is
plain data, so a checkpoint holds the exact phase-space point, thermostat chains and random
generator state.

Run directory (the campaign's layout, so the dataset tools, exports and ``train`` read it):

- ``campaign.yaml``, ``state/config_record.yaml``: the resolved config (a resume is checked against it);
- ``data/dataset.h5``: the start frames (origin ``idg`` or ``import``), the on-the-fly labels
  (origin ``al``, source ``otf``) and the end-of-run check frames (origin ``test``);
- ``state/otf_checkpoint.pt``: MD state, calculator counters and Eq. 2 window, committee state;
- ``models/member_k.model``: the members, saved at the end;
- ``otf/trajectory.xyz``: every ``write_every``-th frame with what the calculator returned;
- ``logs/events.jsonl``; ``report/``: ``otf.json``, ``otf.md`` and ``otf.png`` (``otf_report``).

Kill safety. A label is in ``dataset.h5`` before anything learns from it, and a checkpoint is
written after every step that labelled (and every ``checkpoint_every`` steps). A kill between
the two leaves a stored label the checkpoint does not know: on resume the committee is rebuilt
with every stored frame, the MD replays from the checkpoint, and the calculator answers the step
that labelled from the stored frame when it meets the same geometry instead of asking the
reference again. So no label is lost and none is computed twice.
"""

from __future__ import annotations

import io
import json
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from ase import Atoms
from ase.io import write

from aimspax_like.campaign import _make_root, _record_config, check_config_unchanged, check_cuda, check_spin
from aimspax_like.committee import Committee
from aimspax_like.config import PERIODIC_ONLY_REFERENCES, CampaignConfig
from aimspax_like.context import RunPaths
from aimspax_like.data import DatasetStore, LabelledFrame, reference_fingerprint
from aimspax_like.errors import CampaignInterrupted, ConfigError, LabelsKeepFailing, RunDirectoryError
from aimspax_like.events import EventLog
from aimspax_like.otf import REFIT_FRAMES, OnTheFlyCalculator, ReferenceLabelError
from aimspax_like.piece_planner import PiecePlanner
from aimspax_like.run_lock import LOCK_NAME, RunLock
from aimspax_like.state import load_checkpoint, save_checkpoint
from aimspax_like.structures import atoms_from_arrays, atoms_to_arrays, read_structures

OTF_CHECKPOINT = "otf_checkpoint.pt"
OTF_FORMAT = 1
START_ORIGINS = ("idg", "import")
START_SOURCE = "otf_start"


@dataclass(frozen=True)
class OTFPaths(RunPaths):
    """A campaign's run-directory layout plus the on-the-fly run's own files."""

    @property
    def otf(self) -> Path:
        return self.root / "otf"

    @property
    def trajectory(self) -> Path:
        return self.otf / "trajectory.xyz"

    @property
    def checkpoint(self) -> Path:
        return self.state / OTF_CHECKPOINT

    @property
    def folders(self) -> tuple[Path, ...]:
        return (*super().folders, self.otf)


def is_otf_run(root: Path) -> bool:
    """Whether a run directory holds an on-the-fly run (``resume`` dispatches on it)."""
    return (Path(root) / "otf").is_dir() and (Path(root) / "campaign.yaml").is_file()


# --------------------------------------------------------------------------- checks


def needs_stress(config: CampaignConfig) -> bool:
    return config.otf.md.ensemble.startswith("npt")


def start_models(config: CampaignConfig) -> tuple[list[Path], Path | None]:
    """The member files of ``otf.start.models`` and the dataset that came with them (a run directory's)."""
    given = config.otf.start.models
    if not given:
        return [], None
    if len(given) == 1 and given[0].is_dir():
        run = RunPaths(given[0])
        members = run.member_models()
        if not members:
            raise ConfigError("otf.start.models", f"{given[0]}: no models/member_*.model in this run directory")
        return members, run.dataset if run.dataset.is_file() else None
    missing = [p for p in given if not p.is_file()]
    if missing:
        raise ConfigError("otf.start.models", f"model file not found: {missing[0]}")
    return list(given), None


def check_otf_inputs(config: CampaignConfig) -> Atoms:
    """Everything that can be checked before the run directory is touched; returns the start structure."""
    from aimspax_like.reference.calculators import check_reference_setup

    structures = read_structures(config.system.structures, config.system.index)
    start = structures[0].copy()
    numbers = {int(z) for atoms in structures for z in atoms.numbers}
    check_reference_setup(config.reference.model_dump(mode="json"), numbers, [start])
    if config.reference.kind == "pyscf":
        check_spin(config.reference.charge, config.reference.spin, [start])
    if needs_stress(config) and not start.pbc.all():
        raise ConfigError("otf.md.ensemble", f"{config.otf.md.ensemble} needs a periodic cell in the start structure")
    if config.reference.compute_stress and not start.pbc.all():
        raise ConfigError("reference.compute_stress", "stress needs a periodic start structure")
    members, _ = start_models(config)
    if members:
        from aimspax_like.models.ensemble import MACEEnsemble

        try:
            ensemble = MACEEnsemble.load(members, device="cpu", dtype=config.model.dtype)
        except Exception as exc:  # a damaged or foreign file: one line naming it
            raise ConfigError("otf.start.models", f"cannot load {members[0].parent}: {exc}"[:300]) from None
        known = {int(z) for z in ensemble.z_table.zs}
        if not numbers <= known:
            raise ConfigError("otf.start.models", f"the members do not know element(s) {sorted(numbers - known)}")
    if config.model.device == "cuda":
        check_cuda()
    return start


# --------------------------------------------------------------------------- the run


@dataclass
class OTFRun:
    """The objects of one on-the-fly run while it is in memory."""

    config: CampaignConfig
    paths: OTFPaths
    store: DatasetStore
    events: EventLog
    committee: Committee
    calculator: OnTheFlyCalculator
    state: Any  # sampling.state.MDState
    written_bytes: int = 0
    failures: int = 0
    elapsed_before: float = 0.0  # MD-loop seconds of earlier processes of this run
    loop_started: float = 0.0


def run_otf(
    config: CampaignConfig,
    overwrite: bool = False,
    resume: bool = False,
    should_stop: Callable[[], int] | None = None,
    progress: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Run (or, with ``resume``, continue) the on-the-fly MD of ``config.otf``; returns the report summary.

    ``should_stop`` returns a signal number once the run should save and stop
    (``CampaignInterrupted``); ``progress`` is called with a small dict every MD step.
    """
    start = check_otf_inputs(config)
    paths = OTFPaths(Path(config.output.directory))
    created = _make_root(paths.root)
    lock = RunLock(paths.root)
    try:
        lock.acquire()
        fresh = _prepare(paths, config, overwrite, resume)
        return _run_locked(config, paths, start, fresh, should_stop or (lambda: 0), progress)
    finally:
        lock.release()
        if created and paths.root.is_dir() and not any(paths.root.iterdir()):
            paths.root.rmdir()


def _prepare(paths: OTFPaths, config: CampaignConfig, overwrite: bool, resume: bool) -> bool:
    """Lay out a fresh run directory or check the one to continue; True when it starts fresh."""
    content = [p for p in paths.root.iterdir() if p.name != LOCK_NAME]
    if content and resume:
        if not paths.config.is_file() or not paths.otf.is_dir():
            raise RunDirectoryError(f"{paths.root}: not an on-the-fly run directory (no campaign.yaml or otf/)")
        check_config_unchanged(paths, config)
        if not paths.dataset.is_file():
            raise RunDirectoryError(f"{paths.dataset}: missing from a started run directory; its labels are gone")
        if paths.checkpoint.exists():
            load_checkpoint(paths.checkpoint)  # refuse a damaged one before anything is written
        _record_config(paths, config)
        return False
    if content:
        if not overwrite:
            raise RunDirectoryError(f"{paths.root}: run directory exists; pass --overwrite to start over "
                                    "or --resume to continue")
        for item in content:
            shutil.rmtree(item) if item.is_dir() and not item.is_symlink() else item.unlink()
    for folder in paths.folders:
        folder.mkdir(parents=True, exist_ok=True)
    DatasetStore.create(paths.dataset)
    _record_config(paths, config)
    return True


def _run_locked(
    config: CampaignConfig, paths: OTFPaths, start: Atoms, fresh: bool,
    should_stop: Callable[[], int], progress: Callable[[dict[str, Any]], None] | None,
) -> dict[str, Any]:
    from aimspax_like.otf_report import make_otf_report

    store = DatasetStore.open(paths.dataset)
    events = EventLog(paths.events)
    try:
        checkpoint = load_checkpoint(paths.checkpoint) if paths.checkpoint.exists() else None
        if checkpoint is not None and checkpoint.get("done") and checkpoint["step"] >= config.otf.steps:
            events.emit("otf_resume", step=checkpoint["step"], finished=True)
            return make_otf_report(paths, config, store, events, done=True)
        run = _build(config, paths, start, store, events, checkpoint)
        _loop(run, should_stop, progress)
        run.committee.save(paths.models)
        _checkpoint(run, done=True)
        events.emit("otf_md_end", step=run.state.step, labels=run.calculator.n_labels,
                    timings=dict(run.calculator.timings))
        return make_otf_report(paths, config, store, events, done=True)
    finally:
        events.close()


# --------------------------------------------------------------------------- building


def _store_start_frames(
    config: CampaignConfig, start: Atoms, store: DatasetStore, events: EventLog, scratch: Path,
) -> None:
    """Label the frames a fresh committee is fitted on (those already stored are kept, not redone)."""
    from aimspax_like.reference.label import label
    from aimspax_like.reference.results import LabelResult

    spec = config.reference.model_dump(mode="json")
    if needs_stress(config):
        spec["compute_stress"] = True
    fingerprint = reference_fingerprint(spec)
    stored = store.keys()
    have = {step for origin, _, step, _ in stored if origin == "idg"}
    wanted = config.otf.start.frames
    geometries = _start_geometries(config, start, spec)
    failures = 0
    for k, atoms in enumerate(geometries):
        if len(have) >= wanted:
            break
        if k in have:
            continue
        outcome = label(atoms, spec, str(scratch / f"start_{k}"))
        if not isinstance(outcome, LabelResult):
            # Discarded like any failed label; a spare geometry takes its place.
            failures += 1
            events.emit("otf_start_label_failed", frame=k, kind=outcome.kind.value, message=outcome.message)
            if failures >= config.otf.max_failures:
                raise LabelsKeepFailing(failures, "otf start", f"{outcome.kind.value}: {outcome.message}"[:200])
            continue
        have.add(k)
        frame = LabelledFrame.from_atoms(
            atoms, energy=outcome.energy, forces=outcome.forces, stress=outcome.stress,
            split="train", origin="idg", trajectory=0, md_step=k, reference=fingerprint,
            label_wall_s=outcome.wall_s, source=START_SOURCE)
        index = store.append(frame)
        events.emit("otf_start_label", frame=k, index=index, label_wall_s=outcome.wall_s,
                    source=config.otf.start.source)


def _start_geometries(config: CampaignConfig, start: Atoms, spec: dict[str, Any]) -> list[Atoms]:
    """``otf.start.frames`` geometries: along a reference relaxation, or rattled copies of the start."""
    opts = config.otf.start
    rng = np.random.default_rng(config.seed)
    first = start.copy()
    if opts.source == "rattle":
        out = [first]
        for _ in range(opts.frames - 1 + config.otf.max_failures):  # spares for failed labels
            copy = start.copy()
            copy.positions += rng.normal(0.0, opts.rattle_A, copy.positions.shape)
            out.append(copy)
        return out
    import tempfile

    from ase.optimize import BFGS

    from aimspax_like.reference.calculators import make_calculator

    moving = start.copy()
    moving.positions += rng.normal(0.0, opts.rattle_A, moving.positions.shape)
    path: list[Atoms] = []
    with tempfile.TemporaryDirectory(prefix="otf_relax_") as workdir:
        moving.calc = make_calculator(spec, workdir)
        optimizer = BFGS(moving, logfile=None)
        optimizer.attach(lambda: path.append(Atoms(moving.numbers, moving.positions.copy(), cell=moving.cell.copy(),
                                                     pbc=moving.pbc.copy())))
        optimizer.run(fmax=config.system.relax_fmax, steps=config.system.relax_steps)
    if len(path) <= opts.frames:
        return path
    picks = np.unique(np.linspace(0, len(path) - 1, opts.frames).round().astype(int))
    spares = [i for i in range(len(path)) if i not in set(picks)]  # for failed labels, in path order
    return [path[i] for i in [*picks, *spares]]


def _copy_start_run(dataset: Path, store: DatasetStore) -> None:
    """The labelled frames of the run whose members start this one, as this run's ``import`` frames."""
    from aimspax_like.data import source_tag

    stored = store.keys()
    if any(origin == "import" for origin, *_ in stored):
        return  # copied before a kill
    frames = [f for f in DatasetStore.open(dataset).frames() if f.split in ("train", "valid")]
    copies = []
    for k, f in enumerate(frames):
        copy = LabelledFrame.from_atoms(
            f.to_atoms(), energy=f.energy, forces=f.forces, stress=f.stress, split=f.split, origin="import",
            trajectory=0, md_step=k, member=f.member, reference=f.reference, label_wall_s=f.label_wall_s,
            source=source_tag(dataset, k), piece=0 if f.is_piece else -1, force_mask=f.force_mask,
            parent_index=f.parent_index)
        copies.append(copy)
    store.extend(copies)



def _planner(config: CampaignConfig, committee: Committee) -> PiecePlanner | None:
    """``otf.substructures``: the planner, its core radius defaulting to the receptive field."""
    settings = config.otf.substructures
    if not settings.enabled:
        return None
    model = config.model
    return PiecePlanner(settings, model.r_max * model.num_interactions, ensemble=committee.ensemble, seed=config.seed,
                        vacuum=config.reference.kind not in PERIODIC_ONLY_REFERENCES)

def _build(
    config: CampaignConfig, paths: OTFPaths, start: Atoms, store: DatasetStore, events: EventLog,
    checkpoint: dict[str, Any] | None,
) -> OTFRun:
    from aimspax_like.sampling.dynamics import maxwell_boltzmann
    from aimspax_like.sampling.state import MDState

    members, source_dataset = start_models(config)
    if checkpoint is None:
        if source_dataset is not None:
            _copy_start_run(source_dataset, store)
        elif not members:
            _store_start_frames(config, start, store, events, paths.labels)
    frames = store.frames()
    base = [f for f in frames if f.origin in START_ORIGINS]
    if members:
        committee = Committee.from_files(config, members, base)
    else:
        numbers = sorted({int(z) for f in base for z in f.numbers} | {int(z) for z in start.numbers})
        committee = Committee.from_data(config, base, numbers)
    committee.bound_rounds(config.otf.rounds, config.otf.epochs_per_label, config.seed)
    if checkpoint is None and not members and config.otf.start.epochs > 0:
        started = time.monotonic()
        committee.train_round(config.otf.start.epochs)
        committee.refit_energies(REFIT_FRAMES)
        events.emit("otf_start_fit", frames=len(base), epochs=config.otf.start.epochs,
                    wall_s=time.monotonic() - started, valid_force_mae=committee.valid_force_mae())
    labelled = [f for f in frames if f.origin == "al"]
    committee.add_all(labelled)
    trigger = config.otf.trigger
    calculator = OnTheFlyCalculator(
        committee, config.reference, store, measure=trigger.measure, threshold=trigger.threshold,
        energy_per_atom=trigger.energy_per_atom, epochs=config.otf.epochs_per_label,
        valid_ratio=config.otf.valid_ratio, events=events, min_train=trigger.min_train,
        log_every=config.otf.log_every, compute_stress=needs_stress(config) or config.reference.compute_stress,
        trajectory=0, scratch=paths.labels, window=trigger.window, c_x=trigger.c_x, warmup=trigger.warmup,
        calibrate=trigger.calibrate, planner=_planner(config, committee))
    atoms = start.copy()
    rng = np.random.default_rng(config.seed)
    md = config.otf.md.model_copy(update={"temperature_K": config.otf.temperature_at(0)})
    if checkpoint is None:
        atoms.set_momenta(maxwell_boltzmann(atoms, md.temperature_K, rng))
    atoms.calc = calculator
    state = MDState(atoms, md, rng)
    run = OTFRun(config, paths, store, events, committee, calculator, state)
    if checkpoint is None:
        events.emit("otf_start", steps=config.otf.steps, atoms=len(atoms), start_frames=len(base),
                    members=committee.n_members, trigger=trigger.model_dump(mode="json"))
        if paths.trajectory.exists():
            paths.trajectory.unlink()
    else:
        _restore(run, checkpoint)
        events.emit("otf_resume", step=state.step, labels=calculator.n_labels,
                    stored_after_checkpoint=len(labelled) - calculator.n_labels)
    return run


# --------------------------------------------------------------------------- checkpoint


def _checkpoint(run: OTFRun, done: bool = False) -> None:
    from aimspax_like.sampling.state import phase_space_dict

    s = run.state
    payload = {
        "format": OTF_FORMAT, "done": done, "step": s.step,
        "md": {**phase_space_dict(s), "member_forces": _copy(s.member_forces),
               "member_stress": _copy(s.member_stress), "temperature_K": s.md.temperature_K},
        "calculator": run.calculator.state_dict(), "committee": run.committee.state_dict(),
        "trajectory_bytes": run.written_bytes, "failures": run.failures,
        "elapsed_s": run.elapsed_before + (time.monotonic() - run.loop_started if run.loop_started else 0.0),
    }
    save_checkpoint(run.paths.checkpoint, payload)


def _restore(run: OTFRun, checkpoint: dict[str, Any]) -> None:
    from aimspax_like.sampling.state import load_phase_space

    if checkpoint.get("format") != OTF_FORMAT:
        raise RunDirectoryError(f"{run.paths.checkpoint}: written by another version (format "
                                f"{checkpoint.get('format')}); start a new run directory")
    s, saved = run.state, checkpoint["md"]
    load_phase_space(s, saved)
    s.md = s.md.model_copy(update={"temperature_K": saved["temperature_K"]})
    s.member_forces, s.member_stress = saved["member_forces"], saved["member_stress"]
    run.committee.load_state_dict(checkpoint["committee"])
    run.calculator.load_state_dict(checkpoint["calculator"])
    run.failures = int(checkpoint["failures"])
    run.elapsed_before = float(checkpoint.get("elapsed_s", 0.0))
    run.written_bytes = int(checkpoint["trajectory_bytes"])
    # Frames written after the checkpoint are written again by the replay.
    if run.paths.trajectory.exists():
        with run.paths.trajectory.open("r+b") as handle:
            handle.truncate(run.written_bytes)


def _copy(array: np.ndarray | None) -> np.ndarray | None:
    return None if array is None else np.array(array, copy=True)


# --------------------------------------------------------------------------- the MD loop


def _loop(run: OTFRun, should_stop: Callable[[], int], progress: Callable[[dict[str, Any]], None] | None) -> None:
    from aimspax_like.sampling.ase_md import calculator_forces, calculator_stresses
    from aimspax_like.sampling.dynamics import ensure_forces, step_batch

    config, s, calc = run.config, run.state, run.calculator
    steps, opts = config.otf.steps, config.otf
    stress_fn = calculator_stresses if s.needs_stress else None
    snapshot = _snapshot(run)
    started = run.loop_started = time.monotonic()
    start_step = s.step
    while True:
        if s.member_forces is None:  # a fresh start, or rewound before any forces were known
            calc.n_calls = s.step  # the call at a step has that step's number
            if not _guarded(run, lambda: ensure_forces([s], calculator_forces, stress_fn, None), snapshot):
                continue
            if s.step == 0 and run.written_bytes == 0:
                _write_frame(run)
                _checkpoint(run)
            snapshot = _snapshot(run)
        if s.step >= steps:
            break
        signum = should_stop()
        if signum:
            _checkpoint(run)
            run.events.emit("otf_interrupted", step=s.step, signal=signum)
            raise CampaignInterrupted(signum)
        target = opts.temperature_at(s.step + 1)
        if target != s.md.temperature_K:
            s.md = s.md.model_copy(update={"temperature_K": target})
        labels_before = calc.n_labels
        calc.n_calls = s.step + 1
        if not _guarded(run, lambda: step_batch([s], calculator_forces, stress_fn, None), snapshot):
            continue
        if s.step % opts.write_every == 0 or calc.n_labels != labels_before:
            _write_frame(run)
        if calc.n_labels != labels_before or s.step % opts.checkpoint_every == 0:
            _checkpoint(run)
            snapshot = _snapshot(run)
        if progress is not None:
            rate = (s.step - start_step) / max(time.monotonic() - started, 1e-9)
            progress({"step": s.step, "steps": steps, "labels": calc.n_labels, "rate": rate,
                      "temperature_K": s.temperature(), "target_K": s.md.temperature_K,
                      "uncertainty": calc.results.get(f"uncertainty_{calc.measure}"), "threshold": calc.threshold})


def _snapshot(run: OTFRun) -> dict[str, Any]:
    """Where a failed step rewinds to: the geometry and the forces the calculator gave there
    (kept, so the rewind asks neither the committee nor the reference about it again), and the
    trajectory file's length (frames written after it are written again by the replay)."""
    state = run.state
    return {"step": state.step, "atoms": atoms_to_arrays(state.atoms), "member_forces": _copy(state.member_forces),
            "member_stress": _copy(state.member_stress), "written_bytes": run.written_bytes}


def _guarded(run: OTFRun, advance: Callable[[], None], snapshot: dict[str, Any]) -> bool:
    """Run one MD step; a failed label or non-finite state rewinds to ``snapshot`` with fresh velocities.

    Returns False when the step was rewound. ``otf.max_failures`` rewinds in a row stop the run
    (``LabelsKeepFailing``, exit 3) with the last checkpoint intact.
    """
    from aimspax_like.sampling.dynamics import maxwell_boltzmann

    s = run.state
    try:
        advance()
        if not np.isfinite(s.atoms.positions).all() or not np.isfinite(s.member_forces).all():
            raise FloatingPointError("non-finite positions or forces")
        run.failures = 0
        return True
    except (ReferenceLabelError, FloatingPointError) as exc:
        run.failures += 1
        run.events.emit("otf_rewind", step=s.step, to_step=snapshot["step"], reason=str(exc)[:300],
                        failures=run.failures)
        if run.failures >= run.config.otf.max_failures:
            raise LabelsKeepFailing(run.failures, "otf", str(exc)[:200]) from None
        saved = atoms_from_arrays(snapshot["atoms"])
        s.atoms.set_cell(saved.cell)
        s.atoms.set_positions(saved.positions)
        s.atoms.set_momenta(maxwell_boltzmann(s.atoms, s.md.temperature_K, s.rng))
        s.step = snapshot["step"]
        s.member_forces, s.member_stress = _copy(snapshot["member_forces"]), _copy(snapshot["member_stress"])
        run.written_bytes = snapshot["written_bytes"]
        run.calculator.reset()
        return False


def _write_frame(run: OTFRun) -> None:
    """Append the current frame with what the calculator answered (energy, forces, uncertainty)."""
    s, calc = run.state, run.calculator
    frame = Atoms(s.atoms.numbers, s.atoms.positions.copy(), cell=s.atoms.cell.copy(), pbc=s.atoms.pbc.copy(),
                  momenta=s.atoms.get_momenta())
    results = calc.results
    frame.info.update(
        step=int(s.step), otf_energy=float(results.get("energy", float("nan"))), labelled=bool(results.get("labelled")),
        uncertainty_energy=float(results.get("uncertainty_energy", float("nan"))),
        uncertainty_forces=float(results.get("uncertainty_forces", float("nan"))),
        threshold=_finite_or_none(results.get("threshold")), temperature_K=float(s.temperature()),
        target_K=float(s.md.temperature_K))
    frame.arrays["otf_forces"] = np.asarray(s.member_forces.mean(axis=0), dtype=float)
    path = run.paths.trajectory
    text = io.StringIO()
    write(text, frame, format="extxyz")
    with path.open("ab") as handle:
        handle.truncate(run.written_bytes)  # a frame half written when a write failed is dropped
        handle.write(text.getvalue().encode())
        handle.flush()
        run.written_bytes = handle.tell()


def _finite_or_none(value: Any) -> float | None:
    return float(value) if value is not None and np.isfinite(value) else None


# --------------------------------------------------------------------------- progress


class ProgressLine:
    """One line on stderr: redrawn in place on a terminal, every ``every_s`` seconds otherwise."""

    def __init__(self, stream: Any = None, every_s: float = 10.0) -> None:
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.every_s = 0.5 if self.tty else every_s
        self.last = 0.0
        self.latest: dict[str, Any] | None = None

    def __call__(self, info: dict[str, Any]) -> None:
        self.latest = info
        now = time.monotonic()
        if now - self.last >= self.every_s or info["step"] >= info["steps"]:
            self.last = now
            self._draw(info)

    def _draw(self, info: dict[str, Any]) -> None:
        left = (info["steps"] - info["step"]) / info["rate"] if info["rate"] > 0 else float("inf")
        eta = f"{left / 60:.0f} min" if np.isfinite(left) and left >= 60 else (
            f"{left:.0f} s" if np.isfinite(left) else "?")
        u, thr = info.get("uncertainty"), info.get("threshold")
        trig = f"u {u:.3g}/{thr:.3g}" if u is not None and thr is not None and np.isfinite(thr) else "u warm-up"
        text = (f"otf step {info['step']}/{info['steps']} ({100 * info['step'] / info['steps']:.0f}%) | "
                f"labels {info['labels']} | {trig} | T {info['temperature_K']:.0f} K "
                f"(target {info['target_K']:.0f}) | {info['rate']:.1f} steps/s | ETA {eta}")
        if self.tty:
            self.stream.write("\r" + text + "\x1b[K")
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.tty and self.latest is not None:
            self._draw(self.latest)
            self.stream.write("\n")
            self.stream.flush()


def summary_lines(summary: dict[str, Any]) -> str:
    """The few lines ``aimspax-like otf`` prints at the end."""
    return json.dumps(summary, indent=2)
