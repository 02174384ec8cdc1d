"""What bounded training rounds buy: the quickstart with full rounds against replay rounds.

Runs one campaign per (rounds mode, seed) from the same campaign file, only ``al.rounds.mode``
and ``seed`` changed, and prints, per run and as mean +- std over seeds, the CPU seconds of the
active-learning phase by kind of work (from each run's CPU profile), the labels it took, and the
held-out test errors (reference MD at the test temperatures, never sampled by any model): the
final converged model's force MAE and the mean of the members' force MAEs. The ratios
``replay / full`` are taken within this one invocation. Runs that finished are read, not rerun,
so an interrupted study continues::

    .venv/bin/python workflows/training_cost.py                          # quickstart, seeds 0,1,2
    .venv/bin/python workflows/training_cost.py --seeds 0 --parallel 1   # one seed, one at a time
    .venv/bin/python workflows/training_cost.py --seeds 0 --set al.max_epochs_per_point=2 --out runs/tc2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from aimspax_like.config import dotted_settings, merge_settings

ROOT = Path(__file__).resolve().parents[1]
KINDS = [("md", "md"), ("uncertainty", "uncert"), ("training", "train"), ("io", "io")]


def run_config(base: Path, mode: str, seed: int, out: Path, settings: Sequence[str] = ()) -> Path:
    """The campaign file of one run: ``base`` with its structures made absolute and the
    ``KEY=VALUE`` settings (dotted keys, YAML values) applied."""
    config = merge_settings(yaml.safe_load(base.read_text()), dotted_settings(settings))
    structures = config["system"]["structures"]
    items = structures if isinstance(structures, list) else [structures]
    absolute = [str((base.parent / s).resolve()) if not Path(s).is_absolute() else s for s in items]
    config["system"]["structures"] = absolute if isinstance(structures, list) else absolute[0]
    config["seed"] = seed
    config.setdefault("al", {})["rounds"] = {**config.get("al", {}).get("rounds", {}), "mode": mode}
    config.setdefault("output", {})["directory"] = str(out / f"{mode}_{seed}")
    path = out / f"{mode}_{seed}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def finished(run_dir: Path) -> bool:
    return (run_dir / "report/summary.json").is_file()


def launch(config: Path, log: Path) -> subprocess.Popen:
    command = [sys.executable, "-m", "aimspax_like.cli", "run", str(config), "--overwrite", "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    with log.open("w") as sink:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, env=env, cwd=ROOT)


def results_of(run_dir: Path) -> dict[str, Any]:
    summary = json.loads((run_dir / "report/summary.json").read_text())
    al = summary["profile"].get("al", {})
    cpu = {kind: al.get(kind, {}).get("cpu_s", 0.0) for kind, _ in KINDS}
    cpu["total"] = al.get("driver", {}).get("cpu_s", 0.0) + al.get("labelling", {}).get("cpu_s", 0.0)
    cpu["labels"] = al.get("labelling", {}).get("cpu_s", 0.0)
    test = summary["test"]["all"]
    return {
        "cpu": cpu,
        "al_labels": summary["labels"].get("al", 0) if isinstance(summary["labels"], dict) else None,
        "final_f": 1000 * test["final"]["force_mae"],
        "members_f": 1000 * float(np.mean([m["force_mae"] for m in test["members"]])),
        "md_steps": summary["md_steps"].get("al") if isinstance(summary["md_steps"], dict) else None,
    }


def _pm(values: Sequence[float], digits: int = 1) -> str:
    arr = np.asarray(values, dtype=float)
    return f"{arr.mean():.{digits}f} ± {arr.std():.{digits}f}" if len(arr) > 1 else f"{arr.mean():.{digits}f}"


def table(results: dict[str, dict[int, dict[str, Any]]]) -> str:
    header = ["rounds", "seed", "AL md", "AL uncert", "AL train", "AL io", "AL total", "AL MD steps",
              "test F MAE final (meV/A)", "test F MAE members (meV/A)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for mode, runs in results.items():
        for seed, r in sorted(runs.items()):
            c = r["cpu"]
            lines.append(f"| {mode} | {seed} | {c['md']:.1f} | {c['uncertainty']:.1f} | {c['training']:.1f} | "
                         f"{c['io']:.1f} | {c['total']:.1f} | {r['md_steps']} | {r['final_f']:.1f} | "
                         f"{r['members_f']:.1f} |")
        rows = list(runs.values())
        if rows:
            lines.append(
                f"| {mode} | mean | {_pm([r['cpu']['md'] for r in rows])} | "
                f"{_pm([r['cpu']['uncertainty'] for r in rows])} | {_pm([r['cpu']['training'] for r in rows])} | "
                f"{_pm([r['cpu']['io'] for r in rows])} | {_pm([r['cpu']['total'] for r in rows])} | "
                f"{_pm([r['md_steps'] for r in rows], 0)} | {_pm([r['final_f'] for r in rows])} | "
                f"{_pm([r['members_f'] for r in rows])} |")
    text = "\n".join(lines)
    if "full" in results and "replay" in results and results["full"] and results["replay"]:
        def ratio(get) -> float:
            return float(np.mean([get(r) for r in results["replay"].values()])
                         / np.mean([get(r) for r in results["full"].values()]))

        ratios = {
            "AL training CPU": ratio(lambda r: r["cpu"]["training"]),
            "AL phase CPU": ratio(lambda r: r["cpu"]["total"]),
            "test F MAE final": ratio(lambda r: r["final_f"]),
            "test F MAE members": ratio(lambda r: r["members_f"]),
        }
        text += "\n\nreplay / full (means over seeds): " + ", ".join(f"{k} {v:.2f}" for k, v in ratios.items())
    return text


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=ROOT / "configs/quickstart.yaml")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--modes", default="full,replay")
    parser.add_argument("--parallel", type=int, default=2, help="campaigns at a time (each uses ~1 core)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a campaign setting for every run, dotted key and YAML value (repeatable)")
    parser.add_argument("--out", type=Path, default=ROOT / "runs/training_cost")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    seeds = [int(s) for s in args.seeds.split(",")]
    modes = args.modes.split(",")
    todo = [(m, s) for s in seeds for m in modes if not finished(args.out / f"{m}_{s}")]
    running: list[tuple[str, int, subprocess.Popen]] = []
    while todo or running:
        while todo and len(running) < args.parallel:
            mode, seed = todo.pop(0)
            print(f"running {mode} seed {seed} -> {args.out / f'{mode}_{seed}'}", flush=True)
            config = run_config(args.config.resolve(), mode, seed, args.out, args.set)
            running.append((mode, seed, launch(config, args.out / f"{mode}_{seed}.log")))
        mode, seed, process = running.pop(0)
        if process.wait() != 0:
            print(f"{mode} seed {seed} failed (exit {process.returncode}): see {args.out / f'{mode}_{seed}.log'}")
    results = {m: {s: results_of(args.out / f"{m}_{s}") for s in seeds if finished(args.out / f"{m}_{s}")}
                for m in modes}
    print(f"\ncampaign {args.config}, AL phase CPU seconds (driver + labels on the workers), "
          "test errors on the campaign's held-out reference-MD test set\n")
    print(table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
