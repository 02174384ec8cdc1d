"""The chaos script, shortened: SIGKILL the campaign driver a few times, resume, check everything.

The end-to-end run (a random kill, one in AL, one in convergence training, one in test-set
labelling, and two second drivers refused while one runs) takes a few minutes, so it is ``slow``; the quick tests
here check the script's own bookkeeping (kill schedule, reading the phase from the event log,
the refusal line) in well under a second.
"""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts/chaos_resume.py"


@pytest.fixture(scope="module")
def chaos():
    spec = importlib.util.spec_from_file_location("chaos_resume", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


def test_kill_schedule_is_fixed_by_the_options(chaos):
    assert chaos.kill_schedule(8, ["random", "converge", "test"]) == ["random"] * 6 + ["converge", "test"]
    assert chaos.kill_schedule(3, ["test", "random", "converge"]) == ["random", "converge", "test"]
    assert chaos.kill_schedule(4, ["random", "test", "al", "converge"]) == ["random", "al", "converge", "test"]
    assert chaos.kill_schedule(1, ["random", "converge", "test"]) == ["converge"]
    assert chaos.kill_schedule(4, ["random"]) == ["random"] * 4
    assert chaos.kill_schedule(3, ["test", "converge"]) == ["converge", "converge", "test"]
    assert chaos.kill_schedule(0, ["random", "converge", "test"]) == []
    with pytest.raises(ValueError, match="unknown target"):
        chaos.kill_schedule(2, ["random", "md"])


def test_the_phase_hit_is_read_from_the_event_log(chaos, tmp_path):
    log = tmp_path / "events.jsonl"
    tail = chaos.EventTail(log)
    assert tail.poll() == [] and tail.where() == "-"  # no log yet

    def emit(*events, torn=""):
        with log.open("a") as f:
            f.write("".join(json.dumps({"t": 0, **e}) + "\n" for e in events) + torn)
        tail.poll()
        return tail.where()

    assert emit({"event": "campaign_start"}) == "start-up"
    assert emit({"event": "phase_start", "phase": "idg"}, {"event": "frame_stored"}) == "idg"
    assert emit({"event": "phase_end", "phase": "idg"}, {"event": "phase_resume", "phase": "al"}) == "al"
    assert emit({"event": "phase_start", "phase": "converge"}, torn='{"t": 1, "ev') == "converge"
    assert tail.offset < log.stat().st_size  # the half-written line waits for its end
    assert emit({"event": "campaign_start"}) == "start-up" and tail.torn == 1  # the killed remnant
    assert emit({"event": "phase_start", "phase": "test"}) == "test (sampling)"
    assert emit({"event": "label_submitted", "phase": "al"}) == "test (sampling)"
    assert emit({"event": "label_submitted", "phase": "test"}) == "test (labelling)"
    assert emit({"event": "phase_end", "phase": "test"}, {"event": "campaign_end"}) == "shut-down"
    assert tail.starts == 2 and tail.stored == 1
    assert chaos.read_events(log)[1] == 1


def test_what_counts_as_a_hit(chaos):
    assert chaos.hits("converge", "converge") and not chaos.hits("converge", "converge ended")
    assert chaos.hits("al", "al") and not chaos.hits("al", "idg")
    assert chaos.hits("test", "test (labelling)") and not chaos.hits("test", "test (sampling)")
    assert chaos.hits("test", "test (sampling)", test_labels=False)
    assert chaos.hits("random", "al") and chaos.hits("random", "idg")


def test_the_refusal_line_names_the_holder(chaos):
    line = ("error: runs/x: run directory in use by another driver (pid 4242 on node7 since 2025-01-02 "
            "03:04:05); wait for it to end or stop it")
    match = chaos.IN_USE.search(line)
    assert match and match.group(1) == "4242" and match.group(2) == "node7"
    assert chaos.IN_USE.search("error: runs/x: run directory exists; pass --overwrite to start over") is None


@pytest.mark.slow
def test_campaign_survives_sigkill_and_resumes(tmp_path):
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--kills", "4", "--workdir", str(tmp_path), "--train-size", "26"],
        capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "result             PASS" in result.stdout
    table = result.stdout.split("chaos_resume summary", 1)[1]
    assert re.search(r"\n\s+\d+\s+al\s+al\s", table), table
    assert re.search(r"\n\s+\d+\s+converge\s+converge\s", table), table
    assert re.search(r"\n\s+\d+\s+test\s+test \(labelling\)\s", table), table
    assert "refused 2 / 2" in table
