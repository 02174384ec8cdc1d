"""What the event log says about parallelism: did sampling go on while labels were computed?

For every active-learning label, the scheduler records the MD steps that *other* trajectories
took between its submission and its return (``others_md_steps`` on ``label_done``,
``label_failed`` and ``label_held``). Checks computed in the same batch as the submission do not
count: they were sampled before the label left. In serial mode the number is always zero; in
parallel mode it measures how much sampling the label's wall time did not block.
"""

from __future__ import annotations

from typing import Any

_RETURNED = ("label_done", "label_failed", "label_held")


def label_overlap(events: list[dict[str, Any]]) -> dict[str, Any]:
    returned = [e for e in events
                if e["event"] in _RETURNED and e.get("phase", "al") == "al" and "others_md_steps" in e]
    overlapped = [e for e in returned if e["others_md_steps"] > 0]
    return {
        "labels": len(returned),
        "labels_overlapping_sampling": len(overlapped),
        "md_steps_by_others_during_labels": sum(e["others_md_steps"] for e in returned),
        "max_in_flight": max((e.get("in_flight", 0) for e in events if e["event"] == "label_submitted"), default=0),
    }
