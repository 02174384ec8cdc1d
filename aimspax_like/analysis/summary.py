"""The one-screen summary at the end of a campaign (also ``report/summary.{md,json}``).

Built from the dataset, the event log and the phase results, so it tells what happened, not
what the code intended: labels used per phase, failures by kind, MD steps, the final
validation force MAE per member, the test-set errors (per test temperature: the final model's
and every member's force and energy MAE, and how well the committee's uncertainty tracks the
true force error), the wall time split into ML work (MD + training), waiting for labels, and
label time on the workers, and the CPU profile: CPU seconds per phase and kind of work, driver
and workers (``analysis.profile``).
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aimspax_like.analysis.profile import merge as merge_profiles
from aimspax_like.analysis.profile import render as render_profile
from aimspax_like.analysis.strict_json import dumps_strict
from aimspax_like.analysis.systems import render_systems
from aimspax_like.analysis.timeline import label_overlap
from aimspax_like.events import read_events

if TYPE_CHECKING:  # the report renders summaries without loading the dataset stack (h5py, ASE)
    from aimspax_like.context import RunContext


def _earlier_segments(events: list[dict[str, Any]]) -> tuple[float, Counter[str], list[Any]]:
    """Wall time, time buckets and CPU profiles of the driver runs before the current one (a resumed campaign).

    Each run of the driver is a segment from ``campaign_start`` to its last event; one that ended
    (normally, by a signal or a stop) also logged its time buckets in ``campaign_end``. A segment
    killed outright counts with its wall time only. The last ``campaign_start`` is the current run.
    """
    segments: list[dict[str, Any]] = []
    for event in events:
        if event["event"] == "campaign_start":
            segments.append({"t0": event["t"], "t1": event["t"], "seconds": {}, "profile": None})
        elif segments:
            segments[-1]["t1"] = event["t"]
            if event["event"] == "campaign_end":
                segments[-1]["seconds"] = event.get("seconds", {})
                segments[-1]["profile"] = event.get("profile")
    wall, buckets = 0.0, Counter()
    for segment in segments[:-1]:
        wall += segment["t1"] - segment["t0"]
        buckets.update(segment["seconds"])
    return wall, buckets, [segment["profile"] for segment in segments[:-1]]


def build_summary(ctx: RunContext, results: dict[str, Any]) -> dict[str, Any]:
    events = read_events(ctx.paths.events)
    failures = Counter(e.get("kind") for e in events if e["event"] == "label_failed")
    idg_steps = sum(e.get("md_steps", 0) for e in events if e["event"] == "phase_end" and e["phase"] == "idg")
    counts = ctx.store.counts()
    earlier_wall, earlier_seconds, earlier_profiles = _earlier_segments(events)
    seconds = earlier_seconds + ctx.clock.seconds
    idg_end = next((e for e in reversed(events) if e["event"] == "phase_end" and e["phase"] == "idg"), None)
    summary = {
        "directory": str(ctx.paths.root),
        "labels": {**counts["origin"], "total": counts["total"], "failed": dict(failures)},
        "splits": counts["split"],
        "md_steps": {"idg": idg_steps, "al": results.get("al", {}).get("md_steps", 0)},
        "idg": None if idg_end is None else {
            "frames": idg_end.get("frames"), "reason": idg_end.get("reason"), "epochs": idg_end.get("epochs"),
            "probe": idg_end.get("probe"), "extra_rounds": idg_end.get("extra_rounds", 0),
        },
        "al": results.get("al"),
        "skipped": [e["phase"] for e in events if e["event"] == "phase_skipped"],
        "guards": guard_counts(events),
        "warnings": [e["message"] for e in events if e["event"] == "warning"],
        "overlap": label_overlap(events),
        "analysis": analysis_summary(events),
        "valid_force_mae": results.get("final_valid"),
        "valid_stress_mae": results.get("final_valid_stress"),
        "best_member": results.get("converge", {}).get("best_member"),
        "test": results.get("test"),
        "systems": results.get("systems"),
        "wall_s": {
            "total": round(earlier_wall + ctx.clock.elapsed, 2),
            "ml": round(seconds["md"] + seconds["training"], 2),
            "md": round(seconds["md"], 2),
            "training": round(seconds["training"], 2),
            "waiting": round(seconds["waiting"], 2),
            "labelling_worker_s": round(seconds["labelling"], 2),
        },
        # {phase: {bucket: {wall_s, cpu_s}}}, every driver run that ended added up
        "profile": merge_profiles([*earlier_profiles, ctx.clock.profile()]),
    }
    return summary


def render(summary: dict[str, Any]) -> str:
    labels, wall = summary["labels"], summary["wall_s"]
    failed = ", ".join(f"{k} {v}" for k, v in labels["failed"].items()) or "none"
    lines = [
        f"campaign   {summary['directory']}",
        f"labels     {labels['total']} total: idg {labels['idg']}, al {labels['al']}, test {labels['test']}"
        + (f", analysis {labels['analysis']}" if labels.get("analysis") else "")
        + f" (train {summary['splits']['train']}, valid {summary['splits']['valid']}); failed: {failed}",
        f"md steps   idg {summary['md_steps']['idg']}, al {summary['md_steps']['al']}",
    ]
    idg = summary.get("idg")
    if idg:
        lines.append(f"idg        {idg['frames']} frames, {idg['epochs']} epochs, stopped by {idg['reason']}"
                     + _probe_text(idg))
    if summary.get("skipped"):
        lines.append(f"skipped    {', '.join(summary['skipped'])} (switched off in the config)")
    if summary.get("al") and not summary["al"].get("skipped"):
        al = summary["al"]
        lines.append(f"al         stopped by {al['reason']}; {al['training_rounds']} training rounds; "
                     f"threshold {al['threshold']:.4g} eV/A")
        overlap = summary["overlap"]
        lines.append(f"parallel   {overlap['labels_overlapping_sampling']} of {overlap['labels']} labels ran while "
                     f"other trajectories sampled ({overlap['md_steps_by_others_during_labels']} MD steps by "
                     f"others meanwhile); "
                     f"max {overlap['max_in_flight']} in flight")
        guards = summary["guards"]
        reasons = ", ".join(f"{k} {v}" for k, v in guards["md_unstable"].items()) or "none"
        lines.append(f"guards     {sum(guards['md_unstable'].values())} frames failed a guard ({reasons}); "
                     f"{guards['held']} labels held (energy outliers, {guards['released']} released); "
                     f"{guards['trust_exceeded']} beyond the trust bound")
    analysis = summary.get("analysis")
    if analysis and analysis["points"]:
        r = analysis["pearson_r"]
        lines.append(f"analysis   {analysis['points']} ground-truth points: true max-atom force error "
                     f"{analysis['mean_true_error'] * 1000:.0f} meV/A on average, uncertainty-error Pearson r "
                     + ("n/a" if r is None else f"{r:.2f}"))
    if summary.get("valid_force_mae"):
        maes = "  ".join(f"m{k}: {v * 1000:.1f}" for k, v in enumerate(summary["valid_force_mae"]))
        best = summary.get("best_member")
        lines.append(f"valid F MAE (meV/A)  {maes}" + (f"   best: m{best}" if best is not None else ""))
    if summary.get("valid_stress_mae"):
        maes = "  ".join(f"m{k}: {v * 1000:.2f}" for k, v in enumerate(summary["valid_stress_mae"]))
        lines.append(f"valid S MAE (meV/A^3)  {maes}")
    test = summary.get("test")
    if test and test.get("size"):
        lines.extend(_test_lines(test))
    lines.extend(render_systems(summary.get("systems") or []))
    lines.extend(f"warning    {message}" for message in summary.get("warnings", []))
    lines.append(
        f"wall time  {wall['total']:.1f} s: ML {wall['ml']:.1f} s (MD {wall['md']:.1f}, training "
        f"{wall['training']:.1f}), waiting for labels {wall['waiting']:.1f} s; "
        f"label time on workers {wall['labelling_worker_s']:.1f} s"
    )
    lines.extend(render_profile(summary.get("profile")))
    return "\n".join(lines)


def analysis_summary(events: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The ground-truth analysis points (``al.analysis_every``): how many, mean error, Pearson r."""
    from aimspax_like.analysis.correlation import pearson_r
    from aimspax_like.analysis.series import analysis_points

    points = analysis_points(events)
    if not len(points):
        return None
    return {"points": len(points), "mean_true_error": float(points.true_error.mean()),
            "mean_uncertainty": float(points.delta.mean()), "pearson_r": pearson_r(points.delta, points.true_error)}


def guard_counts(events: list[dict[str, Any]]) -> dict[str, Any]:
    """Guard decisions of the AL phase, by kind (the reason's first words name the guard)."""
    unstable = Counter(_guard_name(e.get("reason", "")) for e in events if e["event"] == "md_unstable")
    return {
        "md_unstable": dict(unstable),
        "held": sum(e["event"] == "label_held" for e in events),
        "released": sum(e["event"] == "label_released" for e in events),
        "trust_exceeded": sum(e["event"] == "trust_exceeded" for e in events),
    }


def _guard_name(reason: str) -> str:
    for word, name in (("predicted energy", "predicted energy"), ("stretched", "bond stretch"),
                       ("compressed", "bond compression"), ("not bonded", "new contact"), ("apart", "close contact"),
                       ("temperature", "temperature"), ("volume", "volume"), ("non-finite", "non-finite")):
        if word in reason:
            return name
    return "other"


def _probe_text(idg: dict[str, Any]) -> str:
    probe = idg.get("probe")
    if not probe:
        return ""
    extra = f" after {idg['extra_rounds']} extra rounds" if idg.get("extra_rounds") else ""
    if probe["passed"]:
        return f"; probe passed ({probe['steps']} guarded committee MD steps{extra})"
    return f"; probe FAILED at step {probe['steps']}{extra}, budget spent ({probe['reason']})"


def _test_lines(test: dict[str, Any]) -> list[str]:
    """A header, one line per test temperature and one over all test frames."""
    temperatures = ", ".join(f"{t:g}" for t in test["temperatures_K"])
    lines = [f"test set   {test['size']} frames from {test['sampler']} MD at {temperatures} K "
             f"(final model: m{test['member']})"]
    groups = [(f"{g['temperature_K']:g} K", g) for g in test["per_temperature"]]
    for label, group in [*groups, ("all", test["all"])]:
        lines.append(f"test {label:<8} {group['frames']:3d} frames: " + _test_errors(group))
    return lines


def _test_errors(group: dict[str, Any]) -> str:
    if not group["frames"]:
        return "none"
    final = group["final"]
    members = "/".join(f"{m['force_mae'] * 1000:.0f}" for m in group["members"])
    r = group["uncertainty_error_r"]
    stress = final.get("stress_mae")
    stress_text = f", S MAE {stress * 1000:.2f} meV/A^3" if isinstance(stress, float) and math.isfinite(stress) else ""
    return (f"final F MAE {final['force_mae'] * 1000:.1f} meV/A, E MAE {final['energy_mae_per_atom'] * 1000:.2f} "
            f"meV/atom{stress_text}; members F {members}; uncertainty-error r " + ("n/a" if r is None else f"{r:.2f}"))


def write_summary(report_dir: Path, summary: dict[str, Any]) -> None:
    """Write ``summary.json`` (strict JSON) and ``summary.md``.

    Strict: an infinite number (the threshold of an AL phase stopped in its warm-up) is written
    as the string ``"inf"`` (``"-inf"``), NaN as ``null``, as in the event log; a plain
    ``json.dumps`` would write ``Infinity``, which JavaScript, jq and most parsers reject.
    """
    report_dir.mkdir(parents=True, exist_ok=True)
    (report_dir / "summary.json").write_text(dumps_strict(summary))
    (report_dir / "summary.md").write_text("# Campaign summary\n\n```\n" + render(summary) + "\n```\n")
