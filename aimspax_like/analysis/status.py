"""Where a campaign stands: the picture behind the live display and ``aimspax-like status``.

``StatusTracker`` reads event records (the dicts ``EventLog.emit`` writes to ``logs/events.jsonl``)
one at a time and keeps a small picture of the campaign: the phase, every AL trajectory's MD step
and state, the threshold, labels done / in flight / failed per phase, the dataset's split sizes,
the best validation force MAE, the workers and blocks, the wall time, and how much of the current
phase's budget (from the resolved ``campaign.yaml``) is used. The driver feeds it from the event
log as events happen (``aimspax_like.live``); ``status_of`` replays the log of a run directory from
any other process. Both end in ``snapshot()``, a strict-JSON dict, which ``render`` (a rich panel)
and ``render_line`` (one plain line) draw.

Nothing here opens ``data/dataset.h5`` (the driver may be writing it): every number comes from the
event log, which records each stored frame (``frame_stored``) and each split change
(``frame_released``), so the split sizes equal the dataset's as long as the log is complete.
"""

from __future__ import annotations

import json
import math
import signal
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

from aimspax_like.analysis.strict_json import strict
from aimspax_like.data.frames import SPLITS  # the dataset's splits: the data sizes list every one
from aimspax_like.events import read_events
from aimspax_like.run_lock import driver_state

PHASE_ORDER = ("idg", "al", "converge", "test")
TRAJECTORY_STATES = ("running", "waiting", "training", "done")
LABEL_PHASES = ("idg", "al", "test", "analysis")
# Below this much of the phase done since it (re)started, a remaining time is a guess: "unknown".
MIN_FRACTION_FOR_ETA = 0.01


def _number(value: Any) -> float | None:
    """A finite float from an event field ("inf" strings, None and junk give None)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _threshold(value: Any) -> float | str | None:
    """A threshold as strict JSON: a finite number, "inf" (warm-up), or None (not known)."""
    if value in ("inf", "Infinity"):
        return "inf"
    if isinstance(value, int | float) and not isinstance(value, bool):
        if math.isinf(value) and value > 0:
            return "inf"
        return float(value) if math.isfinite(value) else None
    return None


class Budgets:
    """The stop criteria of each phase, read from a resolved campaign config (a plain dict)."""

    def __init__(self, config: dict[str, Any] | None = None) -> None:
        config = config or {}
        idg, al = config.get("idg") or {}, config.get("al") or {}
        converge, test = config.get("converge") or {}, config.get("test_set") or {}
        self.known = bool(config)
        self.enabled = {
            "idg": idg.get("enabled", True), "al": al.get("enabled", True),
            "converge": converge.get("enabled", True), "test": bool(test.get("size", 1)),
        }
        self.idg_max_set_size = idg.get("max_set_size")
        self.idg_max_epochs = idg.get("max_epochs")
        self.al_max_md_steps = al.get("max_md_steps")
        self.al_trajectories = al.get("num_trajectories")
        self.al_max_train = al.get("max_train_set_size")
        self.al_counts = al.get("train_set_counts", "shared")  # per_member: aims-PAX's budget rule
        self.members = (config.get("model") or {}).get("ensemble_size") if config else None
        self.converge_max_epochs = converge.get("max_epochs")
        self.test_size = test.get("size")
        self.test_temperatures = self._test_temperatures(test, al)

    @staticmethod
    def _test_temperatures(test: dict[str, Any], al: dict[str, Any]) -> int | None:
        if test.get("temperatures_K") is not None:
            return len(test["temperatures_K"])
        md = al.get("md")
        blocks = md if isinstance(md, list) else [md] if isinstance(md, dict) else []
        temps = {b.get("temperature_K") for b in blocks if isinstance(b, dict)}
        return len(temps) + 1 if temps else None  # the AL temperatures plus one 1.4x the highest


def load_budgets(run_dir: Path) -> Budgets:
    """The budgets of a run directory's ``campaign.yaml`` (none known if it cannot be read)."""
    import yaml

    try:
        data = yaml.safe_load((Path(run_dir) / "campaign.yaml").read_text(encoding="utf-8"))
    except (OSError, ValueError, yaml.YAMLError):
        return Budgets()
    return Budgets(data if isinstance(data, dict) else None)


class StatusTracker:
    """The campaign picture, kept up to date one event record at a time (thread-safe)."""

    def __init__(self, budgets: Budgets | dict[str, Any] | None = None) -> None:
        self.budgets = budgets if isinstance(budgets, Budgets) else Budgets(budgets)
        self._lock = threading.Lock()
        self.directory: str | None = None
        self.t_first: float | None = None
        self.t_last: float | None = None
        self.segments: list[list[float]] = []  # [start, last event] of each driver run
        self.ended = False  # the current segment logged campaign_end
        self.phase: str | None = None
        self.phase_t0: float | None = None
        self._phase_f0: float = 0.0  # the phase's progress fraction when it (re)started
        self.phases_done: list[str] = []
        self.phases_skipped: list[str] = []
        self.requested: list[str] = []
        self.own_train: dict[int, float] = {}  # training frames of one member (its IDG/imported subset)
        self.shared_train = 0  # training frames every member trains on
        self.phase_reasons: dict[str, Any] = {}
        self.interrupted: str | None = None
        self.trajectories: dict[int, dict[str, Any]] = {}
        self.threshold: float | str | None = None
        self.threshold_frozen = False
        self.labels: dict[str, Counter[str]] = {}
        self.splits: Counter[str] = Counter()
        self.origins: Counter[str] = Counter()
        self.analysis_points = 0
        self.valid_mae: dict[str, Any] | None = None
        self._converged: list[float] = []
        self.converge_members: list[int] = []
        self.converge_epoch: dict[str, Any] | None = None
        self._converge_first_epoch = 0
        self.idg_epochs = 0
        self.idg_md_steps: int | None = None
        self.al_train0: int | None = None
        self.al_steps_reported: int | None = None  # from on_progress (the driver only)
        self.test_targets: int | None = None
        self.executor: dict[str, Any] = {}
        self.workers: int | None = None
        self.blocks: dict[str, str] = {}
        self.warnings = 0
        self.md_unstable = 0
        self.events = 0

    # ------------------------------------------------------------------ input

    def feed(self, record: dict[str, Any]) -> None:
        """Take one event record (as ``EventLog.emit`` returns it / writes it)."""
        if not isinstance(record, dict):
            return
        with self._lock:
            self._feed(record)

    def feed_all(self, records: list[dict[str, Any]]) -> None:
        for record in records:
            self.feed(record)

    def progress(self, status: dict[str, Any]) -> None:
        """Take an ``on_progress`` dict: finer-grained numbers the log does not carry."""
        if not isinstance(status, dict):
            return
        with self._lock:
            phase = status.get("phase")
            if phase == "al" and isinstance(status.get("steps"), int):
                self.al_steps_reported = int(status["steps"])
            elif phase == "converge" and isinstance(status.get("epoch"), int):
                # A member's epoch counts from its first training; converge.max_epochs from here.
                member, epoch = status.get("member"), status["epoch"]
                if not self.converge_epoch or self.converge_epoch.get("member") != member:
                    self._converge_first_epoch = epoch
                self.converge_epoch = {"member": member, "epoch": epoch - self._converge_first_epoch + 1,
                                       "valid_force_mae": _number(status.get("valid_mae"))}

    def _label_counter(self, phase: str) -> Counter[str]:
        return self.labels.setdefault(phase, Counter())

    def _feed(self, r: dict[str, Any]) -> None:  # one branch per event name
        name, t = r.get("event"), _number(r.get("t"))
        self.events += 1
        if t is not None:
            self.t_first = t if self.t_first is None else self.t_first
            self.t_last = t
            if self.segments and name != "campaign_start":  # the last event of this driver run so far
                self.segments[-1][1] = t
        phase_of = r.get("phase") or self.phase or "?"
        if name == "campaign_start":
            self.segments.append([t or 0.0, t or 0.0])
            self.requested = [str(p) for p in r.get("phases") or []]  # what this driver run was asked for
            self.directory = r.get("directory", self.directory)
            self.ended, self.phase, self.phase_t0, self.interrupted = False, None, None, None
            for counter in self.labels.values():  # labels in flight died with the last driver
                counter["in_flight"] = 0
            self.workers, self.blocks, self.executor = None, {}, {}
        elif name == "campaign_end":
            self.ended = True
            for counter in self.labels.values():
                counter["in_flight"] = 0
        elif name in ("phase_start", "phase_resume"):
            phase = r.get("phase")
            if phase == "al" and (name == "phase_start" or self.al_train0 is None):
                self.al_train0 = self._budget_train()
            if phase == "converge":
                self.converge_members = list(r.get("members") or [])
                self._converged, self.converge_epoch = [], None
            if phase == "test":
                temps = r.get("temperatures_K")
                if isinstance(temps, list) and isinstance(self.budgets.test_size, int):
                    self.test_targets = self.budgets.test_size * len(temps)
            if name == "phase_resume":
                self._label_counter(phase)["in_flight"] += int(r.get("resubmitted", 0) or 0)
            self.phase, self.phase_t0 = phase, t
            self._phase_f0 = self._fraction()[0] or 0.0
        elif name == "phase_end":
            phase = r.get("phase")
            if phase not in self.phases_done:
                self.phases_done.append(phase)
            self.phase_reasons[phase] = r.get("reason")
            if phase == "idg":
                self.idg_md_steps = r.get("md_steps", self.idg_md_steps)
            if phase in self.labels:
                self.labels[phase]["in_flight"] = 0
            if self.phase == phase:
                self.phase, self.phase_t0 = None, None
        elif name == "phase_skipped":
            if r.get("phase") not in self.phases_skipped:
                self.phases_skipped.append(r.get("phase"))
        elif name in ("al_interrupted", "idg_interrupted", "test_interrupted"):
            self.interrupted = f"{name.split('_')[0]} stopped by {_signal_name(r.get('signal'))}"
        elif name == "campaign_interrupted" and self.interrupted is None:  # a stop no phase logged itself
            self.interrupted = f"{r.get('phase')} stopped by {_signal_name(r.get('signal'))}"
        elif name == "labels_keep_failing":
            self.interrupted = f"labels keep failing ({r.get('consecutive')} in a row)"
        elif name == "al_stop":
            self.phase_reasons["al"] = r.get("reason")
            if isinstance(r.get("md_steps"), int):
                self.al_steps_reported = r["md_steps"]
        elif name == "uncertainty":
            self._trajectory(r).update(step=r.get("step", 0))
            self.threshold = _threshold(r.get("threshold"))
        elif name == "state":
            self._trajectory(r).update(state=r.get("new"), step=r.get("step", 0))
        elif name == "rewind":
            self._trajectory(r)["step"] = r.get("step", 0)
        elif name in ("md_unstable",):
            self.md_unstable += 1
        elif name == "threshold_frozen":
            self.threshold, self.threshold_frozen = _threshold(r.get("value")), True
        elif name == "label_submitted":
            self._label_counter(phase_of)["in_flight"] += 1
            if "threshold" in r:
                self.threshold = _threshold(r["threshold"])
        elif name in ("label_done", "label_held"):
            self._returned(phase_of)
        elif name == "label_failed":
            counter = self._label_counter(phase_of)
            if r.get("retry"):
                counter["retried"] += 1  # tried again: still in flight
            else:
                counter["failed"] += 1
                self._returned(phase_of)
        elif name == "frame_stored":
            split, origin = r.get("split"), r.get("origin") or phase_of
            self.splits[split] += 1
            self.origins[origin] += 1
            self._label_counter(origin)["done"] += 1
            if split == "train":
                self._count_train(r.get("member"), 1)
        elif name == "data_imported":  # frames stored in one write, without a frame_stored each
            new = int(r.get("new") or 0)
            if new:
                share = (int(r.get("valid") or 0) / max(1, int(r.get("frames") or 1)))
                valid = round(new * share)
                self.splits["train"] += new - valid
                self.splits["valid"] += valid
                self.origins["import"] += new
                members = self.budgets.members if isinstance(self.budgets.members, int) else 1
                for member in range(members):  # dealt in turn: an even share each (shared: all)
                    self._count_train(member, (new - valid) / members)
        elif name == "frame_released":
            self.splits["held"] = max(0, self.splits["held"] - 1)
            self.splits[r.get("split")] += 1
            if r.get("split") == "train":
                self._count_train(-1, 1)
        elif name == "analysis_point":
            self.analysis_points += 1
        elif name == "training_round":
            maes = [v for m in r.get("members") or [] if (v := _number(m.get("valid_force_mae"))) is not None]
            if maes:
                self.valid_mae = {"value": min(maes), "phase": r.get("phase"), "train_size": r.get("train_size")}
            if r.get("phase") == "idg":
                self.idg_epochs = int(r.get("total_epochs") or self.idg_epochs)
        elif name == "converged":
            value = _number(r.get("valid_force_mae"))
            if value is not None:
                self._converged.append(value)
                self.valid_mae = {"value": min(self._converged), "phase": "converge",
                                  "train_size": self.splits["train"]}
        elif name == "executor_started":
            self.executor = {"kind": r.get("kind"), "n_workers": r.get("n_workers")}
        elif name == "executor_stopped":
            self.executor = {**self.executor, "stopped": True}
            self.workers = 0
        elif name == "workers":
            self.workers = int(r.get("connected") or 0)
        elif name in ("block_requested", "block_running", "block_released"):
            self.blocks[str(r.get("block"))] = name.split("_")[1]
        elif name == "warning":
            self.warnings += 1

    def _trajectory(self, r: dict[str, Any]) -> dict[str, Any]:
        index = int(r.get("trajectory", -1))
        return self.trajectories.setdefault(index, {"step": 0, "state": "running"})

    def _returned(self, phase: str) -> None:
        counter = self._label_counter(phase)
        counter["in_flight"] = max(0, counter["in_flight"] - 1)

    def _budget_train(self) -> int:
        """The training-set size al.max_train_set_size is compared with (al.train_set_counts)."""
        if self.budgets.al_counts == "per_member":  # the largest member's own frames plus the shared ones
            return round(max(self.own_train.values(), default=0.0)) + self.shared_train
        return int(self.splits["train"])

    def _count_train(self, member: Any, count: float) -> None:
        if isinstance(member, int) and member >= 0:
            self.own_train[member] = self.own_train.get(member, 0.0) + count
        else:
            self.shared_train += int(count)

    # ------------------------------------------------------------------ budgets

    def _fraction(self) -> tuple[float | None, str, dict[str, Any]]:
        """(fraction of the current phase done or None, a short text, what is left)."""
        b, phase = self.budgets, self.phase
        if phase == "idg":
            frames, parts, left, fractions = self.origins["idg"], [], {}, []
            if isinstance(b.idg_max_set_size, int) and b.idg_max_set_size > 0:
                fractions.append(frames / b.idg_max_set_size)
                left["frames"] = max(0, b.idg_max_set_size - frames)
                parts.append(f"frames {frames}/{b.idg_max_set_size}")
            else:
                parts.append(f"frames {frames}")
            if isinstance(b.idg_max_epochs, int) and b.idg_max_epochs > 0:
                fractions.append(self.idg_epochs / b.idg_max_epochs)
                left["epochs"] = max(0, b.idg_max_epochs - self.idg_epochs)
                parts.append(f"epochs {self.idg_epochs}/{b.idg_max_epochs}")
            # IDG stops at whichever budget runs out first (the probe may add rounds).
            return (min(1.0, max(fractions)) if fractions else None), ", ".join(parts), left
        if phase == "al":
            return self._al_fraction()
        if phase == "converge":
            members = len(self.converge_members) or 1
            done = len(self._converged)
            text = f"members {done}/{members} converged"
            epoch = (self.converge_epoch or {}).get("epoch")
            max_epochs = b.converge_max_epochs
            left: dict[str, Any] = {"members": members - done}
            fraction = done / members
            if isinstance(epoch, int) and isinstance(max_epochs, int) and max_epochs > 0:
                text += f", epoch {epoch}/{max_epochs} (at most)"
                fraction += min(1.0, epoch / max_epochs) / members
                left["epochs_at_most"] = max(0, max_epochs - epoch)
            return min(1.0, fraction), text, left
        if phase == "test":
            frames = self.origins["test"]
            target = self.test_targets
            if target is None and isinstance(b.test_size, int) and b.test_temperatures:
                target = b.test_size * b.test_temperatures
            if not target:
                return None, f"frames {frames}", {}
            return min(1.0, frames / target), f"frames {frames}/{target}", {"frames": max(0, target - frames)}
        return None, "", {}

    def _al_steps(self) -> tuple[int, int]:
        """(MD steps of all trajectories, the same with finished trajectories counted as full)."""
        steps = sum(int(t.get("step") or 0) for t in self.trajectories.values())
        if self.al_steps_reported is not None:
            steps = max(steps, self.al_steps_reported)
        full = steps
        cap = self.budgets.al_max_md_steps
        if isinstance(cap, int):
            full = sum(cap if t.get("state") == "done" else min(cap, int(t.get("step") or 0))
                       for t in self.trajectories.values())
            full = max(full, min(steps, cap * len(self.trajectories)))
        return steps, full

    def _al_fraction(self) -> tuple[float | None, str, dict[str, Any]]:
        b = self.budgets
        steps, counted = self._al_steps()
        parts, left, fractions = [], {}, []
        n = b.al_trajectories if isinstance(b.al_trajectories, int) else len(self.trajectories)
        if isinstance(b.al_max_md_steps, int) and n:
            budget = b.al_max_md_steps * n
            fractions.append(counted / budget)
            left["md_steps"] = max(0, budget - counted)
            parts.append(f"steps {steps}/{budget}")
        else:
            parts.append(f"steps {steps}")
        train = self._budget_train()
        per_member = b.al_counts == "per_member"
        if isinstance(b.al_max_train, int):
            parts.append(f"train {train}/{b.al_max_train}" + (" per member" if per_member else ""))
            left["train_frames"] = max(0, b.al_max_train - train)
            start = self.al_train0 if self.al_train0 is not None else 0
            if b.al_max_train > start:
                fractions.append((train - start) / (b.al_max_train - start))
        # AL stops at the first budget spent (or at desired_acc, which cannot be foreseen).
        return (min(1.0, max(fractions)) if fractions else None), ", ".join(parts), left

    # ------------------------------------------------------------------ output

    def snapshot(self, now: float | None = None, alive: bool | None = None) -> dict[str, Any]:
        """The picture as a strict-JSON dict. ``alive``: whether a driver runs it now
        (None: assume so while the last segment has not ended)."""
        with self._lock:
            return strict(self._snapshot(time.time() if now is None else now, alive))

    def _snapshot(self, now: float, alive: bool | None) -> dict[str, Any]:
        if alive is None:
            alive = bool(self.segments) and not self.ended
        end = now if alive else self.t_last
        fraction, detail, left = self._fraction()
        phase_elapsed = (end - self.phase_t0) if (self.phase_t0 is not None and end is not None) else None
        eta = None
        if alive and fraction is not None and phase_elapsed and phase_elapsed > 1.0:
            gained = fraction - self._phase_f0
            if gained >= MIN_FRACTION_FOR_ETA:
                eta = max(0.0, (1.0 - fraction) * phase_elapsed / gained)
        states = Counter(t.get("state") for t in self.trajectories.values())
        labels = {phase: {key: int(c[key]) for key in ("done", "in_flight", "failed", "retried")}
                  for phase, c in sorted(self.labels.items(), key=lambda kv: _phase_key(kv[0]))}
        totals = {key: sum(v[key] for v in labels.values()) for key in ("done", "in_flight", "failed", "retried")}
        steps, _ = self._al_steps()
        driver_s = sum(b - a for a, b in self.segments[:-1]) + (
            (end - self.segments[-1][0]) if self.segments and end is not None else 0.0)
        active_blocks = sum(s in ("requested", "running") for s in self.blocks.values())
        state = "running" if alive else ("not started" if not self.segments else "stopped" if self.ended else "killed")
        ended_phases = {*self.phases_done, *self.phases_skipped}
        test_done = "test" in ended_phases or not self.budgets.enabled["test"]
        if state == "stopped" and "converge" in ended_phases and test_done:
            state = "finished"
        return {
            "directory": self.directory,
            "state": state,
            "phase": self.phase,
            "phase_elapsed_s": _round(phase_elapsed),
            "phases_done": list(self.phases_done),
            "phases_skipped": list(self.phases_skipped),
            "phase_reasons": dict(self.phase_reasons),
            "interrupted": self.interrupted,
            "ended": self.ended,
            "trajectories": [{"index": k, "step": int(v.get("step") or 0), "state": v.get("state")}
                             for k, v in sorted(self.trajectories.items())],
            "trajectory_states": {s: states.get(s, 0) for s in TRAJECTORY_STATES},
            "md_steps": {"al": steps, "idg": self.idg_md_steps},
            "threshold": self.threshold,
            "threshold_frozen": self.threshold_frozen,
            "labels": {**labels, "total": totals},
            "analysis_points": self.analysis_points,
            "data": {**{s: int(self.splits[s]) for s in SPLITS},
                     **{str(s): int(n) for s, n in self.splits.items() if s not in SPLITS and s and n}},
            "valid_force_mae": dict(self.valid_mae) if self.valid_mae else None,
            "converge_epoch": dict(self.converge_epoch) if self.converge_epoch else None,
            "workers": {"connected": self.workers, "executor": self.executor.get("kind"),
                        "stopped": bool(self.executor.get("stopped")),
                        "n_workers": self.executor.get("n_workers"), "active_blocks": active_blocks,
                        "blocks": dict(self.blocks)},
            "elapsed_s": _round((end - self.t_first) if (self.t_first is not None and end is not None) else None),
            "driver_s": _round(driver_s),
            "segments": len(self.segments),
            "progress": {"phase": self.phase, "fraction": _round(fraction, 4), "detail": detail,
                         "left": left, "eta_s": _round(eta)},
            "warnings": self.warnings,
            "md_unstable": self.md_unstable,
            "last_event_t": self.t_last,
            "events": self.events,
        }


def _signal_name(signum: Any) -> str:
    try:
        return signal.Signals(int(signum)).name
    except (TypeError, ValueError):
        return f"signal {signum}"


def _phase_key(phase: str) -> int:
    return PHASE_ORDER.index(phase) if phase in PHASE_ORDER else len(PHASE_ORDER)


def _round(value: float | None, digits: int = 1) -> float | None:
    return None if value is None else round(float(value), digits)


# ---------------------------------------------------------------------- a run directory


def _finished(run_dir: Path) -> tuple[bool, list[str]]:
    try:
        state = json.loads((Path(run_dir) / "state" / "phases.json").read_text())
    except (OSError, ValueError):
        return False, []
    done = state.get("done") if isinstance(state, dict) else None
    done = [str(p) for p in done] if isinstance(done, list) else []
    return "converge" in done and (Path(run_dir) / "report" / "summary.json").is_file(), done


def status_of(run_dir: Path | str, now: float | None = None) -> dict[str, Any]:
    """The status of a run directory, running or not, as a strict-JSON dict.

    Raises ``RunDirectoryError`` for a folder that is not a run directory. Reads only
    ``campaign.yaml``, ``driver.lock``, ``logs/events.jsonl``, ``state/phases.json`` and whether
    ``report/summary.json`` exists; safe while a driver appends to the log.
    """
    from aimspax_like.errors import RunDirectoryError

    root = Path(run_dir)
    if not root.is_dir():
        raise RunDirectoryError(f"{root}: no such run directory")
    markers = (root / "campaign.yaml", root / "logs" / "events.jsonl", root / "driver.lock")
    if not any(path.is_file() for path in markers):  # a driver that has just started has only its lock
        raise RunDirectoryError(f"{root}: not a run directory (no campaign.yaml)")
    driver = driver_state(root)  # before the log: a driver that ends meanwhile has logged its end
    tracker = StatusTracker(load_budgets(root))
    log = root / "logs" / "events.jsonl"
    tracker.feed_all(read_events(log) if log.is_file() else [])
    finished, done = _finished(root)
    if not finished and tracker.ended and tracker.requested and "converge" not in tracker.requested:
        # A driver asked for some phases only (``aimspax-like idg CONFIG``) and did them all.
        finished = set(tracker.requested) <= {*done, *tracker.phases_skipped}
    snapshot = tracker.snapshot(now=now, alive=driver["alive"] and not finished)
    snapshot["directory"] = str(root)
    snapshot["phases_done"] = done or snapshot["phases_done"]
    snapshot["finished"] = finished
    snapshot["driver"] = driver
    snapshot["state"] = _state(snapshot, driver["alive"], finished)
    return strict(snapshot)


def _state(snapshot: dict[str, Any], alive: bool, finished: bool) -> str:
    if finished:
        return "finished"
    if alive:
        return "running"
    if not snapshot["segments"]:
        return "not started"
    return "stopped" if snapshot["ended"] else "killed"  # killed: no campaign_end was logged
