"""``aimspax-like recompute RUN --reference OTHER.yaml [--out NEW_RUN]``: relabel a run at another level of theory.

Why. Sampling with a cheap reference and labelling the final dataset with an expensive one is how
production models are made (the aims-PAX peptide study samples with PBE and relabels the final
dataset with PBE0 before training the production model). The geometries a campaign chose are the
product of its sampling; their labels can be bought again at any level of theory.

What. Every stored frame of RUN (or those of ``--splits``) is sent to the reference of
OTHER.yaml through the execution layer (the same ``Labeller`` as every phase: retries per
``al.failures``, the stop rule, ``label_*`` events of phase ``recompute``). Each new label is
stored in NEW_RUN's own ``data/dataset.h5`` as it returns, with the original's split, origin,
trajectory, MD step, member and uncertainty, the new reference fingerprint and
``source = <RUN>/data/dataset.h5#<index>``. NEW_RUN is a run directory: its ``campaign.yaml`` is
RUN's resolved config with ``reference`` (and ``cluster``, ``faults``) replaced, so later tools
(``train``, ``report``) read it like any other.

Resume without paying twice. Run the same command again: frames whose source index is already in
NEW_RUN's store are skipped; frames whose label failed for good are recorded in
``state/recompute.json`` (written atomically after each) and are not tried again unless
``--retry-failed``. A label in flight when a signal stopped the previous run is lost and sent
again (counted as ``resubmitted``, read back from the event log). NEW_RUN's lock keeps a second
driver out; a NEW_RUN made from another RUN or for another reference is refused.

This module reads and checks every input before anything is written (``plan``: bad input is one
line naming the key, flag or file) and summarises; ``aimspax_like.recompute_labels`` runs the labels.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aimspax_like.errors import CampaignInterrupted, ConfigError, RunDirectoryError, SetupError
from aimspax_like.signals import stop_requested

COMMANDS = ("recompute",)
PHASE = "recompute"
STATE_FILE = "recompute.json"
_ALLOWED = ("reference", "cluster", "faults")


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Register ``recompute`` on the front end's subparsers."""
    cmd = sub.add_parser(
        "recompute", help="relabel a run's dataset with another reference (a new run directory)",
        description="Relabels every stored frame of RUN with the reference of OTHER.yaml on the label workers "
                    "and writes NEW_RUN (default: RUN-<kind> beside RUN). Run the same command again to continue "
                    "after an interruption; labels already stored are never computed again.")
    cmd.add_argument("run_dir", type=Path, help="run directory whose frames are relabelled (read only)")
    cmd.add_argument("--reference", type=Path, required=True,
                     help="YAML with a 'reference:' section (optional 'cluster:' and 'faults:')")
    cmd.add_argument("--out", type=Path, help="new run directory (default: RUN-<reference kind> beside RUN)")
    cmd.add_argument("--splits", help="comma-separated splits to relabel (default: all)")
    cmd.add_argument("--retry-failed", action="store_true", help="try frames whose label failed for good again")
    cmd.add_argument("--quiet", action="store_true", help="no progress lines on stderr")


def run(args: argparse.Namespace) -> int:
    """The command: exit 0 done, 2 bad input, 3 labels keep failing, 128 + signum interrupted."""
    from aimspax_like.errors import CampaignStopped
    from aimspax_like.signals import StopFlag

    options = RecomputeOptions(run_dir=args.run_dir, reference=args.reference, out=args.out,
                               splits=parse_splits(args.splits), retry_failed=args.retry_failed,
                               on_progress=None if args.quiet else _stderr_lines())
    again = f"aimspax-like recompute {args.run_dir} --reference {args.reference}"
    again += f" --out {args.out}" if args.out else ""
    again += f" --splits {args.splits}" if args.splits else ""
    stop = StopFlag().install()
    try:
        summary = recompute(options, should_stop=lambda: stop.signum)
    except (CampaignInterrupted, CampaignStopped, OSError) as exc:
        from aimspax_like.cli import stopped_exit

        interrupted = f"stopped by {{signal}}: every finished label is stored; continue with: {again}"
        code = stopped_exit(exc, again, str(args.out or args.run_dir), interrupted=interrupted)
        if code is None:
            raise
        return code
    finally:
        stop.uninstall()
    print(render(summary))
    return 0


def _stderr_lines() -> Callable[[str], None]:
    start = time.perf_counter()
    return lambda message: print(f"[{time.perf_counter() - start:6.1f} s] {message}", file=sys.stderr, flush=True)


def parse_splits(text: str | None) -> tuple[str, ...] | None:
    """``train,valid`` -> ('train', 'valid'); an unknown name is a one-line error naming ``--splits``."""
    from aimspax_like.data.frames import SPLITS

    if text is None:
        return None
    names = tuple(dict.fromkeys(part.strip() for part in text.split(",") if part.strip()))
    unknown = [name for name in names if name not in SPLITS]
    if unknown or not names:
        raise SetupError(f"--splits: {', '.join(unknown) or 'no split'} given; choose from {', '.join(SPLITS)}")
    return names


@dataclass
class RecomputeOptions:
    """The command's arguments; ``on_progress`` gets the live progress lines (None: silent)."""

    run_dir: Path
    reference: Path
    out: Path | None = None
    splits: tuple[str, ...] | None = None
    retry_failed: bool = False
    on_progress: Callable[[str], None] | None = None
    progress_every_s: float = 10.0


# --------------------------------------------------------------------------- inputs


@dataclass
class Plan:
    """Everything checked before a file is written: the new config, the frames, NEW_RUN."""

    run: Path
    dataset: Path  # RUN/data/dataset.h5, resolved: the frames' ``source``
    out: Path
    config: Any  # the new CampaignConfig
    original: Any  # RUN's CampaignConfig
    fingerprint: str
    frames: dict[int, Any]  # source index -> LabelledFrame, of the selected splits
    splits: tuple[str, ...]
    source_counts: dict[str, int]


def read_reference_file(path: Path, original: Any) -> Any:
    """RUN's config with OTHER.yaml's ``reference`` (and ``cluster``, ``faults``) in place.

    Validated by the campaign config's own models, so a reference section means the same here as
    in a campaign YAML; errors name the dotted key and the file. Path settings (FHI-aims'
    ``species_dir``, CP2K's ``data_dir``) resolve against OTHER.yaml's folder. ``faults`` is
    OTHER.yaml's only: the original run's fault injection belonged to the original reference.
    """
    from aimspax_like.config import config_from_dict, read_yaml

    data = read_yaml(path)
    if not isinstance(data, dict):
        raise ConfigError(str(path), "must be a mapping with a 'reference:' section")
    unknown = [str(key) for key in data if key not in _ALLOWED]
    if unknown:
        raise ConfigError(unknown[0], f"unknown key in {path} (allowed: {', '.join(_ALLOWED)})")
    if "reference" not in data:
        raise ConfigError("reference", f"required key is missing in {path}")
    merged = json.loads(original.model_dump_json())
    merged["reference"] = data["reference"]
    merged["faults"] = data.get("faults")
    if "cluster" in data:
        merged["cluster"] = data["cluster"]
    try:
        config = config_from_dict(merged, source=str(path))
    except ConfigError as exc:
        raise ConfigError(exc.key, f"{exc.message} (in {path})") from None
    base = path.resolve().parent
    for name, value in config.reference:
        if isinstance(value, Path) and not value.is_absolute():
            setattr(config.reference, name, base / value)
    return config


def _default_out(run: Path, kind: str) -> Path:
    plain = Path(os.path.normpath(run))
    if plain.name in ("", ".", ".."):
        plain = run.resolve()
    return plain.parent / f"{plain.name}-{kind}"


def plan(options: RecomputeOptions) -> Plan:
    """Read and check every input (RUN, OTHER.yaml, --splits, NEW_RUN); writes nothing."""
    from aimspax_like.config import load_config
    from aimspax_like.data import DatasetStore, reference_fingerprint
    from aimspax_like.data.frames import SPLITS

    run = options.run_dir
    if not (run / "campaign.yaml").is_file():
        raise RunDirectoryError(f"{run}: not a run directory (no campaign.yaml)")
    record = run / "state" / "config_record.yaml"
    original = load_config(record if record.is_file() else run / "campaign.yaml")
    config = read_reference_file(options.reference, original)
    dataset = (run / "data" / "dataset.h5").resolve()
    stored = DatasetStore.open(dataset).frames()  # one-line SetupError when missing or damaged
    splits = options.splits or SPLITS
    frames = {k: frame for k, frame in enumerate(stored) if frame.split in splits}
    if not frames:
        where = "--splits " + ",".join(splits) if options.splits else "its dataset"
        raise RunDirectoryError(f"{run}: no stored frames to relabel ({where})")
    _check_setup(config, list(frames.values()))
    out = options.out or _default_out(run, config.reference.kind)
    config.output.directory = out
    fingerprint = reference_fingerprint(config.reference)
    result = Plan(run=run, dataset=dataset, out=out, config=config, original=original, fingerprint=fingerprint,
                   frames=frames, splits=tuple(splits),
                   source_counts={s: sum(f.split == s for f in frames.values()) for s in splits})
    _check_out(result)
    return result


def _check_setup(config: Any, frames: list[Any]) -> None:
    """The new reference must be able to label these frames (elements, packages, spin, cells)."""

    from ase import Atoms

    from aimspax_like.campaign import check_spin
    from aimspax_like.reference.calculators import check_reference_setup

    kinds: dict[tuple[Any, ...], Atoms] = {}
    for frame in frames:
        key = (tuple(frame.numbers), tuple(frame.pbc))
        kinds.setdefault(key, Atoms(numbers=frame.numbers, positions=frame.positions, cell=frame.cell,
                                    pbc=frame.pbc))
    structures = list(kinds.values())
    numbers = {int(z) for atoms in structures for z in atoms.numbers}
    check_reference_setup(config.reference.model_dump(mode="json"), numbers, structures)
    if config.reference.kind == "pyscf":
        if any(atoms.pbc.any() for atoms in structures):
            raise ConfigError("reference.kind", "pyscf labels molecules only, and the frames are periodic")
        check_spin(config.reference.charge, config.reference.spin, structures)
    periodic = all(atoms.pbc.all() for atoms in structures)
    if config.reference.compute_stress and not periodic:
        raise ConfigError("reference.compute_stress", "stress needs periodic cells in every frame")
    if periodic and not config.reference.compute_stress and any(f.stress is not None for f in frames):
        # The original labels carry stress (an NPT campaign): the relabelled set must too.
        config.reference.compute_stress = True
        print("note: reference.compute_stress switched on: the original labels carry stress", file=sys.stderr)
    from aimspax_like.execution.providers import check_scheduler_commands

    check_scheduler_commands(config.cluster)


def read_state(out: Path) -> dict[str, Any] | None:
    file = out / "state" / STATE_FILE
    if not file.exists():
        return None
    try:
        data = json.loads(file.read_text())
    except (OSError, ValueError) as exc:
        raise RunDirectoryError(f"{file}: damaged ({type(exc).__name__}); restore it or choose another --out") from None
    if not isinstance(data, dict) or not isinstance(data.get("failed"), dict):
        raise RunDirectoryError(f"{file}: damaged (not a recompute state); restore it or choose another --out")
    return data


def _check_out(p: Plan) -> None:
    """NEW_RUN is new, empty, or a recompute of this very RUN with this very reference."""
    from aimspax_like.run_lock import LOCK_NAME

    out = p.out
    if out.exists() and not out.is_dir():
        raise ConfigError("--out", f"{out} exists and is not a directory")
    if (out / "data" / "dataset.h5").exists() and (out / "data" / "dataset.h5").resolve() == p.dataset:
        raise ConfigError("--out", f"{out} is the run being relabelled; choose a new directory")
    state = read_state(out) if out.is_dir() else None
    if state is None:
        if out.is_dir() and any(_has_content(item) for item in out.iterdir() if item.name != LOCK_NAME):
            raise RunDirectoryError(f"{out}: exists and is not a recompute of {p.run}; choose another --out")
        return
    if state.get("source_dataset") != str(p.dataset):
        raise RunDirectoryError(f"{out}: relabels {state.get('source_dataset')}, not {p.dataset}; "
                                "choose another --out")
    if state.get("reference") != p.fingerprint:
        raise RunDirectoryError(f"{out}: labelled with reference {state.get('kind')} {state.get('reference')}, "
                                f"not {p.config.reference.kind} {p.fingerprint}; choose another --out")
    if state.get("store_created") and not (out / "data" / "dataset.h5").is_file():
        raise RunDirectoryError(f"{out / 'data' / 'dataset.h5'}: missing; its labels are gone (restore it, "
                                "or choose another --out)")


def _has_content(path: Path) -> bool:
    return not path.is_dir() or any(_has_content(item) for item in path.iterdir())


# --------------------------------------------------------------------------- the run


def recompute(options: RecomputeOptions, executor: Any = None,
              should_stop: Callable[[], int] = stop_requested) -> dict[str, Any]:
    """Relabel (or continue relabelling); returns the summary, also in ``report/recompute.json``.

    ``executor``: a started label executor to use (a test session shares one); by default one is
    made from the cluster section and stopped at the end. ``should_stop`` returns a signal number
    once the run should stop: finished labels are stored, then ``CampaignInterrupted`` is raised.
    """
    from aimspax_like.run_lock import RunLock

    p = plan(options)
    created = not p.out.exists()
    try:
        p.out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError("--out", f"cannot create {p.out} ({exc.strerror or exc})") from None
    lock = RunLock(p.out)
    try:
        lock.acquire()
        from aimspax_like.recompute_labels import Relabel

        return Relabel(p, options, should_stop).run(executor)
    finally:
        lock.release()
        if created and p.out.is_dir() and not any(p.out.iterdir()):
            p.out.rmdir()


def compare_levels(pairs: list[tuple[Any, Any]]) -> dict[str, Any]:
    """Old vs new labels of the same geometries: how far apart the two levels of theory are.

    Forces: RMSD and MAE over every component (meV/A). Energies per atom: the mean offset (an
    absolute energy scale differs between methods and means nothing for forces), the spread (standard
    deviation) left after removing it, both meV/atom, and the Pearson r.
    """
    import numpy as np

    from aimspax_like.analysis.correlation import pearson_r

    if not pairs:
        return {"frames": 0}
    diff = np.concatenate([(new.forces - old.forces).ravel() for old, new in pairs])
    old_e = np.array([old.energy / len(old) for old, _ in pairs])
    new_e = np.array([new.energy / len(new) for _, new in pairs])
    delta = (new_e - old_e) * 1000.0
    spread = float(np.std(delta - delta.mean())) if len(delta) > 1 else math.nan
    return {
        "frames": len(pairs), "atoms": int(sum(len(old) for old, _ in pairs)),
        "force_rmsd_meV_A": float(np.sqrt(np.mean(diff**2)) * 1000.0),
        "force_mae_meV_A": float(np.mean(np.abs(diff)) * 1000.0),
        "energy_offset_meV_atom": float(delta.mean()),
        "energy_spread_meV_atom": spread,
        "energy_pearson_r": pearson_r(old_e, new_e),
    }


def render(summary: dict[str, Any]) -> str:
    """The printed table of a summary (``report/recompute.json`` holds the same numbers)."""
    ref = summary["reference"]
    lines = [f"recompute   {summary['run']} -> {summary['out']} ({ref['kind']}, reference {ref['fingerprint']})",
             f"{'split':<10} {'before':>7} {'after':>7}"]
    lines += [f"{name:<10} {c['before']:>7} {c['after']:>7}" for name, c in summary["splits"].items()
              if c["before"] or c["after"]]
    dropped = summary["dropped"]
    kinds = ", ".join(f"{kind}: {n}" for kind, n in sorted(dropped["by_kind"].items()))
    lines += [
        f"relabelled  {summary['relabelled']} this run, {summary['relabelled_total']} of {summary['frames']} in all",
        f"skipped     {summary['skipped']} (relabelled by an earlier run)",
        f"dropped     {dropped['total']}" + (f" ({kinds}; {dropped['this_run']} this run)" if dropped["total"] else ""),
        f"resubmitted {summary['resubmitted']} (in flight when an earlier run stopped)",
    ]
    cmp = summary["comparison"]
    if cmp["frames"]:
        r = cmp["energy_pearson_r"]
        lines += [
            f"old vs new  over {cmp['frames']} frames: forces RMSD {cmp['force_rmsd_meV_A']:.1f} meV/A, "
            f"MAE {cmp['force_mae_meV_A']:.1f} meV/A",
            f"            energy/atom offset {cmp['energy_offset_meV_atom']:.1f} meV/atom, spread after removing "
            f"it {_num(cmp['energy_spread_meV_atom'])} meV/atom, Pearson r {_num(r, '.4f')}",
        ]
    lines.append(f"wall time   {summary['wall_s']:.1f} s; report {Path(summary['out']) / 'report' / 'recompute.json'}")
    return "\n".join(lines)


def _num(value: Any, spec: str = ".1f") -> str:
    return "n/a" if value is None or (isinstance(value, float) and not math.isfinite(value)) else format(value, spec)
