"""One campaign = one run directory, and the phases idg -> al -> converge (-> test set).

Nothing numeric lives here: this module checks the inputs, lays out the run directory, starts
the label executor once, hands a ``RunContext`` to each phase and records which phases have
finished (``state/phases.json``). Every input is checked before the folder is created, so bad
input leaves nothing on disk. An existing folder is an error unless ``overwrite`` is given.

``resume`` continues a run directory instead: finished phases (and a finished test set) are not
repeated, the AL phase continues from ``state/al_checkpoint.pt``, an interrupted IDG restarts from
its stored frames (see ``idg``), an interrupted convergence is trained again from the models the
AL phase saved, and an interrupted test set samples again (frames already stored are not stored
twice; only the MD is replayed). The config must match the one in the run directory,
except for the keys in ``state.SAFE_TO_CHANGE``. Phase results are kept in ``state/results.json``
so the summary of a resumed campaign covers every phase.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from ase import Atoms

from aimspax_like.config import CampaignConfig
from aimspax_like.context import RunContext, RunPaths
from aimspax_like.data import DatasetStore, LabelledFrame, export_extxyz, reference_fingerprint
from aimspax_like.errors import CampaignInterrupted, ConfigError, RunDirectoryError, SetupError
from aimspax_like.events import EventLog
from aimspax_like.run_lock import LOCK_NAME, RunLock
from aimspax_like.state import AL_CHECKPOINT, load_checkpoint, unsafe_changes, write_atomic
from aimspax_like.structures import read_structures

PHASES = ("idg", "al", "converge")
CONFIG_RECORD = "config_record.yaml"


def check_inputs(config: CampaignConfig) -> list[Atoms]:
    """Everything that can be checked before a folder exists; returns the start structures."""
    from aimspax_like.reference.calculators import check_reference_setup

    structures = read_structures(config.system.structures, config.system.index)
    numbers = {int(z) for atoms in structures for z in atoms.numbers}
    check_reference_setup(config.reference.model_dump(mode="json"), numbers, structures)
    if config.idg.enabled and config.idg.sampler == "foundation":
        model = config.idg.foundation_model or ""
        if not model.startswith(("mace-mp", "chgnet")) and not Path(model).is_file():
            raise ConfigError("idg.foundation_model", f"model file not found: {model}")
    from aimspax_like.testset import check_test_set

    check_test_set(config)
    if not config.idg.enabled and not config.al.enabled and config.converge.enabled and not config.import_data:
        raise ConfigError("converge.enabled", "nothing to train on: idg and al are both disabled and no "
                          "import_data is given")
    if config.reference.compute_stress and not all(a.pbc.all() for a in structures):
        raise ConfigError("reference.compute_stress", "stress needs periodic cells in every structure")
    npt = _check_npt(config, structures)
    if config.reference.kind == "pyscf":
        check_spin(config.reference.charge, config.reference.spin, structures)
    from aimspax_like.execution.providers import check_scheduler_commands

    check_scheduler_commands(config.cluster)
    if config.model.device == "cuda":
        check_cuda()
    if npt and not config.reference.compute_stress:
        # The barostat follows the committee's virial: it must be trained on reference stresses.
        config.reference.compute_stress = True
        print(f"note: reference.compute_stress switched on: {npt} runs NPT, whose barostat needs the "
              "committee trained on stresses", file=sys.stderr)
    return structures


def check_start(config: CampaignConfig, structures: list[Atoms]) -> list[LabelledFrame]:
    """The imported frames (``import_data``), read and checked, and the start models checked.

    Before anything is written: an unreadable file, a missing label key, a start model that
    does not know an element, and training data of two references (the provenance guard) are
    refused here in one line.
    """
    from aimspax_like.data.imports import read_imports
    from aimspax_like.data.provenance import check_one_reference

    campaign_reference = reference_fingerprint(config.reference)
    imported = read_imports(config, campaign_reference)
    check_one_reference([f for f in imported if f.split in ("train", "valid")],
                        allow_mixed=config.training.allow_mixed_references, campaign_reference=campaign_reference)
    if config.model.start_from:
        from aimspax_like.start import load_start_members

        numbers = sorted({int(z) for a in [*structures, *imported] for z in a.numbers})
        load_start_members(config, numbers)
    return imported


def _check_npt(config: CampaignConfig, structures: list[Atoms]) -> str | None:
    """A barostat needs a periodic cell in every direction, and stresses from what drives the MD.

    Returns the first config block that runs NPT (None: no NPT anywhere).
    """
    idg, test = [("idg.md", config.idg.md)], [("test_set.md", config.test_set.md)]
    al = [(f"al.md[{k}]" if isinstance(config.al.md, list) else "al.md", config.al.md_for(k))
          for k in range(config.al.num_trajectories)]
    for key, md in idg + test + al:
        if md.ensemble.startswith("npt") and not all(a.pbc.all() for a in structures):
            raise ConfigError(f"{key}.ensemble", f"{md.ensemble} needs periodic cells in every start structure")
    used = ((idg if config.idg.enabled else []) + (al if config.al.enabled else [])
            + (test if config.test_set.size else []))
    return next((key for key, md in used if md.ensemble.startswith("npt")), None)


def check_spin(charge: int, spin: int, structures: list[Atoms]) -> None:
    """PySCF's ``spin`` (2S) must fit each structure's electron count (parity, and at most all of them)."""
    for index, atoms in enumerate(structures):
        electrons = int(atoms.numbers.sum()) - charge
        if electrons < 0 or spin > electrons or (electrons - spin) % 2:
            raise ConfigError("reference.spin", f"spin (2S) {spin} does not fit the {electrons} electrons of "
                              f"start structure {index} (charge {charge}): 2S must have the parity of the "
                              "electron count")


def check_cuda() -> None:
    """``model.device: cuda`` on a machine where torch sees no GPU fails here, not mid-campaign."""
    import torch

    if not torch.cuda.is_available():
        build = f"torch {torch.__version__}" + ("" if torch.version.cuda else ", a build without CUDA")
        raise ConfigError("model.device", f"cuda asked for but torch sees no GPU ({build}); use auto or cpu")


def _read_json(file: Path, default: dict[str, Any]) -> dict[str, Any]:
    """A state file of the run directory; a damaged one is a one-line RunDirectoryError."""
    if not file.exists():
        return default
    try:
        data = json.loads(file.read_text())
    except (OSError, ValueError) as exc:
        raise RunDirectoryError(f"{file}: damaged ({type(exc).__name__}); restore it from a backup") from None
    if not isinstance(data, dict):
        raise RunDirectoryError(f"{file}: damaged (not a JSON object); restore it from a backup")
    return data


def _read_state(paths: RunPaths) -> dict[str, Any]:
    state = _read_json(paths.state / "phases.json", {"done": []})
    if not isinstance(state.get("done"), list):
        raise RunDirectoryError(f"{paths.state / 'phases.json'}: damaged (no list of finished phases)")
    return state


def _read_phases(paths: RunPaths) -> list[str]:
    return _read_state(paths)["done"]


def _mark_phase(paths: RunPaths, phase: str) -> None:
    state = _read_state(paths)
    if phase == "test":  # not a phase of its own (kept out of "done", which the phases own)
        state["test_set_done"] = True
    else:
        state["done"] = [*state["done"], phase]
    state["updated"] = time.time()
    write_atomic(paths.state / "phases.json", json.dumps(state).encode())


def _save_results(paths: RunPaths, results: dict[str, Any]) -> None:
    write_atomic(paths.state / "results.json", json.dumps(results, default=str).encode())


def _load_results(paths: RunPaths) -> dict[str, Any]:
    return _read_json(paths.state / "results.json", {})


def _record_config(paths: RunPaths, config: CampaignConfig) -> None:
    """Write ``campaign.yaml`` for the user and the record a resume is checked against.

    The record (``state/config_record.yaml``) is the engine's own copy: editing the run
    directory's ``campaign.yaml`` and then ``resume RUN`` must not slip a change past the check.
    """
    text = config.resolved_yaml()
    write_atomic(paths.state / CONFIG_RECORD, text.encode())
    write_atomic(paths.config, text.encode())


def driver_job() -> dict[str, Any]:
    """The batch job this driver runs in, and how often it was restarted, when it runs in one.

    The driver's job script passes them as ``AIMSPAX_DRIVER_JOB`` / ``AIMSPAX_DRIVER_RESTART``: it
    clears the scheduler's own variables before the driver starts (label blocks submitted from
    the driver would inherit them).
    """
    job = os.environ.get("AIMSPAX_DRIVER_JOB")
    if not job:
        return {}
    restart = os.environ.get("AIMSPAX_DRIVER_RESTART", "")
    return {"driver_job": job, "driver_restart": int(restart) if restart.isdigit() else 0}


def _record_site(paths: RunPaths, record: dict[str, Any]) -> None:
    """``site.yaml``: the profile this driver run was read with and every value it filled in."""
    import yaml

    text = "# The site profile of the latest driver run: its file and the values it set.\n"
    text += yaml.safe_dump(record, sort_keys=False)
    write_atomic(paths.root / "site.yaml", text.encode())


def check_config_unchanged(paths: RunPaths, config: CampaignConfig) -> None:
    """Refuse to continue ``paths`` with a config that differs from the one it was run with,
    except in ``state.SAFE_TO_CHANGE`` keys (one line naming the first key). The engine's own
    record is compared, not the user-editable ``campaign.yaml`` (see ``_record_config``)."""
    record = paths.state / CONFIG_RECORD
    recorded = record.read_text() if record.is_file() else paths.config.read_text()
    changed = unsafe_changes(recorded, config.resolved_yaml())
    if changed:
        raise ConfigError(changed[0], f"differs from the config {paths.root} was run with; change it back "
                          f"or start a new run directory ({len(changed)} key(s) differ)")


def _resumable(config: CampaignConfig) -> RunPaths | None:
    """The run directory to continue, or None when there is nothing to continue (start fresh)."""
    paths = RunPaths(Path(config.output.directory))
    if not paths.config.is_file():
        return None
    check_config_unchanged(paths, config)
    if (paths.state / AL_CHECKPOINT).exists():  # refuse a damaged one before any worker starts
        load_checkpoint(paths.state / AL_CHECKPOINT)
    if not paths.dataset.is_file():  # the store is made before campaign.yaml: it was deleted
        raise RunDirectoryError(f"{paths.dataset}: missing from a started run directory; its labels are gone "
                                "(restore the file, or start a new run directory)")
    _read_state(paths)  # refuse damaged state files before writing anything
    _load_results(paths)
    _record_config(paths, config)  # the safe changes now apply
    return paths


def _finished(paths: RunPaths, config: CampaignConfig) -> bool:
    state = _read_state(paths)
    if "converge" not in state["done"]:
        return False
    return bool(state.get("test_set_done")) or config.test_set.size == 0 or (paths.report / "summary.json").exists()


def _prepare_directory(config: CampaignConfig, phases: Sequence[str], overwrite: bool) -> RunPaths:
    paths = RunPaths(Path(config.output.directory))
    starts_fresh = phases[0] == "idg"
    if starts_fresh:
        content = [p for p in paths.root.iterdir() if p.name != LOCK_NAME] if paths.root.exists() else []
        if content:
            if not overwrite:
                raise RunDirectoryError(
                    f"{paths.root}: run directory exists; pass --overwrite to start over"
                )
            for item in content:  # everything but the lock this driver holds
                shutil.rmtree(item) if item.is_dir() and not item.is_symlink() else item.unlink()
        for folder in paths.folders:
            folder.mkdir(parents=True, exist_ok=True)
        DatasetStore.create(paths.dataset)
        _record_config(paths, config)  # written last: a campaign.yaml means the layout is complete
        return paths
    done = _read_phases(paths) if paths.root.exists() else []
    required = PHASES[: PHASES.index(phases[0])]
    missing = [p for p in required if p not in done]
    if missing:
        raise RunDirectoryError(f"{paths.root}: phase '{phases[0]}' needs finished {', '.join(missing)} first")
    if phases[0] in done and not overwrite:
        raise RunDirectoryError(f"{paths.root}: phase '{phases[0]}' already finished; pass --overwrite to redo")
    return paths


def run_campaign(
    config: CampaignConfig,
    phases: Sequence[str] = PHASES,
    overwrite: bool = False,
    on_progress: Callable[[dict[str, Any]], None] | None = None,
    executor: Any = None,
    resume: bool = False,
    should_stop: Callable[[], int] | None = None,
    on_event: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Run the given consecutive phases; returns the summary (also written to report/).

    ``executor`` lends an already started label executor (a test session shares one); by
    default the campaign starts its own from ``cluster`` and stops it at the end. With
    ``resume`` an existing run directory is continued (a missing one is started); a finished
    one returns ``{"already_finished": True, ...}`` at once. ``should_stop`` returns a signal
    number once the campaign should save and stop (``CampaignInterrupted`` is raised).
    The run directory's lock (``run_lock``) is held from before anything is written until the end.
    ``on_event`` is called with every event record as it is logged (an ``EventLog`` listener:
    the live status display); ``on_progress`` gets the phases' progress dicts.
    """
    structures = check_inputs(config)
    imported = check_start(config, structures)
    root = Path(config.output.directory)
    created = _make_root(root)
    lock = RunLock(root)
    try:
        lock.acquire()
        return _run_locked(config, structures, phases, overwrite, on_progress, executor, resume, should_stop,
                           on_event, imported)
    finally:
        lock.release()
        if created and root.is_dir() and not any(root.iterdir()):
            root.rmdir()  # refused before anything was written: leave nothing behind


def _only_layout(root: Path) -> bool:
    """Whether the folder holds nothing but (part of) a campaign layout."""
    paths = RunPaths(root)
    names = {p.name for p in (*paths.folders, paths.config)} | {LOCK_NAME}
    return not root.exists() or all(p.name in names for p in root.iterdir())


def _make_root(root: Path) -> bool:
    """Create the run directory (for its lock); True if it was created here. One-line errors."""
    if root.exists() and not root.is_dir():
        raise ConfigError("output.directory", f"{root} exists and is not a directory")
    if root.is_dir():
        return False
    try:
        root.mkdir(parents=True)
    except OSError as exc:
        raise ConfigError("output.directory", f"cannot create {root} ({exc.strerror or exc})") from None
    return True


def _run_locked(
    config: CampaignConfig,
    structures: list[Atoms],
    phases: Sequence[str],
    overwrite: bool,
    on_progress: Callable[[dict[str, Any]], None] | None,
    executor: Any,
    resume: bool,
    should_stop: Callable[[], int] | None,
    on_event: Callable[[dict[str, Any]], None] | None = None,
    imported: list[LabelledFrame] | None = None,
) -> dict[str, Any]:
    from aimspax_like.analysis.summary import build_summary, write_summary
    from aimspax_like.execution import make_label_executor

    paths = _resumable(config) if resume else None
    results: dict[str, Any] = {}
    if paths is None:
        # A layout without campaign.yaml holds no label (the store is made before the config):
        # a resume of it starts it over. Anything else in the folder is not ours to delete.
        layout_only = resume and _only_layout(Path(config.output.directory))
        paths = _prepare_directory(config, phases, overwrite or layout_only)
        (paths.state / AL_CHECKPOINT).unlink(missing_ok=True)  # an overwritten AL starts afresh
    else:
        if _finished(paths, config):
            return {"already_finished": True, "directory": str(paths.root)}
        results = _load_results(paths)
        phases = [p for p in phases if p not in _read_phases(paths)]
    store = DatasetStore.open(paths.dataset)
    events = EventLog(paths.events, listeners=[on_event] if on_event is not None else [])
    owned = executor is None
    if owned:
        executor = make_label_executor(config.cluster, paths.root, on_event=lambda name, f: events.emit(name, **f))
    ctx = RunContext(config, paths, store, events, executor, structures, on_progress=on_progress,
                     should_stop=should_stop or (lambda: 0))
    events.emit("campaign_start", phases=list(phases), directory=str(paths.root), resume=resume, **driver_job())
    if config.site_record is not None:
        _record_site(paths, config.site_record)
        events.emit("site_profile", **config.site_record)
    try:
        if imported:
            from aimspax_like.start import store_imports

            store_imports(ctx, imported)
        with executor if owned else nullcontext():
            if config.system.relax:
                from aimspax_like.structures import relaxed_start_structures

                ctx.structures = relaxed_start_structures(ctx)
            committee = None
            for phase in phases:
                if ctx.should_stop():
                    raise CampaignInterrupted(int(ctx.should_stop()))
                with ctx.clock.in_phase(phase):  # the CPU profile's rows (WallClock)
                    committee = _run_phase(ctx, phase, committee, results)
                _mark_phase(paths, phase)
                _save_results(paths, results)
            state = _read_state(paths)
            if "converge" in phases or (resume and "converge" in state["done"] and not state.get("test_set_done")):
                from aimspax_like.converge import run_test_set

                if committee is None:
                    from aimspax_like.committee import Committee

                    committee = Committee.from_files(config, paths.member_models(), store.frames())
                with ctx.clock.in_phase("test"):
                    results["test"] = run_test_set(ctx, committee, results["converge"]["best_member"])
                _mark_phase(paths, "test")
                _save_results(paths, results)
            if committee is not None and committee.valid:
                final = [committee.trainer.evaluate(k, committee.valid) for k in range(committee.n_members)]
                results["final_valid"] = [errors["force_mae"] for errors in final]
                if any(errors["stress_mae"] == errors["stress_mae"] for errors in final):  # not all NaN
                    results["final_valid_stress"] = [errors["stress_mae"] for errors in final]
            if committee is not None:
                results["systems"] = _systems(ctx, committee, results)
        summary = build_summary(ctx, results)
        write_summary(paths.report, summary)
        _write_report(ctx)
        return summary
    except CampaignInterrupted as exc:
        # Whichever loop noticed the signal (a phase, a label wait, convergence training), the
        # log says the campaign stopped for it and where: the status reads it from here.
        done = _read_state(paths)["done"]
        phase = next((p for p in phases if p not in done), "test")
        events.emit("campaign_interrupted", signal=exc.signum, phase=phase)
        raise
    finally:
        # Whatever stopped the campaign is what the user must see: a failed export (the store
        # deleted, the disk full) is logged, never raised over it, and the log is always closed.
        try:
            if config.output.export_xyz:
                _export(ctx)
        except (SetupError, OSError) as exc:
            ctx.events.emit("export_failed", error=str(exc)[:300])
        try:
            events.emit("campaign_end", wall_s=ctx.clock.elapsed, seconds=dict(ctx.clock.seconds),
                        profile=ctx.clock.profile())
        finally:
            events.close()


def _systems(ctx: RunContext, committee: Any, results: dict[str, Any]) -> list[dict[str, Any]]:
    """Labels and the final model's valid and test errors per chemical system (``analysis.systems``)."""
    from aimspax_like.analysis.systems import system_table
    from aimspax_like.events import read_events

    member = results.get("converge", {}).get("best_member", committee.best_member())
    return system_table(ctx.structures, ctx.store.frames(), read_events(ctx.paths.events),
                        evaluate=lambda atoms: committee.trainer.evaluate(member, atoms))


def _write_report(ctx: RunContext) -> None:
    """The figures and ``report/index.html`` of a finished campaign (about a second or two).

    A convenience on top of results that are already saved: whatever goes wrong while plotting
    is logged as ``report_failed`` and printed as one line, never raised over a finished campaign
    (``aimspax-like report RUN`` writes it again later).
    """
    import sys

    try:
        from aimspax_like.analysis.report import write_report

        write_report(ctx.paths.root)
    except Exception as exc:  # any plotting or file error: the campaign itself succeeded
        message = f"{type(exc).__name__}: {exc}"[:300]
        ctx.events.emit("report_failed", error=message)
        print(f"warning: report not written ({message}); retry with: aimspax-like report {ctx.paths.root}",
              file=sys.stderr)


def _enabled(config: CampaignConfig, phase: str) -> bool:
    return bool(getattr(config, phase).enabled)


def _skip_phase(ctx: RunContext, phase: str, committee: Any, results: dict[str, Any]) -> Any:
    """A phase switched off in the config: recorded as skipped, and what follows still works.

    Without IDG the members start untrained (E0s zero) and active learning labels from scratch;
    without convergence the test set measures the best member as AL left it.
    """
    from aimspax_like.committee import Committee

    ctx.events.emit("phase_skipped", phase=phase, key=f"{phase}.enabled")
    if phase == "idg" and (ctx.config.import_data or ctx.config.model.start_from):
        from aimspax_like.idg import train_on_imports

        return train_on_imports(ctx)
    if phase == "idg":
        numbers = sorted({int(z) for a in ctx.structures for z in a.numbers})
        committee = Committee.from_data(ctx.config, ctx.store.frames(), numbers)
        with ctx.clock.measure("io"):
            committee.save(ctx.paths.models)
        return committee
    if committee is None:
        committee = Committee.from_files(ctx.config, ctx.paths.member_models(), ctx.store.frames())
    results[phase] = {"skipped": True}
    if phase == "converge":
        results[phase]["best_member"] = committee.best_member()
    return committee


def _run_phase(ctx: RunContext, phase: str, committee: Any, results: dict[str, Any]) -> Any:
    from aimspax_like.committee import Committee

    if not _enabled(ctx.config, phase):
        return _skip_phase(ctx, phase, committee, results)
    if committee is None and phase != "idg":
        committee = Committee.from_files(ctx.config, ctx.paths.member_models(), ctx.store.frames())
    if phase == "idg":
        from aimspax_like.idg import run_idg

        return run_idg(ctx)
    if phase == "al":
        from aimspax_like.al import run_al

        results["al"] = run_al(ctx, committee)
        return committee
    from aimspax_like.converge import run_converge

    results["converge"] = run_converge(ctx, committee)
    return committee


def _export(ctx: RunContext) -> None:
    for split in ("train", "valid", "test", "analysis"):
        frames = ctx.store.frames(split=split)
        if frames:
            export_extxyz(frames, ctx.paths.data / f"{split}.xyz")
