"""Shared fixtures.

Fixtures that start processes are session-scoped: starting Parsl workers costs several
seconds, so the whole test session shares one pool.
"""

from __future__ import annotations

import os

# As the CLI does: one OpenMP thread per process, set before torch loads (see cli._default_threads).
os.environ.setdefault("OMP_NUM_THREADS", "1")

from collections.abc import Iterator

import pytest
from ase import Atoms

from aimspax_like.config import LocalCluster
from aimspax_like.execution import ParslLabelExecutor


@pytest.fixture(autouse=True)
def _close_event_logs() -> Iterator[None]:
    """Close the event logs a test opened with ``log_helpers.open_event_log``."""
    from log_helpers import close_event_logs

    yield
    close_event_logs()


@pytest.fixture(scope="session")
def parsl_executor(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ParslLabelExecutor]:
    """One started two-worker Parsl label executor for the whole session, workers warm.

    Each worker's first label pays for importing the label code (~0.5 s), so one slow-ish label
    per worker runs here; timing tests then measure labels, not imports, in any order.
    """
    run_dir = tmp_path_factory.mktemp("parsl_run")
    with ParslLabelExecutor(LocalCluster(max_workers=2), run_dir) as executor:
        assert executor.wait_ready(timeout=60), "no Parsl worker became ready within 60 s"
        dimer = Atoms("Cu2", positions=[[0, 0, 0], [2.5, 0, 0]])
        warm_up = [
            executor.submit(dimer, {"kind": "emt"}, str(run_dir / f"warm{i}"), faults={"delay_s": 0.3})
            for i in range(executor.n_workers)
        ]
        for future in warm_up:
            future.result(timeout=60)
        yield executor


@pytest.fixture(scope="session")
def finished_campaign(tmp_path_factory: pytest.TempPathFactory, parsl_executor: ParslLabelExecutor):
    """The tiny campaign of ``campaign_helpers`` run once to the end: (run directory, summary).

    Shared by every test that reads a finished run (campaign checks, status, report, validate):
    treat it as read-only.
    """
    from campaign_helpers import tiny_config

    from aimspax_like.campaign import run_campaign
    from aimspax_like.config import config_from_dict

    tmp_path = tmp_path_factory.mktemp("campaign")
    # With ground-truth analysis points, so the report has true errors to show, and bounded
    # training rounds (every third one a full pass) so that a whole campaign runs them.
    rounds = {"mode": "replay", "replay_size": 3, "full_every": 3, "replay_weighting": "error"}
    config = config_from_dict(tiny_config(tmp_path, al={"analysis_every": 4, "rounds": rounds}))
    summary = run_campaign(config, executor=parsl_executor)
    return tmp_path / "run", summary
