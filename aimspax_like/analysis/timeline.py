"""What the event log says about parallelism: did sampling go on while labels were computed?

For every active-learning label, count the uncertainty checks that *other* trajectories made
between its submission and its return. In serial mode that number is always zero; in parallel
mode it measures how much sampling the label's wall time did not block.
"""

from __future__ import annotations

from typing import Any


def label_overlap(events: list[dict[str, Any]]) -> dict[str, Any]:
    open_labels: dict[int, dict[str, Any]] = {}
    finished: list[dict[str, Any]] = []
    for event in events:
        if "phase" in event and event["event"] in ("label_submitted", "label_done", "label_failed"):
            continue  # IDG / test-set labels are batch jobs, not part of the AL loop
        kind = event["event"]
        if kind == "label_submitted":
            open_labels[event["label"]] = {"trajectory": event["trajectory"], "t0": event["t"], "checks": 0}
        elif kind == "uncertainty":
            for record in open_labels.values():
                if record["trajectory"] != event["trajectory"]:
                    record["checks"] += 1
        elif kind in ("label_done", "label_failed") and event.get("label") in open_labels:
            record = open_labels.pop(event["label"])
            record["wall_s"] = event["t"] - record["t0"]
            finished.append(record)
    overlapped = [r for r in finished if r["checks"] > 0]
    return {
        "labels": len(finished),
        "labels_overlapping_sampling": len(overlapped),
        "checks_by_others_during_labels": sum(r["checks"] for r in finished),
        "max_in_flight": max((e.get("in_flight", 0) for e in events if e["event"] == "label_submitted"), default=0),
    }
