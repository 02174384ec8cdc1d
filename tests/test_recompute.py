"""``aimspax-like recompute``: a finished run relabelled at another level of theory, resumably.

The finished tiny campaign (EMT Cu4Au2, read-only) is relabelled with Lennard-Jones or with EMT
under injected faults, on the session's Parsl workers. The CLI tests lend that executor to the
command (``make_label_executor`` is patched to hand it over), so they start no Parsl of their own.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from ase import Atoms
from ase.calculators.lj import LennardJones

from aimspax_like.cli import main
from aimspax_like.config import LJReference
from aimspax_like.data import DatasetStore, reference_fingerprint
from aimspax_like.data.frames import source_tag
from aimspax_like.errors import CampaignInterrupted, LabelsKeepFailing, RunDirectoryError
from aimspax_like.events import read_events
from aimspax_like.recompute import RecomputeOptions, compare_levels, recompute

LJ = {"kind": "lj", "sigma": 2.3, "epsilon": 0.05}


def _yaml(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _lj_file(folder: Path) -> Path:
    return _yaml(folder / "lj.yaml", "reference:\n  kind: lj\n  sigma: 2.3\n  epsilon: 0.05\n")


def _emt_file(folder: Path, faults: str = "", name: str = "emt.yaml") -> Path:
    return _yaml(folder / name, "reference:\n  kind: emt\n" + (f"faults:\n{faults}" if faults else ""))


def _events(out: Path, name: str | None = None, phase: str | None = None) -> list[dict]:
    return [e for e in read_events(out / "logs" / "events.jsonl")
            if (name is None or e["event"] == name) and (phase is None or e.get("phase") == phase)]


def _sources(out: Path) -> list[int]:
    return [int(f.source.rsplit("#", 1)[1]) for f in DatasetStore(out / "data" / "dataset.h5").frames()]


def _stored_after(out: Path, count: int):
    """A ``should_stop`` that asks for SIGINT once ``count`` labels are stored in NEW_RUN."""
    store = out / "data" / "dataset.h5"
    return lambda: signal.SIGINT if store.exists() and len(DatasetStore(store)) >= count else 0


class _Lent:
    """The session's executor lent to the command: entering and leaving it starts and stops nothing."""

    def __init__(self, inner, on_submit=None) -> None:
        self.inner, self.on_submit, self.submitted = inner, on_submit, 0

    @property
    def n_workers(self) -> int:
        return self.inner.n_workers

    def submit(self, *args, **kwargs):
        self.submitted += 1
        if self.on_submit is not None:
            self.on_submit(self.submitted)
        return self.inner.submit(*args, **kwargs)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        return None


@pytest.fixture
def lend(monkeypatch, parsl_executor):
    """``lend(on_submit=None)``: the CLI's executor becomes the session's one."""
    def patch(on_submit=None) -> _Lent:
        lent = _Lent(parsl_executor, on_submit)
        monkeypatch.setattr("aimspax_like.execution.make_label_executor", lambda *args, **kwargs: lent)
        return lent
    return patch


def test_relabelled_run_keeps_provenance_and_compares_the_two_levels(finished_campaign, parsl_executor, tmp_path):
    source_run = finished_campaign[0]
    run = tmp_path / "run"
    shutil.copytree(source_run, run, ignore=shutil.ignore_patterns("parsl"))
    originals = DatasetStore(run / "data" / "dataset.h5").frames()
    summary = recompute(RecomputeOptions(run_dir=run, reference=_lj_file(tmp_path)), executor=parsl_executor)

    out = tmp_path / "run-lj"  # the default: beside RUN, named after the reference kind
    new = DatasetStore(out / "data" / "dataset.h5").frames()
    assert len(new) == len(originals) == summary["relabelled"] == summary["frames"]
    fingerprint = reference_fingerprint(LJReference(**LJ))  # every default written out, as a run does
    dataset = (run / "data" / "dataset.h5").resolve()
    for frame in new:
        k = int(frame.source.rsplit("#", 1)[1])
        old = originals[k]
        assert frame.source == source_tag(dataset, k)
        assert (frame.split, frame.origin, frame.trajectory, frame.md_step, frame.member) == \
            (old.split, old.origin, old.trajectory, old.md_step, old.member)
        assert frame.uncertainty == old.uncertainty or (np.isnan(frame.uncertainty) and np.isnan(old.uncertainty))
        assert frame.reference == fingerprint and frame.label_wall_s > 0
        assert np.array_equal(frame.positions, old.positions)
        atoms = Atoms(numbers=old.numbers, positions=old.positions, cell=old.cell, pbc=old.pbc)
        atoms.calc = LennardJones(sigma=2.3, epsilon=0.05, smooth=True)  # the config default
        assert frame.energy == pytest.approx(atoms.get_potential_energy(), abs=1e-9)
        assert np.allclose(frame.forces, atoms.get_forces(), atol=1e-9)

    # The two levels compared over the relabelled frames, as the numbers say they should be.
    report = json.loads((out / "report" / "recompute.json").read_text())
    pairs = [(originals[int(f.source.rsplit("#", 1)[1])], f) for f in new]
    diff = np.concatenate([(n.forces - o.forces).ravel() for o, n in pairs])
    delta = np.array([(n.energy - o.energy) / len(o) for o, n in pairs]) * 1000
    cmp = report["comparison"]
    assert cmp["frames"] == len(new)
    assert cmp["force_rmsd_meV_A"] == pytest.approx(1000 * np.sqrt(np.mean(diff**2)))
    assert cmp["force_mae_meV_A"] == pytest.approx(1000 * np.mean(np.abs(diff)))
    assert cmp["energy_offset_meV_atom"] == pytest.approx(delta.mean())
    assert cmp["energy_spread_meV_atom"] == pytest.approx(delta.std())
    assert -1 <= cmp["energy_pearson_r"] <= 1
    splits = Counter(f.split for f in originals)
    assert {s: c for s, c in report["splits"].items() if c["before"]} == \
        {s: {"before": n, "after": n} for s, n in splits.items()}

    # NEW_RUN is a run directory that the config reader and later tools read like any other.
    from aimspax_like.config import load_config

    config = load_config(out / "campaign.yaml")
    assert config.reference.kind == "lj" and config.reference.sigma == 2.3 and Path(config.output.directory) == out
    assert (out / "state" / "config_record.yaml").read_text() == (out / "campaign.yaml").read_text()
    assert {p.name for p in (out / "data").glob("*.xyz")} == {f"{s}.xyz" for s in splits}
    from test_event_schema import documented

    doc = documented()
    for record in read_events(out / "logs" / "events.jsonl"):
        assert record["event"] in doc and set(record) - {"t", "event"} <= doc[record["event"]], record


def test_only_the_chosen_splits_are_relabelled_here_with_gfn2_xtb(finished_campaign, parsl_executor, tmp_path):
    pytest.importorskip("tblite")
    run = finished_campaign[0]
    originals = DatasetStore(run / "data" / "dataset.h5").frames()
    other = _yaml(tmp_path / "xtb.yaml", "reference:\n  kind: xtb\n  method: GFN2-xTB\n")
    summary = recompute(RecomputeOptions(run_dir=run, reference=other, out=tmp_path / "new", splits=("test", "valid")),
                        executor=parsl_executor)
    wanted = [k for k, f in enumerate(originals) if f.split in ("test", "valid")]
    assert sorted(_sources(tmp_path / "new")) == wanted and summary["frames"] == len(wanted)
    assert set(summary["splits"]) == {"test", "valid"}
    from tblite.ase import TBLite

    frame = DatasetStore(tmp_path / "new" / "data" / "dataset.h5").frame(0)
    atoms = Atoms(numbers=frame.numbers, positions=frame.positions)
    atoms.calc = TBLite(method="GFN2-xTB", verbosity=0)
    assert frame.energy == pytest.approx(atoms.get_potential_energy(), abs=1e-6)


def test_compare_levels_of_identical_labels_is_zero_and_r_one(finished_campaign):
    frames = DatasetStore(finished_campaign[0] / "data" / "dataset.h5").frames()
    cmp = compare_levels([(f, f) for f in frames])
    assert cmp["force_rmsd_meV_A"] == cmp["force_mae_meV_A"] == cmp["energy_offset_meV_atom"] == 0.0
    assert cmp["energy_pearson_r"] == pytest.approx(1.0)
    assert compare_levels([]) == {"frames": 0}


def test_interrupted_run_resumes_without_labelling_a_frame_twice(finished_campaign, parsl_executor, tmp_path):
    run = finished_campaign[0]
    total = len(DatasetStore(run / "data" / "dataset.h5"))
    other = _emt_file(tmp_path, "  delay_s: 0.15\n")
    options = RecomputeOptions(run_dir=run, reference=other, out=tmp_path / "new")
    with pytest.raises(CampaignInterrupted):
        recompute(options, executor=parsl_executor, should_stop=_stored_after(options.out, 5))
    first = _sources(options.out)
    assert 5 <= len(first) < total
    end = _events(options.out, "recompute_end")[-1]
    assert not end["complete"] and end["relabelled"] == len(first) and end["lost"] > 0

    summary = recompute(options, executor=parsl_executor)
    sources = _sources(options.out)
    assert sorted(sources) == list(range(total)) and len(set(sources)) == total  # all of them, each once
    assert summary["skipped"] == len(first) and summary["relabelled"] == total - len(first)
    starts = _events(options.out, "recompute_start")
    assert starts[1]["done"] == len(first) and starts[1]["resubmitted"] == end["lost"] == summary["resubmitted"]
    submitted = _events(options.out, "label_submitted", "recompute")
    assert len(submitted) == total + summary["resubmitted"]
    done = Counter(e["source"] for e in _events(options.out, "label_done", "recompute"))
    assert set(done.values()) == {1} and len(done) == total  # every label paid for once


def test_failed_labels_are_dropped_recorded_and_not_retried_unless_asked(finished_campaign, parsl_executor,
                                                                         tmp_path):
    run = finished_campaign[0]
    total = len(DatasetStore(run / "data" / "dataset.h5"))
    out = tmp_path / "new"
    faulty = RecomputeOptions(run_dir=run, reference=_emt_file(tmp_path, "  scf_failure: 0.3\n"), out=out)
    summary = recompute(faulty, executor=parsl_executor)
    failed = json.loads((out / "state" / "recompute.json").read_text())["failed"]
    dropped = {e["source"] for e in _events(out, "recompute_dropped")}
    assert dropped and set(map(int, failed)) == dropped and summary["dropped"]["total"] == len(dropped)
    assert {entry["kind"] for entry in failed.values()} == {"scf_not_converged"}
    assert set(_sources(out)) == set(range(total)) - dropped  # never stored, never NaN
    assert summary["comparison"]["frames"] == total - len(dropped)

    again = recompute(faulty, executor=parsl_executor)
    assert again["relabelled"] == 0 and again["skipped"] == total - len(dropped)
    assert _events(out, "recompute_start")[-1]["failed_before"] == len(dropped)
    assert len(_events(out, "label_submitted", "recompute")) == total  # nothing sent the second time

    healed = RecomputeOptions(run_dir=run, reference=_emt_file(tmp_path, name="healed.yaml"), out=out,
                              retry_failed=True)
    final = recompute(healed, executor=parsl_executor)  # faults are no reference setting: same NEW_RUN
    assert final["relabelled"] == len(dropped) and final["dropped"]["total"] == 0
    assert sorted(_sources(out)) == list(range(total))
    assert json.loads((out / "state" / "recompute.json").read_text())["failed"] == {}


def test_a_reference_that_always_fails_stops_and_its_frames_stay_to_do(finished_campaign, parsl_executor, tmp_path):
    options = RecomputeOptions(run_dir=finished_campaign[0], out=tmp_path / "new",
                               reference=_emt_file(tmp_path, "  scf_failure: 1.0\n"))
    with pytest.raises(LabelsKeepFailing):
        recompute(options, executor=parsl_executor)
    assert json.loads((options.out / "state" / "recompute.json").read_text())["failed"] == {}
    assert len(_events(options.out, "label_failed", "recompute")) == 10  # al.failures.max_consecutive


def test_a_new_run_of_another_run_or_reference_is_refused(finished_campaign, parsl_executor, tmp_path):
    run = finished_campaign[0]
    other_run = tmp_path / "other"
    shutil.copytree(run, other_run, ignore=shutil.ignore_patterns("parsl"))
    out = tmp_path / "new"
    recompute(RecomputeOptions(run_dir=run, reference=_lj_file(tmp_path), out=out, splits=("test",)),
              executor=parsl_executor)
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    with pytest.raises(RunDirectoryError, match=r"not .*other/data/dataset\.h5"):
        recompute(RecomputeOptions(run_dir=other_run, reference=_lj_file(tmp_path), out=out), executor=parsl_executor)
    with pytest.raises(RunDirectoryError, match="labelled with reference lj"):
        recompute(RecomputeOptions(run_dir=run, reference=_emt_file(tmp_path), out=out), executor=parsl_executor)
    (tmp_path / "occupied").mkdir()
    (tmp_path / "occupied" / "notes.txt").write_text("mine")
    with pytest.raises(RunDirectoryError, match="not a recompute"):
        recompute(RecomputeOptions(run_dir=run, reference=_lj_file(tmp_path), out=tmp_path / "occupied"),
                  executor=parsl_executor)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == before


@pytest.mark.parametrize("case", ["unknown_key", "unknown_reference_key", "no_reference", "missing_file",
                                  "not_a_mapping", "bad_spin", "stress_without_cell", "bad_splits", "not_a_run",
                                  "out_is_run"])
def test_bad_input_is_one_line_exit_2_and_nothing_written(finished_campaign, tmp_path, capsys, case):
    run = finished_campaign[0]
    other = tmp_path / "other.yaml"
    texts = {
        "unknown_key": "reference:\n  kind: lj\nmodel:\n  channels: 4\n",
        "unknown_reference_key": "reference:\n  kind: lj\n  sigmaa: 2\n",
        "no_reference": "cluster:\n  kind: local\n",
        "not_a_mapping": "- reference\n",
        "bad_spin": "reference:\n  kind: pyscf\n  spin: 1\n",  # Cu4Au2 has an even electron count
        "stress_without_cell": "reference:\n  kind: lj\n  compute_stress: true\n",
    }
    other.write_text(texts.get(case, "reference:\n  kind: lj\n"))
    args = ["recompute", str(run), "--reference", str(other), "--out", str(tmp_path / "new"), "--quiet"]
    if case == "missing_file":
        args[3] = str(tmp_path / "absent.yaml")
    elif case == "bad_splits":
        args += ["--splits", "train,trian"]
    elif case == "not_a_run":
        args[1] = str(tmp_path)
    elif case == "out_is_run":
        args[5] = str(run)
    expected = {"unknown_key": "model: unknown key", "unknown_reference_key": "reference.sigmaa: unknown key",
                "no_reference": "reference: required key is missing", "missing_file": "absent.yaml",
                "not_a_mapping": "other.yaml", "bad_spin": "reference.spin", "bad_splits": "--splits: trian",
                "stress_without_cell": "reference.compute_stress", "not_a_run": "not a run directory",
                "out_is_run": "--out"}[case]
    before = sorted(p.name for p in tmp_path.iterdir())
    run_files = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()}
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and expected in err[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()} == run_files


def test_cli_sigint_exits_130_and_the_same_command_finishes(finished_campaign, tmp_path, capsys, lend):
    run = finished_campaign[0]
    total = len(DatasetStore(run / "data" / "dataset.h5"))
    args = ["recompute", str(run), "--reference", str(_emt_file(tmp_path, "  delay_s: 0.1\n")),
            "--out", str(tmp_path / "new")]
    lend(on_submit=lambda n: os.kill(os.getpid(), signal.SIGINT) if n == 8 else None)
    assert main(args) == 130
    err = capsys.readouterr().err
    assert "stopped by SIGINT" in err and "--out" in err.splitlines()[-1]
    stored = len(_sources(tmp_path / "new"))
    assert stored < total

    lend()
    assert main([*args, "--quiet"]) == 0
    out = capsys.readouterr().out
    assert f"{total} of {total} in all" in out and f"skipped     {stored}" in out
    assert sorted(_sources(tmp_path / "new")) == list(range(total))


def test_cli_exit_3_when_labels_keep_failing(finished_campaign, tmp_path, capsys, lend):
    lend()
    args = ["recompute", str(finished_campaign[0]), "--reference",
            str(_emt_file(tmp_path, "  crash: 1.0\n")), "--out", str(tmp_path / "new"), "--quiet"]
    assert main(args) == 3
    assert "stopped: labels keep failing" in capsys.readouterr().err


@pytest.mark.slow
def test_a_real_sigint_to_the_command_and_a_resume(finished_campaign, tmp_path):
    """The installed command with its own Parsl workers, stopped by a real SIGINT mid-way."""
    run = finished_campaign[0]
    total = len(DatasetStore(run / "data" / "dataset.h5"))
    out = tmp_path / "new"
    args = [sys.executable, "-m", "aimspax_like.cli", "recompute", str(run), "--reference",
            str(_emt_file(tmp_path, "  delay_s: 0.4\n")), "--out", str(out), "--quiet"]
    process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # until the first label is stored
        if (out / "logs" / "events.jsonl").exists() and _events(out, "label_done", "recompute"):
            break
        time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130, err
    first = len(_sources(out))
    assert 0 < first < total
    done = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    sources = _sources(out)
    assert sorted(sources) == list(range(total))
    assert set(Counter(e["source"] for e in _events(out, "label_done", "recompute")).values()) == {1}


def test_a_relabelled_substructure_stays_a_substructure(finished_campaign, parsl_executor, tmp_path):
    """A piece relabelled at another level keeps its piece number, core mask and parent indices:
    stored as a whole frame, its buffer atoms' forces would train."""
    import dataclasses

    run = tmp_path / "run"
    shutil.copytree(finished_campaign[0], run, ignore=shutil.ignore_patterns("parsl"))
    store = DatasetStore(run / "data" / "dataset.h5")
    whole = next(f for f in store.frames() if f.split == "train")
    mask = np.arange(len(whole)) < 2
    store_piece = dataclasses.replace(whole, origin="al", trajectory=7, md_step=3, piece=0, stress=None,
                                      force_mask=mask, parent_index=np.arange(len(whole)) + 40)
    DatasetStore.open(run / "data" / "dataset.h5").append(store_piece)
    recompute(RecomputeOptions(run_dir=run, reference=_lj_file(tmp_path)), executor=parsl_executor)
    new = [f for f in DatasetStore(tmp_path / "run-lj" / "data" / "dataset.h5").frames() if f.is_piece]
    assert len(new) == 1 and new[0].piece == 0 and new[0].stress is None
    assert new[0].force_mask.tolist() == mask.tolist()
    assert new[0].parent_index.tolist() == (np.arange(len(whole)) + 40).tolist()
