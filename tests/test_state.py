"""Checkpoint files and config-change rules (no MACE, no Parsl: fast)."""

from __future__ import annotations

import os
import signal

import numpy as np
import pytest
import yaml

from aimspax_like.errors import AimspaxError, CampaignInterrupted, SetupError
from aimspax_like.signals import StopFlag
from aimspax_like.state import (
    FORMAT_VERSION,
    load_checkpoint,
    save_checkpoint,
    unsafe_changes,
    write_atomic,
)


def test_checkpoint_round_trip_keeps_arrays_and_rng_state(tmp_path):
    rng = np.random.default_rng(5)
    rng.normal(size=3)
    path = tmp_path / "state/ck.pt"
    save_checkpoint(path, {"positions": np.arange(6.0).reshape(2, 3), "rng": rng.bit_generator.state})
    state = load_checkpoint(path)
    assert state["format_version"] == FORMAT_VERSION
    np.testing.assert_array_equal(state["positions"], np.arange(6.0).reshape(2, 3))
    copy = np.random.default_rng()
    copy.bit_generator.state = state["rng"]
    assert copy.normal() == rng.normal()  # the trajectory's noise continues exactly
    assert [p.name for p in path.parent.iterdir()] == ["ck.pt"]  # no temporary left behind


def test_write_atomic_replaces_whole_file(tmp_path):
    path = tmp_path / "f.json"
    write_atomic(path, b"old")
    write_atomic(path, b"new")
    assert path.read_bytes() == b"new"


@pytest.mark.parametrize(("content", "message"), [
    (b"", "unreadable checkpoint"),
    (b"garbage\x00\x01", "unreadable checkpoint"),
])
def test_damaged_checkpoint_is_one_line_error(tmp_path, content, message):
    path = tmp_path / "ck.pt"
    path.write_bytes(content)
    with pytest.raises(SetupError, match=message):
        load_checkpoint(path)


def test_truncated_and_foreign_checkpoints_are_refused(tmp_path):
    import torch

    path = tmp_path / "ck.pt"
    save_checkpoint(path, {"x": np.zeros(1000)})
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(SetupError, match="unreadable checkpoint"):
        load_checkpoint(path)
    torch.save({"x": 1}, path)
    with pytest.raises(SetupError, match="no format_version"):
        load_checkpoint(path)
    torch.save({"format_version": FORMAT_VERSION + 1}, path)
    with pytest.raises(SetupError, match=f"format_version {FORMAT_VERSION + 1}"):
        load_checkpoint(path)


def _yaml(**sections) -> str:
    base = {"al": {"window": 400, "max_md_steps": 100, "max_train_set_size": 20},
            "cluster": {"kind": "local", "max_workers": 2}, "output": {"export_xyz": True}, "seed": 1}
    for key, value in sections.items():
        base[key] = {**base[key], **value} if isinstance(value, dict) else value
    return yaml.safe_dump(base)


def test_budget_cluster_and_output_may_change_on_resume():
    changed = _yaml(al={"max_md_steps": 900, "max_train_set_size": 50},
                    cluster={"kind": "slurm", "max_workers": 8}, output={"export_xyz": False})
    assert unsafe_changes(_yaml(), changed) == []


def test_anything_else_is_named():
    assert unsafe_changes(_yaml(), _yaml(al={"window": 100}, seed=2)) == ["al.window", "seed"]


def test_stop_flag_records_sigterm_and_restores_handlers():
    previous = signal.getsignal(signal.SIGTERM)
    flag = StopFlag().install()
    try:
        assert not flag
        os.kill(os.getpid(), signal.SIGTERM)
        assert flag.signum == signal.SIGTERM
        with pytest.raises(KeyboardInterrupt):  # a second signal stops at once
            os.kill(os.getpid(), signal.SIGTERM)
    finally:
        flag.uninstall()
    assert signal.getsignal(signal.SIGTERM) == previous
    assert "SIGTERM" in str(CampaignInterrupted(signal.SIGTERM))


def test_an_interruption_is_no_setup_error():
    """The CLI turns SetupErrors into exit code 2; a clean stop must keep its 128 + signum."""
    stopped = CampaignInterrupted(signal.SIGINT)
    assert isinstance(stopped, AimspaxError) and not isinstance(stopped, SetupError)
    assert stopped.signum == signal.SIGINT


def test_a_key_the_run_never_recorded_is_not_a_change():
    """A run directory started by an older engine (fewer keys) stays resumable after an upgrade."""
    saved = yaml.safe_load(_yaml())
    del saved["al"]["window"]  # as if the engine that started the run had no such key
    assert unsafe_changes(yaml.safe_dump(saved), _yaml()) == []
    assert unsafe_changes(_yaml(), yaml.safe_dump(saved)) == ["al.window"]  # a key that went away is one
