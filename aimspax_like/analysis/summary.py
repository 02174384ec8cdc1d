"""The one-screen summary at the end of a campaign (also ``report/summary.{md,json}``).

Built from the dataset, the event log and the phase results, so it tells what happened, not
what the code intended: labels used per phase, failures by kind, MD steps, the final
validation force MAE per member, the test-set error of the final model and the wall time
split into ML work (MD + training), waiting for labels, and label CPU time on the workers.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from aimspax_like.analysis.timeline import label_overlap
from aimspax_like.context import RunContext
from aimspax_like.events import read_events


def build_summary(ctx: RunContext, results: dict[str, Any]) -> dict[str, Any]:
    events = read_events(ctx.paths.events)
    failures = Counter(e.get("kind") for e in events if e["event"] == "label_failed")
    idg_steps = sum(e.get("md_steps", 0) for e in events if e["event"] == "phase_end" and e["phase"] == "idg")
    counts = ctx.store.counts()
    seconds = ctx.clock.seconds
    summary = {
        "directory": str(ctx.paths.root),
        "labels": {**counts["origin"], "total": counts["total"], "failed": dict(failures)},
        "splits": counts["split"],
        "md_steps": {"idg": idg_steps, "al": results.get("al", {}).get("md_steps", 0)},
        "al": results.get("al"),
        "overlap": label_overlap(events),
        "valid_force_mae": results.get("final_valid"),
        "best_member": results.get("converge", {}).get("best_member"),
        "test": results.get("test"),
        "wall_s": {
            "total": round(ctx.clock.elapsed, 2),
            "ml": round(seconds["md"] + seconds["training"], 2),
            "md": round(seconds["md"], 2),
            "training": round(seconds["training"], 2),
            "waiting": round(seconds["waiting"], 2),
            "labelling_worker_s": round(seconds["labelling"], 2),
        },
    }
    return summary


def render(summary: dict[str, Any]) -> str:
    labels, wall = summary["labels"], summary["wall_s"]
    failed = ", ".join(f"{k} {v}" for k, v in labels["failed"].items()) or "none"
    lines = [
        f"campaign   {summary['directory']}",
        f"labels     {labels['total']} total: idg {labels['idg']}, al {labels['al']}, test {labels['test']}"
        f" (train {summary['splits']['train']}, valid {summary['splits']['valid']}); failed: {failed}",
        f"md steps   idg {summary['md_steps']['idg']}, al {summary['md_steps']['al']}",
    ]
    if summary.get("al"):
        al = summary["al"]
        lines.append(f"al         stopped by {al['reason']}; {al['training_rounds']} training rounds; "
                     f"threshold {al['threshold']:.4g} eV/A")
        overlap = summary["overlap"]
        lines.append(f"parallel   {overlap['labels_overlapping_sampling']} of {overlap['labels']} labels ran while "
                     f"other trajectories sampled ({overlap['checks_by_others_during_labels']} checks meanwhile); "
                     f"max {overlap['max_in_flight']} in flight")
    if summary.get("valid_force_mae"):
        maes = "  ".join(f"m{k}: {v * 1000:.1f}" for k, v in enumerate(summary["valid_force_mae"]))
        best = summary.get("best_member")
        lines.append(f"valid F MAE (meV/A)  {maes}" + (f"   best: m{best}" if best is not None else ""))
    test = summary.get("test")
    if test and test.get("errors"):
        errors = {int(k): v for k, v in test["errors"].items()}  # JSON round trips make keys strings
        err = errors[int(test["member"])]
        lines.append(f"test set   {test['size']} frames: final model F MAE {err['force_mae'] * 1000:.1f} meV/A, "
                     f"E MAE {err['energy_mae_per_atom'] * 1000:.2f} meV/atom")
    lines.append(
        f"wall time  {wall['total']:.1f} s: ML {wall['ml']:.1f} s (MD {wall['md']:.1f}, training "
        f"{wall['training']:.1f}), waiting for labels {wall['waiting']:.1f} s; "
        f"label time on workers {wall['labelling_worker_s']:.1f} s"
    )
    return "\n".join(lines)


def write_summary(report_dir: Path, summary: dict[str, Any]) -> None:
    report_dir.mkdir(parents=True, exist_ok=True)
    (report_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    (report_dir / "summary.md").write_text("# Campaign summary\n\n```\n" + render(summary) + "\n```\n")
