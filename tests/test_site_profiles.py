"""Site profiles: a machine's settings filled into a campaign that names none of them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from aimspax_like.config import load_config
from aimspax_like.errors import ConfigError


def _write(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def _campaign(tmp_path: Path, **extra: object) -> Path:
    (tmp_path / "dimer.xyz").write_text("2\n\nCu 0 0 0\nCu 2.5 0 0\n")
    data = {"system": {"structures": "dimer.xyz"}, "reference": {"kind": "emt"},
            "output": {"directory": str(tmp_path / "run")}, **extra}
    return _write(tmp_path / "campaign.yaml", data)


SLURM_SITE = {
    "name": "cluster-a",
    "cluster": {"kind": "slurm",
                "provider": {"partition": "cpu", "account": "$PROJECT", "walltime": "02:00:00", "max_blocks": 4,
                             "worker_init": ["source $HOME/venv/bin/activate"]},
                "executor": {"worker_python": "~/venv/bin/python"}},
    "reference": {"cp2k": {"data_dir": "~/cp2k/data"}, "emt": {"timeout_s": 600}},
}


def test_profile_fills_in_and_expands_paths_but_not_shell_lines(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PROJECT", "chem42")
    site = _write(tmp_path / "a.yaml", SLURM_SITE)
    config = load_config(_campaign(tmp_path), site=str(site))
    provider = config.cluster.provider
    assert config.cluster.kind == "slurm" and provider.options() == {"partition": "cpu", "account": "chem42"}
    assert provider.worker_init == ["source $HOME/venv/bin/activate"]  # the job's shell expands it, on the node
    assert config.cluster.executor.worker_python == str(Path.home() / "venv/bin/python")
    assert config.reference.timeout_s == 600  # the block for the campaign's reference kind only
    assert config.site is None  # the values are in the config now; the record says where they came from
    record = config.site_record
    assert record["name"] == "cluster-a" and record["file"] == str(site.resolve())
    assert record["applied"]["cluster.provider.account"] == "chem42"
    assert record["applied"]["reference.timeout_s"] == 600
    assert "reference.data_dir" not in record["applied"]


def test_the_campaign_file_wins_and_another_cluster_kind_ignores_the_profile(tmp_path: Path,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PROJECT", "chem42")
    site = _write(tmp_path / "a.yaml", SLURM_SITE)
    mine = load_config(_campaign(tmp_path, cluster={"kind": "slurm", "provider": {"partition": "gpu"}}),
                       site=str(site))
    assert mine.cluster.provider.options() == {"partition": "gpu", "account": "chem42"}
    assert mine.cluster.provider.max_blocks == 4
    local = load_config(_campaign(tmp_path, cluster={"kind": "local", "max_workers": 3}), site=str(site))
    assert local.cluster.kind == "local" and local.cluster.max_workers == 3
    assert not any(key.startswith("cluster") for key in local.site_record["applied"])


def test_which_profile_applies(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PROJECT", "chem42")
    sites = tmp_path / "sites"
    sites.mkdir()
    _write(sites / "hpc.yaml", SLURM_SITE)
    _write(sites / "other.yaml", {"name": "other", "cluster": {"kind": "local", "max_workers": 5}})
    monkeypatch.setenv("AIMSPAX_SITE_DIR", str(sites))
    assert load_config(_campaign(tmp_path, site="hpc")).site_record["name"] == "cluster-a"  # by name
    assert load_config(_campaign(tmp_path, site="hpc"), site="other").site_record["name"] == "other"  # --site wins
    monkeypatch.setenv("AIMSPAX_SITE", "other")
    assert load_config(_campaign(tmp_path)).cluster.max_workers == 5  # the environment's, when the file names none
    assert load_config(_campaign(tmp_path, site=None)).site_record is None  # site: null means none
    with pytest.raises(ConfigError) as info:
        load_config(_campaign(tmp_path, site="nowhere"))
    assert info.value.key == "site" and "no site profile named 'nowhere'" in info.value.message


@pytest.mark.parametrize(("profile", "key", "text"), [
    ({"cluster": {"kind": "slurm", "provider": {"account": "$NO_SUCH_VARIABLE_X"}}},
     "site.cluster.provider.account", "$NO_SUCH_VARIABLE_X is not set"),
    ({"cluster": {"kind": "slurm", "provider": {"partiton": "cpu"}}},
     "cluster.provider.partiton", "set by site profile"),
    ({"clusters": {}}, "site.clusters", "unknown"),
    ({"driver": {"walltime": "00:10:00", "grace_s": 900}}, "site.driver.grace_s", "not shorter"),
    ({"driver": {"restart": "again"}}, "site.driver.restart", "requeue"),
])
def test_bad_profiles_name_the_key(tmp_path: Path, profile: dict, key: str, text: str) -> None:
    site = _write(tmp_path / "bad.yaml", profile)
    with pytest.raises(ConfigError) as info:
        load_config(_campaign(tmp_path), site=str(site))
    assert info.value.key == key and text in info.value.message, str(info.value)


def test_a_run_records_the_profile_and_what_it_set(tmp_path: Path) -> None:
    from campaign_helpers import tiny_config

    from aimspax_like.cli import main

    data = tiny_config(tmp_path, idg={"max_set_size": 6}, al={"max_md_steps": 10, "max_train_set_size": 6},
                       test_set={"size": 0})
    data["site"] = "site.yaml"
    _write(tmp_path / "campaign.yaml", data)
    _write(tmp_path / "site.yaml", {"name": "laptop", "cluster": {"kind": "local", "max_workers": 1}})
    assert main(["run", str(tmp_path / "campaign.yaml"), "--quiet"]) == 0
    recorded = yaml.safe_load((tmp_path / "run" / "site.yaml").read_text())
    assert recorded["name"] == "laptop" and recorded["applied"] == {"cluster.kind": "local", "cluster.max_workers": 1}
    assert yaml.safe_load((tmp_path / "run" / "campaign.yaml").read_text())["cluster"]["max_workers"] == 1
    events = [json.loads(line) for line in (tmp_path / "run" / "logs" / "events.jsonl").read_text().splitlines()]
    assert [e["name"] for e in events if e["event"] == "site_profile"] == ["laptop"]
    # The run directory's campaign.yaml holds the values: it resumes without the profile.
    (tmp_path / "site.yaml").unlink()
    assert main(["resume", str(tmp_path / "run"), "--quiet"]) == 0
