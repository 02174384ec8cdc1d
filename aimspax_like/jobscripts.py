"""``aimspax-like jobscripts``: the driver's batch script and one label block's, for any scheduler.

The driver job outlives its walltime. It asks the scheduler for a warning signal ``grace_s``
seconds before the end (SLURM ``--signal=B:TERM@grace``, LSF ``-wa TERM -wt``, Grid Engine's soft
limit ``s_rt`` and SIGUSR1; PBS and Torque have no such option, so the script keeps its own timer),
forwards it to the driver as SIGTERM, and the driver saves its state within seconds, even in the
middle of a training round or a label wait, and exits with 143. The script then requeues
itself (SLURM: ``scontrol requeue``, the same job id) or submits itself again, and the next job
continues with ``run --resume``; any other exit code (0 done, 2 bad input, 3 stopped for a
cause to fix) ends the chain. A job submitted by hand a second time simply continues too,
because the driver always runs with ``--resume`` (a missing run directory is started).

The label block script is the one Parsl itself writes for the campaign's ``cluster`` section
(``execution.providers.block_script``), so what the user reviews is what the scheduler gets.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from aimspax_like.cluster_config import walltime_seconds
from aimspax_like.errors import ConfigError

COMMANDS = ("jobscripts",)

_DIRECTIVE = {"slurm": "#SBATCH", "pbspro": "#PBS", "torque": "#PBS", "lsf": "#BSUB", "sge": "#$"}
_SUFFIX = {"slurm": "sbatch", "pbspro": "pbs", "torque": "pbs", "lsf": "lsf", "sge": "sge"}
_RESTART_VARIABLE = "AIMSPAX_RESTART"
# The scheduler's variables, cleared before the driver starts: label blocks submitted from the
# driver would inherit them (sbatch exports the environment) and srun in a block reads some of
# them as options, e.g. SLURM_CPUS_PER_TASK=8 would turn `srun -n 128 aims.x` into 1024 CPUs.
_SCHEDULER_VARIABLES = {"slurm": "SLURM_* | SBATCH_* | SRUN_* | SALLOC_*", "pbspro": "PBS_*", "torque": "PBS_*",
                        "lsf": "LSB_* | LSF_*", "sge": "SGE_* | JOB_ID | PE_HOSTFILE"}


def _directives(kind: str, name: str, walltime: str, grace_s: int, requeue: bool, extra: list[str]) -> list[str]:
    prefix = _DIRECTIVE[kind]
    seconds = walltime_seconds(walltime)
    if kind == "slurm":
        lines = [f"--job-name={name}", f"--time={walltime}", f"--signal=B:TERM@{grace_s}",
                 "--open-mode=append", f"--output={name}-%j.out"]
        if requeue:
            lines.append("--requeue")
    elif kind in ("pbspro", "torque"):
        lines = [f"-N {name}", f"-l walltime={walltime}", "-j oe", f"-o {name}.out"]
    elif kind == "lsf":
        minutes = max(1, seconds // 60)
        lines = [f"-J {name}", f"-W {minutes // 60}:{minutes % 60:02d}", "-wa TERM", f"-wt {max(1, grace_s // 60)}",
                 f"-o {name}-%J.out"]
    else:  # sge: the soft limit sends SIGUSR1 grace_s before the hard one
        soft = seconds - grace_s
        lines = [f"-N {name}", f"-l h_rt={walltime}", f"-l s_rt={soft // 3600:02d}:{soft % 3600 // 60:02d}:"
                 f"{soft % 60:02d}", "-j y", f"-o {name}.out", "-cwd"]
    for line in extra:
        lines.append(line[len(prefix):].strip() if line.startswith(prefix) else line)
    return [f"{prefix} {line}" for line in lines]


def _restart_command(kind: str, mode: str, script: str) -> str:
    quoted = shlex.quote(script)
    if kind == "slurm" and mode == "requeue":  # a site that refuses requeues gets a new job instead
        return (f'{{ scontrol requeue "$JOB" || {{ echo "requeue refused: submitting a new job"; '
                f'sbatch --export=ALL,{_RESTART_VARIABLE}=$((RESTART + 1)) {quoted}; }}; }}')
    if kind == "slurm":
        return f'sbatch --export=ALL,{_RESTART_VARIABLE}=$((RESTART + 1)) {quoted}'
    if kind in ("pbspro", "torque", "sge"):
        return f'qsub -v {_RESTART_VARIABLE}=$((RESTART + 1)) {quoted}'
    return f'{_RESTART_VARIABLE}=$((RESTART + 1)) bsub < {quoted}'


def driver_script(
    kind: str,
    config: str,
    script_path: str,
    *,
    walltime: str = "24:00:00",
    grace_s: int = 300,
    max_restarts: int = 20,
    restart: str = "requeue",
    directives: list[str] | None = None,
    setup: list[str] | None = None,
    site: str | None = None,
    workdir: str | None = None,
    command: str = "aimspax-like",
    name: str = "aimspax-driver",
    run_dir: str = "RUN_DIR",
) -> str:
    """The driver's batch script for scheduler ``kind`` (see the module docstring)."""
    if kind not in _DIRECTIVE:
        raise ConfigError("driver.scheduler", f"no driver job script for {kind!r} (slurm, pbspro, torque, lsf, sge)")
    if grace_s >= walltime_seconds(walltime):
        raise ConfigError("driver.grace_s", f"{grace_s} s is not shorter than the walltime {walltime}")
    requeue = kind == "slurm" and restart == "requeue"
    restart_count = (f"${{SLURM_RESTART_COUNT:-${{{_RESTART_VARIABLE}:-0}}}}" if requeue
                     else f"${{{_RESTART_VARIABLE}:-0}}")
    job = {"slurm": "${SLURM_JOB_ID:-}", "pbspro": "${PBS_JOBID:-}", "torque": "${PBS_JOBID:-}",
           "lsf": "${LSB_JOBID:-}", "sge": "${JOB_ID:-}"}[kind]
    run = [command, "run", config, "--resume", "--quiet"] + (["--site", site] if site else [])
    timer = ""
    if kind in ("pbspro", "torque"):  # no warning signal option: our own timer sends it
        timer = (f"( sleep {walltime_seconds(walltime) - grace_s} && kill -TERM $$ ) 2>/dev/null &\n"
                 "TIMER=$!\n")
    lines = [
        "#!/bin/bash",
        "# The aimspax-like driver as a batch job that outlives its walltime (aimspax-like jobscripts).",
        f"# {grace_s} s before the walltime the driver is told to save (SIGTERM); it exits with 143 and",
        f"# this job {'requeues' if requeue else 'resubmits'} itself to continue with --resume, at most "
        f"{max_restarts} times.",
        "# Submitting it again by hand continues the campaign as well.",
        *_directives(kind, name, walltime, grace_s, requeue, directives or []),
        "set -uo pipefail",
        "",
        f"JOB={job}",
        f"RESTART={restart_count}",
        f"cd {shlex.quote(workdir)}" if workdir else f'cd "${{{_submit_dir(kind)}:-$PWD}}"',
        *(setup or []),
        "# The driver records its job and restart in the event log (campaign_start).",
        'export AIMSPAX_DRIVER_JOB="$JOB" AIMSPAX_DRIVER_RESTART="$RESTART"',
        "for name in $(compgen -e); do",
        f'    case "$name" in {_SCHEDULER_VARIABLES[kind]}) unset "$name" ;; esac',
        "done",
        'echo "driver job $JOB (restart $RESTART) on $(hostname) at $(date -Is)"',
        " ".join(shlex.quote(part) for part in run) + " &",
        "DRIVER=$!",
        "# The scheduler's warning goes to this shell; the driver saves on SIGTERM.",
        'trap \'echo "warning signal at $(date -Is): the driver saves and stops"; kill -TERM "$DRIVER" 2>/dev/null\''
        " TERM USR1",
        timer.rstrip("\n") or None,
        "while :; do",
        '    wait "$DRIVER"; rc=$?',
        '    kill -0 "$DRIVER" 2>/dev/null || break  # a signal ended the wait, not the driver',
        "done",
        "[ -n \"${TIMER:-}\" ] && kill \"$TIMER\" 2>/dev/null",
        'echo "driver exited with $rc at $(date -Is)"',
        '[ "$rc" -eq 143 ] || exit "$rc"  # 0 done, 2 bad input, 3 stopped for a cause to fix: no restart',
        f'if [ "$RESTART" -ge {max_restarts} ]; then',
        f'    echo "gave up after {max_restarts} restarts; continue with: {command} resume {run_dir}"; exit "$rc"',
        "fi",
        f"if ! {_restart_command(kind, restart, script_path)}; then",
        f'    echo "could not {"requeue" if requeue else "resubmit"} this job; submit {script_path} again '
        'by hand to continue"; exit "$rc"',
        "fi",
        "exit 0",
        "",
    ]
    return "\n".join(line for line in lines if line is not None).replace("\n\n\n", "\n\n")


def _submit_dir(kind: str) -> str:
    return {"slurm": "SLURM_SUBMIT_DIR", "pbspro": "PBS_O_WORKDIR", "torque": "PBS_O_WORKDIR",
            "lsf": "LS_SUBCWD", "sge": "SGE_O_WORKDIR"}[kind]


def add_parsers(sub: argparse._SubParsersAction) -> None:
    cmd = sub.add_parser("jobscripts", help="write the driver's batch script and a label block's for this machine")
    cmd.add_argument("config", type=Path, help="campaign YAML")
    cmd.add_argument("--site", help="site profile (a name or a file); default: the campaign's, or $AIMSPAX_SITE")
    cmd.add_argument("--output", type=Path, default=Path("jobscripts"), help="folder to write them to")


def run(args: argparse.Namespace) -> int:
    from aimspax_like.cluster_config import BatchCluster
    from aimspax_like.config import load_config
    from aimspax_like.execution.providers import block_script
    from aimspax_like.site import DriverJob, read_profile

    config = load_config(args.config, site=args.site)
    record = config.site_record  # the profile load_config found, if any: its driver section is ours
    site_file = record["file"] if record is not None else None
    driver = read_profile(Path(site_file)).driver if site_file is not None else DriverJob()
    kind = driver.scheduler or (config.cluster.kind if isinstance(config.cluster, BatchCluster) else None)
    if kind is None:
        raise ConfigError("driver.scheduler", "the cluster is local: name the driver's scheduler in the site "
                          "profile (driver: {scheduler: slurm})")
    folder = args.output
    driver_path = (folder / f"driver.{_SUFFIX.get(kind, kind)}").absolute()  # driver_script refuses kinds it lacks
    executable = Path(sys.executable).with_name("aimspax-like")
    text = driver_script(
        kind, str(args.config.resolve()), str(driver_path), walltime=driver.walltime, grace_s=driver.grace_s,
        max_restarts=driver.max_restarts, restart=driver.restart, directives=driver.directives, setup=driver.setup,
        site=site_file, workdir=str(Path.cwd()), command=str(executable) if executable.is_file() else "aimspax-like",
        run_dir=str(Path(config.output.directory).absolute()),
    )
    written = [driver_path]
    block = None
    if isinstance(config.cluster, BatchCluster):
        block = block_script(config.cluster, "<Parsl's worker pool command, filled in at submission>")
        written.append((folder / f"label_block.{_SUFFIX.get(config.cluster.kind, config.cluster.kind)}").absolute())
    folder.mkdir(parents=True, exist_ok=True)
    driver_path.write_text(text)
    driver_path.chmod(0o755)
    if block is not None:
        written[1].write_text(block)
    for path in written:
        print(path)
    return 0
