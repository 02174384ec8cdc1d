"""``aimspax-like otf``: an on-the-fly MD run in a run directory, its report, its bad inputs,
and a SIGKILL in the middle that loses no label and computes none twice.

The 6-atom Cu/Au cluster of ``campaign_helpers``, EMT as the reference and a 2-member 8-channel
committee keep a 120-step run to ~20 s on 2 cores.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import yaml
from ase.calculators.calculator import all_changes
from ase.calculators.emt import EMT
from ase.io import read
from campaign_helpers import tiny_config

from aimspax_like.cli import main
from aimspax_like.data import DatasetStore
from aimspax_like.events import read_events

HERE = __name__  # for the 'import' reference kind (module:Name)


class FlakyEMT(EMT):
    """EMT whose every third calculation fails, standing for a DFT code whose SCF does not
    always converge (labels run in the test's process, so the count is the run's)."""

    calls = 0

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        FlakyEMT.calls += 1
        if FlakyEMT.calls % 3 == 0:
            raise RuntimeError("SCF did not converge (injected)")
        super().calculate(atoms, properties, system_changes)


def otf_config(tmp_path: Path, **otf) -> Path:
    config = tiny_config(tmp_path)
    for key in ("idg", "al", "converge", "test_set"):
        config.pop(key)
    config["otf"] = {
        "steps": 120, "md": {"temperature_K": 500, "friction_per_fs": 0.02},
        "trigger": {"measure": "forces", "threshold": 0.2},
        "start": {"frames": 4, "source": "relax", "epochs": 40},
        "write_every": 5, "checkpoint_every": 20, "validate_frames": 5, "log_every": 10, **otf,
    }
    path = tmp_path / "otf.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _otf_frames(run: Path) -> list:
    return DatasetStore.open(run / "data" / "dataset.h5").frames(origin="al")


def test_otf_run_labels_stores_learns_and_reports(tmp_path: Path, capsys) -> None:
    path = otf_config(tmp_path, temperature_ramp=[[0, 300], [60, 700]])
    assert main(["otf", str(path), "--quiet"]) == 0
    run = tmp_path / "run"
    out = capsys.readouterr().out
    assert "labels at step 1000" in out and "force MAE" in out

    store = DatasetStore.open(run / "data" / "dataset.h5")
    keys = store.keys()
    assert len(keys) == len(set(keys)), "a frame stored twice"
    labels = _otf_frames(run)
    starts = store.frames(origin="idg")
    checks = store.frames(origin="test")
    assert len(starts) == 4 and all(f.source == "otf_start" for f in starts)
    assert 0 < len(labels) < 121, "the committee should answer some steps alone and need the reference at others"
    assert all(f.source == "otf" for f in labels)
    assert {f.split for f in labels} == {"train", "valid"}
    for frame in [*labels, *starts, *checks]:
        assert np.isfinite(frame.energy) and np.isfinite(frame.forces).all()

    events = read_events(run / "logs" / "events.jsonl")
    computed = [e for e in events if e["event"] == "otf_label" and not e["reused"]]
    assert sorted(e["step"] for e in computed) == sorted(f.md_step for f in labels)
    assert all(e["error_forces"] >= 0 for e in computed)

    summary = json.loads((run / "report" / "otf.json").read_text())
    assert summary["steps"] == 120 and summary["finished"]
    assert summary["labels"]["cumulative"]["total"] == len(labels)
    assert sum(summary["labels"]["per_1000_steps"]) == len(labels)
    check = summary["check"]
    assert check["frames"] == len(checks) == 5
    assert 0 < check["force_mae_eV_A"] < 2.0 and check["max_force_error_eV_A"] >= check["force_mae_eV_A"]
    assert summary["timings"]["training_s"] > 0 and summary["timings"]["reference_s"] > 0
    assert (run / "report" / "otf.png").stat().st_size > 0
    assert len(list((run / "models").glob("member_*.model"))) == 2

    frames = read(run / "otf" / "trajectory.xyz", ":")
    written = [a.info["step"] for a in frames]
    assert set(range(0, 121, 5)) <= set(written)
    assert written == sorted(written) and len(written) == len(set(written))
    targets = {a.info["step"]: a.info["target_K"] for a in frames}
    assert (targets[0], targets[30], targets[120]) == pytest.approx((300, 500, 700))
    # A checked frame was answered by the committee alone; the reference's number differs from it.
    by_step = {a.info["step"]: a for a in frames}
    for frame in checks:
        assert not by_step[frame.md_step].info["labelled"]

    # status and report know an on-the-fly run; the report reuses the stored check frames.
    assert main(["status", str(run)]) == 0
    assert "finished; MD step 120 of 120" in capsys.readouterr().out
    assert main(["status", str(run), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["labels_stored"] == len(labels)
    assert main(["report", str(run)]) == 0
    assert "force MAE" in capsys.readouterr().out
    assert len(DatasetStore.open(run / "data" / "dataset.h5").frames(origin="test")) == 5

    # Finished: running it again with --resume does nothing new.
    assert main(["otf", str(path), "--quiet", "--resume"]) == 0
    assert len(_otf_frames(run)) == len(labels)
    # A longer run continues from where it ended (otf.steps may change on resume; the trigger may not).
    data = yaml.safe_load(path.read_text())
    data["otf"]["steps"] = 150
    path.write_text(yaml.safe_dump(data))
    assert main(["otf", str(path), "--quiet", "--resume"]) == 0
    assert json.loads((run / "report" / "otf.json").read_text())["steps"] == 150
    steps = [a.info["step"] for a in read(run / "otf" / "trajectory.xyz", ":")]
    assert steps == sorted(set(steps)) and steps[-1] == 150
    data["otf"]["trigger"]["threshold"] = 0.5
    path.write_text(yaml.safe_dump(data))
    assert main(["otf", str(path), "--quiet", "--resume"]) == 2


@pytest.mark.parametrize(("change", "key"), [
    ({"otf": {"stepz": 3}}, "otf.stepz"),
    ({"otf": {"md": {"ensemble": "npt_berendsen"}}}, "otf.md.ensemble"),
    ({"otf": {"trigger": {"threshold": "high"}}}, "otf.trigger.threshold"),
    ({"otf": {"start": {"models": ["missing.model"]}}}, "otf.start.models"),
    ({"otf": {"temperature_ramp": [[100, 300], [50, 600]]}}, "otf.temperature_ramp"),
])
def test_bad_otf_input_is_one_line_exit_2_and_writes_nothing(tmp_path: Path, capsys, change, key) -> None:
    path = otf_config(tmp_path)
    data = yaml.safe_load(path.read_text())
    for section, values in change.items():
        for name, value in values.items():
            current = data[section].get(name)
            merge = isinstance(current, dict) and isinstance(value, dict)
            data[section][name] = {**current, **value} if merge else value
    path.write_text(yaml.safe_dump(data))
    assert main(["otf", str(path), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {key}")
    assert not (tmp_path / "run").exists()


def test_existing_run_directory_needs_overwrite_or_resume(tmp_path: Path, capsys) -> None:
    path = otf_config(tmp_path)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("mine")
    assert main(["otf", str(path), "--quiet"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["otf", str(path), "--quiet", "--resume"]) == 2  # not an on-the-fly run: refused, kept
    assert (tmp_path / "run" / "notes.txt").read_text() == "mine"


def test_failed_labels_rewind_the_md_and_are_never_stored(tmp_path: Path) -> None:
    path = otf_config(tmp_path, steps=60, validate_frames=0, max_failures=8)
    data = yaml.safe_load(path.read_text())
    data["reference"] = {"kind": "import", "path": f"{HERE}:FlakyEMT"}
    data["otf"]["start"]["source"] = "rattle"
    path.write_text(yaml.safe_dump(data))
    assert main(["otf", str(path), "--quiet"]) == 0
    run = tmp_path / "run"
    events = read_events(run / "logs" / "events.jsonl")
    rewinds = [e for e in events if e["event"] == "otf_rewind"]
    # A start frame whose label failed was replaced by another rattled copy.
    assert len(DatasetStore.open(run / "data" / "dataset.h5").frames(origin="idg")) == 4
    assert rewinds, "about one label in three fails: some rewinds must have happened"
    assert all(e["to_step"] <= e["step"] for e in rewinds)
    labels = _otf_frames(run)
    computed = sorted(e["step"] for e in events if e["event"] == "otf_label" and not e["reused"])
    assert computed == sorted(f.md_step for f in labels)
    summary = json.loads((run / "report" / "otf.json").read_text())
    assert summary["steps"] == 60
    steps = [a.info["step"] for a in read(run / "otf" / "trajectory.xyz", ":")]
    assert steps == sorted(set(steps)), "frames of a rewound stretch were kept beside their replay"


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-c", "import sys; from aimspax_like.cli import main; sys.exit(main(sys.argv[1:]))", *args]


def test_sigkill_and_resume_lose_no_label_and_repeat_none(tmp_path: Path) -> None:
    path = otf_config(tmp_path, steps=160, checkpoint_every=1000)
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    log = tmp_path / "first.log"
    with log.open("wb") as sink:
        proc = subprocess.Popen(_cli("otf", str(path), "--quiet"), env=env, cwd=tmp_path,
                                stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
    events_file = run / "logs" / "events.jsonl"
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            labels = [e for e in read_events(events_file) if e["event"] == "otf_label"] if events_file.exists() else []
            if len(labels) >= 6:
                break
            time.sleep(0.05)
        assert proc.poll() is None, f"the run ended before it could be killed: {log.read_text()[-2000:]}"
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    before = read_events(events_file)
    computed_before = [e["step"] for e in before if e["event"] == "otf_label" and not e["reused"]]
    stored_before = sorted(f.md_step for f in _otf_frames(run))
    assert stored_before and computed_before

    done = subprocess.run(_cli("resume", str(run), "--quiet"), env=env, cwd=tmp_path, capture_output=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    events = read_events(events_file)
    after = events[len(before):]
    assert after[0]["event"] == "otf_resume"
    computed = [e["step"] for e in events if e["event"] == "otf_label" and not e["reused"]]
    stored = [f.md_step for f in _otf_frames(run)]
    # Every reference call is stored once, and every stored label was computed once.
    assert sorted(computed) == sorted(stored)
    assert not [step for step, n in Counter(computed).items() if n > 1], "a label computed twice"
    assert set(stored_before) <= set(stored), "a label stored before the kill is gone"
    keys = DatasetStore.open(run / "data" / "dataset.h5").keys()
    assert len(keys) == len(set(keys))
    summary = json.loads((run / "report" / "otf.json").read_text())
    assert summary["steps"] == 160 and summary["labels"]["cumulative"]["total"] == len(stored)
    steps = [a.info["step"] for a in read(run / "otf" / "trajectory.xyz", ":")]
    assert steps == sorted(set(steps)), "trajectory frames repeated or out of order after the resume"


class _Killed(BaseException):
    """Stands for SIGKILL at one instant: nothing after it runs, nothing is cleaned up by the code."""


def test_label_stored_but_not_checkpointed_is_taken_from_the_dataset_on_resume(tmp_path: Path, monkeypatch) -> None:
    """The worst instant: a label is in the dataset, the checkpoint after it was never written.
    The resumed run replays the MD from the checkpoint before and, meeting the same geometry at
    the same step, takes the stored label instead of asking the reference again."""
    from aimspax_like import otf_run

    path = otf_config(tmp_path, steps=80, checkpoint_every=1000, validate_frames=0)
    real = otf_run._checkpoint

    def dies_after_third_label(run, done=False):
        if run.calculator.n_labels == 3 and not done:
            raise _Killed
        real(run, done)

    monkeypatch.setattr(otf_run, "_checkpoint", dies_after_third_label)
    with pytest.raises(_Killed):
        main(["otf", str(path), "--quiet"])
    run = tmp_path / "run"
    stored_before = [f.md_step for f in _otf_frames(run)]
    assert len(stored_before) == 3
    monkeypatch.setattr(otf_run, "_checkpoint", real)
    assert main(["resume", str(run), "--quiet"]) == 0

    events = read_events(run / "logs" / "events.jsonl")
    reused = [e for e in events if e["event"] == "otf_label" and e["reused"]]
    assert [e["step"] for e in reused] == [stored_before[-1]]
    computed = [e["step"] for e in events if e["event"] == "otf_label" and not e["reused"]]
    assert sorted(computed) == sorted(f.md_step for f in _otf_frames(run))
    assert len(computed) == len(set(computed))


def test_npt_on_a_periodic_cell_labels_stress_and_moves_the_cell(tmp_path: Path) -> None:
    """A barostat follows the calculator's stress: labels carry the reference's stress, the
    committee is trained on it, and the cell volume changes."""
    from ase.build import bulk

    from aimspax_like.data import DatasetStore as Store

    cell = bulk("Cu", "fcc", a=3.7, cubic=True).repeat((2, 1, 1))  # 8 atoms, 3 % too large for EMT
    cell.write(tmp_path / "cell.xyz")
    path = otf_config(tmp_path, steps=60, validate_frames=2,
                      md={"ensemble": "npt_berendsen", "temperature_K": 300, "taup_fs": 50,
                          "compressibility_per_bar": 1e-5},
                      start={"frames": 4, "source": "rattle", "rattle_A": 0.05, "epochs": 30})
    data = yaml.safe_load(path.read_text())
    data["system"]["structures"] = str(tmp_path / "cell.xyz")
    data["training"] = {"batch_size": 4, "stress_weight": 100.0}
    path.write_text(yaml.safe_dump(data))
    assert main(["otf", str(path), "--quiet"]) == 0
    run = tmp_path / "run"
    store = Store.open(run / "data" / "dataset.h5")
    frames = store.frames(origin="idg") + store.frames(origin="al")
    assert frames and all(f.stress is not None and np.isfinite(f.stress).all() for f in frames)
    volumes = [a.get_volume() for a in read(run / "otf" / "trajectory.xyz", ":")]
    assert abs(volumes[-1] - volumes[0]) > 1e-3 * volumes[0], "the barostat never moved the cell"
