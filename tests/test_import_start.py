"""Campaigns that start from what users have: labelled data and existing MACE models.

The finished tiny campaign of the session provides both: its exported extxyz files (labelled by
EMT, the same reference) and its member model files.
"""

from __future__ import annotations

import shutil

import ase.io
import pytest
import torch
from campaign_helpers import tiny_config

from aimspax_like.campaign import run_campaign
from aimspax_like.cli import main
from aimspax_like.config import EMTReference, config_from_dict
from aimspax_like.data import DatasetStore, reference_fingerprint
from aimspax_like.data.provenance import MixedReferences
from aimspax_like.errors import ConfigError
from aimspax_like.events import read_events
from aimspax_like.start import load_start_members


def import_config(tmp_path, finished, **overrides) -> dict:
    run, _ = finished
    sources = overrides.pop("import_data", None)
    config = tiny_config(tmp_path, **overrides)
    config["import_data"] = sources or [
        {"path": str(run / "data/train.xyz"), "reference": "file"},
        {"path": str(run / "data/valid.xyz"), "reference": "file"},
    ]
    config["model"]["start_from"] = [str(p) for p in sorted((run / "models").glob("member_*.model"))]
    config["idg"] = {**config["idg"], "enabled": False}
    config["al"] = {**config["al"], "max_train_set_size": 40, "max_md_steps": 120}
    return config


@pytest.fixture(scope="module")
def imported_run(tmp_path_factory, finished_campaign, parsl_executor):
    tmp_path = tmp_path_factory.mktemp("imported")
    config = config_from_dict(import_config(tmp_path, finished_campaign))
    summary = run_campaign(config, executor=parsl_executor)
    return tmp_path / "run", summary


def test_a_campaign_starts_from_imported_frames_and_existing_models(imported_run, finished_campaign):
    run, summary = imported_run
    source_run, _ = finished_campaign
    n_train = len(ase.io.read(source_run / "data/train.xyz", ":"))
    n_valid = len(ase.io.read(source_run / "data/valid.xyz", ":"))
    exported = n_train + n_valid
    frames = DatasetStore(run / "data/dataset.h5").frames()
    imported = [f for f in frames if f.origin == "import"]
    assert summary["labels"]["import"] == len(imported) == exported
    assert summary["labels"]["idg"] == 0 and summary["labels"]["al"] > 0  # AL went on from there
    assert {f.reference for f in frames if f.origin in ("import", "al")} == {reference_fingerprint(EMTReference())}
    assert imported[0].source.endswith("train.xyz#0") and imported[-1].source.endswith(f"valid.xyz#{n_valid - 1}")
    # The valid file's frames stay validation frames; training frames are dealt to the members.
    assert all(f.split == "valid" for f in imported if "valid.xyz" in f.source)
    assert {f.member for f in imported if f.split == "train"} == {0, 1}
    events = read_events(run / "logs/events.jsonl")
    names = [e["event"] for e in events]
    assert names.count("data_imported") == 2 and "start_models" in names
    start = next(e for e in events if e["event"] == "start_models")
    assert len(start["files"]) == 2 and start["perturbed"] is False
    assert next(e for e in events if e["event"] == "phase_skipped")["phase"] == "idg"
    assert summary["test"]["all"]["final"]["force_mae"] < 1.0  # a working model at the end


def test_a_resumed_campaign_never_imports_a_frame_twice(tmp_path, finished_campaign, parsl_executor):
    config = config_from_dict(import_config(tmp_path, finished_campaign, al={"enabled": False},
                                            converge={"enabled": False}, test_set={"size": 0}))
    run_campaign(config, executor=parsl_executor)
    first = DatasetStore(tmp_path / "run/data/dataset.h5").frames()
    assert run_campaign(config, executor=parsl_executor, resume=True)["already_finished"]
    (tmp_path / "run/state/phases.json").unlink()  # as if killed before IDG ended
    run_campaign(config, executor=parsl_executor, resume=True)
    again = DatasetStore(tmp_path / "run/data/dataset.h5").frames()
    assert len(again) == len(first)
    imported = [e for e in read_events(tmp_path / "run/logs/events.jsonl") if e["event"] == "data_imported"]
    assert [e["new"] for e in imported] == [len([f for f in first if "train.xyz" in f.source]),
                                            len([f for f in first if "valid.xyz" in f.source]), 0, 0]


def test_one_start_file_for_all_members_gives_perturbed_readouts(tmp_path, finished_campaign):
    run, _ = finished_campaign
    config = config_from_dict({**tiny_config(tmp_path), "model": {
        **tiny_config(tmp_path)["model"], "ensemble_size": 3, "start_from": str(run / "models/member_0.model")}})
    members = load_start_members(config, [29, 79])
    original = torch.load(run / "models/member_0.model", weights_only=False)
    params = [dict(m.named_parameters()) for m in (original, *members)]
    for name, value in params[0].items():
        assert torch.equal(params[1][name], value)  # member 0: the file exactly
        for other in params[2:]:
            assert torch.equal(other[name], value) == ("readouts" not in name), name
    assert not torch.equal(params[2]["readouts.0.linear.weight"], params[3]["readouts.0.linear.weight"])


def test_the_provenance_guard_refuses_two_levels_of_theory(tmp_path, finished_campaign, capsys):
    run, _ = finished_campaign
    data = import_config(tmp_path, finished_campaign, import_data=[
        {"path": str(run / "data/train.xyz"), "reference": "PBE0/def2-TZVP"}])
    with pytest.raises(MixedReferences) as caught:
        run_campaign(config_from_dict(data))
    message = str(caught.value)
    assert "PBE0/def2-TZVP" in message and reference_fingerprint(EMTReference()) in message
    assert "training.allow_mixed_references" in message and "\n" not in message
    assert not (tmp_path / "run").exists()  # refused before anything was written
    # The CLI: one line, exit code 2.
    import yaml

    (tmp_path / "mixed.yaml").write_text(yaml.safe_dump(data))
    assert main(["run", str(tmp_path / "mixed.yaml"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: training.allow_mixed_references: the training data mix")
    assert not (tmp_path / "run").exists()
    # Said on purpose: allowed.
    from aimspax_like.campaign import check_inputs, check_start

    data["training"] = {**data["training"], "allow_mixed_references": True}
    allowed = config_from_dict(data)
    frames = check_start(allowed, check_inputs(allowed))
    assert {f.reference for f in frames} == {"PBE0/def2-TZVP"}


@pytest.mark.parametrize(("change", "key", "words"), [
    ({"path": "missing.xyz"}, "import_data.0.path", "file not found"),
    ({"energy_key": "E_dft"}, "import_data.0.path", "import_data.0.energy_key"),
    ({"reference": "file", "path": "plain.xyz"}, "import_data.0.reference", "has no 'reference' key"),
    ({"path": "frames.cif"}, "import_data.0.path", "expected an extended XYZ"),
])
def test_bad_import_sources_are_one_line_before_anything_is_written(tmp_path, finished_campaign, change, key, words):
    run, _ = finished_campaign
    plain = ase.io.read(run / "data/train.xyz", ":")
    for atoms in plain:
        atoms.info.pop("reference", None)
    ase.io.write(tmp_path / "plain.xyz", plain)
    shutil.copy(run / "data/train.xyz", tmp_path / "frames.cif")
    source = {"path": str(run / "data/train.xyz"), "reference": "campaign", **change}
    if not source["path"].startswith("/"):
        source["path"] = str(tmp_path / source["path"])
    with pytest.raises(ConfigError) as caught:
        run_campaign(config_from_dict(import_config(tmp_path, finished_campaign, import_data=[source])))
    assert caught.value.key == key and words in caught.value.message
    assert not (tmp_path / "run").exists()


def test_start_models_that_cannot_serve_are_refused(tmp_path, finished_campaign):
    run, _ = finished_campaign
    data = tiny_config(tmp_path)
    data["model"]["start_from"] = str(run / "models/member_0.model")
    (tmp_path / "silver.xyz").write_text("2\n\nAg 0 0 0\nAg 0 0 2.8\n")
    data["system"]["structures"] = str(tmp_path / "silver.xyz")
    with pytest.raises(ConfigError, match="knows no Ag"):
        run_campaign(config_from_dict(data))
    data["model"]["start_from"] = str(tmp_path / "silver.xyz")
    with pytest.raises(ConfigError, match="not a MACE model file"):
        run_campaign(config_from_dict(data))
    data["model"]["start_from"] = [str(run / "models/member_0.model")] * 3
    with pytest.raises(ConfigError, match="one for all members or one per member"):
        config_from_dict(data)
    assert not (tmp_path / "run").exists()


def test_import_and_start_model_paths_resolve_against_the_config_folder(tmp_path):
    from aimspax_like.config import load_config

    (tmp_path / "configs").mkdir()
    (tmp_path / "configs/c.yaml").write_text(
        "system: {structures: s.xyz}\nreference: {kind: emt}\n"
        "import_data: [{path: ../runs/a/data/train.xyz, reference: file}]\n"
        "model: {ensemble_size: 2, start_from: [../m0.model, /abs/m1.model]}\n")
    config = load_config(tmp_path / "configs/c.yaml")
    assert config.import_data[0].path == tmp_path / "configs/../runs/a/data/train.xyz"
    assert config.model.start_from == [str(tmp_path / "configs/../m0.model"), "/abs/m1.model"]
    (tmp_path / "configs/c.yaml").write_text(
        "system: {structures: s.xyz}\nreference: {kind: emt}\nmodel: {start_from: mace-mp-0-small}\n")
    assert load_config(tmp_path / "configs/c.yaml").model.start_from == ["mace-mp-0-small"]
