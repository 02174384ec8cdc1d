"""MD throughput of batched committee sampling against one ASE dynamics object per trajectory.

Engine: every trajectory advances with ``step_batch`` driven by ``Committee.committee_forces``
(one batched ``MACEEnsemble.predict`` per step, chunked as ``atoms_per_call`` says for the
device). Reference structure (aims-PAX style): each trajectory is an ``ase.md.langevin.Langevin``
object with an ASE calculator that runs the members one after another on its one structure
(``MACEEnsemble.to_calculator()``: same graph code, same weights, forces only), stepped one
trajectory after the other. Both sample Langevin MD with the campaign defaults (500 K, 1 fs,
friction 0.001/fs).

Printed per system and N: trajectory-steps per second of both, their ratio, the batched step
time, the raw model time inside it (the members' forward+backward on prebuilt graphs of the
same chunks, timed in turn with the two MD loops) and the graph-building time
(``GraphBuilder.batch``), so the engine's own overhead, step minus model, is visible.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_sampling.py --quick
    .venv/bin/python scripts/bench_sampling.py --n 1,4,16,32,64 --steps 5 --device cuda
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch: one OpenMP pool, as the CLI does

import argparse
import time
from collections.abc import Callable

import mace  # noqa: F401  (first: e3nn needs the torch.load switch mace sets)
import numpy as np
import torch
from ase import Atoms, units
from ase.build import bulk, molecule
from ase.md.langevin import Langevin

from aimspax_like.committee import Committee
from aimspax_like.config import MDConfig, ModelConfig, TrainingConfig
from aimspax_like.models.ensemble import MACEEnsemble, average_neighbors
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


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def engine(committee: Committee, structures: list[Atoms], md: MDConfig, limit: int | None) -> Callable[[], None]:
    """One call advances every trajectory by one batched step (the scheduler's hot loop)."""
    rng = np.random.default_rng(1)
    states = []
    for k, atoms in enumerate(structures):
        start = atoms.copy()
        start.set_momenta(maxwell_boltzmann(start, md.temperature_K, rng))
        states.append(MDState(start, md, np.random.default_rng(k)))

    def advance() -> None:
        step_batch(states, committee.committee_forces, max_atoms_per_call=limit)

    return advance


def raw_model(ensemble: MACEEnsemble, structures: list[Atoms], limit: int | None) -> tuple[Callable[[], None], float]:
    """The members' forward+backward alone on prebuilt graphs of the engine's chunks, and the
    seconds it took to build those graphs."""
    groups = chunks([MDState(a, MDConfig(), np.random.default_rng(0)) for a in structures], limit)
    begin = clock()
    graphs = [ensemble.graphs.batch([s.atoms for s in g], ensemble.device).to_dict() for g in groups]
    sync(ensemble.device)
    graph_time = clock() - begin

    def advance() -> None:
        for graph in graphs:
            for member in ensemble.members:
                member(graph, training=False, compute_force=True)["forces"].detach()

    return advance, graph_time


def reference(committee: Committee, structures: list[Atoms], md: MDConfig) -> Callable[[], None]:
    """One call advances N ASE Langevin objects, one after the other, by one step each."""
    rng = np.random.default_rng(1)
    dynamics = []
    for k, atoms in enumerate(structures):
        start = atoms.copy()
        start.set_momenta(maxwell_boltzmann(start, md.temperature_K, rng))
        start.calc = committee.ensemble.to_calculator()
        dynamics.append(Langevin(
            start, timestep=md.timestep_fs * units.fs, temperature_K=md.temperature_K,
            friction=md.friction_per_fs / units.fs, fixcm=True, rng=np.random.default_rng(k),
        ))

    def advance() -> None:
        for dyn in dynamics:
            dyn.run(1)

    return advance


CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "process": time.process_time}
clock = time.perf_counter


def timed(advance: Callable[[], None], device: torch.device) -> float:
    sync(device)
    begin = clock()
    advance()
    sync(device)
    return clock() - begin


def step_times(loops: list[tuple[Callable[[], None], bool]], steps: int, device: torch.device) -> list[float]:
    """Seconds per step of each loop, after one warm-up step where asked (MD loops: it also
    makes their first forces). The loops take turns step by step, each step in a rotated
    order (and the rotation carries on across calls), so changes in machine load and any
    first-in-line effect hit them alike."""
    global _turn
    for advance, warm_up in loops:
        if warm_up:
            advance()
    totals = [0.0] * len(loops)
    for _ in range(steps):
        order = [(k + _turn) % len(loops) for k in range(len(loops))]
        _turn += 1
        for k in order:
            totals[k] += timed(loops[k][0], device)
    return [t / steps for t in totals]


_turn = 0


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", default="1,4,16,32,64", help="Comma-separated trajectory counts.")
    parser.add_argument("--steps", type=int, default=5, help="Timed MD steps per measurement.")
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


def main() -> None:
    global clock
    args = parse_args()
    clock = CLOCKS[args.clock]
    counts = [int(n) for n in args.n.split(",")]
    md = MDConfig()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); model {args.channels} channels, "
          f"max_L {args.max_L}, r_max {args.r_max}, {args.dtype}, {args.members} members; Langevin "
          f"{md.temperature_K:g} K, {md.timestep_fs:g} fs; {args.steps} timed steps, {args.clock} clock; "
          "steps/s = trajectory-steps/s")
    header = (f"{'system':9} {'atoms':>5} {'N':>3} {'chunk':>5} {'seq steps/s':>11} {'batch steps/s':>13} "
              f"{'ratio':>6} {'step ms':>9} {'model ms':>9} {'graphs ms':>9} {'overhead':>8}")
    for name in args.systems.split(","):
        atoms = SYSTEMS[name]()
        committee = build_committee(atoms, args)
        device = committee.ensemble.device
        if args.chunk_atoms == "auto":
            limit = atoms_per_call(str(device))
        else:
            limit = None if args.chunk_atoms == "none" else int(args.chunk_atoms)
        print(f"\n{name}: {len(atoms)} atoms, device {device}, chunk {limit or 'all'} atoms per call")
        print(header)
        for n in counts:
            structures = replicas(atoms, n)
            model_loop, graphs = raw_model(committee.ensemble, structures, limit)
            loops = [(engine(committee, structures, md, limit), True), (model_loop, False)]
            if not args.no_sequential:
                loops.append((reference(committee, structures, md), True))
            batched, model, sequential = [*step_times(loops, args.steps, device), float("nan")][:3]
            per_call = max(len(g) for g in chunks([MDState(a, md, None) for a in structures], limit))
            print(f"{name:9} {len(atoms):5d} {n:3d} {per_call:5d} {n / sequential:11.2f} {n / batched:13.2f} "
                  f"{sequential / batched:6.2f} {1e3 * batched:9.1f} {1e3 * model:9.1f} {1e3 * graphs:9.1f} "
                  f"{(batched - model) / batched:8.0%}", flush=True)


if __name__ == "__main__":
    main()
