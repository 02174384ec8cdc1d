"""MD throughput of batched committee sampling against one ASE dynamics object per trajectory.

Engine: every trajectory advances with ``step_batch`` driven by ``Committee.committee_forces``
(one batched ``MACEEnsemble.predict`` per step, chunked as ``atoms_per_call`` says for the
device). Reference structure (aims-PAX style): each trajectory is an ``ase.md.langevin.Langevin``
object (with ``FixCom``) and an ASE calculator that runs the members one after another on its
one structure (``MACEEnsemble.to_calculator()``: same graph code, same weights), stepped one
trajectory after the other. Both sample Langevin MD with the campaign defaults (500 K, 1 fs,
friction 0.001/fs).

Printed per system and N, as medians over the timed steps: trajectory-steps per second of both;
their ratio (median of the per-step ratios of the two loops, which run back to back in every
step, with the range); the engine's step time; the raw model-call time inside it (the members'
forward + force backward, results on the host: ``predict``'s "members" stage) and its graph
building; the overhead, (step - model) / model summed over the steps: everything the engine
does besides calling the members; and that "rest" per trajectory-step for both loops (ms). Where
both loops make the same member calls (CPU chunks of one structure each), the ratio can only
move by the rest, and the rest, unlike the ratio, barely feels other load on the machine.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_sampling.py --quick
    .venv/bin/python scripts/bench_sampling.py --clock process --steps 3 --min-seconds 10    # this CPU
    .venv/bin/python scripts/bench_sampling.py --device cuda --steps 10                         # a GPU
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch: one OpenMP pool, as the CLI does

import argparse
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import mace  # noqa: F401  (first: e3nn needs the torch.load switch mace sets)
import numpy as np
import torch
from ase import Atoms, units
from ase.build import bulk, molecule
from ase.constraints import FixCom
from ase.md.langevin import Langevin

from aimspax_like.committee import Committee
from aimspax_like.config import MDConfig, ModelConfig, TrainingConfig
from aimspax_like.models.ensemble import MACEEnsemble, average_neighbors
from aimspax_like.models.torch_utils import StageTimer
from aimspax_like.models.training import EnsembleTrainer
from aimspax_like.sampling.dynamics import MDState, atoms_per_call, chunks, maxwell_boltzmann, step_batch


def ethanol_cluster() -> Atoms:
    """99 atoms: eleven randomly oriented ethanol molecules on a 4.5 A grid, not periodic."""
    rng = np.random.default_rng(0)
    cluster = Atoms()
    sites = [(i, j, k) for i in range(3) for j in range(2) for k in range(2)][:11]
    for site in sites:
        mol = molecule("CH3CH2OH")
        mol.rotate(rng.uniform(0, 360), rng.normal(size=3), center="COM")
        mol.translate(4.5 * np.array(site, dtype=float))
        cluster += mol
    return cluster


def copper_cell() -> Atoms:
    """160 atoms: a periodic fcc Cu cell (2 x 4 x 5 cubic cells)."""
    return bulk("Cu", "fcc", a=3.61, cubic=True).repeat((2, 4, 5))


def ethanol() -> Atoms:
    """9 atoms: the quickstart molecule, where per-call overhead dominates a CPU step."""
    return molecule("CH3CH2OH")


SYSTEMS: dict[str, Callable[[], Atoms]] = {"molecule": ethanol_cluster, "cell": copper_cell, "ethanol": ethanol}


def replicas(atoms: Atoms, n: int) -> list[Atoms]:
    out = []
    for k in range(n):
        copy = atoms.copy()
        copy.rattle(0.02, seed=k)
        out.append(copy)
    return out


def build_committee(atoms: Atoms, args: argparse.Namespace) -> Committee:
    model = ModelConfig(
        ensemble_size=args.members, channels=args.channels, max_L=args.max_L, r_max=args.r_max,
        dtype=args.dtype, device=args.device,
    )
    zs = sorted(set(atoms.numbers.tolist()))
    ensemble = MACEEnsemble.build(
        model, seeds=list(range(args.members)), atomic_numbers=zs, atomic_energies=dict.fromkeys(zs, 0.0),
        avg_num_neighbors=average_neighbors([atoms], args.r_max),
    )
    return Committee(ensemble, EnsembleTrainer(ensemble, TrainingConfig(), reset_after=2))


def engine(
    committee: Committee, structures: list[Atoms], md: MDConfig, limit: int | None, timer: StageTimer
) -> Callable[[], None]:
    """One call advances every trajectory by one batched step (the scheduler's hot loop); the
    ensemble's stage timer runs only inside it, so the model time is that of the engine's calls."""
    rng = np.random.default_rng(1)
    states = []
    for k, atoms in enumerate(structures):
        start = atoms.copy()
        start.set_momenta(maxwell_boltzmann(start, md.temperature_K, rng))
        states.append(MDState(start, md, np.random.default_rng(k)))
    ensemble = committee.ensemble

    def advance() -> None:
        ensemble.timer = timer
        try:
            step_batch(states, committee.committee_forces, max_atoms_per_call=limit)
        finally:
            ensemble.timer = None

    return advance


def reference(
    committee: Committee, structures: list[Atoms], md: MDConfig, timer: StageTimer
) -> Callable[[], None]:
    """One call advances N ASE Langevin objects, one after the other, by one step each; the same
    stage timer separates its model calls from the rest (ASE's integrator, calculator, graphs)."""
    rng = np.random.default_rng(1)
    dynamics = []
    for k, atoms in enumerate(structures):
        start = atoms.copy()
        start.set_momenta(maxwell_boltzmann(start, md.temperature_K, rng))
        start.set_constraint(FixCom())  # the engine's Langevin also keeps the centre of mass still
        start.calc = committee.ensemble.to_calculator()
        dynamics.append(Langevin(
            start, timestep=md.timestep_fs * units.fs, temperature_K=md.temperature_K,
            friction=md.friction_per_fs / units.fs, fixcm=False, rng=np.random.default_rng(k),
        ))

    ensemble = committee.ensemble

    def advance() -> None:
        ensemble.timer = timer
        try:
            for dyn in dynamics:
                dyn.run(1)
        finally:
            ensemble.timer = None

    return advance


CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "process": time.process_time}


@dataclass
class Timing:
    """Per-step seconds of the engine (with its model and graph stages) and of the sequential loop."""

    batched: list[float] = field(default_factory=list)
    model: list[float] = field(default_factory=list)
    graphs: list[float] = field(default_factory=list)
    sequential: list[float] = field(default_factory=list)
    sequential_model: list[float] = field(default_factory=list)

    def ratios(self) -> np.ndarray:
        """Paired per-step speed-ups: the two loops ran back to back in each step."""
        return np.array(self.sequential) / np.array(self.batched)


def measure(
    batched: Callable[[], None], sequential: Callable[[], None] | None, timer: StageTimer,
    clock: Callable[[], float], steps: int, min_seconds: float,
) -> Timing:
    """At least ``steps`` paired steps, more until the engine has run ``min_seconds``, after one
    warm-up step each (which also makes their first forces). The loops alternate which goes first
    from step to step, so load changes and first-in-line effects hit both alike."""
    loops = [batched] + ([sequential] if sequential else [])
    for advance in loops:
        advance()
    timing = Timing()
    while len(timing.batched) < steps or sum(timing.batched) < min_seconds:
        order = loops if len(timing.batched) % 2 == 0 else loops[::-1]
        for advance in order:
            timer.reset()
            timer.sync()
            begin = clock()
            advance()
            timer.sync()
            elapsed = clock() - begin
            if advance is batched:
                timing.batched.append(elapsed)
                timing.model.append(timer.totals["members"])
                timing.graphs.append(timer.totals["graphs"])
            else:
                timing.sequential.append(elapsed)
                timing.sequential_model.append(timer.totals["members"])
    return timing


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", default="1,4,16,32,64", help="Comma-separated trajectory counts.")
    parser.add_argument("--steps", type=int, default=5, help="Least number of timed MD steps per measurement.")
    parser.add_argument("--min-seconds", type=float, default=0.0,
                        help="Keep stepping until the engine's timed steps add up to this (cheap cases get more).")
    parser.add_argument("--members", type=int, default=4)
    parser.add_argument("--channels", type=int, default=32)
    parser.add_argument("--max-L", dest="max_L", type=int, default=1)
    parser.add_argument("--r-max", dest="r_max", type=float, default=6.0)
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--systems", default="molecule,cell", help=f"Comma-separated, of {sorted(SYSTEMS)}.")
    parser.add_argument("--chunk-atoms", default="auto",
                        help="Atoms per batched call: 'auto' (per device), 'none' (one call) or a number.")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                        help="wall: elapsed time (what a user waits; use on GPUs). process: this process's CPU "
                             "time, immune to other load on a shared CPU machine (one thread: same as wall).")
    parser.add_argument("--no-sequential", action="store_true", help="Time the engine only.")
    parser.add_argument("--quick", action="store_true", help="N = 1,4 and 2 steps: a few minutes on 2 CPU cores.")
    args = parser.parse_args()
    if args.quick:
        args.n, args.steps = "1,4", 2
    return args


HEADER = (f"{'system':8} {'atoms':>5} {'N':>3} {'per call':>8} {'steps':>5} {'seq steps/s':>11} "
          f"{'batch steps/s':>13} {'ratio':>6} {'(min-max)':>11} {'step ms':>9} {'model ms':>9} "
          f"{'graphs ms':>9} {'overhead':>8} {'rest/traj seq':>13} {'batch':>6}")


def row(name: str, atoms: int, n: int, per_call: int, t: Timing) -> str:
    """Medians over the timed steps; ratio: median of the paired per-step ratios (with their range);
    overhead: engine step time beyond its model calls, relative to the model calls."""
    step, model, graphs = (float(np.median(x)) for x in (t.batched, t.model, t.graphs))
    overhead = (sum(t.batched) - sum(t.model)) / sum(t.model)
    rest = 1e3 * (sum(t.batched) - sum(t.model)) / (n * len(t.batched))
    if t.sequential:
        ratios = t.ratios()
        seq_rate = f"{n / float(np.median(t.sequential)):11.2f}"
        ratio = f"{float(np.median(ratios)):6.2f} {f'({ratios.min():.2f}-{ratios.max():.2f})':>11}"
        seq_rest = f"{1e3 * (sum(t.sequential) - sum(t.sequential_model)) / (n * len(t.sequential)):13.2f}"
    else:
        seq_rate, ratio, seq_rest = f"{'-':>11}", f"{'-':>6} {'':>11}", f"{'-':>13}"
    return (f"{name:8} {atoms:5d} {n:3d} {per_call:8d} {len(t.batched):5d} {seq_rate} {n / step:13.2f} {ratio} "
            f"{1e3 * step:9.1f} {1e3 * model:9.1f} {1e3 * graphs:9.1f} {overhead:8.0%} {seq_rest} {rest:6.2f}")


def main() -> None:
    args = parse_args()
    clock = CLOCKS[args.clock]
    counts = [int(n) for n in args.n.split(",")]
    md = MDConfig()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); model {args.channels} channels, "
          f"max_L {args.max_L}, r_max {args.r_max}, {args.dtype}, {args.members} members; Langevin "
          f"{md.temperature_K:g} K, {md.timestep_fs:g} fs; >= {args.steps} timed steps (>= {args.min_seconds:g} s), "
          f"{args.clock} clock; steps/s = trajectory-steps/s")
    for name in args.systems.split(","):
        atoms = SYSTEMS[name]()
        committee = build_committee(atoms, args)
        device = committee.ensemble.device
        if args.chunk_atoms == "auto":
            limit = atoms_per_call(str(device))
        else:
            limit = None if args.chunk_atoms == "none" else int(args.chunk_atoms)
        timer = StageTimer(device, clock)
        print(f"\n{name}: {len(atoms)} atoms, device {device}, {limit or 'all'} atoms per call at most")
        print(HEADER)
        for n in counts:
            structures = replicas(atoms, n)
            sequential = None if args.no_sequential else reference(committee, structures, md, timer)
            timing = measure(
                engine(committee, structures, md, limit, timer), sequential, timer, clock, args.steps,
                args.min_seconds,
            )
            per_call = max(len(g) for g in chunks([MDState(a, md, None) for a in structures], limit))
            print(row(name, len(atoms), n, per_call, timing), flush=True)


if __name__ == "__main__":
    main()
