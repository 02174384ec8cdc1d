"""Labels that cannot lie: an SCF that did not converge is a failure, even when nothing raised.

The outputs read here are real program outputs stored in ``tests/data/scf_outputs`` (see its
README for where each came from); FHI-aims' failure lines are added to the real stored water
output at run time (no real unconverged aims.out could be found to store). Most tests label
through ``label()`` with the ``import`` kind, as a user's own ASE calculator would be used: a
small calculator defined here computes EMT numbers (finite, so nothing else would stop them)
and leaves a stored output in its folder, like a DFT code that reports its failure only there.
"""

from __future__ import annotations

import os
import shlex
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk
from ase.calculators.calculator import all_changes
from ase.calculators.emt import EMT
from ase.units import Rydberg

from aimspax_like.config import MDConfig
from aimspax_like.reference import FailureKind, LabelFailure, LabelResult, label, scf_checks
from aimspax_like.reference.aims import read_aims_outcome
from aimspax_like.reference.md_segment import SegmentRequest, SegmentResult, run_segment

HERE = __name__  # this module, for the 'import' kind ('module:Name')
DATA = Path(__file__).parent / "data" / "scf_outputs"
AIMS_STORED = Path(__file__).parent / "data" / "aims" / "water_singlepoint.out"
# FHI-aims' two SCF failure texts, as public aims.out parsers match them (see the README).
AIMS_STOPPED = "  *** scf_solver: SCF cycle not converged."
AIMS_CARRIED_ON = (
    "  * WARNING! SELF-CONSISTENCY CYCLE DID NOT CONVERGE\n"
    "  * USING YOUR PRESELECTED ACCURACY CRITERIA.\n"
    "  * DO NOT RELY ON ANY FINAL DATA WITHOUT FURTHER CHECKS.\n"
)


def aims_output(kind: str) -> str:
    """The real stored aims.out, or it with one of FHI-aims' failure texts put in."""
    text = AIMS_STORED.read_text()
    if kind == "converged":
        return text
    lines = text.splitlines(keepends=True)
    if kind == "stopped":  # cut in the middle of the SCF, ended as FHI-aims ends such a run
        cut = next(i for i, line in enumerate(lines) if "SCF    5 :" in line)
        return "".join(lines[: cut + 1]) + AIMS_STOPPED + "\n"
    # carried on (postprocess_anyway): the warning where the converged line was, rest untouched
    at = next(i for i, line in enumerate(lines) if "Self-consistency cycle converged." in line)
    return "".join(lines[:at]) + AIMS_CARRIED_ON + "".join(lines[at + 1 :])


class StoredOutputCalculator(EMT):
    """EMT energies and forces, plus what a DFT code leaves behind: stored output files copied
    into its folder and, when given, a ``converged`` (or other) flag, as ASE's ``Vasp`` sets it.

    ``files`` holds (stored path under ``DATA``, or 'aims:<kind>', name in the folder) pairs.
    """

    def __init__(self, files: Any = (), converged: bool | None = None, flag: str = "converged",
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.files = [tuple(pair) for pair in files]
        if converged is not None:
            setattr(self, flag, converged)

    def calculate(self, atoms: Atoms | None = None, properties: Any = ("energy",),
                  system_changes: Any = all_changes) -> None:
        super().calculate(atoms, properties, system_changes)
        folder = Path(self.directory)
        folder.mkdir(parents=True, exist_ok=True)
        for stored, name in self.files:
            if stored.startswith("aims:"):
                (folder / name).write_text(aims_output(stored.split(":", 1)[1]))
            else:
                shutil.copyfile(DATA / stored, folder / name)


def replayed_espresso(output: str) -> Any:
    """ASE's real ``Espresso`` calculator whose 'pw.x' prints a stored pw.x output.

    ASE writes its input file, runs the command, and reads the output with its own parser,
    exactly as with pw.x; the command is ``sh -c 'cat "$0"' <stored output>`` (ASE appends
    ``-in espresso.pwi``, which sh ignores).
    """
    from ase.calculators.espresso import Espresso, EspressoProfile

    stored = DATA / "espresso" / output
    profile = EspressoProfile(command=f"sh -c 'cat \"$0\"' {shlex.quote(str(stored))}", pseudo_dir=str(DATA))
    return Espresso(profile=profile, pseudopotentials={"Si": "Si.pz-vbc.UPF"}, kpts=(2, 2, 2),
                    input_data={"system": {"ecutwfc": 12.0}, "control": {"tprnfor": True}})


def copper() -> Atoms:
    atoms = bulk("Cu", "fcc", a=3.6, cubic=True)
    atoms.positions[0] += [0.05, -0.03, 0.02]
    return atoms


def silicon() -> Atoms:
    """The two-atom Si cell of the stored pw.x runs (positions as in their inputs)."""
    cell = [[0.0, 2.715, 2.715], [2.715, 0.0, 2.715], [2.715, 2.715, 0.0]]
    return Atoms("Si2", positions=[[0, 0, 0], [1.42, 1.31, 1.39]], cell=cell, pbc=True)


def stored_spec(files: list[tuple[str, str]], **kwargs: Any) -> dict[str, Any]:
    return {"kind": "import", "path": f"{HERE}:StoredOutputCalculator",
            "kwargs": {"files": [list(pair) for pair in files], **kwargs}}


def assert_scf_failure(outcome: Any, *words: str) -> None:
    assert isinstance(outcome, LabelFailure), outcome
    assert outcome.kind is FailureKind.SCF_NOT_CONVERGED, outcome
    for word in words:
        assert word in outcome.message, outcome.message


# --------------------------------------------------------------------------- the stored outputs

UNCONVERGED = [
    (scf_checks.cp2k_failure, "cp2k/unconverged.out", "SCF run NOT converged"),
    (scf_checks.espresso_failure, "espresso/unconverged_stop.pwo", "convergence NOT achieved after   2 iterations"),
    (scf_checks.espresso_failure, "espresso/unconverged_continue.pwo", "estimated scf accuracy 0.0045"),
    (scf_checks.vasp_outcar_failure, "vasp/OUTCAR.unconverged_vasp6_excerpt", "EDIFF was not reached (unconverged)"),
    (lambda text: scf_checks.vasp_oszicar_failure(text, nelm=10), "vasp/nelm_reached/OSZICAR",
     "ionic step 4 used all NELM=10"),
]
CONVERGED = [
    (scf_checks.cp2k_failure, "cp2k/converged.out"),
    (scf_checks.espresso_failure, "espresso/converged.pwo"),
    (scf_checks.vasp_outcar_failure, "vasp/OUTCAR.converged_vasp5"),
    (scf_checks.vasp_outcar_failure, "vasp/OUTCAR.converged_vasp6_excerpt"),
]


@pytest.mark.parametrize(("check", "stored", "words"), UNCONVERGED, ids=[c[1] for c in UNCONVERGED])
def test_each_codes_unconverged_output_is_a_failure(check: Any, stored: str, words: str) -> None:
    message = check((DATA / stored).read_text())
    assert message is not None and words in message, message


@pytest.mark.parametrize(("check", "stored"), CONVERGED, ids=[c[1] for c in CONVERGED])
def test_each_codes_converged_output_passes(check: Any, stored: str) -> None:
    assert check((DATA / stored).read_text()) is None


def test_pw_x_that_claims_convergence_after_its_last_allowed_iteration_is_caught() -> None:
    """pw.x 6.7 with scf_must_converge=.false. says "convergence has been achieved" and prints
    forces after electron_maxstep=2 iterations; ASE reads them as a result."""
    from ase.io import read

    text = (DATA / "espresso" / "unconverged_continue.pwo").read_text()
    assert "convergence has been achieved in   2 iterations" in text
    atoms = read(DATA / "espresso" / "unconverged_continue.pwo", format="espresso-out")
    assert np.isfinite(atoms.get_potential_energy()) and np.isfinite(atoms.get_forces()).all()
    assert "above the scf convergence threshold 1e-08 Ry" in scf_checks.espresso_failure(text)


def test_fhi_aims_failure_texts_and_the_routine_mixer_restart() -> None:
    converged = aims_output("converged")
    assert "Self-consistency cycle not yet converged - restarting mixer" in converged
    assert scf_checks.aims_failure(converged) is None
    assert "SCF cycle not converged" in scf_checks.aims_failure(aims_output("stopped"))
    assert "SELF-CONSISTENCY CYCLE DID NOT CONVERGE" in scf_checks.aims_failure(aims_output("carried_on"))


def test_fhi_aims_run_that_carried_on_past_a_failed_scf_is_not_a_label(tmp_path: Path) -> None:
    """With postprocess_anyway FHI-aims prints energy, forces and 'Have a nice day.' anyway."""
    (tmp_path / "aims.out").write_text(aims_output("carried_on"))
    assert "Have a nice day." in aims_output("carried_on")
    outcome = read_aims_outcome(tmp_path, n_atoms=3)
    assert_scf_failure(outcome, "FHI-aims", "SELF-CONSISTENCY CYCLE DID NOT CONVERGE")


def test_vasp_nelm_comes_from_the_incar(tmp_path: Path) -> None:
    """custodian's real run used NELM = 10 and hit it every ionic step; with NELM = 15 in the
    INCAR the same OSZICAR would be converged (custodian's own test does the same)."""
    folder = tmp_path / "vasp"
    shutil.copytree(DATA / "vasp" / "nelm_reached", folder)
    calc = EMT(directory=str(folder))
    assert "NELM=10" in scf_checks.scf_failure(calc)
    incar = folder / "INCAR"
    incar.write_text(incar.read_text().replace("NELM = 10", "NELM = 15"))
    assert scf_checks.scf_failure(calc) is None


@pytest.mark.parametrize("stored", ["OUTCAR.converged_vasp5", "OUTCAR.converged_vasp6_excerpt",
                                    "OUTCAR.unconverged_vasp6_excerpt"])
def test_ase_vasp_reads_the_stored_outcars_as_we_do(tmp_path: Path, stored: str) -> None:
    """ASE's own ``Vasp.read_convergence`` agrees on every stored OUTCAR, and a ``Vasp`` whose
    ``converged`` is False (as ``Vasp.read_results`` sets it) is refused even with no files."""
    from ase.calculators.vasp import Vasp

    lines = (DATA / "vasp" / stored).read_text().splitlines(keepends=True)
    calc = Vasp(directory=str(tmp_path))
    calc.converged = calc.read_convergence(lines=lines)
    ours = scf_checks.vasp_outcar_failure("".join(lines))
    assert calc.converged is (ours is None)
    message = scf_checks.scf_failure(calc, tmp_path)  # no OUTCAR there: the flag alone decides
    assert message == (None if calc.converged else "Vasp: the calculator reports converged=False")
    shutil.copyfile(DATA / "vasp" / stored, tmp_path / "OUTCAR")
    assert scf_checks.scf_failure(Vasp(directory=str(tmp_path))) == ours


# --------------------------------------------------------------------------- through label()


def test_calculator_reporting_non_convergence_without_raising_is_not_a_label(tmp_path: Path) -> None:
    """What ASE's Vasp does: converged=False from the OUTCAR, and finite energies all the same."""
    spec = stored_spec([("vasp/OUTCAR.unconverged_vasp6_excerpt", "OUTCAR")], converged=False)
    outcome = label(copper(), spec, str(tmp_path / "w"))
    assert_scf_failure(outcome, "VASP", "EDIFF was not reached (unconverged)")
    assert (tmp_path / "w" / "OUTCAR").is_file()  # kept as evidence


@pytest.mark.parametrize("flag", ["converged", "scf_converged"])
def test_a_false_converged_flag_alone_is_a_failure(tmp_path: Path, flag: str) -> None:
    outcome = label(copper(), stored_spec([], converged=False, flag=flag), str(tmp_path / "w"))
    assert_scf_failure(outcome, "StoredOutputCalculator", f"{flag}=False")
    passed = label(copper(), stored_spec([], converged=True, flag=flag), str(tmp_path / "ok"))
    assert isinstance(passed, LabelResult), passed


LABEL_UNCONVERGED = {
    "vasp-outcar": ([("vasp/OUTCAR.unconverged_vasp6_excerpt", "OUTCAR")], "VASP"),
    "vasp-oszicar": ([("vasp/nelm_reached/OSZICAR", "OSZICAR"), ("vasp/nelm_reached/INCAR", "INCAR")],
                     "NELM=10"),
    "espresso": ([("espresso/unconverged_continue.pwo", "espresso.pwo")], "Quantum ESPRESSO"),
    "cp2k": ([("cp2k/unconverged.out", "cp2k.out")], "CP2K"),
    "aims-stopped": ([("aims:stopped", "aims.out")], "FHI-aims"),
    "aims-carried-on": ([("aims:carried_on", "aims.out")], "FHI-aims"),
}
LABEL_CONVERGED = {
    "vasp5": [("vasp/OUTCAR.converged_vasp5", "OUTCAR")],
    "vasp6": [("vasp/OUTCAR.converged_vasp6_excerpt", "OUTCAR")],
    "espresso": [("espresso/converged.pwo", "espresso.pwo")],
    "cp2k": [("cp2k/converged.out", "cp2k.out")],
    "aims": [("aims:converged", "aims.out")],
}


@pytest.mark.parametrize("case", list(LABEL_UNCONVERGED))
def test_unconverged_output_files_alone_make_the_label_a_failure(tmp_path: Path, case: str) -> None:
    files, code = LABEL_UNCONVERGED[case]
    assert_scf_failure(label(copper(), stored_spec(files), str(tmp_path / "w")), code)


@pytest.mark.parametrize("case", list(LABEL_CONVERGED))
def test_converged_output_files_give_a_label(tmp_path: Path, case: str) -> None:
    outcome = label(copper(), stored_spec(LABEL_CONVERGED[case]), str(tmp_path / "w"))
    assert isinstance(outcome, LabelResult), outcome
    assert not (tmp_path / "w").exists()  # scratch removed as after any success


def test_ase_espresso_replaying_real_pw_x_outputs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """ASE's real Espresso calculator and parser on the three stored pw.x runs."""
    spec = {"kind": "import", "path": f"{HERE}:replayed_espresso"}
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")  # ASE's Espresso defaults to the working folder: ours is scratch
    good = label(silicon(), {**spec, "kwargs": {"output": "converged.pwo"}}, str(tmp_path / "good"))
    assert isinstance(good, LabelResult), good
    assert good.energy == pytest.approx(-15.61198042 * Rydberg, rel=1e-6)  # ASE: CODATA units
    lying = label(silicon(), {**spec, "kwargs": {"output": "unconverged_continue.pwo"}}, str(tmp_path / "lying"))
    assert_scf_failure(lying, "Quantum ESPRESSO", "above the scf convergence threshold")
    # pw.x stopped: no forces to read, so ASE's parser fails; the output says why
    stopped = label(silicon(), {**spec, "kwargs": {"output": "unconverged_stop.pwo"}}, str(tmp_path / "stopped"))
    assert_scf_failure(stopped, "Quantum ESPRESSO", "convergence NOT achieved after")
    assert not any((tmp_path / "cwd").iterdir())  # every input and output went to a label's scratch


def test_reference_md_stops_at_an_unconverged_step(tmp_path: Path) -> None:
    request = SegmentRequest(MDConfig(temperature_K=300).model_dump(mode="json"), 3,
                             np.zeros((4, 3)), rng_seed=1)
    spec = stored_spec([("espresso/unconverged_continue.pwo", "espresso.pwo")])
    failed = run_segment(copper(), spec, str(tmp_path / "bad"), request=request)
    assert_scf_failure(failed, "Quantum ESPRESSO")
    flagged = run_segment(copper(), stored_spec([], converged=False), str(tmp_path / "flag"), request=request)
    assert_scf_failure(flagged, "converged=False")
    fine = run_segment(copper(), stored_spec([("espresso/converged.pwo", "espresso.pwo")]),
                       str(tmp_path / "good"), request=request)
    assert isinstance(fine, SegmentResult), fine


# --------------------------------------------------------------------------- ASE's CP2K, for real

HAVE_CP2K = shutil.which("cp2k_shell") is not None
UNDER_CI = os.environ.get("CI", "").lower() == "true"


@pytest.mark.dft
@pytest.mark.skipif(not HAVE_CP2K and not UNDER_CI, reason="CP2K is not installed; required under CI")
def test_ase_cp2k_calculator_that_returns_an_unconverged_scf_is_refused(tmp_path: Path) -> None:
    """ASE's own CP2K calculator (the 'import' kind, not ours) returns the energy of an SCF that
    CP2K 2023 gave up on after max_scf steps; only the 'SCF run NOT converged' text says so."""
    from aimspax_like.reference.cp2k import find_data_dir, profile_from_spec

    data = find_data_dir(profile_from_spec({}), ("BASIS_MOLOPT", "GTH_POTENTIALS"))
    kwargs = {"command": "cp2k_shell", "xc": "PBE", "basis_set": "SZV-MOLOPT-SR-GTH",
              "basis_set_file": f"{data}/BASIS_MOLOPT", "potential_file": f"{data}/GTH_POTENTIALS",
              "pseudo_potential": "GTH-PBE", "cutoff": 80 * Rydberg, "poisson_solver": None,
              "print_level": "LOW"}
    spec = {"kind": "import", "path": "ase.calculators.cp2k:CP2K"}
    atoms = silicon()
    short = label(atoms, {**spec, "kwargs": {**kwargs, "max_scf": 2}}, str(tmp_path / "short"))
    assert_scf_failure(short, "CP2K", "SCF run NOT converged")
    assert "SCF run NOT converged" in (tmp_path / "short" / "cp2k.out").read_text()
    full = label(atoms, {**spec, "kwargs": {**kwargs, "max_scf": 50}}, str(tmp_path / "full"))
    assert isinstance(full, LabelResult), full
