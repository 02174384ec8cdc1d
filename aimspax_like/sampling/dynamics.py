"""Batched molecular dynamics of many trajectories driven by one force call per step.

Every running trajectory advances together. Their positions and momenta live in two
contiguous buffers (each trajectory's ``Atoms`` holds views into them), so every integrator
stage is one numpy expression over all atoms of all trajectories, with per-trajectory
timestep, temperature, friction and ensemble broadcast from per-system arrays. The forces of
all trajectories come from one call of a ``ForceFn`` (in the engine: the committee's batched
prediction), optionally split into chunks of at most ``max_atoms_per_call`` atoms.

One step is ``B A T A [barostat] F B``: half kick, half drift, a full-step thermostat, half
drift, the NPT cell rescaling, one force evaluation, half kick. ``T`` is the Ornstein-Uhlenbeck
step for ``langevin`` (BAOAB, Leimkuhler & Matthews), Bussi's stochastic velocity rescaling
for ``bussi``, ``npt_crescale`` and ``npt_berendsen``, a Nose-Hoover chain for ``nose_hoover``
and nothing for ``nve`` (which leaves velocity Verlet). The thermostat splitting is symmetric (time-reversible, second
order); the cell rescaling uses the pressure at the start of the step, first order in the
barostat as GROMACS' C-rescale is, which is harmless for ``taup >> dt``. ``npt_mtk``
trajectories skip that sequence and take the Martyna-Tobias-Klein step of ``sampling.mtk``
(both chains, cell and particle half kicks, an exact drift of positions and cell, the same
force call, then the mirror image): deterministic, time-reversible, with a conserved extended
energy (``MDState.conserved_energy``). Every ensemble needs exactly one force evaluation per step.

What stays per trajectory in Python: each stochastic trajectory draws its noise from its own
generator (so its path does not depend on which other trajectories share the batch, which
changes whenever a label is in flight), ``ForceFn`` returns one array per structure (the
scheduler reads each trajectory's member forces for Eq. 1) and the step counter.

Why not torch-sim-atomistic (looked at, not used): each of its integrators owns its own state
class (an NVT Langevin state, an NPT state, ...) and asks one ``ModelInterface`` for forces, so
a batch mixing ensembles would be several states and several model calls, and the committee
would have to hide behind one model that returns the mean while the scheduler also needs every
member's forces (Eq. 1). The scheduler further stops, rewinds and relabels single ASE
trajectories between steps. The arithmetic here is a few vector operations over
``[n_atoms, 3]`` arrays; the model call dominates the step, so owning it costs nothing.
"""

from __future__ import annotations

from collections.abc import Sequence

from aimspax_like.sampling.batch import AtomsPerCall, Batch, atoms_per_call, chunks, evaluate
from aimspax_like.sampling.state import (
    ForceFn,
    MDState,
    StressFn,
    degrees_of_freedom,
    fixed_atoms,
    maxwell_boltzmann,
)

__all__ = [
    "AtomsPerCall",
    "ForceFn",
    "MDState",
    "StressFn",
    "atoms_per_call",
    "chunks",
    "degrees_of_freedom",
    "ensure_forces",
    "evaluate",
    "fixed_atoms",
    "maxwell_boltzmann",
    "step_batch",
]


def ensure_forces(
    states: Sequence[MDState],
    force_fn: ForceFn,
    stress_fn: StressFn | None = None,
    max_atoms_per_call: AtomsPerCall = "auto",
) -> None:
    """Evaluate forces for the states that have none yet (new or rewound trajectories)."""
    missing = [
        s for s in states if s.member_forces is None or (s.needs_stress and s.member_stress is None)
    ]
    if missing:
        evaluate(missing, force_fn, stress_fn, max_atoms_per_call)


def step_batch(
    states: Sequence[MDState],
    force_fn: ForceFn,
    stress_fn: StressFn | None = None,
    max_atoms_per_call: AtomsPerCall = "auto",
) -> None:
    """Advance every state by one step of its own ensemble with one batched force evaluation.

    ``stress_fn`` is needed only when an NPT trajectory is in the batch. ``max_atoms_per_call``:
    ``"auto"`` chunks the force call as ``atoms_per_call()`` says for this machine, ``None``
    makes one call for all structures, an integer caps the atoms per call.
    """
    if not states:
        return
    states = list(states)
    ensure_forces(states, force_fn, stress_fn, max_atoms_per_call)
    batch = states[0].batch
    if not (isinstance(batch, Batch) and batch.matches(states)):
        batch = Batch(states)
    batch.step(force_fn, stress_fn, max_atoms_per_call)
