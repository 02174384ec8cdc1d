"""Can the initial committee explore? A short guarded MD probe before active learning starts.

Active learning is only as good as the trajectories that find its labels. A committee trained
on a handful of frames can drive MD that leaves the physical region within tens of femtoseconds
(atoms fuse, bonds tear) and never comes back; every label then goes to a distorted geometry.
The probe runs the committee's own batched MD from the start structures at the AL temperatures,
with the AL guards, for ``idg.probe_steps`` steps. IDG goes on (more frames, more epochs) until
the probe passes or its budget ends; the result is logged (``idg_probe``) and summarised.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from ase import Atoms

from aimspax_like.config import CampaignConfig
from aimspax_like.guards import build_guards, first_failure
from aimspax_like.sampling.dynamics import MDState, maxwell_boltzmann, step_batch


@dataclass
class ProbeResult:
    passed: bool
    steps: int  # MD steps of the shortest-lived trajectory (the probe length when it passed)
    reason: str  # the first guard failure, empty when passed

    def as_dict(self) -> dict[str, Any]:
        return {"passed": self.passed, "steps": self.steps, "reason": self.reason}


def probe_committee(
    committee: Any, structures: list[Atoms], config: CampaignConfig, steps: int, seed: int
) -> ProbeResult:
    """Run ``al.num_trajectories`` guarded committee trajectories for ``steps`` MD steps."""
    al = config.al
    states, guards = [], []
    for k in range(al.num_trajectories):
        md = al.md_for(k)
        rng = np.random.default_rng([seed, 104729, k])
        atoms = structures[k % len(structures)].copy()
        atoms.calc = None
        atoms.set_momenta(maxwell_boltzmann(atoms, md.temperature_K, rng))
        states.append(MDState(atoms, md, rng))
        guards.append(build_guards(atoms.copy(), md.temperature_K, al.guards))
    for step in range(1, steps + 1):
        step_batch(states, committee.committee_forces, getattr(committee, "committee_stresses", None))
        for k in range(len(states)):
            reason = first_failure(guards[k], states[k])
            if reason:
                return ProbeResult(False, step, f"trajectory {k}: {reason}")
    return ProbeResult(True, steps, "")
