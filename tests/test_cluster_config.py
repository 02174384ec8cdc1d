"""The batch cluster kinds without a cluster: config validation against Parsl's provider classes,
and the providers and block scripts they turn into (Parsl's own script writer, with the submit
command caught instead of run)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml
from ase.io import write

from aimspax_like.config import LocalCluster, SlurmCluster, config_from_dict
from aimspax_like.errors import ConfigError
from aimspax_like.execution import ParslLabelExecutor, make_label_executor
from aimspax_like.execution.providers import block_script, build_provider


def _config(tmp_path: Path, cluster: dict | None) -> dict:
    write(tmp_path / "dimer.xyz", _dimer())
    config = {"system": {"structures": str(tmp_path / "dimer.xyz")}, "reference": {"kind": "emt"}}
    if cluster is not None:
        config["cluster"] = cluster
    return config


def _dimer():
    from ase import Atoms

    return Atoms("Cu2", positions=[[0, 0, 0], [2.5, 0, 0]])


def _slurm(section: str, **values: object) -> dict:
    return {"kind": "slurm", section: values}


BAD_CLUSTERS = [
    # (cluster section, text expected in the one-line error)
    ({"kind": "pbs"}, "cluster: Input tag 'pbs'"),
    ({"kind": "slurm", "max_workers": 2}, "cluster.max_workers: unknown key"),  # a local key
    (_slurm("provider", partiton="cpu"), "cluster.provider.partiton: unknown key"),
    (_slurm("provider", min_blocks=3, max_blocks=2), "cluster.provider.max_blocks: must be at least min_blocks (3)"),
    (_slurm("provider", min_blocks=2), "cluster.provider.max_blocks: must be at least min_blocks (2)"),
    (_slurm("provider", init_blocks=4, max_blocks=2), "cluster.provider.max_blocks: must be at least init_blocks (4)"),
    (_slurm("provider", max_blocks=0), "cluster.provider.max_blocks"),
    (_slurm("provider", min_blocks=-1), "cluster.provider.min_blocks"),
    (_slurm("provider", nodes_per_block=0), "cluster.provider.nodes_per_block"),
    (_slurm("provider", walltime="1:00"), "cluster.provider.walltime: must be HH:MM:SS"),
    (_slurm("provider", walltime="01:75:00"), "cluster.provider.walltime: must be HH:MM:SS"),
    (_slurm("provider", walltime="2h"), "cluster.provider.walltime: must be HH:MM:SS"),
    (_slurm("provider", walltime="00:00:00"), "cluster.provider.walltime: must be longer"),
    (_slurm("provider", scheduler_options=["echo hi"]), "cluster.provider.scheduler_options"),
    (_slurm("launcher", kind="torchrun"), "cluster.launcher.kind"),
    (_slurm("launcher", kind="simple", overrides="--mpi=pmi2"), "cluster.launcher.overrides: only used by"),
    (_slurm("executor", max_idletime_s=-1), "cluster.executor.max_idletime_s"),
    (_slurm("executor", workers_per_node=0), "cluster.executor.workers_per_node"),
    (_slurm("executor", cores_per_worker=0), "cluster.executor.cores_per_worker"),
    (_slurm("executor", address="node1", interface="ib0"), "cluster.executor.interface: give address or interface"),
    ({"kind": "local", "provider": {}}, "cluster.provider: unknown key"),  # a slurm key
    # Keys beyond the shared ones are checked against the signature of Parsl's class for the kind.
    ({"kind": "pbspro", "provider": {"partition": "cpu"}},
     "cluster.provider.partition: unknown key: not an argument of Parsl's PBSProProvider (it takes: account, "),
    ({"kind": "slurm", "provider": {"exclusive": "yes"}}, "cluster.provider.exclusive: 'yes' does not fit"),
    ({"kind": "pbspro", "provider": {"cpus_per_node": "128"}}, "cluster.provider.cpus_per_node: '128' is not a int"),
    ({"kind": "lsf", "provider": {"parallelism": 2}}, "cluster.provider.parallelism: set by aimspax-like"),
    ({"kind": "sge", "provider": {"launcher": "srun"}}, "cluster.provider.launcher: set by aimspax-like"),
    ({"kind": "pbspro", "provider": {"scheduler_options": ["#SBATCH --mem=4G"]}},
     "cluster.provider.scheduler_options: '#SBATCH --mem=4G' is neither '#PBS ...'"),
    ({"kind": "kubernetes"}, "cluster: Input tag 'kubernetes'"),
]


@pytest.mark.parametrize(("cluster", "expected"), BAD_CLUSTERS)
def test_bad_cluster_sections_name_the_key(tmp_path: Path, cluster: dict, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        config_from_dict(_config(tmp_path, cluster))
    message = str(info.value)
    assert expected in message, message
    assert "\n" not in message


@pytest.mark.parametrize("cluster", BAD_CLUSTERS[3:5])
def test_bad_cluster_section_exits_2_from_the_cli(tmp_path: Path, capsys, cluster) -> None:
    from aimspax_like.cli import main

    path = tmp_path / "campaign.yaml"
    config = _config(tmp_path, cluster[0])
    config["output"] = {"directory": str(tmp_path / "run")}
    path.write_text(yaml.safe_dump(config))
    assert main(["run", str(path), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: cluster.provider.max_blocks") and "\n" not in err
    assert not (tmp_path / "run").exists()


def test_cluster_kinds_and_defaults(tmp_path: Path) -> None:
    assert isinstance(config_from_dict(_config(tmp_path, None)).cluster, LocalCluster)
    # Older configs without 'kind' still mean the local pool.
    local = config_from_dict(_config(tmp_path, {"max_workers": 3})).cluster
    assert isinstance(local, LocalCluster) and local.max_workers == 3
    slurm = config_from_dict(_config(tmp_path, {"kind": "slurm"})).cluster
    assert isinstance(slurm, SlurmCluster)
    assert (slurm.provider.min_blocks, slurm.provider.max_blocks, slurm.provider.init_blocks) == (0, 1, 0)
    assert build_provider(slurm).exclusive and slurm.launcher.kind == "single_node"  # Parsl's default
    assert slurm.executor.max_idletime_s == 120.0  # Parsl's default


def test_resolved_yaml_round_trips_a_slurm_cluster(tmp_path: Path) -> None:
    cluster = {
        "kind": "slurm",
        "provider": {"partition": "cpu", "max_blocks": 4, "scheduler_options": "--gres=gpu:0\n#SBATCH --mem=8G",
                     "worker_init": "module load aims\nsource /opt/venv/bin/activate"},
        "launcher": {"kind": "srun", "overrides": "--mpi=pmi2"},
    }
    config = config_from_dict(_config(tmp_path, cluster))
    provider = config.cluster.provider
    assert provider.scheduler_options == ["#SBATCH --gres=gpu:0", "#SBATCH --mem=8G"]
    assert provider.worker_init == ["module load aims", "source /opt/venv/bin/activate"]
    again = config_from_dict(yaml.safe_load(config.resolved_yaml()))
    assert again.cluster == config.cluster


def _cluster(**sections: dict) -> SlurmCluster:
    return SlurmCluster.model_validate(sections)


def _block_script(cluster: SlurmCluster) -> str:
    """The sbatch script Parsl writes for one block (its submit command caught, not run)."""
    return block_script(cluster, "WORKER_POOL_COMMAND")


def test_slurm_provider_fields_and_block_script() -> None:
    cluster = _cluster(
        provider={"partition": "cpu", "account": "proj42", "qos": "normal", "walltime": "01:30:00",
                  "nodes_per_block": 2, "init_blocks": 1, "min_blocks": 0, "max_blocks": 3, "exclusive": True,
                  "scheduler_options": ["--gres=gpu:0", "#SBATCH --mail-type=NONE"],
                  "worker_init": ["module load intel", "source /opt/venv/bin/activate"]},
        launcher={"kind": "srun", "overrides": "--cpu-bind=none"},
        executor={"workers_per_node": 4, "cores_per_worker": 2},
    )
    provider = build_provider(cluster)
    assert (provider.init_blocks, provider.min_blocks, provider.max_blocks) == (1, 0, 3)
    assert provider.nodes_per_block == 2 and provider.walltime == "01:30:00"
    assert provider.parallelism == 1.0  # srun: one pool per node, Parsl's slot count is right
    assert type(provider.launcher).__name__ == "SrunLauncher"

    script = _block_script(cluster)
    lines = script.splitlines()
    for line in ("#SBATCH --nodes=2", "#SBATCH --time=90", "#SBATCH --ntasks-per-node=1",
                 "#SBATCH --partition=cpu", "#SBATCH --account=proj42", "#SBATCH --qos=normal",
                 "#SBATCH --exclusive", "#SBATCH --gres=gpu:0", "#SBATCH --mail-type=NONE",
                 "export OMP_NUM_THREADS=2", "module load intel", "source /opt/venv/bin/activate"):
        assert line in lines, (line, script)
    # The user's worker_init comes after our OMP default, so a site can override it.
    assert lines.index("export OMP_NUM_THREADS=2") < lines.index("module load intel")
    srun = [line for line in lines if line.startswith("srun ")]
    assert srun and "--ntasks 2" in srun[0] and "--cpu-bind=none" in srun[0]
    assert "WORKER_POOL_COMMAND" in script


def test_single_node_launcher_without_exclusive(tmp_path: Path) -> None:
    cluster = _cluster(provider={"exclusive": False, "nodes_per_block": 2, "max_blocks": 2},
                       launcher={"kind": "single_node"}, executor={"workers_per_node": 1})
    provider = build_provider(cluster)
    # One pool per block: Parsl must count one slot per block, not one per node.
    assert provider.parallelism == 2.0
    script = _block_script(cluster)
    assert "#SBATCH --exclusive" not in script
    assert "--partition" not in script and "--account" not in script
    assert not any(line.startswith("srun ") for line in script.splitlines())
    assert "WORKER_POOL_COMMAND" in script
    assert ParslLabelExecutor(cluster, tmp_path).n_workers == 2


def test_slurm_executor_builds_htex_with_autoscaling(tmp_path: Path) -> None:
    cluster = _cluster(
        provider={"max_blocks": 3, "nodes_per_block": 2},
        launcher={"kind": "srun"},
        executor={"workers_per_node": 4, "max_idletime_s": 7, "strategy_period_s": 2, "address": "localhost",
                  "worker_python": "/shared/venv/bin/python"},
    )
    executor = make_label_executor(cluster, tmp_path)
    assert isinstance(executor, ParslLabelExecutor) and executor.batch
    assert executor.n_workers == 3 * 2 * 4
    assert executor._scaling() == {"strategy": "htex_auto_scale", "max_idletime": 7.0, "strategy_period": 2.0}
    htex = executor._build_htex()
    assert htex.address == "127.0.0.1"  # resolved, so the interchange can bind it
    assert htex.launch_cmd.startswith("/shared/venv/bin/python -m parsl.executors.high_throughput.process_worker_pool")
    assert htex.workers_per_node == 4
    assert type(htex.provider).__name__ == "SlurmProvider" and htex.provider.max_blocks == 3
    # Labels go through the placement wrapper (for label_placed events); the local pool does not.
    names = {app: fn.__name__ for app, fn in executor._task_functions().items()}
    assert names == {"label": "label_with_placement", "md_segment": "segment_with_placement"}
    local = make_label_executor(LocalCluster(), tmp_path)
    assert {app: fn.__name__ for app, fn in local._task_functions().items()} == {
        "label": "label", "md_segment": "run_segment"}


def test_default_address_is_this_hosts_and_bad_ones_are_config_errors(tmp_path: Path) -> None:
    import platform
    import socket

    executor = ParslLabelExecutor(_cluster(), tmp_path)
    try:
        expected = socket.gethostbyname(platform.node())
    except OSError:  # a host whose own name does not resolve: the user must name an address
        with pytest.raises(ConfigError):
            executor.address()
    else:
        assert executor.address() == expected
    bad = ParslLabelExecutor(_cluster(executor={"address": "no-such-host.invalid"}), tmp_path)
    with pytest.raises(ConfigError) as info:
        bad.address()
    assert info.value.key == "cluster.executor.address"


def test_placement_wrapper_imports_nothing_heavy() -> None:
    import subprocess

    code = (
        "import sys\n"
        "from ase import Atoms\n"
        "from aimspax_like.execution import label_with_placement, worker_report\n"
        "outcome, where = label_with_placement(Atoms('Cu2', positions=[[0,0,0],[2.5,0,0]]), {'kind': 'emt'}, 'w')\n"
        "assert outcome.ok and where['slurm_job_id'] == '77' and where['pid'] > 0, where\n"
        "assert worker_report()['slurm_job_id'] == '77'\n"
        "heavy = {'torch', 'mace', 'e3nn', 'parsl'} & set(sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    import os
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        env = {**os.environ, "SLURM_JOB_ID": "77"}
        subprocess.run([sys.executable, "-c", code], check=True, timeout=60, cwd=folder, env=env)


def test_slurm_template_is_a_valid_campaign() -> None:
    from aimspax_like.config import load_config

    root = Path(__file__).resolve().parents[1]
    config = load_config(root / "configs/slurm_template.yaml")
    cluster = config.cluster
    assert isinstance(cluster, SlurmCluster)
    assert cluster.launcher.kind != "srun"  # FHI-aims launches itself with srun
    assert config.reference.kind == "aims" and config.reference.command.startswith("srun ")
    assert "#SBATCH --ntasks-per-node=128" in cluster.provider.scheduler_options
    script = (root / "scripts/driver_job.sbatch").read_text()
    assert "aimspax-like run" in script and "#SBATCH --gres=gpu:1" in script
    lines = script.splitlines()
    # It outlives its walltime: a warning signal, requeue, and the driver always resumes.
    assert {"#SBATCH --signal=B:TERM@600", "#SBATCH --requeue"} <= set(lines) and 'scontrol requeue "$JOB"' in script
    assert 'aimspax-like run "$CONFIG" --resume --quiet &' in lines


@pytest.mark.parametrize(("kind", "options", "lines"), [
    ("pbspro", {"queue": "cpu", "account": "chem42", "cpus_per_node": 64, "select_options": ":mpiprocs=64",
                "scheduler_options": ["-l place=excl"]},
     ["# submitted by Parsl as: qsub -q cpu -A chem42 SCRIPT", "#PBS -l select=1:ncpus=64:mpiprocs=64",
      "#PBS -l place=excl", "#PBS -l walltime=01:00:00"]),
    ("lsf", {"queue": "normal", "project": "CHEM042", "scheduler_options": ["-R span[hosts=1]"]},
     ["# submitted by Parsl as: bsub SCRIPT", "#BSUB -q normal", "#BSUB -P CHEM042", "#BSUB -W 60",
      "#BSUB -R span[hosts=1]"]),
    ("sge", {"queue": "all.q", "scheduler_options": ["-pe smp 8"]},
     ["# submitted by Parsl as: qsub -q all.q -terse SCRIPT", "#$ -l h_rt=01:00:00", "#$ -pe smp 8"]),
    ("torque", {"queue": "batch", "account": "p1"},
     ["# submitted by Parsl as: qsub -q batch -A p1 SCRIPT", "#PBS -l walltime=01:00:00"]),
])
def test_other_schedulers_block_scripts(tmp_path: Path, kind: str, options: dict, lines: list[str]) -> None:
    cluster = {"kind": kind, "provider": {"max_blocks": 2, "worker_init": ["module load dft"], **options},
               "executor": {"cores_per_worker": 4}}
    config = config_from_dict(_config(tmp_path, cluster))
    script = block_script(config.cluster).splitlines()
    for line in [*lines, "export OMP_NUM_THREADS=4", "module load dft", "WORKER_POOL_COMMAND"]:
        assert line in script, (line, "\n".join(script))
    assert ParslLabelExecutor(config.cluster, tmp_path).n_workers == 2


def test_per_node_launchers_count_a_pool_on_every_node(tmp_path: Path) -> None:
    cluster = {"kind": "pbspro", "provider": {"nodes_per_block": 3, "max_blocks": 2},
               "launcher": {"kind": "mpiexec"}, "executor": {"workers_per_node": 4}}
    config = config_from_dict(_config(tmp_path, cluster))
    provider = build_provider(config.cluster)
    assert type(provider.launcher).__name__ == "MpiExecLauncher" and provider.parallelism == 1.0
    assert ParslLabelExecutor(config.cluster, tmp_path).n_workers == 2 * 3 * 4
    single = config_from_dict(_config(tmp_path, {**cluster, "launcher": {"kind": "single_node"}}))
    assert build_provider(single.cluster).parallelism == 3.0
    assert ParslLabelExecutor(single.cluster, tmp_path).n_workers == 2 * 4


def test_a_label_timeout_must_fit_in_a_block(tmp_path: Path) -> None:
    config = _config(tmp_path, {"kind": "slurm", "provider": {"walltime": "01:00:00"}})
    config["reference"]["timeout_s"] = 3590
    with pytest.raises(ConfigError) as info:
        config_from_dict(config)
    assert info.value.key == "reference.timeout_s" and "cluster.provider.walltime (01:00:00)" in info.value.message
    config["reference"]["timeout_s"] = 3000
    assert config_from_dict(config).reference.timeout_s == 3000
    config["cluster"] = {"kind": "local"}
    config["reference"]["timeout_s"] = 10 * 3600  # no block walltime on this machine
    assert config_from_dict(config).cluster.kind == "local"


def test_only_the_execution_package_imports_parsl() -> None:
    import re

    package = Path(__file__).resolve().parents[1] / "aimspax_like"
    pattern = re.compile(r"^\s*(import parsl|from parsl[ .])", re.MULTILINE)
    importers = sorted(str(path.relative_to(package)) for path in package.rglob("*.py")
                       if pattern.search(path.read_text()))
    assert importers and all(name.startswith("execution/") for name in importers), importers


def test_a_scheduler_whose_commands_are_missing_is_refused_before_anything_is_written(
    tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    from aimspax_like.cli import main

    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin") + ":/usr/bin/nonexistent")  # no qsub anywhere
    config = _config(tmp_path, {"kind": "pbspro", "provider": {"queue": "cpu"}})
    config["output"] = {"directory": str(tmp_path / "run")}
    (tmp_path / "campaign.yaml").write_text(yaml.safe_dump(config))
    assert main(["run", str(tmp_path / "campaign.yaml"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("error: cluster.kind: pbspro, but qsub, qstat, qdel not found on PATH (run the driver where the "
                   "scheduler's commands are, or use cluster.kind: local)")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("name", ["pbspro_example", "lsf_example", "local_slurm"])
def test_example_site_profiles_apply_to_the_example_campaign(name: str, tmp_path: Path) -> None:
    from aimspax_like.config import load_config

    root = Path(__file__).resolve().parents[1]
    config = load_config(root / "configs/aspirin_aims_anywhere.yaml", site=str(root / f"configs/sites/{name}.yaml"))
    assert config.site_record["name"] == name.replace("_example", "-example").replace("_", "-")
    if name != "local_slurm":
        assert config.cluster.kind == name.removesuffix("_example")
        assert config.reference.command.endswith("aims.x") and str(Path.home()) in str(config.reference.species_dir)
