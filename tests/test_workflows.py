"""The scaling benchmark's metrics against numbers worked out by hand on small event lists.

The benchmark (workflows/scaling_benchmark.py) prints speedup, efficiency, worker utilisation
and trajectory waiting time computed from event logs; these tests pin those functions to
hand-computed values so the printed numbers can be trusted. Importing the module loads neither
torch nor Parsl.
"""

from __future__ import annotations

import math
import sys

import pytest
from workflow_helpers import WORKFLOWS, load_workflow

bench = load_workflow("scaling_benchmark")


def _state(t, trajectory, old, new):
    return {"t": t, "event": "state", "trajectory": trajectory, "old": old, "new": new}


def _parallel_events():
    """Two trajectories, two workers, three labels; the third is drained after the target (2).

    t=100 al_start
    t=101 label 0 (traj 0) submitted; traj 0 running -> waiting
    t=102 label 1 (traj 1) submitted; traj 1 running -> waiting
    t=105 label 0 done, ran 3.5 s on its worker [101.5, 105]; traj 0 waiting -> training
    t=106 traj 0 training -> running; training round
    t=106.5 label 2 (traj 0) submitted; traj 0 running -> waiting
    t=107 label 1 done, ran 4 s [103, 107] (target reached here); traj 1 waiting -> training
    t=109 label 2 done, ran 2 s [107, 109]: drained after the stop criterion
    t=109.5 al_stop
    """
    return [
        {"t": 99.0, "event": "executor_ready", "workers": 2},
        {"t": 100.0, "event": "al_start", "mode": "parallel", "trajectories": 2},
        {"t": 101.0, "event": "label_submitted", "label": 0, "trajectory": 0, "in_flight": 1},
        _state(101.0, 0, "running", "waiting"),
        {"t": 102.0, "event": "label_submitted", "label": 1, "trajectory": 1, "in_flight": 2},
        _state(102.0, 1, "running", "waiting"),
        {"t": 105.0, "event": "label_done", "label": 0, "trajectory": 0, "wall_s": 3.5},
        _state(105.0, 0, "waiting", "training"),
        {"t": 106.0, "event": "training_round", "epochs": 1},
        _state(106.0, 0, "training", "running"),
        {"t": 106.5, "event": "label_submitted", "label": 2, "trajectory": 0, "in_flight": 2},
        _state(106.5, 0, "running", "waiting"),
        {"t": 107.0, "event": "label_done", "label": 1, "trajectory": 1, "wall_s": 4.0},
        _state(107.0, 1, "waiting", "training"),
        {"t": 109.0, "event": "label_done", "label": 2, "trajectory": 0, "wall_s": 2.0},
        {"t": 109.5, "event": "al_stop", "reason": "max_train_set_size", "md_steps": 40},
    ]


def test_fixed_work_wall_utilisation_and_waiting():
    m = bench.setting_metrics(_parallel_events(), workers=2, target_labels=2)
    assert m["target_reached"] and m["mode"] == "parallel" and m["trajectories"] == 2
    assert m["wall_s"] == pytest.approx(7.0)  # al_start 100 -> 2nd label_done 107
    assert m["wall_to_stop_s"] == pytest.approx(9.5)
    assert m["labels_done"] == 3 and m["labels_failed"] == 0
    # Busy inside [100, 107]: label 0 3.5 s + label 1 4 s + label 2 none (it ran 107-109).
    assert m["utilisation"] == pytest.approx(7.5 / (2 * 7.0))
    # Waiting inside [100, 107]: traj 0 101-105 and 106.5-107 (4.5 s), traj 1 102-107 (5 s).
    assert m["traj_wait_s"] == pytest.approx(9.5)
    assert m["wait_fraction"] == pytest.approx(9.5 / (2 * 7.0))
    # Training status: traj 0 105-106; traj 1 from 107, i.e. nothing inside the window.
    assert m["train_status_s"] == pytest.approx(1.0)
    assert m["training_rounds"] == 1 and m["max_in_flight"] == 2 and m["md_steps"] == 40


def test_without_target_the_window_ends_at_the_last_label():
    m = bench.setting_metrics(_parallel_events(), workers=2)
    assert m["target_labels"] == 3 and m["wall_s"] == pytest.approx(9.0)
    assert m["utilisation"] == pytest.approx(9.5 / (2 * 9.0))
    # traj 0: 101-105 and 106.5-109 (6.5 s); traj 1: 102-107 (5 s)
    assert m["traj_wait_s"] == pytest.approx(11.5)


def test_unreached_target_falls_back_to_al_stop():
    m = bench.setting_metrics(_parallel_events(), workers=2, target_labels=5)
    assert not m["target_reached"] and m["wall_s"] == pytest.approx(9.5)


def test_serial_mode_counts_every_trajectory_as_waiting():
    """Serial: the loop blocks while a label runs, so all 3 trajectories wait for it."""
    events = [
        {"t": 0.0, "event": "al_start", "mode": "serial", "trajectories": 3},
        {"t": 1.0, "event": "label_submitted", "label": 0, "trajectory": 2, "in_flight": 1},
        _state(1.0, 2, "running", "waiting"),
        {"t": 3.0, "event": "label_done", "label": 0, "trajectory": 2, "wall_s": 1.8},
        _state(3.0, 2, "waiting", "training"),
        {"t": 3.0, "event": "label_submitted", "label": 1, "trajectory": 0, "in_flight": 1},
        _state(3.0, 0, "running", "waiting"),
        {"t": 4.0, "event": "label_failed", "label": 1, "trajectory": 0, "wall_s": 0.9},
        _state(4.0, 0, "waiting", "running"),
        {"t": 5.0, "event": "label_submitted", "label": 2, "trajectory": 1, "in_flight": 1},
        {"t": 8.0, "event": "label_done", "label": 2, "trajectory": 1, "wall_s": 2.9},
        {"t": 8.5, "event": "al_stop", "reason": "max_train_set_size", "md_steps": 12},
    ]
    m = bench.setting_metrics(events, workers=1, target_labels=2)
    assert m["wall_s"] == pytest.approx(8.0) and m["labels_done"] == 2 and m["labels_failed"] == 1
    # Labels in flight 1-3, 3-4 and 5-8: 6 s, times 3 trajectories.
    assert m["traj_wait_s"] == pytest.approx(18.0)
    assert m["wait_fraction"] == pytest.approx(18.0 / 24.0)
    assert m["utilisation"] == pytest.approx((1.8 + 0.9 + 2.9) / 8.0)


def test_continue_policy_never_waits():
    events = [
        {"t": 0.0, "event": "al_start", "mode": "parallel", "trajectories": 2},
        {"t": 0.5, "event": "label_submitted", "label": 0, "trajectory": 0, "in_flight": 1},
        {"t": 2.5, "event": "label_done", "label": 0, "trajectory": 0, "wall_s": 2.0},
        {"t": 2.6, "event": "training_round", "epochs": 1},
        {"t": 2.7, "event": "al_stop", "reason": "max_train_set_size", "md_steps": 30},
    ]
    m = bench.setting_metrics(events, workers=4, target_labels=1)
    assert m["traj_wait_s"] == 0.0 and m["train_status_s"] == 0.0
    assert m["utilisation"] == pytest.approx(2.0 / (4 * 2.5))
    assert m["training_rounds"] == 0  # the round after the target is outside the window


def test_speedup_and_efficiency():
    rows = [{"workers": 1, "wall_s": 100.0}, {"workers": 4, "wall_s": 30.0}, {"workers": 16, "wall_s": 10.0}]
    bench.add_scaling(rows, rows[0])
    assert [r["speedup"] for r in rows] == pytest.approx([1.0, 100 / 30, 10.0])
    assert [r["efficiency"] for r in rows] == pytest.approx([1.0, 100 / 120, 10 / 16])


def test_interval_helpers():
    assert bench._union_length([(0, 2), (1, 3), (5, 6), (5.5, 5.7)], 0.5, 10) == pytest.approx(3.5)
    assert bench._union_length([], 0, 1) == 0.0
    assert bench._overlap(0, 1, 2, 3) == 0.0 and bench._overlap(0, 5, 2, 3) == 1.0
    assert math.isclose(bench.status_seconds([_state(1.0, 0, "running", "waiting")], "waiting", 0.0, 4.0), 3.0)


def test_plan_covers_both_policies_and_serial_runs_with_one_worker():
    args = bench.parse_args(["--workers", "1,4", "--mode-workers", "8", "--cores-per-worker", "0.001"])
    settings = bench.plan(args)
    workers = [(s.policy, s.workers) for s in settings if s.study == "workers"]
    # Settings with equal W are neighbours: they share one worker pool.
    assert workers == [("wait", 1), ("continue", 1), ("wait", 4), ("continue", 4)]
    modes = [(s.mode, s.policy, s.workers, s.trajectories) for s in settings if s.study == "modes"]
    assert modes == [("serial", "wait", 1, 8), ("parallel", "wait", 8, 8), ("parallel", "continue", 8, 8)]
    assert args.labels == 32 and args.label_cost_steps == 100 and args.mode_label_cost_steps == 200


def test_importing_the_benchmark_loads_nothing_heavy():
    import subprocess

    script = str(WORKFLOWS / "scaling_benchmark.py")
    code = f"import runpy, sys; runpy.run_path({script!r}, run_name='x'); print(sorted(m for m in "
    code += "('torch', 'mace', 'parsl') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"
