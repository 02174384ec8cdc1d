"""FALCON's Pt55 example with the engine: on-the-fly MD of an icosahedral Pt55 cluster at 600 K.

The FALCON paper runs MD of an icosahedral Pt55 cluster with ASE's EMT as the reference, 600 K,
1 fs, and a GPR model trained on energies that calls EMT whenever its predicted energy
uncertainty exceeds an accuracy threshold epsilon (0.125 eV: 53 EMT calls in the first 1000
steps, 153 in the first 120,000), and sweeps epsilon from 0.05 to 0.20 eV.

This study runs the same MD with ``aimspax-like otf`` (``configs/otf_pt55.yaml``): a MACE
committee started from frames of an EMT relaxation (FALCON's start), FALCON's trigger (the
spread of the members' total energies, in eV) at each epsilon, one run directory per epsilon.
It prints, per epsilon:

- labels (EMT calls) in the first 1000 and 10000 MD steps and in all;
- the errors of the trajectory the committee drove, on frames it answered alone (every
  ``otf.write_every``-th step, up to ``otf.validate_frames`` of them), recomputed with EMT:
  energy RMSE (eV and meV/atom), and the largest atomic force error;
- the wall time split into model (committee predictions), training and reference, and the
  MD loop's total.

Runs that finished are read, not rerun, and a killed one resumes, so an interrupted study
continues where it stopped::

    .venv/bin/python workflows/falcon_pt55.py                           # 3 epsilons + 0.2 calibrated
    .venv/bin/python workflows/falcon_pt55.py --steps 2000 --epsilons 0.1 --out runs/pt55_quick
    .venv/bin/python workflows/falcon_pt55.py --set model.channels=16   # any config key
    .venv/bin/python workflows/falcon_pt55.py --calibrate               # every epsilon calibrated too
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from aimspax_like.config import dotted_settings, merge_settings

ROOT = Path(__file__).resolve().parents[1]
BASE = ROOT / "configs" / "otf_pt55.yaml"
FALCON = {"epsilon_eV": 0.125, "labels_first_1000": 53, "labels_first_120000": 153}


def run_config(base: Path, epsilon: float, steps: int, out: Path, settings: Sequence[str] = (),
               calibrate: bool = False) -> Path:
    """The config of one epsilon: ``base`` with absolute structure paths, the trigger and step
    count set, and the ``KEY=VALUE`` settings (dotted keys, YAML values) applied last."""
    config = yaml.safe_load(base.read_text())
    structures = config["system"]["structures"]
    items = structures if isinstance(structures, list) else [structures]
    config["system"]["structures"] = [str((base.parent / s).resolve()) if not Path(s).is_absolute() else s
                                      for s in items]
    otf = config.setdefault("otf", {})
    otf["steps"] = steps
    otf["trigger"] = {**otf.get("trigger", {}), "measure": "energy", "energy_per_atom": False,
                      "threshold": float(epsilon), "calibrate": calibrate}
    config = merge_settings(config, dotted_settings(settings))
    config.setdefault("output", {})["directory"] = str(out / run_name(epsilon, calibrate))
    path = out / f"{run_name(epsilon, calibrate)}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def run_name(epsilon: float, calibrate: bool = False) -> str:
    return f"eps_{epsilon:.3f}" + ("_calibrated" if calibrate else "")


def finished(run_dir: Path, steps: int) -> bool:
    report = run_dir / "report" / "otf.json"
    if not report.is_file():
        return False
    summary = json.loads(report.read_text())
    return bool(summary.get("finished")) and summary.get("steps") == steps


def launch(config: Path, run_dir: Path, log: Path) -> subprocess.Popen:
    """``aimspax-like otf`` (or its resume, when a killed run left a checkpoint) in its own process."""
    resume = ["--resume"] if (run_dir / "state" / "otf_checkpoint.pt").is_file() else ["--overwrite"]
    command = [sys.executable, "-m", "aimspax_like.cli", "otf", str(config), "--quiet", *resume]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    with log.open("w") as sink:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, env=env, cwd=ROOT)


def results_of(run_dir: Path) -> dict[str, Any]:
    """The numbers of the table, from one run's ``report/otf.json``."""
    summary = json.loads((run_dir / "report" / "otf.json").read_text())
    labels = summary["labels"]["cumulative"]
    check = summary["check"]
    t = summary["timings"]
    return {
        "epsilon": summary["trigger"]["threshold"], "calibrated": summary["trigger"].get("calibrate", False),
        "steps": summary["steps"], "start_frames": summary["start_frames"],
        "labels_1k": labels.get("1000"), "labels_10k": labels.get("10000"), "labels": labels["total"],
        "per_1000": summary["labels"]["per_1000_steps"], "check_frames": check.get("frames", 0),
        "energy_rmse_eV": check.get("energy_rmse_eV"), "energy_rmse_meV_atom": check.get("energy_rmse_meV_per_atom"),
        "energy_bias_eV": check.get("energy_bias_eV"),
        "force_mae": check.get("force_mae_eV_A"), "max_force_error": check.get("max_force_error_eV_A"),
        "model_s": t.get("model_s", 0.0), "training_s": t.get("training_s", 0.0),
        "reference_s": t.get("reference_s", 0.0), "md_loop_s": summary.get("elapsed_s", 0.0),
        "at_labels": summary.get("at_labels", {}),
        "sampled_energy_eV": sampled_energy(run_dir, summary["steps"]),
    }


def reference_md(config_path: Path, steps: int, out: Path, stride: int = 10) -> dict[str, Any]:
    """MD of the same start with the reference itself (same integrator, thermostat and seed):
    the ensemble the on-the-fly trajectories should sample. Its mean potential energy over the
    second half is what theirs (recomputed by the reference at the check frames) is compared to."""
    cached = out / f"reference_md_{steps}.json"
    if cached.is_file():
        return json.loads(cached.read_text())
    import numpy as np

    from aimspax_like.config import load_config
    from aimspax_like.reference.calculators import make_calculator
    from aimspax_like.sampling.ase_md import calculator_forces
    from aimspax_like.sampling.dynamics import maxwell_boltzmann, step_batch
    from aimspax_like.sampling.state import MDState
    from aimspax_like.structures import read_structures

    config = load_config(config_path)
    atoms = read_structures(config.system.structures, config.system.index)[0].copy()
    rng = np.random.default_rng(config.seed)
    md = config.otf.md.model_copy(update={"temperature_K": config.otf.temperature_at(0)})
    atoms.set_momenta(maxwell_boltzmann(atoms, md.temperature_K, rng))
    atoms.calc = make_calculator(config.reference.model_dump(mode="json"), str(out / "reference_md_scratch"))
    state = MDState(atoms, md, rng)
    started = time.monotonic()
    energies = []
    for step in range(1, steps + 1):
        step_batch([state], calculator_forces, None, None)
        if step % stride == 0:
            energies.append((step, float(atoms.get_potential_energy())))
    second = [e for s, e in energies if s > steps // 2]
    result = {"steps": steps, "energy_second_half_eV": float(np.mean(second)),
              "energy_second_half_std_eV": float(np.std(second)), "wall_s": time.monotonic() - started}
    cached.write_text(json.dumps(result, indent=2))
    return result


def sampled_energy(run_dir: Path, steps: int) -> float | None:
    """Mean reference energy of a run's check frames in the second half of its MD."""
    from aimspax_like.data import DatasetStore

    frames = [f for f in DatasetStore.open(run_dir / "data" / "dataset.h5").frames(origin="test")
              if f.md_step > steps // 2]
    return sum(f.energy for f in frames) / len(frames) if frames else None


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def table(rows: list[dict[str, Any]]) -> str:
    head = ("epsilon (eV) | calibrated | labels 1k | labels 10k | labels | energy RMSE (eV) | (meV/atom) | "
            "energy bias (eV) | force MAE (eV/A) | max force err (eV/A) | model (s) | training (s) | reference (s) | "
            "MD loop (s) | E_pot 2nd half (eV)")
    lines = [head, " | ".join("---" for _ in head.split("|"))]
    for r in rows:
        lines.append(" | ".join([
            f"{r['epsilon']:.3f}", "yes" if r["calibrated"] else "no", _fmt(r["labels_1k"], "d"),
            _fmt(r["labels_10k"], "d"), f"{r['labels']}",
            _fmt(r["energy_rmse_eV"], ".3f"), _fmt(r["energy_rmse_meV_atom"], ".2f"), _fmt(r["energy_bias_eV"], "+.3f"),
            _fmt(r["force_mae"], ".3f"),
            _fmt(r["max_force_error"], ".2f"), f"{r['model_s']:.0f}", f"{r['training_s']:.0f}",
            f"{r['reference_s']:.1f}", f"{r['md_loop_s']:.0f}", _fmt(r["sampled_energy_eV"], ".2f")]))
    return "\n".join("| " + line + " |" for line in lines)


def comparison(rows: list[dict[str, Any]]) -> str:
    """FALCON's published counts beside ours at the nearest epsilons."""
    out = [f"FALCON (GPR on energies, epsilon {FALCON['epsilon_eV']} eV): {FALCON['labels_first_1000']} EMT calls "
           f"in the first 1000 steps, {FALCON['labels_first_120000']} in the first 120,000."]
    for r in rows:
        kind = " calibrated" if r["calibrated"] else ""
        out.append(f"engine, epsilon {r['epsilon']:.3f} eV{kind}: {_fmt(r['labels_1k'], 'd')} labels in the first 1000 "
                   f"steps, {r['labels']} in {r['steps']} (plus {r['start_frames']} start frames); labels per "
                   f"1000 steps: {', '.join(str(n) for n in r['per_1000'])}")
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epsilons", type=float, nargs="+", default=[0.05, 0.10, 0.20],
                        help="energy thresholds in eV (default: 0.05 0.10 0.20)")
    parser.add_argument("--steps", type=int, default=10000, help="MD steps per run (default: 10000)")
    parser.add_argument("--parallel", type=int, default=2, help="runs at once (default: 2, one per core)")
    parser.add_argument("--config", type=Path, default=BASE, help="base config (default: configs/otf_pt55.yaml)")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "falcon_pt55")
    parser.add_argument("--calibrate", type=float, nargs="*", metavar="EPS", default=[0.2],
                        help="also run these epsilons (all when none is given; default 0.2) with "
                             "otf.trigger.calibrate (the spread scaled by the error/spread ratio measured at "
                             "the labels)")
    parser.add_argument("--plain-only", action="store_true", help="no calibrated runs")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="config setting for every run, dotted key and YAML value (repeatable)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    # The smallest epsilon labels most and runs longest: it starts first, the others share the
    # second slot from the cheapest up.
    order = sorted(args.epsilons)
    order = order[:1] + sorted(order[1:], reverse=True)
    calibrated = [] if args.plain_only else sorted(args.calibrate or args.epsilons)
    runs = [(e, False) for e in order] + [(e, True) for e in calibrated]
    queue = []
    for epsilon, calibrate in runs:
        config = run_config(args.config, epsilon, args.steps, args.out, args.set, calibrate)
        run_dir = args.out / run_name(epsilon, calibrate)
        if not finished(run_dir, args.steps):
            queue.append((run_name(epsilon, calibrate), config, run_dir))
    running: list[tuple[str, subprocess.Popen]] = []
    failed = []
    while queue or running:
        while queue and len(running) < max(1, args.parallel):
            name, config, run_dir = queue.pop(0)
            print(f"[{time.monotonic() - started:6.0f} s] start {name} -> {run_dir}", flush=True)
            running.append((name, launch(config, run_dir, args.out / f"{name}.log")))
        time.sleep(2)
        for item in list(running):
            name, proc = item
            if proc.poll() is not None:
                running.remove(item)
                state = "done" if proc.returncode == 0 else f"FAILED (exit {proc.returncode}, see the log)"
                print(f"[{time.monotonic() - started:6.0f} s] {name} {state}", flush=True)
                if proc.returncode != 0:
                    failed.append(name)
    names = [run_name(e) for e in sorted(args.epsilons)] + [run_name(e, True) for e in calibrated]
    rows = [results_of(args.out / name) for name in names if name not in failed]
    reference = reference_md(args.out / f"{run_name(sorted(args.epsilons)[0])}.yaml", args.steps, args.out)
    sampled = (f"EMT-only MD of the same start ({args.steps} steps, same thermostat and seed): mean potential "
               f"energy over the second half {reference['energy_second_half_eV']:.2f} eV "
               f"(std {reference['energy_second_half_std_eV']:.2f} eV); the last column is the same mean over "
               "the check frames of each on-the-fly run, recomputed with EMT.")
    text = (f"Pt55 (icosahedron, 55 atoms), EMT reference, 600 K, 1 fs, {args.steps} MD steps per run; "
            f"study wall time {time.monotonic() - started:.0f} s\n\n{table(rows)}\n\n{sampled}\n\n"
            f"{comparison(rows)}\n")
    print("\n" + text)
    (args.out / "table.md").write_text(text)
    (args.out / "results.json").write_text(json.dumps(rows, indent=2))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
