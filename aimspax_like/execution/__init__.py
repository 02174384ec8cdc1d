"""Where reference labels run: the engine's only door to Parsl.

The scheduler hands a structure to a ``LabelExecutor`` (``base``) and gets a plain
``concurrent.futures.Future`` back. Production labels run in Parsl workers
(``htex.ParslLabelExecutor``: one HighThroughputExecutor over the provider that
``providers.build_provider`` makes from the ``cluster`` section, this machine or blocks of any
batch scheduler); ``threads.ThreadLabelExecutor`` runs them on threads for unit tests. Block
changes become events (``blocks``); what workers run besides ``label`` is in ``worker_tasks``.

No module outside this package imports parsl, and importing the package imports none of it:
Parsl is loaded when an executor starts or a provider is built.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from aimspax_like.errors import ConfigError
from aimspax_like.execution.base import EventHook, LabelExecutor
from aimspax_like.execution.blocks import slurm_job_state
from aimspax_like.execution.htex import ParslLabelExecutor
from aimspax_like.execution.threads import ThreadLabelExecutor
from aimspax_like.execution.worker_tasks import label_with_placement, placement, worker_report

if TYPE_CHECKING:
    from aimspax_like.cluster_config import BatchCluster, LocalCluster

__all__ = [
    "EventHook",
    "LabelExecutor",
    "ParslLabelExecutor",
    "ThreadLabelExecutor",
    "label_with_placement",
    "make_label_executor",
    "placement",
    "slurm_job_state",
    "worker_report",
]


def make_label_executor(
    cluster_config: LocalCluster | BatchCluster,
    run_dir: str | os.PathLike[str],
    on_event: EventHook | None = None,
) -> LabelExecutor:
    """The (not yet started) executor for the campaign's ``cluster`` section."""
    from aimspax_like.execution.providers import PROVIDER_CLASSES

    kind = getattr(cluster_config, "kind", None)
    if kind not in PROVIDER_CLASSES:
        raise ConfigError("cluster.kind", f"unknown cluster kind {kind!r}")
    return ParslLabelExecutor(cluster_config, run_dir, on_event=on_event)
