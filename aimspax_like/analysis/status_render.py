"""How a campaign's status looks: a rich panel for terminals, one line for log files.

Pure formatting of the snapshot dicts ``analysis.status`` builds (``StatusTracker.snapshot``,
``status_of``): the same picture for the driver's live display and for ``aimspax-like status``.
"""

from __future__ import annotations

import datetime as _dt
import statistics
import time
from typing import Any

MAX_TRAJECTORY_ROWS = 8  # more trajectories than this are summed up in one line



def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "unknown"
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds} s"
    minutes, secs = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours} h {minutes:02d} min"
    days, hours = divmod(hours, 24)
    return f"{days} d {hours} h"


def _mev(value: float | None) -> str:
    return "-" if value is None else f"{1000 * value:.1f} meV/A"


def _threshold_text(value: Any) -> str:
    if value is None:
        return "-"
    return "inf (warm-up)" if value == "inf" else f"{value:.3f} eV/A"


def _labels_text(snapshot: dict[str, Any]) -> str:
    labels = snapshot["labels"]
    total = labels["total"]
    parts = [f"{p} {v['done']}" for p, v in labels.items() if p != "total" and (v["done"] or v["in_flight"])]
    text = f"{total['done']} done"
    if parts:
        text += f" ({', '.join(parts)})"
    text += f", {total['in_flight']} in flight, {total['failed']} failed"
    if total["retried"]:
        text += f", {total['retried']} retried"
    if snapshot.get("analysis_points"):
        text += f", {snapshot['analysis_points']} ground-truth analysis points"
    return text


def _data_text(snapshot: dict[str, Any]) -> str:
    data = snapshot["data"]
    text = f"train {data['train']}, valid {data['valid']}, test {data['test']}"
    return text + "".join(f", {split} {n}" for split, n in data.items()
                          if split not in ("train", "valid", "test") and n)


def _workers_text(snapshot: dict[str, Any]) -> str:
    w = snapshot["workers"]
    if w["executor"] is None:
        return "-"
    if w.get("stopped"):
        return f"{w['executor']} executor stopped"
    connected = w["connected"] if w["connected"] is not None else w["n_workers"]
    text = f"{connected if connected is not None else '?'} {w['executor']} workers"
    if w["blocks"]:
        text += f", {w['active_blocks']} active blocks of {len(w['blocks'])}"
    return text


def _phase_text(snapshot: dict[str, Any]) -> str:
    phase = snapshot["phase"]
    done = [p for p in snapshot["phases_done"] if p not in snapshot["phases_skipped"]]
    if phase is None:
        if snapshot.get("state") == "finished":
            return "finished (" + ", ".join(done) + ")"
        return "between phases" + (f" (done: {', '.join(done)})" if done else "")
    text = phase
    if snapshot["phase_elapsed_s"] is not None:
        running = snapshot.get("state", "running") == "running"
        text += f" {'for' if running else 'stopped after'} {format_duration(snapshot['phase_elapsed_s'])}"
    if done:
        text += f" (done: {', '.join(done)})"
    return text


def _trajectory_summary(snapshot: dict[str, Any]) -> str:
    trajectories = snapshot["trajectories"]
    if not trajectories:
        return "-"
    steps = [t["step"] for t in trajectories]
    text = f"{len(trajectories)}"
    if snapshot["phase"] == "al":
        text += ": " + ", ".join(f"{n} {s}" for s, n in snapshot["trajectory_states"].items() if n) + ";"
    text += f"{'' if snapshot['phase'] == 'al' else ','} steps {min(steps)}..{max(steps)} " \
            f"(median {statistics.median(steps):g})"
    reason = snapshot["phase_reasons"].get("al")
    if snapshot["phase"] != "al" and reason:
        text += f"; AL stopped at {reason}"
    return text


def _state_line(snapshot: dict[str, Any]) -> str:
    state = snapshot.get("state") or ("running" if not snapshot["ended"] else "stopped")
    driver = snapshot.get("driver") or {}
    if state == "running" and driver.get("pid"):
        state += f" (driver pid {driver['pid']} on {driver.get('host')})"
    if snapshot.get("interrupted") and state != "running":
        state += f": {snapshot['interrupted']}"
    return state


def render(snapshot: dict[str, Any]) -> Any:
    """A rich renderable of a snapshot: a compact panel."""
    from rich import box
    from rich.console import Group
    from rich.panel import Panel
    from rich.table import Table

    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold cyan", no_wrap=True)
    grid.add_column()
    grid.add_row("status", _state_line(snapshot))
    grid.add_row("phase", _phase_text(snapshot))
    progress = snapshot["progress"]
    if progress["detail"]:
        fraction = progress["fraction"]
        text = progress["detail"]
        if fraction is not None:
            text += f"  [{100 * fraction:.0f} %]"
        grid.add_row("progress", text)
    if snapshot["trajectories"] or snapshot["phase"] == "al":
        threshold = _threshold_text(snapshot["threshold"]) + (" (frozen)" if snapshot["threshold_frozen"] else "")
        grid.add_row("threshold", threshold)
    grid.add_row("labels", _labels_text(snapshot))
    grid.add_row("data", _data_text(snapshot))
    mae = snapshot["valid_force_mae"]
    if mae:
        grid.add_row("valid MAE", f"{_mev(mae['value'])} (best member, {mae['phase']}, train {mae['train_size']})")
    epoch = snapshot.get("converge_epoch")
    if snapshot["phase"] == "converge" and epoch:
        grid.add_row("converging", f"member {epoch['member']} epoch {epoch['epoch']}: "
                                   f"valid {_mev(epoch['valid_force_mae'])}")
    grid.add_row("workers", _workers_text(snapshot))
    elapsed = format_duration(snapshot["elapsed_s"])
    if snapshot["segments"] > 1:
        elapsed += f" ({snapshot['segments']} driver runs, {format_duration(snapshot['driver_s'])} of driver time)"
    grid.add_row("elapsed", elapsed)
    if snapshot["phase"] is not None and snapshot.get("state", "running") == "running":
        eta = progress["eta_s"]
        grid.add_row("phase ETA", "unknown" if eta is None else f"~{format_duration(eta)}")
    parts: list[Any] = [grid]
    trajectories = snapshot["trajectories"]
    if 0 < len(trajectories) <= MAX_TRAJECTORY_ROWS and snapshot["phase"] == "al":
        table = Table(box=box.SIMPLE_HEAD, padding=(0, 1), show_edge=False)
        table.add_column("trajectory", justify="right")
        table.add_column("MD step", justify="right")
        table.add_column("state")
        for t in trajectories:
            table.add_row(str(t["index"]), str(t["step"]), t["state"] or "?")
        parts.append(table)
    elif trajectories:
        grid.add_row("trajectories", _trajectory_summary(snapshot))
    title = "aimspax-like" + (f"  {snapshot['directory']}" if snapshot.get("directory") else "")
    return Panel(Group(*parts), title=title, title_align="left", expand=False)


def render_line(snapshot: dict[str, Any]) -> str:
    """The picture in one plain line (no timestamp): for log files and scripts."""
    phase = snapshot["phase"] or ("finished" if snapshot.get("state") == "finished" else "-")
    parts = [phase]
    if snapshot["progress"]["detail"]:
        parts.append(snapshot["progress"]["detail"])
    if snapshot["trajectories"] and snapshot["phase"] == "al":
        counts = " ".join(f"{s} {n}" for s, n in snapshot["trajectory_states"].items() if n)
        parts.append(f"traj {counts}")
    if snapshot["phase"] == "al" and snapshot["threshold"] is not None:
        parts.append(f"threshold {_threshold_text(snapshot['threshold']).split(' (')[0]}")
    total = snapshot["labels"]["total"]
    parts.append(f"labels {total['done']} done {total['in_flight']} in flight {total['failed']} failed")
    parts.append("data " + " ".join(f"{split} {n}" for split, n in snapshot["data"].items()
                                    if n or split in ("train", "valid", "test")))
    mae = snapshot["valid_force_mae"]
    if mae:
        parts.append(f"valid {_mev(mae['value'])}")
    workers = snapshot["workers"]
    connected = workers["connected"] if workers["connected"] is not None else workers["n_workers"]
    if connected is not None and not workers.get("stopped"):
        parts.append(f"workers {connected}")
    parts.append(f"elapsed {format_duration(snapshot['elapsed_s'])}")
    if snapshot["phase"] is not None and snapshot.get("state", "running") == "running":
        parts.append(f"ETA {format_duration(snapshot['progress']['eta_s'])}")
    if snapshot.get("state") and snapshot["state"] != "running":
        parts.append(_state_line(snapshot))
    return "  ".join(parts)


def timestamp(t: float | None = None) -> str:
    return _dt.datetime.fromtimestamp(time.time() if t is None else t).strftime("%Y-%m-%d %H:%M:%S")
