"""A minimal ASE calculator around PySCF molecular DFT / Hartree-Fock.

PySCF ships no maintained ASE calculator for plain molecular SCF, and we need two behaviours a
generic wrapper would not give: an unconverged SCF must raise ``SCFNotConverged`` (so the label
is classified, not silently accepted), and periodic cells must be refused (this is a molecular
code path). PySCF itself is imported inside ``calculate`` so that importing this module stays
cheap for label workers that never use it.
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
        mf = self._mean_field(self.atoms)
        energy = mf.kernel()
        if not mf.converged:
            raise SCFNotConverged(
                f"PySCF SCF not converged in {self.parameters['max_cycle']} cycles "
                f"(last energy {energy:.8f} Ha)"
            )
        gradient = np.asarray(mf.nuc_grad_method().kernel())  # Hartree / Bohr
        self.results["energy"] = float(energy) * Hartree
        self.results["free_energy"] = self.results["energy"]
        self.results["forces"] = -gradient * (Hartree / Bohr)

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
