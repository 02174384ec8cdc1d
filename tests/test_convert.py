"""``aimspax-like convert``: an aims-PAX pair (aimsPAX.yaml + model.yaml) as one campaign YAML.

The input is the pair an aims-PAX v0.2 user ran on aspirin (tests/data/aimspax/), converted
through the CLI and read back with the campaign reader: every mapped key is checked by value,
every key without an equivalent must have its comment line, and bad input is one line.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import yaml

from aimspax_like.cli import main
from aimspax_like.config import load_config

DATA = Path(__file__).parent / "data" / "aimspax"
MD = {"ensemble": "langevin", "temperature_K": 500.0, "timestep_fs": 0.5, "friction_per_fs": 0.001}


def pair(folder: Path, aimspax: dict | None = None, model: dict | None = None) -> tuple[Path, Path]:
    """The shared pair in ``folder`` (changed by ``aimspax``/``model``: section -> keys, None deletes)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, changes in (("aimsPAX.yaml", aimspax), ("model.yaml", model)):
        data = yaml.safe_load((DATA / name).read_text())
        for section, keys in (changes or {}).items():
            if keys is None:
                data.pop(section, None)
                continue
            body = data.setdefault(section, {})
            for key, value in keys.items():
                if value is None:
                    body.pop(key, None)
                else:
                    body[key] = value
        (folder / name).write_text(yaml.safe_dump(data, sort_keys=False) if changes else (DATA / name).read_text())
        paths.append(folder / name)
    return paths[0], paths[1]


def convert(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["convert", *args])
    out, err = capsys.readouterr()
    return code, out.strip(), err.strip()


def comment_for(text: str, where: str) -> str:
    """The one comment line about ``where`` ('aimsPAX.yaml MD.MD_seed'); fails unless exactly one."""
    lines = [line for line in text.splitlines() if line.startswith(f"# {where}:")]
    assert len(lines) == 1, f"{where}: {lines}"
    return lines[0]


def test_the_shared_pair_converts_key_by_key(tmp_path, capsys):
    aimspax, model = pair(tmp_path)
    (tmp_path / "teacher.model").write_bytes(b"stands in for the file; the reader only resolves its path")
    code, out, err = convert(capsys, str(aimspax), str(model), "--output", str(tmp_path / "campaign.yaml"))
    assert code == 0, err
    assert out.startswith(f"wrote {tmp_path / 'campaign.yaml'}")
    config = load_config(tmp_path / "campaign.yaml")

    assert config.system.structures == [tmp_path / "aspirin.xyz"]  # MISC.path_to_geometry
    assert config.reference.kind == "mace" and config.reference.model == tmp_path / "teacher.model"
    m = config.model
    assert (m.ensemble_size, m.channels, m.max_L, m.r_max, m.num_interactions, m.radial_mlp, m.dtype, m.device) == (
        4, 16, 1, 5.0, 2, [32, 32, 32], "float32", "cpu")
    t = config.training
    assert (t.batch_size, t.valid_batch_size, t.lr, t.amsgrad, t.energy_weight, t.forces_weight) == (
        5, 5, 0.01, True, 1.0, 1000.0)
    idg = config.idg
    assert (idg.sampler, idg.foundation_model) == ("foundation", str(tmp_path / "teacher.model"))
    assert (idg.stride, idg.intermediate_epochs, idg.max_epochs, idg.valid_ratio) == (20, 5, 10, 0.2)
    assert idg.points_per_member == 4  # 5 points per member and round, 1 of them for validation
    assert idg.probe_steps == 0
    al = config.al
    assert (al.num_trajectories, al.c_x, al.check_every, al.max_epochs_per_point, al.intermediate_epochs) == (
        2, -0.1, 10, 2, 1)
    assert (al.max_train_set_size, al.train_set_counts, al.valid_ratio) == (40, "per_member", 0.2)
    assert al.guards.energy_outlier == 6.0 and al.guards.enabled  # this project's protections stay on
    for block in (idg.md, al.md, config.test_set.md):
        assert block.model_dump(include=set(MD)) == MD
    c = config.converge
    assert (c.enabled, c.members, c.max_epochs, c.patience) == (True, "best", 30, 30)
    assert (config.cluster.kind, config.cluster.max_workers) == ("local", 1)
    assert config.output.directory == Path("runs/aspirin") and config.seed == 42

    text = (tmp_path / "campaign.yaml").read_text()
    assert "comment below says why not; `aimspax-like init` writes a template with every key." in text
    assert "top-level seed" in comment_for(text, "aimsPAX.yaml MD.MD_seed")
    assert "aimspax-like resume" in comment_for(text, "aimsPAX.yaml MISC.create_restart")
    assert "nothing to set" in comment_for(text, "model.yaml ARCHITECTURE.model_choice")
    assert "nothing to set" in comment_for(text, "model.yaml ARCHITECTURE.interaction_first")
    budget = [line for line in text.splitlines() if line.startswith("# max_train_set_size: 40 counts per member")]
    assert len(budget) == 1 and "al.train_set_counts: per_member" in budget[0]
    assert any("idg.points_per_member counts training points only" in line for line in text.splitlines())


def test_every_input_key_is_mapped_or_commented(tmp_path, capsys):
    """Keys aims-PAX would ignore (a typo, a section it does not know) are comment lines, not lost."""
    aimspax, model = pair(tmp_path, aimspax={"ACTIVE_LEARNING": {"max_trainset_size": 10},
                                             "EXTRA": {"answer": 42}},
                          model={"TRAINING": {"scheduler": "ReduceLROnPlateau", "ema": True, "ema_decay": 0.95},
                                 "ARCHITECTURE": {"gate": "tanh"}})
    code, _, err = convert(capsys, str(aimspax), str(model), "--output", str(tmp_path / "c.yaml"))
    assert code == 0, err
    text = (tmp_path / "c.yaml").read_text()
    assert "unknown key" in comment_for(text, "aimsPAX.yaml ACTIVE_LEARNING.max_trainset_size")
    assert "unknown section" in comment_for(text, "aimsPAX.yaml EXTRA.answer")
    assert "no learning-rate scheduler" in comment_for(text, "model.yaml TRAINING.scheduler")
    assert "not available: SiLU" in comment_for(text, "model.yaml ARCHITECTURE.gate")
    config = load_config(tmp_path / "c.yaml")
    assert config.training.ema_decay == 0.95
    comments = "\n".join(line for line in text.splitlines() if line.startswith("#"))
    settings = yaml.safe_load(text)
    for path in (aimspax, model):
        for section, body in yaml.safe_load(path.read_text()).items():
            for key in body:
                if f"{path.name} {section}.{key}:" not in comments:
                    assert _mapped(section, key), f"{path.name} {section}.{key} is neither mapped nor commented"
    assert settings["al"]["train_set_counts"] == "per_member"


def _mapped(section: str, key: str) -> bool:
    from aimspax_like.aimspax_keys import DIRECT

    special = {"n_points_per_sampling_step_idg", "ensemble_size", "initial_sampling", "foundational_model",
               "foundational_model_settings", "use_teacher_reference", "teacher_reference_settings",
               "max_train_set_size", "converge_best", "stat_ensemble", "thermostat", "temperature", "timestep",
               "friction", "path_to_geometry", "type", "max_workers", "name_exp", "device", "ema", "ema_decay"}
    return key in special or any(s == section and k == key for _, s, k in DIRECT)


def test_paths_point_back_at_the_aims_pax_folder_from_anywhere(tmp_path, capsys):
    aimspax, model = pair(tmp_path / "aimspax")
    out = tmp_path / "elsewhere" / "deep" / "campaign.yaml"
    code, _, err = convert(capsys, str(aimspax), str(model), "--output", str(out))
    assert code == 0, err
    settings = yaml.safe_load(out.read_text())
    assert settings["system"]["structures"] == ["../../aimspax/aspirin.xyz"]
    assert settings["reference"]["model"] == "../../aimspax/teacher.model"
    config = load_config(out)
    assert [p.resolve() for p in config.system.structures] == [tmp_path / "aimspax" / "aspirin.xyz"]
    assert config.reference.model.resolve() == tmp_path / "aimspax" / "teacher.model"
    text = out.read_text()
    assert "# aspirin.xyz is not in" in text and "# teacher.model is not in" in text


def test_without_a_teacher_the_reference_is_fhi_aims_from_control_in(tmp_path, capsys):
    no_teacher = {"use_teacher_reference": None, "teacher_reference_settings": None,
                  "species_dir": "/opt/aims/species_defaults/defaults_2020/light"}
    aimspax, model = pair(tmp_path, aimspax={"INITIAL_DATASET_GENERATION": no_teacher, "ACTIVE_LEARNING": no_teacher})
    code, _, err = convert(capsys, str(aimspax), str(model), "--output", str(tmp_path / "a.yaml"))
    assert code == 0, err
    config = load_config(tmp_path / "a.yaml")
    assert (config.reference.kind, config.reference.command, config.reference.xc) == ("aims", "aims.x", "pbe")
    assert str(config.reference.species_dir) == "/opt/aims/species_defaults/defaults_2020/light"
    text = (tmp_path / "a.yaml").read_text()
    assert "# no control.in in" in text and "# no CLUSTER.launch_str" in text
    (tmp_path / "control.in").write_text(
        "# PBE for aspirin\nxc                 pbe\nrelativistic       atomic_zora scalar\n"
        "sc_accuracy_rho    1E-5\ncompute_forces     .true.\nspin none\n"
        "################\n  species        H\n    nucleus 1\n")
    code, _, err = convert(capsys, str(aimspax), str(model), "--output", str(tmp_path / "a.yaml"), "--force")
    assert code == 0, err
    config = load_config(tmp_path / "a.yaml")
    assert config.reference.xc == "pbe"
    assert config.reference.parameters == {"relativistic": "atomic_zora scalar", "sc_accuracy_rho": 1e-5,
                                           "spin": "none"}


def test_a_slurm_cluster_becomes_a_provider_skeleton(tmp_path, capsys):
    cluster = {"type": "slurm", "max_workers": None, "project_name": "aspirin",
               "parsl_options": {"nodes_per_block": 1, "init_blocks": 1, "min_blocks": 1, "max_blocks": 4,
                                 "label": "aspirin"},
               "slurm_str": "#SBATCH --job-name=aspirin\n#SBATCH --partition=cpu\n#SBATCH --nodes=1\n"
                            "#SBATCH --time=2-00:00:00\n#SBATCH --account=proj42\n#SBATCH --mem=200G\n",
               "worker_str": "module load intel\nexport OMP_NUM_THREADS=1\n",
               "launch_str": "srun aims.x >> aims.out", "calc_dir": "/scratch/calc", "clean_dirs": False}
    no_teacher = {"use_teacher_reference": None, "teacher_reference_settings": None}
    aimspax, model = pair(tmp_path, aimspax={"CLUSTER": cluster, "INITIAL_DATASET_GENERATION": no_teacher,
                                             "ACTIVE_LEARNING": no_teacher})
    code, _, err = convert(capsys, str(aimspax), str(model), "--output", str(tmp_path / "s.yaml"))
    assert code == 0, err
    config = load_config(tmp_path / "s.yaml")
    provider = config.cluster.provider
    assert config.cluster.kind == "slurm"
    assert (provider.partition, provider.account, provider.walltime) == ("cpu", "proj42", "48:00:00")
    assert (provider.nodes_per_block, provider.init_blocks, provider.min_blocks, provider.max_blocks) == (1, 1, 1, 4)
    assert provider.scheduler_options == ["#SBATCH --mem=200G"]
    assert provider.worker_init == ["module load intel", "export OMP_NUM_THREADS=1"]
    assert (config.reference.command, config.reference.keep_workdir) == ("srun aims.x", True)
    text = (tmp_path / "s.yaml").read_text()
    assert "RUN/labels" in comment_for(text, "aimsPAX.yaml CLUSTER.calc_dir")
    assert comment_for(text, "aimsPAX.yaml CLUSTER.project_name")
    assert comment_for(text, "aimsPAX.yaml CLUSTER.parsl_options.label")
    assert re.search(r"^# aimsPAX.yaml CLUSTER.slurm_str line not taken: #SBATCH --nodes=1", text, re.M)


BAD = [
    # (file to break, its new text, text expected in the one-line error)
    ("aimsPAX.yaml", None, "aimsPAX.yaml: file not found"),
    ("aimsPAX.yaml", "ACTIVE_LEARNING: [unclosed\n", "aimsPAX.yaml: not valid YAML"),
    ("model.yaml", "- GENERAL\n- TRAINING\n", "model.yaml: the top level must be a mapping of sections, not a list"),
    ("aimsPAX.yaml", "ACTIVE_LEARNING: [1, 2]\n", "aimsPAX.yaml: ACTIVE_LEARNING: must be a mapping of keys"),
    ("aimsPAX.yaml", "ACTIVE_LEARNING:\n  max_train_set_size: forty\n",
     "aimsPAX.yaml: ACTIVE_LEARNING.max_train_set_size: expected an integer, got 'forty'"),
    ("aimsPAX.yaml", "ACTIVE_LEARNING:\n  c_x: -2\n", "aimsPAX.yaml ACTIVE_LEARNING.c_x: "),
    ("model.yaml", "ARCHITECTURE:\n  num_channels: 0\n", "model.yaml ARCHITECTURE.num_channels: "),
    ("aimsPAX.yaml", "MISC:\n  path_to_geometry: 3\n", "aimsPAX.yaml: MISC.path_to_geometry: expected a string"),
]


@pytest.mark.parametrize(("name", "text", "expected"), BAD, ids=[e for _, _, e in BAD])
def test_bad_input_is_one_line_exit_2_and_nothing_written(tmp_path, capsys, name, text, expected):
    aimspax, model = pair(tmp_path)
    broken = tmp_path / name
    if text is None:
        broken.unlink()
    else:
        broken.write_text(text)
    code, out, err = convert(capsys, str(aimspax), str(model), "--output", str(tmp_path / "out.yaml"))
    assert code == 2 and not out
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and expected in err, err
    assert not (tmp_path / "out.yaml").exists()


def test_an_existing_output_needs_force(tmp_path, capsys):
    aimspax, model = pair(tmp_path)
    out = tmp_path / "campaign.yaml"
    out.write_text("mine\n")
    code, _, err = convert(capsys, str(aimspax), str(model), "--output", str(out))
    assert code == 2 and err == f"error: {out}: file exists; pass --force to overwrite"
    assert out.read_text() == "mine\n"
    code, _, err = convert(capsys, str(aimspax), str(model), "--output", str(tmp_path))
    assert code == 2 and "is a folder" in err
    assert convert(capsys, str(aimspax), str(model), "--output", str(out), "--force")[0] == 0
    assert load_config(out).al.train_set_counts == "per_member"


def test_a_converted_campaign_runs_to_the_end_with_a_teacher(tmp_path, capsys, monkeypatch, finished_campaign):
    """End to end through the CLI: the tiny campaign's best model (trained on EMT labels of a Cu/Au
    cluster) is the teacher; the converted campaign labels with it and stops on the per-member budget."""
    from campaign_helpers import tiny_cluster

    from aimspax_like.data import DatasetStore

    run, _ = finished_campaign
    folder = tmp_path / "aimspax"
    tiny = {"INITIAL_DATASET_GENERATION": {"ensemble_size": 2, "n_points_per_sampling_step_idg": 4, "valid_ratio": 0.25,
                                           "intermediate_epochs_idg": 3, "max_initial_epochs": 6,
                                           "skip_step_initial": 5},
            "ACTIVE_LEARNING": {"ensemble_size": 2, "max_train_set_size": 12, "valid_ratio": 0.25,
                                "skip_step_mlff": 2, "max_convergence_epochs": 4, "convergence_patience": 2},
            "MD": {"temperature": 400},
            "MISC": {"path_to_geometry": "cluster.xyz"}, "CLUSTER": {"max_workers": 2}}
    aimspax, model = pair(folder, aimspax=tiny, model={"ARCHITECTURE": {"num_channels": 8, "max_L": 0,
                                                                        "radial_MLP": [8], "r_max": 4.5}})
    from ase.io import write

    write(folder / "cluster.xyz", tiny_cluster())
    shutil.copyfile(run / "models" / "best.model", folder / "teacher.model")
    monkeypatch.chdir(tmp_path)
    assert convert(capsys, str(aimspax), str(model), "--output", "campaign.yaml")[0] == 0
    raw = yaml.safe_load(Path("campaign.yaml").read_text())
    raw["test_set"]["size"] = 2
    Path("campaign.yaml").write_text(yaml.safe_dump(raw))
    assert main(["run", "campaign.yaml", "--quiet"]) == 0, capsys.readouterr().err
    frames = DatasetStore.open(tmp_path / "runs" / "aspirin" / "data" / "dataset.h5").frames()
    own = [sum(f.member == k and f.split == "train" for f in frames) for k in (0, 1)]
    al_train = sum(f.origin == "al" and f.split == "train" for f in frames)
    assert own == [6, 6]  # 2 rounds of 3 training points per member (4 with 1 for validation)
    assert al_train > 0 and max(own) + al_train == 12
