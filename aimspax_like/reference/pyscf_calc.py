"""A minimal ASE calculator around PySCF molecular DFT / Hartree-Fock.

PySCF ships no maintained ASE calculator for plain molecular SCF, and we need two behaviours a
generic wrapper would not give: an unconverged SCF must raise ``SCFNotConverged`` (so the label
is classified, not silently accepted), and periodic cells must be refused (this is a molecular
code path). PySCF itself is imported inside ``calculate`` so that importing this module stays
cheap for label workers that never use it.

Warm starts: a calculator kept alive between calculations (a warm label worker, or the steps of
one stretch of reference MD) starts each SCF from the last converged density matrix when the
new molecule has the same AO basis (the same elements in the same order, basis set), charge,
spin and functional; otherwise it starts from PySCF's default guess. A warm start that does
not converge (or raises) is retried once from the default guess before ``SCFNotConverged`` is
raised, so a stale density can cost time but never a label. ``scf_cycles`` is the number of SCF iterations
the last calculation took (both tries of a retried one); ``warm_started`` whether it began
from a previous density.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
from ase import Atoms
from ase.calculators.calculator import Calculator, CalculatorSetupError, all_changes
from ase.units import Bohr, Hartree

from aimspax_like.reference.results import SCFNotConverged


class PySCFCalculator(Calculator):
    """Energy and forces from a PySCF RKS/UKS (or RHF/UHF when ``xc='HF'``) calculation."""

    implemented_properties: ClassVar[list[str]] = ["energy", "free_energy", "forces"]
    default_parameters: ClassVar[dict[str, Any]] = {
        "xc": "PBE",
        "basis": "def2-SVP",
        "charge": 0,
        "spin": 0,
        "max_cycle": 100,
        "conv_tol": 1e-9,
    }

    def __init__(self, *, warm: bool = True, **kwargs: Any) -> None:
        """``warm``: start each SCF from the previous converged density when it fits (see above)."""
        self.warm = bool(warm)
        self.scf_cycles: int | None = None
        self.warm_started = False
        self._density: np.ndarray | None = None
        self._density_key: tuple[Any, ...] | None = None
        super().__init__(**kwargs)

    def calculate(
        self,
        atoms: Atoms | None = None,
        properties: list[str] | None = None,
        system_changes: list[str] = all_changes,
    ) -> None:
        super().calculate(atoms, properties or ["energy"], system_changes)
        assert self.atoms is not None
        if any(self.atoms.pbc):
            raise CalculatorSetupError(
                f"the PySCF reference labels molecules only; got pbc={self.atoms.pbc.tolist()}"
            )
        guess_key = self._guess_key(self.atoms)
        dm0 = self._density if self.warm and self._density_key == guess_key else None
        self._density = self._density_key = None  # set again only by a converged SCF
        self.scf_cycles = 0
        self.warm_started = dm0 is not None
        try:
            mf, energy = self._scf(self.atoms, dm0)
        except Exception:
            if dm0 is None:
                raise
            mf = None  # a broken guess (e.g. non-finite) must not cost the label either
        if dm0 is not None and (mf is None or not mf.converged):  # retry once from the default guess
            self.warm_started = False
            mf, energy = self._scf(self.atoms, None)
        if not mf.converged:
            raise SCFNotConverged(
                f"PySCF SCF not converged in {self.parameters['max_cycle']} cycles "
                f"(last energy {energy:.8f} Ha)"
            )
        gradient = np.asarray(mf.nuc_grad_method().kernel())  # Hartree / Bohr
        if self.warm:
            self._density = np.asarray(mf.make_rdm1())
            self._density_key = guess_key
        self.results["energy"] = float(energy) * Hartree
        self.results["free_energy"] = self.results["energy"]
        self.results["forces"] = -gradient * (Hartree / Bohr)

    def _scf(self, atoms: Atoms, dm0: np.ndarray | None) -> tuple[Any, float]:
        """One SCF run from ``dm0`` (None: PySCF's default guess); adds its cycles to ``scf_cycles``."""
        mf = self._mean_field(atoms)
        counted = [0]
        mf.callback = lambda _env: counted.__setitem__(0, counted[0] + 1)
        energy = float(mf.kernel(dm0=dm0))
        cycles = getattr(mf, "cycles", None)  # PySCF >= 2.3 counts them itself
        self.scf_cycles = (self.scf_cycles or 0) + (int(cycles) if isinstance(cycles, int) else counted[0])
        return mf, energy

    def _guess_key(self, atoms: Atoms) -> tuple[Any, ...]:
        """What a density matrix is valid for: same AO basis (element sequence, basis), electrons, functional."""
        p = self.parameters
        return (tuple(int(z) for z in atoms.numbers), str(p["basis"]), int(p["charge"]), int(p["spin"]),
                str(p["xc"]).upper())

    def forget_density(self) -> None:
        """Start the next SCF from PySCF's default guess."""
        self._density = self._density_key = None

    def _mean_field(self, atoms: Atoms) -> Any:
        from pyscf import dft, gto, scf

        p = self.parameters
        symbols = atoms.get_chemical_symbols()
        mol = gto.M(
            atom=[(symbols[i], tuple(xyz)) for i, xyz in enumerate(atoms.positions)],
            unit="Angstrom",
            basis=p["basis"],
            charge=int(p["charge"]),
            spin=int(p["spin"]),
            verbose=0,
        )
        restricted = int(p["spin"]) == 0
        if str(p["xc"]).upper() == "HF":
            mf = scf.RHF(mol) if restricted else scf.UHF(mol)
        else:
            mf = dft.RKS(mol) if restricted else dft.UKS(mol)
            mf.xc = p["xc"]
        mf.max_cycle = int(p["max_cycle"])
        mf.conv_tol = float(p["conv_tol"])
        mf.chkfile = None  # no scratch files left behind per label
        mf.verbose = 0
        return mf
