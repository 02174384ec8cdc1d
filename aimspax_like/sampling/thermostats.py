"""Thermostat and barostat kernels vectorised over many trajectories at once.

Every function here works on per-system arrays (one entry per trajectory) or on per-atom
arrays with a ``system`` index, so one call serves every trajectory of a batch whatever their
temperatures, time constants or sizes. There is no Python loop over trajectories; the only
loops are over the (fixed, short) Nose-Hoover chain and the Suzuki-Yoshida weights.

Units are ASE's throughout (eV, A, amu, ASE time); ``kT`` is in eV.
"""

from __future__ import annotations

import numpy as np

# Fourth-order Suzuki-Yoshida weights for the Nose-Hoover chain propagator (as ASE uses them).
_SY4 = (
    1.0 / (2.0 - 2.0 ** (1.0 / 3.0)),
    -(2.0 ** (1.0 / 3.0)) / (2.0 - 2.0 ** (1.0 / 3.0)),
    1.0 / (2.0 - 2.0 ** (1.0 / 3.0)),
)
CHAIN_LENGTH = 3


def per_system_sum(values: np.ndarray, system: np.ndarray, n_systems: int) -> np.ndarray:
    """Sum of per-atom ``values`` (``[n]`` or ``[n, 3]``, summed over the last axis) per system."""
    if values.ndim == 2:
        values = values.sum(axis=1)
    return np.bincount(system, weights=values, minlength=n_systems)


def twice_kinetic(momenta: np.ndarray, masses: np.ndarray, system: np.ndarray, n_systems: int) -> np.ndarray:
    """``sum(p^2 / m)`` per system (twice the kinetic energy)."""
    return per_system_sum(momenta * momenta / masses, system, n_systems)


def remove_drift(
    momenta: np.ndarray, masses: np.ndarray, system: np.ndarray, n_systems: int, which: np.ndarray
) -> None:
    """Subtract the centre-of-mass momentum of the systems flagged in ``which``, in place."""
    total = np.stack([np.bincount(system, weights=momenta[:, k], minlength=n_systems) for k in range(3)], axis=1)
    mass = np.bincount(system, weights=masses[:, 0], minlength=n_systems)
    velocity = np.where(which[:, None], total / mass[:, None], 0.0)
    momenta -= masses * velocity[system]


def langevin_coefficients(gamma: np.ndarray, dt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """BAOAB's O-step factors: ``p <- c1 p + c2 sqrt(m kT) R`` over one full step ``dt``."""
    c1 = np.exp(-gamma * dt)
    return c1, np.sqrt(1.0 - c1 * c1)


def bussi_scale(
    kinetic2: np.ndarray,
    n_dof: np.ndarray,
    kT: np.ndarray,
    decay: np.ndarray,
    normal: np.ndarray,
    chi2: np.ndarray,
) -> np.ndarray:
    """Stochastic velocity rescaling factor per system (Bussi, Donadio, Parrinello 2007, Eq. A7).

    ``kinetic2`` is ``sum(p^2/m)``, ``decay = exp(-dt / tau)``, ``normal`` one standard normal
    and ``chi2`` a chi-squared draw with ``n_dof - 1`` degrees of freedom, per system.
    """
    target_over_current = n_dof * kT / np.maximum(kinetic2, 1e-300)  # K_target / K
    factor = (1.0 - decay) * target_over_current / n_dof
    alpha2 = decay + factor * (chi2 + normal * normal) + 2.0 * normal * np.sqrt(decay * factor)
    return np.sqrt(np.maximum(alpha2, 0.0))


def chain_masses(n_dof: np.ndarray, kT: np.ndarray, tau: np.ndarray) -> np.ndarray:
    """Nose-Hoover chain masses ``[n_systems, CHAIN_LENGTH]`` (Martyna, Klein, Tuckerman 1992)."""
    q = np.empty((len(n_dof), CHAIN_LENGTH))
    q[:, 0] = n_dof * kT * tau**2
    q[:, 1:] = (kT * tau**2)[:, None]
    return q


def nose_hoover_chain(
    chain: np.ndarray,
    q: np.ndarray,
    kinetic2: np.ndarray,
    n_dof: np.ndarray,
    kT: np.ndarray,
    delta: np.ndarray,
) -> np.ndarray:
    """Propagate each system's chain by ``delta``; return the factor that scales its momenta.

    ``chain`` is ``[n_systems, 2, CHAIN_LENGTH]`` (positions ``eta``, momenta ``p_eta``) and is
    updated in place; ``kinetic2`` is ``sum(p^2/m)`` before the step. The particle momenta only
    ever get multiplied by one factor per system, so the kinetic energy is tracked through
    that factor instead of being re-summed over atoms. Fourth-order Suzuki-Yoshida splitting.
    """
    eta, p_eta = chain[:, 0, :], chain[:, 1, :]
    scale = np.ones(len(kinetic2))
    kin2 = kinetic2.copy()
    last = CHAIN_LENGTH - 1

    def kick(j: int, half: np.ndarray, quarter: np.ndarray) -> None:
        if j < last:
            p_eta[:, j] *= np.exp(-quarter * p_eta[:, j + 1] / q[:, j + 1])
        force = kin2 - n_dof * kT if j == 0 else p_eta[:, j - 1] ** 2 / q[:, j - 1] - kT
        p_eta[:, j] += half * force
        if j < last:
            p_eta[:, j] *= np.exp(-quarter * p_eta[:, j + 1] / q[:, j + 1])

    for weight in _SY4:
        d = weight * delta
        for j in range(last, -1, -1):
            kick(j, d / 2, d / 4)
        eta += d[:, None] * p_eta / q
        factor = np.exp(-d * p_eta[:, 0] / q[:, 0])
        scale *= factor
        kin2 *= factor * factor
        for j in range(CHAIN_LENGTH):
            kick(j, d / 2, d / 4)
    return scale


def chain_energy(chain: np.ndarray, q: np.ndarray, n_dof: np.ndarray, kT: np.ndarray) -> np.ndarray:
    """The chain's share of the conserved energy, per system (for checking the integrator)."""
    eta, p_eta = chain[:, 0, :], chain[:, 1, :]
    return (
        (0.5 * p_eta**2 / q).sum(axis=1)
        + n_dof * kT * eta[:, 0]
        + kT * eta[:, 1:].sum(axis=1)
    )


def cell_rescaling_strain(
    pressure: np.ndarray,
    target: np.ndarray,
    volume: np.ndarray,
    kT: np.ndarray,
    compressibility: np.ndarray,
    tau_p: np.ndarray,
    dt: np.ndarray,
    noise: np.ndarray,
) -> np.ndarray:
    """Isotropic stochastic cell rescaling (Bernetti & Bussi 2020): ``d log V`` per system.

    ``d eps = -(beta / tau_p) (P0 - P) dt + sqrt(2 kT beta dt / (V tau_p)) R``. With ``noise``
    all zero it is Berendsen's barostat (right mean pressure, volume fluctuations too small);
    with standard normals it samples the isothermal-isobaric volume distribution.
    """
    drift = -(compressibility / tau_p) * (target - pressure) * dt
    spread = np.sqrt(2.0 * kT * compressibility * dt / (volume * tau_p))
    return drift + spread * noise
