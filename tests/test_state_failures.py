"""Label failure policies of the AL scheduler: crashes retried, SCF failures discarded at once."""

from __future__ import annotations

import pytest
from ase.build import bulk
from test_scheduler import EMT_SPEC, SpreadCommittee

from aimspax_like.config import ALConfig, MDConfig, config_from_dict
from aimspax_like.errors import ConfigError
from aimspax_like.events import EventLog, read_events
from aimspax_like.execution import ThreadLabelExecutor
from aimspax_like.scheduler import ALScheduler


def _run(tmp_path, faults, **failures):
    config = ALConfig(num_trajectories=2, check_every=1, warmup=2, max_train_set_size=6, max_md_steps=200,
                      md=MDConfig(temperature_K=300), failures=failures)
    events = EventLog(tmp_path / "events.jsonl")
    stored = []
    executor = ThreadLabelExecutor(max_workers=2)
    scheduler = ALScheduler(
        config, SpreadCommittee(), executor,
        lambda atoms, result, provenance: stored.append(provenance) or _frame(atoms, result, provenance),
        events, EMT_SPEC, tmp_path / "labels", train_set_size=lambda: len(stored), faults=faults, seed=4,
    )
    for seed in (0, 1):
        atoms = bulk("Cu", "fcc", a=3.6, cubic=True)
        atoms.rattle(0.05, seed=seed)
        scheduler.add_trajectory(atoms)
    with executor:
        result = scheduler.run()
    events.close()
    return result, read_events(tmp_path / "events.jsonl")


def _frame(atoms, result, provenance):
    from aimspax_like.data import LabelledFrame

    return LabelledFrame.from_atoms(atoms, result.energy, result.forces, split="train", **provenance)


def test_crashes_are_retried_then_discarded(tmp_path):
    result, events = _run(tmp_path, {"crash": 0.5}, crashed_retries=2)
    failed = [e for e in events if e["event"] == "label_failed"]
    retried = [e for e in failed if e["retry"]]
    assert retried and all(e["kind"] == "crashed" for e in failed)
    assert result.labels_failed == len(failed) - len(retried)  # only exhausted labels count as lost
    assert result.labels_done >= 6  # labels still in flight at the stop are kept
    rewinds = [e for e in events if e["event"] == "rewind"]
    assert len(rewinds) == result.labels_failed  # a retry keeps the trajectory waiting


def test_scf_failures_are_never_retried(tmp_path):
    result, events = _run(tmp_path, {"scf_failure": 0.3}, crashed_retries=5)
    failed = [e for e in events if e["event"] == "label_failed"]
    assert failed and not any(e["retry"] for e in failed)
    assert result.labels_failed == len(failed)


def test_policy_is_part_of_the_config():
    config = config_from_dict({"system": {"structures": "x.xyz"}, "reference": {"kind": "emt"},
                               "al": {"failures": {"timed_out_retries": 2}}})
    assert config.al.failures.timed_out_retries == 2 and config.al.failures.crashed_retries == 1
    with pytest.raises(ConfigError, match=r"al\.failures\.crashed_retries"):
        config_from_dict({"system": {"structures": "x.xyz"}, "reference": {"kind": "emt"},
                          "al": {"failures": {"crashed_retries": -1}}})
