"""What an on-the-fly run reports: label counts over the MD, where the time went, and the errors
of the trajectory the committee drove, measured against the reference on frames it answered alone.

The check frames are written trajectory frames that were *not* labelled (on a labelled step the
calculator returned the reference's own numbers, which would flatter the error). The reference
recomputes ``otf.validate_frames`` of them, spread evenly over the run; they are stored with
origin ``test`` (never trained on) so that a second report, or one after a resume, does not
compute them again.

Writes ``report/otf.json`` (everything below), ``report/otf.md`` (the tables) and
``report/otf.png`` (labels, uncertainty against the trigger, temperature over the MD).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from ase import Atoms

from aimspax_like.config import CampaignConfig
from aimspax_like.data import DatasetStore, LabelledFrame, reference_fingerprint
from aimspax_like.events import EventLog
from aimspax_like.otf import OTF_ORIGIN
from aimspax_like.state import load_checkpoint, write_atomic

CHECK_ORIGIN = "test"
CHECK_SOURCE = "otf_check"
LABEL_BIN = 1000  # MD steps per bin of the label counts (FALCON reports labels per 1000 steps)


def read_trajectory(path: Path) -> list[Atoms]:
    from ase.io import read

    if not path.is_file() or path.stat().st_size == 0:
        return []
    return list(read(path, ":", format="extxyz"))


def label_counts(steps: list[int], total_steps: int) -> dict[str, Any]:
    """Labels per ``LABEL_BIN`` MD steps and cumulative counts at 1k, 10k steps and the end."""
    n_bins = max(1, -(-total_steps // LABEL_BIN))
    per_bin = np.bincount(np.minimum(np.asarray(steps, dtype=int) // LABEL_BIN, n_bins - 1),
                          minlength=n_bins) if steps else np.zeros(n_bins, dtype=int)
    at = {str(mark): int(sum(1 for s in steps if s <= mark)) for mark in (1000, 10000) if mark <= total_steps}
    at["total"] = len(steps)
    return {"per_1000_steps": [int(n) for n in per_bin], "cumulative": at}


def check_frames(config: CampaignConfig, frames: list[Atoms], store: DatasetStore, scratch: Path,
                 events: EventLog | None) -> list[tuple[Atoms, LabelledFrame]]:
    """Pairs (trajectory frame, reference label) for up to ``otf.validate_frames`` unlabelled frames."""
    from aimspax_like.reference.label import label
    from aimspax_like.reference.results import LabelResult

    wanted = config.otf.validate_frames
    candidates = [a for a in frames if not a.info.get("labelled") and "otf_forces" in a.arrays]
    if not wanted or not candidates:
        return []
    picks = np.unique(np.linspace(0, len(candidates) - 1, min(wanted, len(candidates))).round().astype(int))
    spec = config.reference.model_dump(mode="json")
    fingerprint = reference_fingerprint(spec)
    stored = {step: row for row, (origin, _, step, _) in enumerate(store.keys()) if origin == CHECK_ORIGIN}
    pairs = []
    for i in picks:
        atoms = candidates[int(i)]
        step = int(atoms.info["step"])
        if step in stored:
            pairs.append((atoms, store.frame(stored[step])))
            continue
        outcome = label(_geometry(atoms), spec, str(scratch / f"check_{step}"))
        if not isinstance(outcome, LabelResult):
            if events is not None:
                events.emit("otf_check_failed", step=step, kind=outcome.kind.value, message=outcome.message)
            continue
        frame = LabelledFrame.from_atoms(
            _geometry(atoms), energy=outcome.energy, forces=outcome.forces, stress=outcome.stress, split="test",
            origin=CHECK_ORIGIN, trajectory=0, md_step=step, reference=fingerprint, label_wall_s=outcome.wall_s,
            source=CHECK_SOURCE)
        store.append(frame)
        pairs.append((atoms, frame))
    return pairs


def _geometry(atoms: Atoms) -> Atoms:
    return Atoms(atoms.numbers, atoms.positions, cell=atoms.cell, pbc=atoms.pbc)


def errors(pairs: list[tuple[Atoms, LabelledFrame]]) -> dict[str, Any]:
    """Energy and force errors of the committee's answers against the reference."""
    if not pairs:
        return {"frames": 0}
    de = np.array([float(a.info["otf_energy"]) - float(f.energy) for a, f in pairs])
    n_atoms = np.array([len(a) for a, _ in pairs], dtype=float)
    df = np.concatenate([np.asarray(a.arrays["otf_forces"]) - np.asarray(f.forces) for a, f in pairs])
    norms = np.linalg.norm(df, axis=1)
    return {
        "frames": len(pairs),
        "energy_rmse_eV": float(np.sqrt(np.mean(de**2))),
        "energy_bias_eV": float(np.mean(de)),
        "energy_rmse_meV_per_atom": float(1000 * np.sqrt(np.mean((de / n_atoms) ** 2))),
        "energy_max_error_eV": float(np.abs(de).max()),
        "force_mae_eV_A": float(np.abs(df).mean()),
        "force_rmse_eV_A": float(np.sqrt(np.mean(df**2))),
        "max_force_error_eV_A": float(norms.max()),
    }


def honesty(events: list[dict[str, Any]]) -> dict[str, Any]:
    """How the committee's uncertainty compared with its true error where the reference labelled
    (its answer before training on the label): a median ratio above 1 means it is overconfident."""
    labels = [e for e in events if e.get("event") == "otf_label" and not e.get("reused") and "error_forces" in e]
    if not labels:
        return {"labels": 0}
    u = np.array([e["uncertainty"] for e in labels], dtype=float)
    err_f = np.array([e["error_forces"] for e in labels], dtype=float)
    # A substructure has no whole-frame energy to compare: its label carries the force error only.
    err_e = np.array([e["error_energy"] for e in labels if "error_energy" in e], dtype=float)
    return {"labels": len(labels), "median_uncertainty": float(np.median(u)),
            "median_error_forces_eV_A": float(np.median(err_f)),
            "median_error_energy_eV": float(np.median(err_e)) if len(err_e) else None}


def make_otf_report(paths: Any, config: CampaignConfig, store: DatasetStore, events: EventLog | None,
                    done: bool) -> dict[str, Any]:
    """Check frames, summary, tables and figure of an on-the-fly run directory (``otf_run.OTFPaths``)."""
    checkpoint = load_checkpoint(paths.checkpoint) if paths.checkpoint.exists() else {}
    calc_state = checkpoint.get("calculator", {})
    steps_done = int(checkpoint.get("step", 0))
    keys = store.keys()
    labelled = sorted({step for origin, _, step, _ in keys if origin == OTF_ORIGIN})  # pieces share a step
    frames = read_trajectory(paths.trajectory)
    pairs = check_frames(config, frames, store, paths.labels, events) if done else []
    timings = dict(calc_state.get("timings", {}))
    from aimspax_like.events import read_events

    at_labels = honesty(read_events(paths.events) if paths.events.is_file() else [])
    summary: dict[str, Any] = {
        "directory": str(paths.root), "finished": done, "steps": steps_done, "steps_asked": config.otf.steps,
        "atoms": len(frames[0]) if frames else None,
        "start_frames": sum(1 for origin, *_ in keys if origin in ("idg", "import")),
        "labels": label_counts(labelled, max(steps_done, 1)),
        "trigger": config.otf.trigger.model_dump(mode="json"),
        "timings": timings, "elapsed_s": float(checkpoint.get("elapsed_s", 0.0)),
        "check": errors(pairs), "at_labels": at_labels,
    }
    paths.report.mkdir(parents=True, exist_ok=True)
    write_atomic(paths.report / "otf.json", json.dumps(summary, indent=2, allow_nan=False).encode())
    write_atomic(paths.report / "otf.md", render_markdown(summary).encode())
    _figure(paths.report / "otf.png", frames, labelled, config, steps_done)
    if events is not None:
        events.emit("otf_report", labels=len(labelled), check=summary["check"])
    return summary


def render_markdown(summary: dict[str, Any]) -> str:
    labels = summary["labels"]
    trig = summary["trigger"]
    unit = {"energy": "eV/atom" if trig["energy_per_atom"] else "eV", "forces": "eV/A"}[trig["measure"]]
    lines = [
        f"# On-the-fly run {summary['directory']}", "",
        f"{summary['steps']} of {summary['steps_asked']} MD steps, {summary['atoms']} atoms, "
        f"{summary['start_frames']} start frames; trigger: {trig['measure']} above {trig['threshold']} {unit}.", "",
        "| labels at step 1000 | at 10000 | total |", "|---|---|---|",
        f"| {labels['cumulative'].get('1000', '-')} | {labels['cumulative'].get('10000', '-')} | "
        f"{labels['cumulative']['total']} |", "",
        "Labels per 1000 MD steps: " + ", ".join(str(n) for n in labels["per_1000_steps"]), "",
    ]
    t = summary["timings"]
    if t:
        lines += ["| time (s) | model | training | reference |", "|---|---|---|---|",
                  f"| wall | {t.get('model_s', 0):.1f} | {t.get('training_s', 0):.1f} | "
                  f"{t.get('reference_s', 0):.1f} |",
                  f"| CPU | {t.get('model_cpu_s', 0):.1f} | {t.get('training_cpu_s', 0):.1f} | "
                  f"{t.get('reference_cpu_s', 0):.1f} |", ""]
    honest = summary["at_labels"]
    if honest.get("labels"):
        energy = honest["median_error_energy_eV"]
        in_energy = "" if energy is None else f"{energy:.3g} eV in energy and "
        lines += [f"At the {honest['labels']} labels the committee's own answer (before training on the label) "
                  f"was off by a median {in_energy}"
                  f"{honest['median_error_forces_eV_A']:.3g} eV/A in the largest atomic force, for a median "
                  f"uncertainty of {honest['median_uncertainty']:.3g} {unit}.", ""]
    check = summary["check"]
    if check.get("frames"):
        lines += [f"Errors of the committee's answers on {check['frames']} unlabelled trajectory frames, "
                  "recomputed with the reference:", "",
                  "| energy RMSE (eV) | (meV/atom) | force MAE (eV/A) | force RMSE (eV/A) | max force error (eV/A) |",
                  "|---|---|---|---|---|",
                  f"| {check['energy_rmse_eV']:.4f} | {check['energy_rmse_meV_per_atom']:.2f} | "
                  f"{check['force_mae_eV_A']:.4f} | {check['force_rmse_eV_A']:.4f} | "
                  f"{check['max_force_error_eV_A']:.3f} |", ""]
    return "\n".join(lines)


def _figure(path: Path, frames: list[Atoms], labelled: list[int], config: CampaignConfig, steps_done: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measure = config.otf.trigger.measure
    fig, axes = plt.subplots(3, 1, figsize=(7, 8), sharex=True)
    steps = np.array([a.info["step"] for a in frames], dtype=float)
    ax = axes[0]
    if labelled:  # held flat from the last label to the last step
        ax.step(np.concatenate([[0], labelled, [max(steps_done, labelled[-1])]]),
                np.concatenate([np.arange(len(labelled) + 1), [len(labelled)]]), where="post", color="C3")
    ax.set_ylabel("labels (cumulative)")
    ax = axes[1]
    if frames:
        u = np.array([a.info.get(f"uncertainty_{measure}", np.nan) for a in frames], dtype=float)
        thr = np.array([np.nan if a.info.get("threshold") is None else a.info["threshold"] for a in frames],
                       dtype=float)
        ax.semilogy(steps, u, lw=0.7, label=f"uncertainty ({measure})")
        ax.semilogy(steps, thr, lw=1.0, color="k", ls="--", label="trigger")
        ax.legend(loc="upper right", fontsize=8)
    ax.set_ylabel("eV/A" if measure == "forces" else "eV")
    ax = axes[2]
    if frames:
        ax.plot(steps, [a.info.get("temperature_K", np.nan) for a in frames], lw=0.7, label="kinetic")
        ax.plot(steps, [a.info.get("target_K", np.nan) for a in frames], lw=1.0, color="k", ls="--", label="target")
        ax.legend(loc="upper right", fontsize=8)
    ax.set_ylabel("T (K)")
    ax.set_xlabel("MD step")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def otf_status(root: Path) -> dict[str, Any]:
    """Where an on-the-fly run directory stands, for ``aimspax-like status`` (read-only)."""
    from aimspax_like.config import load_config
    from aimspax_like.run_lock import driver_state

    root = Path(root)
    config = load_config(root / "campaign.yaml")
    checkpoint_file = root / "state" / "otf_checkpoint.pt"
    checkpoint = load_checkpoint(checkpoint_file) if checkpoint_file.is_file() else {}
    dataset = root / "data" / "dataset.h5"
    keys = DatasetStore.open(dataset).keys() if dataset.is_file() else []
    driver = driver_state(root)
    done = bool(checkpoint.get("done"))
    state = "finished" if done else "running" if driver.get("alive") else "stopped" if checkpoint else "not started"
    return {
        "directory": str(root), "kind": "otf", "state": state, "driver": driver,
        "step_checkpointed": int(checkpoint.get("step", 0)), "steps": config.otf.steps,
        "labels_stored": sum(1 for origin, *_ in keys if origin == OTF_ORIGIN),
        "start_frames": sum(1 for origin, *_ in keys if origin in ("idg", "import")),
        "check_frames": sum(1 for origin, *_ in keys if origin == CHECK_ORIGIN),
        "timings": checkpoint.get("calculator", {}).get("timings", {}),
    }


def render_status(status: dict[str, Any]) -> str:
    line = (f"on-the-fly run {status['directory']}: {status['state']}; MD step {status['step_checkpointed']} of "
            f"{status['steps']} at the last checkpoint; {status['labels_stored']} labels stored "
            f"(+{status['start_frames']} start frames, {status['check_frames']} check frames)")
    if status["state"] == "running":
        line += f"; driver pid {status['driver'].get('pid')} on {status['driver'].get('host')}"
    return line


def report_run(root: Path) -> dict[str, Any]:
    """``aimspax-like report`` of an on-the-fly run: the report written again from the run
    directory (check frames stored earlier are reused; a finished run's missing ones are computed)."""
    from aimspax_like.config import load_config
    from aimspax_like.otf_run import OTFPaths

    paths = OTFPaths(Path(root))
    config = load_config(paths.config)
    config.output.directory = paths.root
    checkpoint = load_checkpoint(paths.checkpoint) if paths.checkpoint.is_file() else {}
    return make_otf_report(paths, config, DatasetStore.open(paths.dataset), None, done=bool(checkpoint.get("done")))
