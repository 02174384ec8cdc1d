"""Phase switches, the exploration probe, start-structure checks and loud budgets, on the tiny campaign."""

from __future__ import annotations

import json

import numpy as np
import pytest
from ase.calculators.emt import EMT
from ase.io import read, write
from campaign_helpers import tiny_cluster, tiny_config

from aimspax_like.campaign import run_campaign
from aimspax_like.config import config_from_dict
from aimspax_like.data import DatasetStore
from aimspax_like.errors import ConfigError
from aimspax_like.events import read_events


def _events(run, name):
    return [e for e in read_events(run / "logs/events.jsonl") if e["event"] == name]


def test_al_disabled_goes_from_idg_to_converge_and_relax_is_kept(tmp_path, parsl_executor):
    config = config_from_dict(tiny_config(tmp_path, al={"enabled": False}, system={"relax": True},
                                          test_set={"size": 0}))
    summary = run_campaign(config, executor=parsl_executor)
    run = tmp_path / "run"
    store = DatasetStore.open(run / "data/dataset.h5")
    assert store.counts()["origin"]["al"] == 0 and store.counts()["origin"]["idg"] > 0
    assert [e["phase"] for e in _events(run, "phase_skipped")] == ["al"]
    assert json.loads((run / "state/phases.json").read_text())["done"] == ["idg", "al", "converge"]
    assert (run / "models/best.model").is_file() and summary["best_member"] is not None
    relaxed = read(run / "state/start_structures.xyz")
    relaxed.calc = EMT()
    assert np.linalg.norm(relaxed.get_forces(), axis=1).max() < 0.05
    assert _events(run, "relaxed")[0]["energy_drop"] > 0


def test_converge_disabled_keeps_al_models_and_still_measures_them(tmp_path, parsl_executor):
    config = config_from_dict(tiny_config(tmp_path, converge={"enabled": False}))
    summary = run_campaign(config, executor=parsl_executor)
    run = tmp_path / "run"
    assert [e["phase"] for e in _events(run, "phase_skipped")] == ["converge"]
    assert not (run / "models/best.model").exists()
    assert summary["test"] and summary["test"]["size"] > 0


def test_al_starting_at_its_budget_says_so(tmp_path, parsl_executor, capsys):
    config = config_from_dict(tiny_config(tmp_path, al={"max_train_set_size": 2}, test_set={"size": 0},
                                          converge={"max_epochs": 1}))
    run_campaign(config, executor=parsl_executor)
    warnings = _events(tmp_path / "run", "warning")
    assert any(w.get("key") == "al.max_train_set_size" for w in warnings)
    assert "al.max_train_set_size" in capsys.readouterr().err


def test_idg_and_al_both_disabled_is_a_config_error(tmp_path):
    config = config_from_dict(tiny_config(tmp_path, idg={"enabled": False}, al={"enabled": False}))
    with pytest.raises(ConfigError, match=r"converge\.enabled"):
        run_campaign(config)
    assert not (tmp_path / "run").exists()


def test_a_failing_probe_extends_idg_until_it_passes(tmp_path, parsl_executor, monkeypatch):
    import aimspax_like.idg as idg
    from aimspax_like.probe import ProbeResult

    calls = []

    def probe(committee, structures, config, steps, seed):
        calls.append(steps)
        return ProbeResult(len(calls) >= 3, 7 if len(calls) < 3 else steps, "" if len(calls) >= 3 else "fused")

    monkeypatch.setattr(idg, "probe_committee", probe)
    config = config_from_dict(tiny_config(tmp_path, idg={"max_epochs": 3, "probe_steps": 20},
                                          al={"max_train_set_size": 2}, test_set={"size": 0},
                                          converge={"enabled": False}))
    run_campaign(config, executor=parsl_executor)
    run = tmp_path / "run"
    end = next(e for e in _events(run, "phase_end") if e["phase"] == "idg")
    assert len(calls) == 3 and end["extra_rounds"] == 2 and end["probe"]["passed"]
    assert end["epochs"] == 3 * 3  # two rounds past max_epochs
    assert [p["passed"] for p in _events(run, "idg_probe")] == [False, False, True]


def test_the_real_probe_runs_guarded_committee_md(tmp_path, parsl_executor):
    config = config_from_dict(tiny_config(tmp_path, idg={"probe_steps": 15}, al={"max_train_set_size": 2},
                                          test_set={"size": 0}, converge={"enabled": False}))
    run_campaign(config, executor=parsl_executor)
    probes = _events(tmp_path / "run", "idg_probe")
    assert probes and all(p["steps"] <= 15 for p in probes)
    assert probes[-1]["passed"] == (probes[-1]["reason"] == "")


def test_a_start_far_from_a_minimum_is_flagged(tmp_path, parsl_executor):
    squeezed = tiny_cluster()
    squeezed.positions *= 0.8  # every Cu-Cu contact squeezed to ~2 A: IDG MD heats far past 400 K
    write(tmp_path / "squeezed.xyz", squeezed)
    overrides = tiny_config(tmp_path, al={"enabled": False}, test_set={"size": 0}, converge={"enabled": False},
                            idg={"max_epochs": 3, "probe_steps": 0})
    overrides["system"]["structures"] = str(tmp_path / "squeezed.xyz")
    run_campaign(config_from_dict(overrides), executor=parsl_executor)
    warnings = _events(tmp_path / "run", "warning")
    assert any(w.get("key") == "system.structures" and w["temperature_K"] > 800 for w in warnings)
