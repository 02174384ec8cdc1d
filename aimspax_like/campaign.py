"""One campaign = one run directory, and the phases idg -> al -> converge (-> test set).

Nothing numeric lives here: this module checks the inputs, lays out the run directory, starts
the label executor once, hands a ``RunContext`` to each phase and records which phases have
finished (``state/phases.json``). Every input is checked before the folder is created, so bad
input leaves nothing on disk. An existing folder is an error unless ``overwrite`` is given.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from ase import Atoms

from aimspax_like.config import CampaignConfig
from aimspax_like.context import RunContext, RunPaths
from aimspax_like.data import DatasetStore, export_extxyz
from aimspax_like.errors import ConfigError, RunDirectoryError
from aimspax_like.events import EventLog
from aimspax_like.structures import read_structures

PHASES = ("idg", "al", "converge")


def check_inputs(config: CampaignConfig) -> list[Atoms]:
    """Everything that can be checked before a folder exists; returns the start structures."""
    from aimspax_like.reference.calculators import check_reference_setup

    structures = read_structures(config.system.structures, config.system.index)
    numbers = {int(z) for atoms in structures for z in atoms.numbers}
    check_reference_setup(config.reference.model_dump(mode="json"), numbers)
    if config.idg.enabled and config.idg.sampler == "foundation":
        model = config.idg.foundation_model or ""
        if not model.startswith(("mace-mp", "chgnet")) and not Path(model).is_file():
            raise ConfigError("idg.foundation_model", f"model file not found: {model}")
    if config.reference.compute_stress and not all(a.pbc.all() for a in structures):
        raise ConfigError("reference.compute_stress", "stress needs periodic cells in every structure")
    return structures


def _read_phases(paths: RunPaths) -> list[str]:
    file = paths.state / "phases.json"
    return json.loads(file.read_text())["done"] if file.exists() else []


def _mark_phase(paths: RunPaths, phase: str) -> None:
    done = [*_read_phases(paths), phase]
    tmp = paths.state / "phases.json.tmp"
    tmp.write_text(json.dumps({"done": done, "updated": time.time()}))
    os.replace(tmp, paths.state / "phases.json")


def _prepare_directory(config: CampaignConfig, phases: Sequence[str], overwrite: bool) -> RunPaths:
    paths = RunPaths(Path(config.output.directory))
    starts_fresh = phases[0] == "idg"
    if starts_fresh:
        if paths.root.exists() and any(paths.root.iterdir()):
            if not overwrite:
                raise RunDirectoryError(
                    f"{paths.root}: run directory exists; pass --overwrite to start over"
                )
            shutil.rmtree(paths.root)
        for folder in (paths.state, paths.data, paths.models, paths.logs, paths.labels):
            folder.mkdir(parents=True, exist_ok=True)
        paths.config.write_text(config.resolved_yaml())
        DatasetStore.create(paths.dataset)
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
) -> dict[str, Any]:
    """Run the given consecutive phases; returns the summary (also written to report/).

    ``executor`` lends an already started label executor (a test session shares one); by
    default the campaign starts its own from ``cluster`` and stops it at the end.
    """
    from aimspax_like.analysis.summary import build_summary, write_summary
    from aimspax_like.execution import make_label_executor

    structures = check_inputs(config)
    paths = _prepare_directory(config, phases, overwrite)
    events = EventLog(paths.events)
    store = DatasetStore.open(paths.dataset)
    owned = executor is None
    if owned:
        executor = make_label_executor(config.cluster, paths.root, on_event=lambda name, f: events.emit(name, **f))
    ctx = RunContext(config, paths, store, events, executor, structures, on_progress=on_progress)
    events.emit("campaign_start", phases=list(phases), directory=str(paths.root))
    results: dict[str, Any] = {}
    try:
        with executor if owned else nullcontext():
            committee = None
            for phase in phases:
                committee = _run_phase(ctx, phase, committee, results)
                _mark_phase(paths, phase)
            if "converge" in phases and committee is not None:
                from aimspax_like.converge import run_test_set

                results["test"] = run_test_set(ctx, committee, results["converge"]["best_member"])
            if committee is not None and committee.valid:
                results["final_valid"] = [
                    committee.trainer.evaluate(k, committee.valid)["force_mae"] for k in range(committee.n_members)
                ]
        summary = build_summary(ctx, results)
        write_summary(paths.report, summary)
        return summary
    finally:
        if config.output.export_xyz:
            _export(ctx)
        events.emit("campaign_end", wall_s=ctx.clock.elapsed)
        events.close()


def _run_phase(ctx: RunContext, phase: str, committee: Any, results: dict[str, Any]) -> Any:
    from aimspax_like.committee import Committee

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
    for split in ("train", "valid", "test"):
        frames = ctx.store.frames(split=split)
        if frames:
            export_extxyz(frames, ctx.paths.data / f"{split}.xyz")
