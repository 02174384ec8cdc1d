"""The driver as a batch job that outlives its walltime: the scripts ``aimspax-like jobscripts``
writes, for every scheduler, and what they do with the warning signal (run here with bash and
stub scheduler commands; the real SLURM requeue is in ``test_slurm.py``)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from aimspax_like.errors import ConfigError
from aimspax_like.jobscripts import driver_script

KINDS = ("slurm", "pbspro", "torque", "lsf", "sge")


@pytest.mark.parametrize("kind", KINDS)
def test_every_scheduler_gets_a_script_that_asks_for_a_warning(kind: str, tmp_path: Path) -> None:
    text = driver_script(kind, "/data/campaign.yaml", str(tmp_path / "driver.sh"), walltime="02:00:00", grace_s=300,
                         directives=["--partition=gpu"] if kind == "slurm" else ["-q gpu"],
                         setup=["module load cuda"])
    (tmp_path / "driver.sh").write_text(text)
    subprocess.run(["bash", "-n", str(tmp_path / "driver.sh")], check=True)
    lines = text.splitlines()
    warning = {
        "slurm": ["#SBATCH --signal=B:TERM@300", "#SBATCH --requeue", "#SBATCH --time=02:00:00",
                  "#SBATCH --partition=gpu"],
        "pbspro": ["#PBS -l walltime=02:00:00", "#PBS -q gpu", "( sleep 6900 && kill -TERM $$ ) 2>/dev/null &"],
        "torque": ["#PBS -l walltime=02:00:00", "( sleep 6900 && kill -TERM $$ ) 2>/dev/null &"],
        "lsf": ["#BSUB -W 2:00", "#BSUB -wa TERM", "#BSUB -wt 5", "#BSUB -q gpu"],
        "sge": ["#$ -l h_rt=02:00:00", "#$ -l s_rt=01:55:00", "#$ -q gpu"],
    }[kind]
    for line in warning:
        assert line in lines, (line, text)
    run = next(line for line in lines if " run /data/campaign.yaml " in line)
    assert "--resume" in run and run.endswith("&")
    assert "module load cuda" in lines
    assert lines.index("module load cuda") < lines.index(run)


def test_grace_must_leave_time_to_run() -> None:
    with pytest.raises(ConfigError) as info:
        driver_script("slurm", "c.yaml", "d.sh", walltime="00:05:00", grace_s=300)
    assert info.value.key == "driver.grace_s"
    with pytest.raises(ConfigError) as info:
        driver_script("condor", "c.yaml", "d.sh")
    assert info.value.key == "driver.scheduler"


# A stand-in driver: saves on SIGTERM and exits 143, as the real one does (or exits with $STUB_RC).
STUB_DRIVER = """#!{python}
import os, signal, sys, time
from pathlib import Path
log = Path(os.environ["STUB_LOG"])
env = os.environ
words = [env.get("AIMSPAX_DRIVER_JOB", "?"), env.get("AIMSPAX_DRIVER_RESTART", "?"), str("SLURM_CPUS_PER_TASK" in env)]
log.write_text("started " + " ".join(words) + "\\n")
def stop(signum, frame):
    with log.open("a") as f:
        f.write("saved\\n")
    sys.exit(143)
signal.signal(signal.SIGTERM, stop)
rc = int(os.environ.get("STUB_RC", "-1"))
if rc >= 0:
    sys.exit(rc)
time.sleep(60)
"""

STUB_SUBMIT = """#!/bin/bash
echo "$(basename "$0") $*" >> "$STUB_SUBMITS"
[ "$(basename "$0")" != "${STUB_REFUSE:-}" ]
"""


def _stubbed(tmp_path: Path, restart: str, max_restarts: int = 3) -> tuple[Path, dict[str, str]]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    driver = bin_dir / "aimspax-like"
    driver.write_text(STUB_DRIVER.format(python=sys.executable))
    for name in ("sbatch", "scontrol"):
        (bin_dir / name).write_text(STUB_SUBMIT)
    for path in bin_dir.iterdir():
        path.chmod(0o755)
    script = tmp_path / "driver.sbatch"
    script.write_text(driver_script("slurm", str(tmp_path / "campaign.yaml"), str(script), walltime="01:00:00",
                                    grace_s=120, restart=restart, max_restarts=max_restarts, workdir=str(tmp_path),
                                    command=str(driver)))
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "STUB_LOG": str(tmp_path / "driver.log"),
           "STUB_SUBMITS": str(tmp_path / "submits.log"), "SLURM_JOB_ID": "4242", "SLURM_CPUS_PER_TASK": "8"}
    return script, env


def _run_until_started(script: Path, env: dict[str, str], log: Path) -> subprocess.Popen[str]:
    proc = subprocess.Popen(["bash", str(script)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    deadline = time.monotonic() + 30
    while not (log.is_file() and log.read_text().startswith("started")):
        assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()[0]
        time.sleep(0.05)
    return proc


@pytest.mark.parametrize(("restart", "env_extra", "expected"), [
    ("requeue", {"SLURM_RESTART_COUNT": "1"}, ["scontrol requeue 4242"]),
    ("resubmit", {"AIMSPAX_RESTART": "1"}, ["sbatch --export=ALL,AIMSPAX_RESTART=2 {script}"]),
    # A site that refuses requeues: a new job, which counts its restarts itself.
    ("requeue", {"SLURM_RESTART_COUNT": "1", "STUB_REFUSE": "scontrol"},
     ["scontrol requeue 4242", "sbatch --export=ALL,AIMSPAX_RESTART=2 {script}"]),
    ("requeue", {"AIMSPAX_RESTART": "1", "STUB_REFUSE": "scontrol"},
     ["scontrol requeue 4242", "sbatch --export=ALL,AIMSPAX_RESTART=2 {script}"]),
])
def test_warning_signal_makes_the_driver_save_and_the_job_continue(
    tmp_path: Path, restart: str, env_extra: dict[str, str], expected: list[str]
) -> None:
    script, env = _stubbed(tmp_path, restart)
    env.update(env_extra)
    log = tmp_path / "driver.log"
    proc = _run_until_started(script, env, log)
    proc.send_signal(signal.SIGTERM)  # what SLURM's --signal=B:TERM@grace sends to the batch shell
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    assert log.read_text().splitlines() == ["started 4242 1 False", "saved"]  # SLURM_* cleared for the driver
    assert "driver exited with 143" in out and "warning signal" in out
    assert (tmp_path / "submits.log").read_text().splitlines() == [line.format(script=script) for line in expected]


@pytest.mark.parametrize(("rc", "restarts"), [(0, "0"), (2, "0"), (3, "0"), (143, "3")])
def test_no_restart_when_done_on_bad_input_on_a_stop_or_out_of_restarts(tmp_path: Path, rc: int, restarts: str) -> None:
    script, env = _stubbed(tmp_path, "requeue", max_restarts=3)
    env.update({"STUB_RC": str(rc), "SLURM_RESTART_COUNT": restarts})
    done = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == rc, done.stdout
    assert not (tmp_path / "submits.log").exists()
    if rc == 143:
        assert "gave up after 3 restarts" in done.stdout


def _sites(tmp_path: Path) -> Path:
    """One campaign file and two machines' profiles of the same name (PBS Pro and LSF)."""
    (tmp_path / "ethanol.xyz").write_text("3\n\nO 0 0 0\nH 0.96 0 0\nH -0.24 0.93 0\n")
    campaign = {"system": {"structures": "ethanol.xyz"}, "reference": {"kind": "aims", "timeout_s": 3600},
                "site": "hpc", "output": {"directory": str(tmp_path / "run")}}
    (tmp_path / "campaign.yaml").write_text(yaml.safe_dump(campaign))
    pbs = {"name": "pbs-machine",
           "cluster": {"kind": "pbspro", "provider": {
               "queue": "cpu", "account": "chem42", "walltime": "04:00:00", "cpus_per_node": 128,
               "select_options": ":mpiprocs=128", "max_blocks": 8, "scheduler_options": ["-l place=excl"],
               "worker_init": ["module load fhi-aims", "source $HOME/venv/bin/activate"]}},
           "reference": {"aims": {"command": "mpiexec -n 128 $AIMS_BIN", "species_dir": "~/species/light"}},
           "driver": {"walltime": "24:00:00", "grace_s": 600, "directives": ["-q gpu", "-l select=1:ngpus=1"]}}
    lsf = {"name": "lsf-machine",
           "cluster": {"kind": "lsf", "provider": {"queue": "normal", "project": "CHEM042", "walltime": "02:00:00",
                                                  "max_blocks": 4, "worker_init": ["module load aims"]}},
           "reference": {"aims": {"command": "mpirun -np 48 ${AIMS_BIN}", "species_dir": "/opt/aims/species"}},
           "driver": {"walltime": "12:00:00", "grace_s": 900, "directives": ["-q gpu", "-gpu num=1"]}}
    for name, profile in (("pbs", pbs), ("lsf", lsf)):
        (tmp_path / f"sites_{name}").mkdir()
        (tmp_path / f"sites_{name}" / "hpc.yaml").write_text(yaml.safe_dump(profile))
    return tmp_path / "campaign.yaml"


def test_one_campaign_two_sites_pbspro_and_lsf_scripts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       capsys) -> None:
    from aimspax_like.cli import main

    campaign = _sites(tmp_path)
    monkeypatch.setenv("AIMS_BIN", "/opt/aims/bin/aims.x")
    monkeypatch.chdir(tmp_path)
    scripts = {}
    for name in ("pbs", "lsf"):
        monkeypatch.setenv("AIMSPAX_SITE_DIR", str(tmp_path / f"sites_{name}"))
        assert main(["jobscripts", str(campaign), "--output", str(tmp_path / f"out_{name}")]) == 0
        written = capsys.readouterr().out.split()
        scripts[name] = {Path(path).name: Path(path).read_text() for path in written}
    pbs, lsf = scripts["pbs"], scripts["lsf"]
    assert set(pbs) == {"driver.pbs", "label_block.pbs"} and set(lsf) == {"driver.lsf", "label_block.lsf"}
    block = pbs["label_block.pbs"].splitlines()
    for line in ("#PBS -l walltime=04:00:00", "#PBS -l select=1:ncpus=128:mpiprocs=128", "#PBS -l place=excl",
                 "module load fhi-aims", "source $HOME/venv/bin/activate", "export OMP_NUM_THREADS=1"):
        assert line in block, (line, pbs["label_block.pbs"])
    assert "#PBS -q gpu" in pbs["driver.pbs"] and "#PBS -l walltime=24:00:00" in pbs["driver.pbs"]
    assert f"--site {tmp_path / 'sites_pbs' / 'hpc.yaml'}" in pbs["driver.pbs"]
    block = lsf["label_block.lsf"].splitlines()
    for line in ("#BSUB -P CHEM042", "#BSUB -q normal", "#BSUB -W 120", "module load aims"):
        assert line in block, (line, lsf["label_block.lsf"])
    assert "#BSUB -wt 15" in lsf["driver.lsf"] and "#BSUB -gpu num=1" in lsf["driver.lsf"]


def test_a_bad_site_profile_is_one_line_and_writes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          capsys) -> None:
    from aimspax_like.cli import main

    campaign = _sites(tmp_path)
    monkeypatch.delenv("AIMS_BIN", raising=False)  # the PBS profile's command names $AIMS_BIN
    monkeypatch.setenv("AIMSPAX_SITE_DIR", str(tmp_path / "sites_pbs"))
    assert main(["jobscripts", str(campaign), "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: site.reference.aims.command: $AIMS_BIN is not set") and "\n" not in err
    assert not (tmp_path / "out").exists()


def test_a_job_that_can_neither_requeue_nor_resubmit_says_so(tmp_path: Path) -> None:
    script, env = _stubbed(tmp_path, "resubmit")
    env.update({"STUB_RC": "143", "STUB_REFUSE": "sbatch"})
    done = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 143 and "could not resubmit this job" in done.stdout, done.stdout
