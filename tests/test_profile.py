"""The CPU profile: the driver's clock per phase and bucket (wall and CPU), the labels' CPU measured
on the worker (in process, on a label server, in a timeout child, in a pool thread), and the
summary's table built from the ``campaign_end`` profiles of a log. Timing bounds are generous:
a busy loop must show as CPU and a sleep must not, nothing tighter."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
from ase import Atoms
from ase.calculators.calculator import Calculator, all_changes

from aimspax_like.analysis import profile
from aimspax_like.analysis.summary import _earlier_segments
from aimspax_like.events import WallClock
from aimspax_like.reference import label, warm_worker
from aimspax_like.reference.cpu_time import CpuMeter
from aimspax_like.reference.results import LabelFailure, LabelResult

HERE = __name__  # for the 'import' reference kind (module:Name)
BUSY_S = 0.3


def _spin(seconds: float) -> None:
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass


def _spin_thread(seconds: float) -> None:
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass


class _Zero(Calculator):
    implemented_properties: ClassVar[list[str]] = ["energy", "forces"]

    def work(self) -> None:
        raise NotImplementedError

    def calculate(self, atoms=None, properties=None, system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        self.work()
        self.results = {"energy": 0.0, "forces": np.zeros((len(self.atoms), 3))}


class BusyCalculator(_Zero):
    def work(self) -> None:
        _spin_thread(BUSY_S)


class SleepyCalculator(_Zero):
    def work(self) -> None:
        time.sleep(BUSY_S)


class SpawningCalculator(_Zero):
    """Its CPU is spent by a program it starts and waits for (as pw.x or mpirun would be)."""

    def work(self) -> None:
        code = f"import time\nend = time.process_time() + {BUSY_S}\nwhile time.process_time() < end: pass"
        subprocess.run([sys.executable, "-c", code], check=True)


def _dimer() -> Atoms:
    return Atoms("H2", positions=[[0, 0, 0], [0.8, 0, 0]])


def _spec(name: str, **extra) -> dict:
    return {"kind": "import", "path": f"{HERE}:{name}", **extra}


@pytest.fixture(autouse=True)
def _no_servers_left():
    yield
    warm_worker.close_all_servers()


# --------------------------------------------------------------------------- the driver's clock


def test_clock_attributes_buckets_to_the_phase_and_keeps_the_flat_seconds():
    clock = WallClock()
    with clock.in_phase("idg"), clock.measure("md"):
        _spin(0.05)
    with clock.in_phase("al"):
        with clock.measure("training"):
            _spin(0.05)
        clock.add("labelling", 2.0, cpu_s=1.5)
        clock.add("labelling", 1.0)  # a worker that measured no CPU
    with clock.measure("io"):  # outside every phase
        pass
    table = clock.profile()
    assert set(table) == {"idg", "al", "other"}
    assert set(table["idg"]) == {"md", "driver"} and set(table["al"]) == {"training", "labelling", "driver"}
    assert table["al"]["labelling"] == {"wall_s": 3.0, "cpu_s": 1.5}
    assert table["other"]["io"]["wall_s"] >= 0
    assert clock.phase == "other"  # restored after each phase
    assert set(clock.seconds) == {"md", "training", "labelling", "io"}  # the flat record as before
    assert clock.seconds["labelling"] == 3.0
    for phase, bucket in (("idg", "md"), ("al", "training")):
        assert table[phase][bucket]["cpu_s"] > 0.02
        assert table[phase]["driver"]["wall_s"] >= table[phase][bucket]["wall_s"]


def test_a_busy_loop_is_cpu_and_a_sleep_is_wall_only():
    clock = WallClock()
    with clock.in_phase("al"):
        with clock.measure("training"):
            _spin(BUSY_S)
        with clock.measure("waiting"):
            time.sleep(BUSY_S)
    al = clock.profile()["al"]
    assert al["training"]["cpu_s"] > 0.5 * BUSY_S
    assert al["waiting"]["wall_s"] >= 0.9 * BUSY_S
    assert al["waiting"]["cpu_s"] < 0.5 * al["waiting"]["wall_s"]
    assert al["driver"]["wall_s"] >= 1.8 * BUSY_S


def test_nested_measures_count_each_second_once():
    clock = WallClock()
    with clock.in_phase("al"), clock.measure("waiting"):
        time.sleep(0.1)
        with clock.measure("io"):
            _spin(0.2)
    al = clock.profile()["al"]
    # the inner 'io' is not also 'waiting': the CPU is io's, and the two add up to the phase
    assert al["io"]["cpu_s"] > 0.1 and al["waiting"]["cpu_s"] < 0.1
    assert al["waiting"]["wall_s"] + al["io"]["wall_s"] <= al["driver"]["wall_s"] + 1e-3
    assert clock.seconds["waiting"] < 0.2  # the flat record is exclusive too


def test_time_outside_the_phases_is_the_other_row():
    clock = WallClock()
    _spin(0.05)
    with clock.in_phase("converge"):
        time.sleep(0.05)
    table = clock.profile()
    assert table["other"]["driver"]["cpu_s"] > 0.02
    assert table["converge"]["driver"]["cpu_s"] < table["converge"]["driver"]["wall_s"]


# --------------------------------------------------------------------------- the worker's meter


def test_the_meter_of_a_pool_thread_counts_that_thread_only():
    readings = []

    def sleeper() -> None:
        meter = CpuMeter()
        time.sleep(BUSY_S)
        readings.append(meter.seconds())

    thread = threading.Thread(target=sleeper)
    thread.start()
    _spin(BUSY_S)  # the main thread busy meanwhile: not the sleeping label's CPU
    thread.join()
    assert readings[0] < 0.5 * BUSY_S


@pytest.mark.parametrize("extra", [{}, {"timeout_s": 60.0}, {"timeout_s": 60.0, "warm": False}],
                         ids=["in-process", "label-server", "timeout-child"])
@pytest.mark.parametrize("name", ["BusyCalculator", "SpawningCalculator"])
def test_a_label_reports_its_cpu_wherever_it_ran(tmp_path: Path, name: str, extra: dict):
    result = label(_dimer(), _spec(name, **extra), str(tmp_path / "w"))
    assert isinstance(result, LabelResult), result
    assert result.cpu_s is not None and result.cpu_s > 0.5 * BUSY_S
    assert result.cost()["cpu_s"] == pytest.approx(result.cpu_s, abs=1e-3)


def test_a_label_that_sleeps_costs_wall_not_cpu(tmp_path: Path):
    result = label(_dimer(), _spec("SleepyCalculator"), str(tmp_path / "w"))
    assert isinstance(result, LabelResult), result
    assert result.wall_s >= 0.9 * BUSY_S
    assert result.cpu_s is not None and result.cpu_s < 0.5 * result.wall_s


def test_a_failed_label_reports_its_cpu_too(tmp_path: Path):
    result = label(_dimer(), _spec("BusyCalculator"), str(tmp_path / "w"), faults={"scf_failure": 1.0})
    assert isinstance(result, LabelFailure), result
    assert result.cpu_s is not None and result.cpu_s >= 0


def test_cost_leaves_cpu_out_when_unknown():
    assert "cpu_s" not in LabelResult(0.0, [[0.0, 0.0, 0.0]], None, None, 1.0).cost()


# --------------------------------------------------------------------------- the summary's table


def _cell(wall: float, cpu: float) -> dict[str, float]:
    return {"wall_s": wall, "cpu_s": cpu}


RUN_1 = {
    "idg": {"md": _cell(10, 12.0), "training": _cell(40, 40.0), "labelling": _cell(60, 30.0),
            "waiting": _cell(20, 0.5), "driver": _cell(75, 54.0)},
    "al": {"md": _cell(5, 5.0), "uncertainty": _cell(1, 1.0), "io": _cell(2, 1.0), "driver": _cell(10, 8.0)},
    "other": {"driver": _cell(3, 2.0)},
}
RUN_2 = {  # a resumed driver run: AL goes on, convergence follows
    "al": {"md": _cell(5, 5.0), "training": _cell(10, 10.0), "labelling": _cell(8, 6.0),
           "driver": _cell(16, 15.0)},
    "converge": {"training": _cell(30, 30.0), "io": _cell(1, 0.5), "driver": _cell(32, 31.0)},
}


def _log() -> list[dict]:
    return [
        {"t": 0.0, "event": "campaign_start"},
        {"t": 90.0, "event": "campaign_end", "wall_s": 90.0, "seconds": {"md": 15.0}, "profile": RUN_1},
        {"t": 100.0, "event": "campaign_start"},
        {"t": 110.0, "event": "campaign_interrupted"},  # a killed run: no profile of its own
        {"t": 200.0, "event": "campaign_start"},
        {"t": 250.0, "event": "campaign_end", "wall_s": 50.0, "profile": RUN_2},
        {"t": 300.0, "event": "campaign_start"},  # the current run
    ]


def test_profiles_of_several_driver_runs_add_up():
    merged = profile.from_events(_log())
    assert merged["al"]["md"] == {"wall_s": 10.0, "cpu_s": 10.0}
    assert merged["al"]["driver"] == {"wall_s": 26.0, "cpu_s": 23.0}
    assert merged["converge"]["training"]["cpu_s"] == 30.0
    _, _, earlier = _earlier_segments(_log())  # the summary's view: every run before the current one
    assert profile.merge(earlier) == merged
    assert profile.merge([None, {"al": "damaged"}, {"al": {"md": {"cpu_s": None}}}]) == {"al": {"md": _cell(0, 0)}}


def test_the_table_has_a_row_per_phase_and_a_total():
    lines = profile.render(profile.from_events(_log()))
    header, *rows, wall = lines
    assert header.split() == ["cpu", "profile", "(s)", "md", "uncert", "train", "labels", "io", "wait", "other",
                              "total"]
    table = {row.split()[0]: [float(v) for v in row.split()[1:]] for row in rows}
    assert list(table) == ["idg", "al", "converge", "other", "total"]  # phase order, 'other' last
    # idg: md 12, train 40, labels 30 (worker CPU), wait 0.5; other = 54 - 52.5; total = 54 + 30
    assert table["idg"] == [12.0, 0.0, 40.0, 30.0, 0.0, 0.5, 1.5, 84.0]
    assert table["al"] == [10.0, 1.0, 10.0, 6.0, 1.0, 0.0, 1.0, 29.0]
    assert table["total"][-1] == pytest.approx(sum(t[-1] for name, t in table.items() if name != "total"))
    assert wall.startswith("wall by phase (s)") and "idg 75.0" in wall and "al 26.0" in wall
    assert "labels 68.0 on the workers" in wall


def test_no_profile_renders_nothing():
    assert profile.render(None) == [] and profile.render({}) == []
    assert profile.from_events([{"t": 0.0, "event": "campaign_end", "seconds": {}}]) == {}
