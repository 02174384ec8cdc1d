"""A run directory that cannot be corrupted: what is refused up front, what stops a run mid-way.

Every refusal here is a ``SetupError`` (the CLI's one line and exit code 2) that leaves nothing
on disk when it could be known before the start; a stop mid-run keeps every stored label.
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from ase import Atoms
from ase.calculators.calculator import Calculator
from ase.io import write
from campaign_helpers import tiny_cluster, tiny_config

from aimspax_like.campaign import check_inputs, run_campaign
from aimspax_like.cli import main
from aimspax_like.config import config_from_dict
from aimspax_like.data import DatasetStore
from aimspax_like.errors import ConfigError, LabelsKeepFailing, RunDirectoryError, SetupError
from aimspax_like.events import read_events


class NeedsLicence(Calculator):
    """An ASE calculator whose constructor fails, as a licensed code without its licence server does."""

    def __init__(self, **kwargs) -> None:
        raise RuntimeError("no licence server")


def _config(tmp_path: Path, **overrides):
    return config_from_dict(tiny_config(tmp_path, **overrides))


def _refused_before_anything(tmp_path: Path, config, key: str) -> None:
    with pytest.raises(SetupError, match=key):
        run_campaign(config)
    assert not Path(config.output.directory).exists()


# --------------------------------------------------------------------------- up front


def test_overlapping_atoms_and_non_finite_coordinates_are_refused(tmp_path: Path) -> None:
    overlapping = tiny_cluster()
    overlapping.positions[1] = overlapping.positions[0] + [0.1, 0, 0]
    write(tmp_path / "overlap.xyz", overlapping)
    config = _config(tmp_path, system={"structures": str(tmp_path / "overlap.xyz")})
    with pytest.raises(ConfigError, match=r"atoms 0 and 1 are 0.10 A apart"):
        run_campaign(config)
    assert not (tmp_path / "run").exists()
    nan = tiny_cluster()
    nan.positions[2, 1] = np.nan
    write(tmp_path / "nan.xyz", nan)
    _refused_before_anything(tmp_path, _config(tmp_path, system={"structures": str(tmp_path / "nan.xyz")}),
                             "non-finite coordinates")


def test_npt_on_a_cluster_is_refused(tmp_path: Path) -> None:
    config = _config(tmp_path, al={"md": {"temperature_K": 400, "ensemble": "npt_berendsen"}})
    _refused_before_anything(tmp_path, config, r"al\.md\.ensemble: npt_berendsen needs periodic cells")


def test_pyscf_spin_must_fit_the_electrons(tmp_path: Path) -> None:
    write(tmp_path / "water.xyz", Atoms("OH2", positions=[[0, 0, 0], [0.96, 0, 0], [-0.24, 0.93, 0]]))
    config = _config(tmp_path, system={"structures": str(tmp_path / "water.xyz")},
                     reference={"kind": "pyscf", "spin": 1})
    _refused_before_anything(tmp_path, config, r"reference\.spin: spin \(2S\) 1 does not fit the 10 electrons")


@pytest.mark.parametrize(("path", "message"), [
    ("json:dumps", "calling 'json:dumps' failed"),
    ("os:path", "neither an ASE calculator class"),
    ("os:getcwd", "returned str, not an ASE calculator"),
    ("pathlib:Path", "the class Path, not an ASE calculator class"),
    ("test_run_directory:NeedsLicence", r"calling 'test_run_directory:NeedsLicence' failed \(RuntimeError: no licence"),
])
def test_an_import_that_is_not_a_calculator_is_refused_before_any_file(tmp_path: Path, path: str,
                                                                        message: str) -> None:
    config = _config(tmp_path, reference={"kind": "import", "path": path})
    _refused_before_anything(tmp_path, config, message)


def test_slurm_without_its_commands_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = _config(tmp_path)
    config.cluster = config_from_dict({**tiny_config(tmp_path), "cluster": {"kind": "slurm"}}).cluster
    monkeypatch.setenv("PATH", str(tmp_path / "no-bin"))
    with pytest.raises(ConfigError, match=r"cluster\.kind: slurm, but sbatch, squeue, scancel not found"):
        check_inputs(config)


def test_an_output_path_that_is_a_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "run").write_text("not a folder")
    with pytest.raises(ConfigError, match="exists and is not a directory"):
        run_campaign(_config(tmp_path))
    assert (tmp_path / "run").read_text() == "not a folder"


def test_a_refused_phase_leaves_no_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    raw = tiny_config(tmp_path)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw))
    assert main(["al", str(tmp_path / "c.yaml"), "--quiet"]) == 2
    assert "needs finished idg first" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # made for the lock, removed with it


# --------------------------------------------------------------------------- a started run directory


@pytest.fixture(scope="module")
def after_idg(tmp_path_factory, parsl_executor):
    """A run directory whose IDG has finished (the AL checkpoint does not exist yet)."""
    tmp_path = tmp_path_factory.mktemp("after_idg")
    raw = tiny_config(tmp_path, test_set={"size": 0})
    run_campaign(config_from_dict(raw), phases=("idg",), executor=parsl_executor)
    return tmp_path, raw


def _copy(after_idg, tmp_path: Path):
    import shutil

    source, raw = after_idg
    shutil.copytree(source / "run", tmp_path / "run")
    raw = {**raw, "output": {"directory": str(tmp_path / "run")}}
    (tmp_path / "run/campaign.yaml").write_text(
        (tmp_path / "run/campaign.yaml").read_text().replace(str(source / "run"), str(tmp_path / "run")))
    (tmp_path / "run/state/config_record.yaml").write_text((tmp_path / "run/campaign.yaml").read_text())
    return raw


def test_an_edited_campaign_yaml_is_refused_on_resume(after_idg, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    _copy(after_idg, tmp_path)
    record = tmp_path / "run/campaign.yaml"
    edited = yaml.safe_load(record.read_text())
    edited["model"]["channels"] = 16
    record.write_text(yaml.safe_dump(edited, sort_keys=False))
    before = sorted(p.name for p in (tmp_path / "run").rglob("*"))
    assert main(["resume", str(tmp_path / "run"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: model.channels: differs from the config"), err
    assert sorted(p.name for p in (tmp_path / "run").rglob("*")) == before
    edited["model"]["channels"] = 8  # a safe key may change (a budget)
    edited["al"]["max_md_steps"] = 50
    record.write_text(yaml.safe_dump(edited, sort_keys=False))
    from aimspax_like.campaign import _resumable

    assert _resumable(config_from_dict(edited)) is not None  # accepted, and now the record
    assert yaml.safe_load((tmp_path / "run/state/config_record.yaml").read_text())["al"]["max_md_steps"] == 50


def test_a_damaged_state_file_is_refused_before_anything_is_written(after_idg, tmp_path: Path) -> None:
    raw = _copy(after_idg, tmp_path)
    (tmp_path / "run/state/phases.json").write_bytes(b"\x00\xd7garbage")
    record = (tmp_path / "run/state/config_record.yaml").stat().st_mtime_ns
    with pytest.raises(RunDirectoryError, match=r"phases\.json: damaged \(UnicodeDecodeError\)"):
        run_campaign(config_from_dict(raw), resume=True)
    assert (tmp_path / "run/state/config_record.yaml").stat().st_mtime_ns == record


def test_a_deleted_dataset_is_refused_not_recreated(after_idg, tmp_path: Path) -> None:
    raw = _copy(after_idg, tmp_path)
    (tmp_path / "run/data/dataset.h5").unlink()
    with pytest.raises(RunDirectoryError, match=r"dataset\.h5: missing from a started run directory"):
        run_campaign(config_from_dict(raw), resume=True)
    with pytest.raises(SetupError, match="dataset store not found"):
        run_campaign(config_from_dict(raw), phases=("al",))
    assert not (tmp_path / "run/data/dataset.h5").exists()


def test_a_dataset_deleted_mid_run_stops_the_run(after_idg, tmp_path: Path, parsl_executor) -> None:
    raw = _copy(after_idg, tmp_path)
    dataset = tmp_path / "run/data/dataset.h5"
    frames = len(DatasetStore(dataset))

    def delete_once_al_runs() -> int:
        events = tmp_path / "run/logs/events.jsonl"
        if dataset.exists() and '"phase_start", "phase": "al"' in events.read_text():
            dataset.unlink()
        return 0

    with pytest.raises(SetupError, match="disappeared while the campaign ran"):
        run_campaign(config_from_dict(raw), phases=("al",), executor=parsl_executor,
                     should_stop=delete_once_al_runs)
    assert not dataset.exists() and frames > 0


def test_labels_that_keep_failing_stop_the_campaign_with_state_saved(after_idg, tmp_path: Path,
                                                                    parsl_executor) -> None:
    raw = _copy(after_idg, tmp_path)
    raw["faults"] = {"crash": 1.0}
    with pytest.raises(LabelsKeepFailing, match=r"10 failed tries in a row \(al; last: RuntimeError: injected crash"):
        run_campaign(config_from_dict(raw), resume=True, executor=parsl_executor)
    events = read_events(tmp_path / "run/logs/events.jsonl")
    failed = [e for e in events if e["event"] == "label_failed"]
    assert len(failed) == 10 and all(e["phase"] == "al" for e in failed)
    assert sum(e["retry"] for e in failed) >= 1  # crashes were retried on the way
    assert (tmp_path / "run/state/al_checkpoint.pt").exists()
    raw.pop("faults")  # fixed: the resume finishes
    summary = run_campaign(config_from_dict(raw), resume=True, executor=parsl_executor)
    assert summary["labels"]["al"] > 0
    # The summary covers every run of the driver (IDG, the stopped AL, the resume), not the last one.
    ends = [e for e in read_events(tmp_path / "run/logs/events.jsonl") if e["event"] == "campaign_end"]
    assert len(ends) == 3
    earlier = ends[0]["wall_s"] + ends[1]["wall_s"]
    # Above the earlier runs' total (not a share of the last run's: under load the part of the last
    # run after its summary can be half of it), and not above all three.
    assert earlier < summary["wall_s"]["total"] <= earlier + ends[2]["wall_s"] + 5
    assert summary["wall_s"]["training"] > ends[2]["seconds"]["training"]
    # So does its CPU profile: IDG ran in the first driver run only, AL's labels in the other two.
    profile = summary["profile"]
    assert profile["idg"]["training"]["cpu_s"] == pytest.approx(ends[0]["profile"]["idg"]["training"]["cpu_s"],
                                                                abs=2e-3)
    al_labels = [end["profile"]["al"]["labelling"]["cpu_s"] for end in ends[1:]]
    assert al_labels[0] > 0  # the failed tries cost CPU too
    assert profile["al"]["labelling"]["cpu_s"] == pytest.approx(sum(al_labels), abs=2e-3)


def test_cli_exit_code_3_for_a_stop_and_one_line(after_idg, tmp_path: Path) -> None:
    import subprocess

    raw = _copy(after_idg, tmp_path)
    raw["faults"] = {"crash": 1.0}
    raw["al"]["failures"] = {"max_consecutive": 2, "crashed_retries": 0}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw))
    done = subprocess.run([sys.executable, "-m", "aimspax_like.cli", "run", str(tmp_path / "c.yaml"), "--resume",
                           "--quiet"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 3, done.stderr[-2000:]
    lines = [line for line in done.stderr.strip().splitlines() if not line.startswith("warning:")]
    assert len(lines) == 1 and "labels keep failing" in lines[0] and "resume" in lines[0], done.stderr


def test_a_signal_is_not_blamed_on_the_reference() -> None:
    """Workers killed by the signal that stops the campaign must not trip the failure stop."""
    from aimspax_like.events import EventLog
    from aimspax_like.labelling import Labeller
    from aimspax_like.reference.results import FailureKind, LabelFailure

    stop = {"signum": 0}
    labeller = Labeller(None, {}, Path("."), EventLog(None), max_consecutive=2, should_stop=lambda: stop["signum"])
    lost = LabelFailure(FailureKind.CRASHED, "worker lost", None, 0.0)
    labeller.record_failure("al", lost)
    stop["signum"] = signal.SIGTERM
    labeller.record_failure("al", lost)  # would be the second in a row
    stop["signum"] = 0
    with pytest.raises(LabelsKeepFailing):
        labeller.record_failure("al", lost)
