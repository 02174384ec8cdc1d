"""Labels in real SLURM jobs, with blocks that scale up under load and back down when idle.

Needs the one-node cluster of ``scripts/slurm_start.sh``; run with ``pytest -m slurm``. Each
test prints its block timeline (``pytest -m slurm -s`` shows it).
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from ase.cluster import Icosahedron
from campaign_helpers import tiny_config

from aimspax_like.campaign import run_campaign
from aimspax_like.config import SlurmCluster, config_from_dict
from aimspax_like.events import read_events
from aimspax_like.execution import ParslLabelExecutor
from aimspax_like.reference.results import LabelResult

pytestmark = pytest.mark.slurm

BLOCK_EVENTS = ("block_requested", "block_running", "block_released", "workers")


@pytest.fixture(scope="module")
def partition() -> str:
    """The default partition of a SLURM cluster that is up; fails (not skips) without one."""
    if shutil.which("sinfo") is None:
        pytest.fail("no SLURM commands here: run `bash scripts/slurm_start.sh` first")
    info = subprocess.run(["sinfo", "-h", "-o", "%P %T"], capture_output=True, text=True, timeout=30)
    rows = [line.split() for line in info.stdout.splitlines() if line.strip()]
    usable = [p.rstrip("*") for p, state in rows if state in ("idle", "mixed", "allocated", "completing")]
    if info.returncode != 0 or not usable:
        pytest.fail(f"no usable SLURM node ({info.stdout.strip()} {info.stderr.strip()}): run scripts/slurm_start.sh")
    defaults = [p.rstrip("*") for p, _ in rows if p.endswith("*")]
    return defaults[0] if defaults else usable[0]


def _queued(job_ids: set[str]) -> set[str]:
    """Which of these jobs SLURM still has pending or running."""
    if not job_ids:
        return set()
    out = subprocess.run(
        ["squeue", "-h", "-o", "%i %t", "-j", ",".join(sorted(job_ids))],
        capture_output=True, text=True, timeout=30,
    ).stdout
    return {line.split()[0] for line in out.splitlines() if line.split() and line.split()[1] in ("PD", "R", "CF")}


def _timeline(events: list[dict[str, Any]], t0: float) -> str:
    rows = []
    for e in events:
        if e["event"] in BLOCK_EVENTS or e["event"] == "label_placed":
            detail = {k: v for k, v in e.items() if k not in ("t", "event")}
            rows.append(f"  {e['t'] - t0:7.1f} s  {e['event']:<16} {detail}")
    return "\n".join(rows)


def _check_block_bookkeeping(events: list[dict[str, Any]], max_blocks: int) -> dict[str, str]:
    """Every block requested once, with a SLURM job id, released once; never above max_blocks."""
    requested = {e["block"]: e["job_id"] for e in events if e["event"] == "block_requested"}
    released = [e["block"] for e in events if e["event"] == "block_released"]
    assert requested and all(requested.values()), requested
    assert sorted(released) == sorted(requested), (requested, released)
    counts = [e["active_blocks"] for e in events if "active_blocks" in e]
    assert max(counts) <= max_blocks and counts[-1] == 0, counts
    return requested


def test_label_burst_scales_blocks_out_and_back_in(partition: str, tmp_path: Path) -> None:
    """Six 2 s labels on max_blocks=2: two SLURM jobs start, run the labels, and are cancelled
    once idle for max_idletime_s; one more task then brings a new block up."""
    events: list[dict[str, Any]] = []
    t0 = time.time()

    def record(name: str, fields: dict[str, Any]) -> None:
        events.append({"t": time.time(), "event": name, **fields})

    cluster = SlurmCluster.model_validate({
        "provider": {"partition": partition, "walltime": "00:10:00", "min_blocks": 0, "max_blocks": 2,
                     "exclusive": False},
        "launcher": {"kind": "srun"},
        "executor": {"workers_per_node": 1, "max_idletime_s": 3, "strategy_period_s": 1},
    })
    idle_s = cluster.executor.max_idletime_s
    with ParslLabelExecutor(cluster, tmp_path, on_event=record) as executor:
        assert executor.block_states() == {}  # min_blocks = init_blocks = 0: nothing until labels come
        atoms = Icosahedron("Cu", 2)
        futures = [
            executor.submit(atoms, {"kind": "emt"}, str(tmp_path / f"burst{i}"), faults={"delay_s": 2.0})
            for i in range(6)
        ]
        outcomes = [f.result(timeout=150) for f in futures]
        last_label_t = time.time()
        assert all(isinstance(o, LabelResult) for o in outcomes), outcomes
        first_jobs = {e["job_id"] for e in events if e["event"] == "block_requested"}
        assert len(first_jobs) == 2, "six queued labels should have asked for max_blocks=2 blocks"

        # Idle now: the strategy cancels both blocks after max_idletime_s.
        deadline = time.time() + 60
        while time.time() < deadline and not all(s == "released" for s in executor.block_states().values()):
            time.sleep(0.5)
        assert set(executor.block_states().values()) == {"released"}, executor.block_states()
        released = [e for e in events if e["event"] == "block_released"]
        assert {e["reason"] for e in released} == {"scaled_in"}
        assert min(e["t"] for e in released) - last_label_t >= idle_s - 1.0
        deadline = time.time() + 30
        while _queued(first_jobs) and time.time() < deadline:
            time.sleep(0.5)
        assert not _queued(first_jobs), "cancelled blocks are still in the SLURM queue"

        # Work again: a new block (a new SLURM job) comes up for it.
        report = executor.probe().result(timeout=120)
        assert report["slurm_job_id"] not in first_jobs and report["heavy_modules"] == []
    print(f"\nblock timeline (t from executor start):\n{_timeline(events, t0)}")

    requested = _check_block_bookkeeping(events, max_blocks=2)
    assert report["slurm_job_id"] in requested.values()
    running = {e["block"] for e in events if e["event"] == "block_running"}
    assert running >= {e["block"] for e in events if e["event"] == "block_requested" and e["job_id"] in first_jobs}
    assert max(e["connected"] for e in events if e["event"] == "workers") == 2
    placed = [e for e in events if e["event"] == "label_placed"]
    assert len(placed) == 6 and all(e["ok"] for e in placed)
    # Each label reports the SLURM job it ran in: one of the blocks, and both blocks took labels.
    assert {e["slurm_job_id"] for e in placed} == first_jobs
    assert all(requested[e["block"]] == e["slurm_job_id"] for e in placed)


def test_unusable_partition_fails_labels_instead_of_hanging(partition: str, tmp_path: Path) -> None:
    """sbatch refusing the block is infrastructure failure: the label future raises, with
    SLURM's message, and the failed block is an event."""
    from parsl.executors.errors import BadStateException

    events: list[tuple[str, dict[str, Any]]] = []
    cluster = SlurmCluster.model_validate({
        "provider": {"partition": f"{partition}-no-such-partition", "walltime": "00:05:00", "exclusive": False},
        "executor": {"max_idletime_s": 3, "strategy_period_s": 1},
    })
    with ParslLabelExecutor(cluster, tmp_path, on_event=lambda n, d: events.append((n, d))) as executor:
        future = executor.submit(Icosahedron("Cu", 2), {"kind": "emt"}, str(tmp_path / "never"))
        with pytest.raises(BadStateException, match="invalid partition"):
            future.result(timeout=60)
    failed = [d for n, d in events if n == "block_released"]
    assert failed and failed[0]["reason"] == "failed" and failed[0]["job_id"] is None
    assert "invalid partition" in failed[0]["message"]


def _tiny_campaign(tmp_path: Path, partition: str) -> dict:
    """The tiny EMT campaign of test_campaign.py (2-member MACE), its labels sent to SLURM."""
    config = tiny_config(tmp_path)
    config["cluster"] = {
        "kind": "slurm",
        "provider": {"partition": partition, "walltime": "00:15:00", "min_blocks": 0, "max_blocks": 2,
                     "exclusive": False},
        "launcher": {"kind": "single_node"},
        "executor": {"workers_per_node": 1, "max_idletime_s": 3, "strategy_period_s": 1},
    }
    return config


def test_tiny_campaign_labels_run_inside_slurm_jobs(partition: str, tmp_path: Path) -> None:
    config = config_from_dict(_tiny_campaign(tmp_path, partition))
    summary = run_campaign(config)
    run = tmp_path / "run"
    assert (run / "models/best.model").is_file()
    events = read_events(run / "logs/events.jsonl")
    t0 = events[0]["t"]
    print(f"\ncampaign block timeline (t from campaign start):\n{_timeline(events, t0)}")
    counts = [(round(e["t"] - t0, 1), e["active_blocks"]) for e in events if "active_blocks" in e]
    print(f"block count over time: {counts}")

    requested = _check_block_bookkeeping(events, max_blocks=2)
    assert any(e["event"] == "block_running" for e in events)
    assert max(e["connected"] for e in events if e["event"] == "workers") >= 1
    # Every label that went to the executor reports the SLURM job it ran in, one of the blocks'.
    placed = {Path(e["workdir"]).name: e for e in events if e["event"] == "label_placed"}
    assert all(e["slurm_job_id"] and requested[e["block"]] == e["slurm_job_id"] for e in placed.values())
    al_done = [e["label"] for e in events if e["event"] == "label_done" and e["phase"] == "al"]
    assert al_done and all(f"al_{label:06d}" in placed for label in al_done)
    assert summary["test"]["size"] == 6  # sampled by reference MD in the driver: no test labels to place
    # At the end every block was cancelled and has left the SLURM queue.
    assert _wait_gone(set(requested.values()))


def _wait_gone(job_ids: set[str], timeout: float = 30) -> bool:
    deadline = time.time() + timeout
    while _queued(job_ids) and time.time() < deadline:
        time.sleep(0.5)
    return not _queued(job_ids)



def test_slurm_job_state_tells_a_cancelled_job_from_a_completed_one(partition: str, tmp_path: Path) -> None:
    """Without accounting Parsl calls every job that left squeue COMPLETED; scontrol still knows."""
    from aimspax_like.execution import slurm_job_state

    def submit(command: str) -> str:
        out = subprocess.run(["sbatch", "--parsable", "-p", partition, "-o", str(tmp_path / "%j.out"),
                              "--wrap", command], capture_output=True, text=True, check=True, timeout=30)
        return out.stdout.strip().split(";")[0]

    cancelled, completed = submit("sleep 300"), submit("true")
    subprocess.run(["scancel", cancelled], check=True, timeout=30)
    deadline = time.time() + 60
    while time.time() < deadline and _queued({cancelled, completed}):
        time.sleep(0.5)
    assert slurm_job_state(cancelled) == "CANCELLED"
    assert slurm_job_state(completed) == "COMPLETED"
    assert slurm_job_state(None) is None


def _job_field(job_id: str, field: str) -> str | None:
    out = subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True, timeout=30).stdout
    return next((word.split("=", 1)[1] for word in out.split() if word.startswith(f"{field}=")), None)


def _wait_for(check, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while not check():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(1)


def test_driver_job_warned_before_its_walltime_saves_requeues_and_finishes(partition: str, tmp_path: Path) -> None:
    """The driver's job script (``aimspax-like jobscripts``) in a real SLURM job: the walltime
    warning (sent here by ``scancel --signal=TERM --batch``, exactly what ``--signal=B:TERM@grace``
    delivers) makes the driver save mid-campaign; the job requeues itself, continues with --resume and
    finishes. SLURM holds a requeued job back for a while; the test lets it start at once."""
    import json
    import sys

    import yaml

    from aimspax_like.jobscripts import driver_script

    data = tiny_config(tmp_path, test_set={"size": 2})
    data["cluster"] = {"kind": "local", "max_workers": 1}
    (tmp_path / "campaign.yaml").write_text(yaml.safe_dump(data))
    script = tmp_path / "driver.sbatch"
    script.write_text(driver_script(
        "slurm", str(tmp_path / "campaign.yaml"), str(script), walltime="00:20:00", grace_s=120, max_restarts=2,
        directives=[f"--partition={partition}", "--cpus-per-task=1"], workdir=str(tmp_path),
        command=str(Path(sys.executable).with_name("aimspax-like"))))
    submitted = subprocess.run(["sbatch", "--parsable", str(script)], cwd=tmp_path, capture_output=True, text=True,
                               check=True, timeout=30)
    job = submitted.stdout.strip().split(";")[0]
    log = tmp_path / "run" / "logs" / "events.jsonl"

    def events() -> list[dict]:
        return read_events(log) if log.is_file() else []

    try:
        _wait_for(lambda: any(e["event"] == "al_start" for e in events()), 300, "active learning to start")
        subprocess.run(["scancel", "--signal=TERM", "--batch", job], check=True, timeout=30)
        _wait_for(lambda: _job_field(job, "Restarts") == "1" and _job_field(job, "JobState") == "PENDING", 120,
                  "the job to requeue itself")
        subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], check=True, timeout=30)
        _wait_for(lambda: job not in _queued({job}), 600, "the requeued job to finish")
    finally:
        subprocess.run(["scancel", job], capture_output=True, timeout=30)
    output = (tmp_path / f"aimspax-driver-{job}.out").read_text()
    records = events()
    starts = [(e["driver_job"], e["driver_restart"], e["resume"]) for e in records if e["event"] == "campaign_start"]
    print(f"\n{output}\n" + "\n".join(json.dumps(e) for e in records if e["event"].startswith("campaign")))
    assert starts == [(job, 0, True), (job, 1, True)], starts
    interrupted = [e for e in records if e["event"] == "campaign_interrupted"]
    # Sent once AL started: it lands in AL or, on a busy machine, already in convergence training.
    assert len(interrupted) == 1 and interrupted[0]["signal"] == 15 and interrupted[0]["phase"] in ("al", "converge")
    assert output.count("driver exited with 143") == 1 and output.count("driver exited with 0") == 1
    assert (tmp_path / "run" / "report" / "summary.json").is_file()
    # The job completion log (sacct -c) has one record per run of the job: the requeued run (SLURM
    # 22.05 logs its state at that moment, PENDING) and the finished one.
    completions = subprocess.run(["sacct", "-c", "-j", job, "-n", "-o", "JobID,State"], capture_output=True,
                                 text=True, timeout=30).stdout.split()
    states = completions[1::2]
    assert completions[::2] == [job, job] and states[0] in ("REQUEUED", "PENDING") and states[1] == "COMPLETED", \
        completions
