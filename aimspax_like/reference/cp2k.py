"""CP2K (periodic DFT, Gaussian and plane waves) through ASE's shell-mode calculator.

ASE's ``CP2K`` calculator keeps one ``cp2k_shell`` process alive and sends it new cells and
positions over a pipe, so only the first label on a worker pays for starting CP2K, parsing the
input and building the basis; later labels start their SCF from the previous density. This
module keeps one such calculator per worker process and reference spec in a small pool
(``_POOL``): a label borrows a calculator, gives it back when it succeeded or merely failed to
converge, and discards it (killing the process) when the shell crashed or ran out of time, so
the next label starts a fresh shell.

The spec is split the way ASE splits other codes:

* ``CP2KTemplate`` is *what* to compute: functional, basis, pseudopotential, cutoff, k-points,
  SCF limits, charge and multiplicity, stress, and the generated CP2K input text.
* ``CP2KProfile`` is *how* to run it: the launch command (``cp2k_shell``, or
  ``srun -n 64 cp2k.psmp --shell`` on a cluster) and the data folder holding the basis and
  pseudopotential files.

What ASE's calculator does not give us is added here:

* SCF non-convergence. CP2K (2023.1) prints ``*** WARNING ... SCF run NOT converged ***`` and
  carries on with unconverged numbers; newer versions may stop instead. Each label's part of
  the CP2K output is checked for that text, and the label becomes ``SCF_NOT_CONVERGED`` either
  way. The force environment is rebuilt after such a label, so the next label does not start
  from a bad density.
* Timeouts. ``label`` normally runs a label with ``timeout_s`` in a fresh Python child, which
  would start a fresh CP2K every time. CP2K labels instead run in the worker itself under a
  watchdog thread that kills the shell's process group (launcher and MPI ranks included) when
  the time is up; the blocked read then fails and the label becomes ``TIMED_OUT``. The watchdog
  is armed once the shell answered: a shell that hangs while starting is not caught.
* SCF robustness. Broyden density mixing instead of CP2K's plain P mixing, which stalls on
  small or nearly metallic cells started from the atomic guess; ``smearing_K`` adds Fermi-Dirac
  smearing (with all virtual orbitals) for metals.
* Large cell changes. CP2K keeps the real-space grid of the cell the force environment was
  built for and only deforms it (as in its own NPT MD). Once a label's cell is strained by more
  than ``REBUILD_STRAIN`` from that cell, the force environment is rebuilt so that the grid
  again matches ``cutoff_Ry``.

Each label's excerpt of the CP2K output is copied to ``<workdir>/cp2k.out`` (kept after
failures, or with ``keep_workdir``). The shell itself runs in a private scratch folder in the
system temp dir (``aimspax-cp2k-<host>-<pid>-*``), removed when the worker exits, or by the
next worker on the host when it was killed.

Only periodic cells are labelled (``pbc`` true in all three directions): molecules would need a
vacuum box and a non-periodic Poisson solver, which this reference does not set up.
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from ase import Atoms
from ase.calculators.calculator import CalculationFailed, Calculator, all_changes
from ase.data import chemical_symbols
from ase.units import Rydberg

from aimspax_like.reference.faults import InjectedFault
from aimspax_like.reference.results import (
    FailureKind,
    LabelFailure,
    LabelOutcome,
    LabelResult,
    SCFNotConverged,
    classify_exception,
    one_line,
)
from aimspax_like.reference.scf_checks import CP2K_SCF_FAILURE_MARKS

DEFAULT_COMMAND = "cp2k_shell"
DEFAULT_BASIS_FILE = "BASIS_MOLOPT"
DEFAULT_POTENTIAL_FILE = "GTH_POTENTIALS"
OUTPUT_NAME = "cp2k.out"
# Any cell-matrix component strained more than this from the force environment's cell
# rebuilds the force environment (new grid for the new cell).
REBUILD_STRAIN = 0.05
# A shell's output file is started afresh (new force environment) past this size.
MAX_OUTPUT_BYTES = 50_000_000
# CP2K's SCF gave up: the 2023 warning and the wording of later versions' error (``scf_checks``).
SCF_FAILURE_MARKS = CP2K_SCF_FAILURE_MARKS
# Functionals with GTH pseudopotentials of their own name; others fall back to GTH-PBE.
_GTH_FUNCTIONALS = {"PBE": "GTH-PBE", "BLYP": "GTH-BLYP", "BP": "GTH-BP", "PADE": "GTH-PADE", "LDA": "GTH-PADE"}
# Where a CP2K installation keeps its data files, relative to the bin/ folder of the executable.
_DATA_DIRS_NEAR_BINARY = ("../share/cp2k/data", "../share/cp2k", "../data", "../share/data")
_SYSTEM_DATA_DIRS = ("/usr/share/cp2k/data", "/usr/share/cp2k")
_LAUNCHERS = frozenset({"srun", "mpirun", "mpiexec", "mpiexec.hydra", "aprun", "ibrun", "jsrun", "orterun"})
_TERM_GRACE_S = 2.0


class CP2KSetupProblem(ValueError):
    """A spec that cannot run; ``key`` is the reference key to fix (for a ``ConfigError``)."""

    def __init__(self, key: str, message: str) -> None:
        self.key = key
        self.message = message
        super().__init__(f"reference.{key}: {message}")


# --------------------------------------------------------------------------- template / profile


@dataclass(frozen=True)
class CP2KProfile:
    """How CP2K is run: the shell command and the data folder (None: CP2K's own default)."""

    command: str
    data_dir: str | None

    def shell_command(self, scratch: str) -> str:
        """The line ASE's shell wrapper runs (``sh -c``): in ``scratch``, in a session of its own.

        ``setsid`` makes the shell the leader of a new process group, so that a timeout can kill
        the launcher and everything under it without touching the worker itself.
        """
        inner = shlex.quote(self.command)
        starter = "setsid " if shutil.which("setsid") else ""
        return f"cd {shlex.quote(scratch)} && exec {starter}/bin/sh -c {inner}"

    def executable(self) -> str:
        """The CP2K program in the command: after env assignments and an MPI launcher's options."""
        words = shlex.split(self.command)
        if words and words[0] == "env":
            words = words[1:]
        while words and "=" in words[0] and not words[0].startswith("-"):
            words = words[1:]
        if not words:
            raise ValueError("the command names no program")
        if os.path.basename(words[0]) not in _LAUNCHERS:
            return words[0]
        rest = [w for w in words[1:] if not w.startswith("-") and not w.isdigit() and "=" not in w]
        if not rest:
            raise ValueError(f"no program follows the launcher {words[0]!r}")
        return rest[-1]

    def launcher(self) -> str | None:
        words = [w for w in shlex.split(self.command) if w != "env" and "=" not in w]
        return words[0] if words and os.path.basename(words[0]) in _LAUNCHERS else None


@dataclass(frozen=True)
class CP2KTemplate:
    """What CP2K computes; ``input_text`` and ``ase_parameters`` feed ASE's ``CP2K``."""

    xc: str
    basis_set: str
    basis_set_file: str
    pseudo_potential: str
    potential_file: str
    cutoff_Ry: float
    kpoints: tuple[int, int, int] | None
    max_scf: int
    eps_scf: float
    charge: int
    multiplicity: int
    stress: bool
    smearing_K: float | None = None

    def potential_name(self) -> str:
        """The pseudopotential name CP2K looks up ('auto' resolved from the functional)."""
        if self.pseudo_potential.lower() != "auto":
            return self.pseudo_potential
        return _GTH_FUNCTIONALS.get(self.xc.strip().upper(), "GTH-PBE")

    def input_text(self) -> str:
        """The CP2K input sections ASE completes (it adds cell, coordinates, kinds, XC, cutoff)."""
        kpoints = ""
        if self.kpoints is not None:
            n1, n2, n3 = self.kpoints
            kpoints = f"    &KPOINTS\n      SCHEME MONKHORST-PACK {n1} {n2} {n3}\n    &END KPOINTS\n"
        smear = ""
        if self.smearing_K:
            smear = (
                "      ADDED_MOS -1\n"  # every virtual orbital the basis has, so the Fermi tail fits
                "      &SMEAR\n        METHOD FERMI_DIRAC\n"
                f"        ELECTRONIC_TEMPERATURE [K] {self.smearing_K:g}\n      &END SMEAR\n"
            )
        return (
            "&FORCE_EVAL\n"
            "  &DFT\n"
            "    &SCF\n"
            f"      EPS_SCF {self.eps_scf:.3e}\n"
            f"{smear}"
            # Broyden density mixing: plain P mixing (CP2K's default) stalls on small or
            # near-metallic cells started from the atomic guess.
            "      &MIXING\n        METHOD BROYDEN_MIXING\n        ALPHA 0.4\n        NBROYDEN 8\n"
            "      &END MIXING\n"
            "      &PRINT\n"
            "        &RESTART OFF\n"  # no restart files per SCF step: the shell keeps the density
            "        &END RESTART\n"
            "      &END PRINT\n"
            "    &END SCF\n"
            f"{kpoints}"
            "  &END DFT\n"
            "&END FORCE_EVAL\n"
        )

    def ase_parameters(self) -> dict[str, Any]:
        return {
            "xc": self.xc,
            "basis_set": self.basis_set,
            "basis_set_file": self.basis_set_file,
            "pseudo_potential": self.potential_name(),
            "potential_file": self.potential_file,
            "cutoff": self.cutoff_Ry * Rydberg,  # ASE takes eV
            "max_scf": self.max_scf,
            "charge": self.charge,
            "multiplicity": self.multiplicity if self.multiplicity != 1 else None,
            "uks": self.multiplicity != 1,
            "stress_tensor": self.stress,
            "poisson_solver": None,  # periodic cells only: CP2K's default periodic solver
            "print_level": "LOW",
            "inp": self.input_text(),
        }


def profile_from_spec(spec: dict[str, Any]) -> CP2KProfile:
    data_dir = spec.get("data_dir")
    return CP2KProfile(
        command=str(spec.get("command") or DEFAULT_COMMAND), data_dir=str(data_dir) if data_dir else None
    )


def template_from_spec(spec: dict[str, Any], data_dir: str | None = None) -> CP2KTemplate:
    """The spec's physics; the data files become absolute paths when ``data_dir`` is known."""
    kpoints = spec.get("kpoints")
    return CP2KTemplate(
        xc=str(spec.get("xc", "PBE")),
        basis_set=str(spec.get("basis_set", "DZVP-MOLOPT-SR-GTH")),
        basis_set_file=_data_file(str(spec.get("basis_set_file") or DEFAULT_BASIS_FILE), data_dir),
        pseudo_potential=str(spec.get("pseudo_potential", "auto")),
        potential_file=_data_file(str(spec.get("potential_file") or DEFAULT_POTENTIAL_FILE), data_dir),
        cutoff_Ry=float(spec.get("cutoff_Ry", 400.0)),
        kpoints=None if kpoints is None else (int(kpoints[0]), int(kpoints[1]), int(kpoints[2])),
        max_scf=int(spec.get("max_scf", 50)),
        eps_scf=float(spec.get("eps_scf", 1e-6)),
        charge=int(spec.get("charge", 0)),
        multiplicity=int(spec.get("multiplicity", 1)),
        stress=bool(spec.get("compute_stress", False)),
        smearing_K=float(spec["smearing_K"]) if spec.get("smearing_K") else None,
    )


def _data_file(name: str, data_dir: str | None) -> str:
    if data_dir is None or os.path.isabs(name):
        return name
    return str(Path(data_dir) / name)


def find_data_dir(profile: CP2KProfile, names: Iterable[str] = (DEFAULT_BASIS_FILE,)) -> str | None:
    """The configured data folder, else the first usual place that holds all of ``names``.

    Looked at in order: ``$CP2K_DATA_DIR``, folders beside the executable's ``bin/``, and the
    Debian/Ubuntu folder ``/usr/share/cp2k``. None when nothing fits (CP2K may still know its
    compiled-in folder).
    """
    if profile.data_dir:
        return profile.data_dir
    candidates: list[Path] = []
    if os.environ.get("CP2K_DATA_DIR"):
        candidates.append(Path(os.environ["CP2K_DATA_DIR"]))
    with contextlib.suppress(ValueError):
        found = shutil.which(profile.executable())
        if found:
            for binary in dict.fromkeys([Path(found), Path(found).resolve()]):
                candidates += [(binary.parent / rel).resolve() for rel in _DATA_DIRS_NEAR_BINARY]
    candidates += [Path(p) for p in _SYSTEM_DATA_DIRS]
    wanted = [n for n in names if not os.path.isabs(n)]
    for folder in candidates:
        if folder.is_dir() and all((folder / n).is_file() for n in wanted):
            return str(folder)
    return None


# --------------------------------------------------------------------------- setup check


def check_cp2k_setup(spec: dict[str, Any], numbers: set[int], structures: Iterable[Atoms] | None = None) -> None:
    """Raise ``CP2KSetupProblem`` for anything that would make every label fail.

    Checks (when given) that every structure is periodic, then the command's programs, and that
    the data files exist and hold the basis set and the pseudopotential for every element.
    """
    for index, atoms in enumerate(structures or ()):
        if not all(atoms.pbc):
            raise CP2KSetupProblem(
                "kind", f"CP2K labels periodic cells only; structure {index} has pbc={atoms.pbc.tolist()}"
            )
    profile = profile_from_spec(spec)
    try:
        program = profile.executable()
        launcher = profile.launcher()
    except ValueError as exc:
        raise CP2KSetupProblem("command", f"cannot parse {profile.command!r}: {exc}") from None
    missing = [p for p in (launcher, program) if p and shutil.which(p) is None]
    if missing:
        raise CP2KSetupProblem("command", f"{', '.join(missing)} not found on PATH (command {profile.command!r})")
    if profile.data_dir and not Path(profile.data_dir).is_dir():
        raise CP2KSetupProblem("data_dir", f"{profile.data_dir} is not a folder")
    basis_name = str(spec.get("basis_set_file") or DEFAULT_BASIS_FILE)
    potential_name = str(spec.get("potential_file") or DEFAULT_POTENTIAL_FILE)
    data_dir = find_data_dir(profile, (basis_name, potential_name))
    template = template_from_spec(spec, data_dir)
    for key, path, wanted in (
        ("basis_set", template.basis_set_file, template.basis_set),
        ("pseudo_potential", template.potential_file, template.potential_name()),
    ):
        file_key = "basis_set_file" if key == "basis_set" else "potential_file"
        if not Path(path).is_file():
            where = f"in {data_dir}" if data_dir else "(no CP2K data folder found; set reference.data_dir)"
            raise CP2KSetupProblem(file_key if spec.get(file_key) else "data_dir", f"no file {Path(path).name} {where}")
        available = read_data_names(path)
        lacking = [chemical_symbols[z] for z in sorted(numbers) if wanted.upper() not in available.get(z, set())]
        if lacking:
            raise CP2KSetupProblem(key, f"{wanted} is not in {path} for {', '.join(lacking)}")


def read_data_names(path: str | Path) -> dict[int, set[str]]:
    """Atomic number -> upper-case names (and aliases) of the entries of a CP2K basis or GTH file.

    An entry starts with a line ``<element> <name> [<alias> ...]``; every other line starts with
    a number or is a comment.
    """
    symbols = {s.upper(): z for z, s in enumerate(chemical_symbols) if z > 0}
    names: dict[int, set[str]] = {}
    with open(path, errors="replace") as handle:
        for line in handle:
            words = line.split("#", 1)[0].split()
            if len(words) >= 2 and words[0].upper() in symbols and not _is_number(words[1]):
                names.setdefault(symbols[words[0].upper()], set()).update(w.upper() for w in words[1:])
    return names


def _is_number(word: str) -> bool:
    try:
        float(word.replace("D", "E").replace("d", "e"))
    except ValueError:
        return False
    return True


# --------------------------------------------------------------------------- persistent shells


class _Session:
    """One ASE ``CP2K`` calculator with its running shell, scratch folder and output file."""

    def __init__(self, key: str, template: CP2KTemplate, profile: CP2KProfile) -> None:
        from ase.calculators.cp2k import CP2K

        self.key = key
        _remove_orphaned_scratch()
        self.scratch = tempfile.mkdtemp(prefix=f"{_scratch_prefix()}{os.getpid()}-")
        self.generation = 0
        self.calc: Any = None
        self.reference_cell: np.ndarray | None = None
        self.labels = 0
        failure = ""
        # A shell that dies while starting makes ASE warn from its destructor (and leave pipes
        # open when that warning is an error): let that happen here, quietly.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                self.calc = CP2K(
                    command=profile.shell_command(self.scratch), label=self._project(), **template.ase_parameters()
                )
            except Exception as exc:
                failure = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            if failure:
                gc.collect()
        if failure:
            shutil.rmtree(self.scratch, ignore_errors=True)
            try:
                program = profile.executable()
                hint = "" if shutil.which(program) else f"; {program} not found on PATH"
            except ValueError as exc:
                hint = f"; {exc}"
            raise RuntimeError(f"the CP2K shell did not start (command {profile.command!r}{hint}): {failure}")

    def _project(self) -> str:
        return str(Path(self.scratch) / f"cp2k-{self.generation}")

    @property
    def output(self) -> Path:
        return Path(self._project() + ".out")

    @property
    def pid(self) -> int | None:
        shell = getattr(self.calc, "_shell", None)
        child = getattr(shell, "_child", None)
        return None if child is None else int(child.pid)

    def output_size(self) -> int:
        try:
            return self.output.stat().st_size
        except OSError:
            return 0

    def read_output_from(self, offset: int) -> str:
        try:
            with open(self.output, "rb") as handle:
                handle.seek(offset)
                return handle.read().decode(errors="replace")
        except OSError:
            return ""

    def prepare(self, atoms: Atoms) -> None:
        """Decide whether this label may reuse the force environment (and its density).

        A new one is built for the first label, for other elements or atom counts, for a cell
        strained past ``REBUILD_STRAIN`` from the one the grid was made for, and when the
        output file grew past ``MAX_OUTPUT_BYTES``. Every new force environment writes a new
        output file, so a label's part of the output always starts at a known offset.
        """
        cell = np.asarray(atoms.cell, dtype=float)
        previous = self.calc.atoms
        rebuild = (
            self.calc._force_env_id is None
            or previous is None
            or self.reference_cell is None
            or not np.array_equal(previous.numbers, atoms.numbers)
            or self.output_size() > MAX_OUTPUT_BYTES
        )
        if not rebuild:
            try:
                strain = np.linalg.solve(self.reference_cell, cell) - np.eye(3)
                rebuild = bool(np.abs(strain).max() > REBUILD_STRAIN)
            except np.linalg.LinAlgError:
                rebuild = True
        if rebuild:
            self.forget_density()
            self.reference_cell = cell.copy()

    def forget_density(self) -> None:
        """Destroy the force environment; the next label builds a new one, with a new output file."""
        with contextlib.suppress(Exception):
            self.calc._release_force_env()
        self.calc.reset()  # also forget the cached atoms, so the next call sends everything
        self.reference_cell = None
        self.output.unlink(missing_ok=True)
        self.generation += 1
        self.calc.label = self._project()

    def close(self) -> None:
        """End CP2K politely (EXIT), or kill it; remove the scratch folder."""
        shell = getattr(self.calc, "_shell", None)
        if shell is not None and getattr(shell, "isready", False):
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    self.calc.close()
            except Exception:
                self.kill()
        else:
            self.kill()
        shutil.rmtree(self.scratch, ignore_errors=True)

    def kill(self) -> None:
        """SIGTERM the shell's process group, then SIGKILL; leave ASE nothing to clean up."""
        shell = getattr(self.calc, "_shell", None)
        child: subprocess.Popen[str] | None = getattr(shell, "_child", None)
        if child is not None:
            kill_process_group(child)
            for stream in (child.stdin, child.stdout):
                with contextlib.suppress(Exception):
                    if stream is not None:
                        stream.close()
            shell._child = None
            shell.isready = False
        if self.calc is not None:
            self.calc._shell = None
            self.calc._force_env_id = None


def _scratch_prefix() -> str:
    host = "".join(c if c.isalnum() or c in "-_" else "_" for c in socket.gethostname()) or "host"
    return f"aimspax-cp2k-{host}-"


def _remove_orphaned_scratch() -> None:
    """Remove scratch folders of this host's worker processes that died without cleaning up.

    A worker killed by a signal (Parsl ends its workers that way) runs no exit handler; its
    CP2K shell ends by itself on the closed pipe, but the folder stays. The owner's pid is in
    the folder name; folders of other hosts (a shared temp dir) are never touched.
    """
    prefix = _scratch_prefix()
    for folder in Path(tempfile.gettempdir()).glob(f"{prefix}*-*"):
        pid_text = folder.name[len(prefix) :].split("-", 1)[0]
        if not pid_text.isdigit() or int(pid_text) == os.getpid():
            continue
        try:
            os.kill(int(pid_text), 0)
        except ProcessLookupError:
            shutil.rmtree(folder, ignore_errors=True)
        except PermissionError:  # alive, someone else's
            continue


def kill_process_group(child: subprocess.Popen[Any]) -> None:
    """Stop ``child`` and its process group (its own session when started through setsid)."""
    try:
        group = os.getpgid(child.pid)
    except ProcessLookupError:
        group = None
    own_group = group is not None and group == os.getpgrp()
    for sig, wait_s in ((signal.SIGTERM, _TERM_GRACE_S), (signal.SIGKILL, 10.0)):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if group is not None and not own_group:
                os.killpg(group, sig)
            else:
                os.kill(child.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.wait(timeout=wait_s)
            return


class _Pool:
    """Idle sessions per spec key; a label borrows one and returns it (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._idle: dict[str, list[_Session]] = {}
        self._started = 0

    def take(self, key: str) -> _Session | None:
        with self._lock:
            idle = self._idle.get(key)
            return idle.pop() if idle else None

    def give_back(self, session: _Session) -> None:
        with self._lock:
            self._idle.setdefault(session.key, []).append(session)

    def count_start(self) -> None:
        with self._lock:
            self._started += 1

    @property
    def started(self) -> int:
        """Shells started in this process so far (tests and benchmarks read it)."""
        return self._started

    def close_all(self) -> None:
        with self._lock:
            sessions = [s for idle in self._idle.values() for s in idle]
            self._idle.clear()
        for session in sessions:
            session.close()


_POOL = _Pool()
atexit.register(_POOL.close_all)


def close_all_shells() -> None:
    """End every idle CP2K shell of this process (they are also ended when it exits)."""
    _POOL.close_all()


def shells_started() -> int:
    return _POOL.started


def spec_key(spec: dict[str, Any]) -> str:
    """Specs that compute the same thing the same way share shells (limits do not matter)."""
    relevant = {k: v for k, v in spec.items() if k not in ("timeout_s", "keep_workdir")}
    return json.dumps(relevant, sort_keys=True, default=str)


# --------------------------------------------------------------------------- one label


class _Watchdog:
    """Kills the session's shell when the label's time is up; ``fired`` says whether it did."""

    def __init__(self, deadline: float | None) -> None:
        self.deadline = deadline
        self.fired = threading.Event()
        self._session: _Session | None = None
        self._timer: threading.Timer | None = None

    def arm(self, session: _Session) -> None:
        self._session = session
        if self.deadline is None:
            return
        self._timer = threading.Timer(max(0.0, self.deadline - time.monotonic()), self._fire)
        self._timer.daemon = True
        self._timer.start()

    def _fire(self) -> None:
        self.fired.set()
        shell = getattr(self._session.calc, "_shell", None) if self._session else None
        child = getattr(shell, "_child", None)
        if child is not None:
            kill_process_group(child)

    def disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()


def run_cp2k(
    atoms: Atoms,
    spec: dict[str, Any],
    workdir: str,
    want_stress: bool,
    fault: InjectedFault | None = None,
) -> LabelOutcome:
    """Label ``atoms`` on this process's persistent CP2K shell; never raises for a failed label."""
    start = time.monotonic()
    timeout_s = spec.get("timeout_s")
    deadline = start + float(timeout_s) if timeout_s else None
    if not all(atoms.pbc):
        message = f"the CP2K reference labels periodic cells only; got pbc={atoms.pbc.tolist()}"
        return LabelFailure(FailureKind.CRASHED, message, workdir, 0.0)
    if fault is not None:
        timed_out = _apply_fault(fault, deadline)
        if timed_out:
            return LabelFailure(FailureKind.TIMED_OUT, f"no result after {timeout_s:g} s", workdir, 0.0)
    key = spec_key(spec)
    watchdog = _Watchdog(deadline)
    session: _Session | None = None
    offset = 0
    try:
        session = _POOL.take(key)
        if session is None:
            profile = profile_from_spec(spec)
            template = template_from_spec(spec, find_data_dir(profile, _data_names(spec)))
            session = _Session(key, template, profile)
            _POOL.count_start()
        watchdog.arm(session)
        session.prepare(atoms)
        offset = session.output_size()
        atoms.calc = session.calc
        energy = atoms.get_potential_energy()
        forces = atoms.get_forces()
        stress = atoms.get_stress(voigt=True) if want_stress else None
        atoms.calc = None
    except Exception as exc:
        watchdog.disarm()
        atoms.calc = None
        text = session.read_output_from(offset) if session is not None else ""
        _save_output(workdir, text)
        if session is not None:
            session.close()
        if watchdog.fired.is_set():
            message = f"no result after {timeout_s:g} s; CP2K shell killed"
            return LabelFailure(FailureKind.TIMED_OUT, message, workdir, 0.0)
        if says_cp2k_scf_failed(text):
            return LabelFailure(FailureKind.SCF_NOT_CONVERGED, _scf_message(text, spec), workdir, 0.0)
        kind, message = classify_exception(exc)
        clue = cp2k_error_line(text)
        return LabelFailure(kind, f"CP2K: {clue}" if clue else message, workdir, 0.0)
    except BaseException:  # interrupted (Ctrl-C, a signal): leave no shell in an unknown state
        watchdog.disarm()
        if session is not None:
            session.close()
        raise
    watchdog.disarm()
    text = session.read_output_from(offset)
    _save_output(workdir, text)
    session.labels += 1
    failed_scf = says_cp2k_scf_failed(text)
    if watchdog.fired.is_set():  # the time ran out just after the results came in: shell is gone
        session.close()
    else:
        if failed_scf:
            session.forget_density()
        _POOL.give_back(session)
    if failed_scf:
        return LabelFailure(FailureKind.SCF_NOT_CONVERGED, _scf_message(text, spec), workdir, 0.0)
    return LabelResult(energy=energy, forces=forces, stress=stress, workdir=workdir, wall_s=0.0)


def _data_names(spec: dict[str, Any]) -> tuple[str, str]:
    return (
        str(spec.get("basis_set_file") or DEFAULT_BASIS_FILE),
        str(spec.get("potential_file") or DEFAULT_POTENTIAL_FILE),
    )


def _apply_fault(fault: InjectedFault, deadline: float | None) -> bool:
    """Apply an injected fault, but let a 'hang' end at the deadline; True when it timed out."""
    if fault.kind != "hang" and fault.delay_s <= 0:
        fault.apply()
        return False
    pause = fault.delay_s + (fault.hang_s if fault.kind == "hang" else 0.0)
    if deadline is not None and time.monotonic() + pause > deadline:
        time.sleep(max(0.0, deadline - time.monotonic()))
        return True
    time.sleep(pause)
    if fault.kind not in (None, "hang"):
        InjectedFault(fault.kind).apply()
    return False


def says_cp2k_scf_failed(text: str) -> bool:
    lowered = text.lower()
    return any(mark in lowered for mark in SCF_FAILURE_MARKS)


def _scf_message(text: str, spec: dict[str, Any]) -> str:
    line = next((ln.strip(" *") for ln in text.splitlines() if says_cp2k_scf_failed(ln)), "SCF run NOT converged")
    return f"CP2K: {line} (max_scf {spec.get('max_scf', 50)})"


def cp2k_error_line(text: str) -> str:
    """The message in CP2K's ABORT box (the lines after ``[ABORT]``, without the drawing)."""
    lines = text.splitlines()
    for index, line in enumerate(lines):
        if "[ABORT]" not in line:
            continue
        body = []
        for following in lines[index + 1 : index + 10]:
            inner = following.strip().strip("*").strip()
            if not inner:
                if set(following.strip()) == {"*"}:
                    break  # the box's bottom edge
                continue
            inner = _ABORT_ART.sub("", inner).strip()
            if inner and not _SOURCE_LOCATION.fullmatch(inner):
                body.append(inner)
        return one_line(" ".join(body)) or "ABORT"
    return ""


_ABORT_ART = re.compile(r"^(?:\\_+/|O/\||/\| \||/ \\|\|)(?=\s|$)")
_SOURCE_LOCATION = re.compile(r"\S+\.F:\d+")


def _save_output(workdir: str, text: str) -> None:
    if text:
        with contextlib.suppress(OSError):
            (Path(workdir) / OUTPUT_NAME).write_text(text)


# --------------------------------------------------------------------------- ASE calculator


class CP2KCalculator(Calculator):
    """An ASE calculator on this process's pooled CP2K shells, for MD driven by the reference.

    Each call borrows a shell exactly as a label does, so reference-driven MD (IDG, test sets,
    relaxations) and labels share the same warm CP2K. A failed SCF raises ``SCFNotConverged``;
    any other failure raises ASE's ``CalculationFailed``.
    """

    implemented_properties: ClassVar[list[str]] = ["energy", "free_energy", "forces", "stress"]

    def __init__(self, spec: dict[str, Any], directory: str = ".", **kwargs: Any) -> None:
        super().__init__(directory=directory, **kwargs)
        self.spec = dict(spec)

    def calculate(
        self,
        atoms: Atoms | None = None,
        properties: list[str] | None = None,
        system_changes: list[str] = all_changes,
    ) -> None:
        super().calculate(atoms, properties or ["energy"], system_changes)
        assert self.atoms is not None
        want_stress = "stress" in (properties or []) or bool(self.spec.get("compute_stress"))
        spec = {**self.spec, "compute_stress": True} if want_stress else self.spec
        Path(self.directory).mkdir(parents=True, exist_ok=True)
        geometry = Atoms(
            numbers=self.atoms.numbers, positions=self.atoms.positions, cell=self.atoms.cell, pbc=self.atoms.pbc
        )
        outcome = run_cp2k(geometry, spec, str(Path(self.directory).absolute()), want_stress)
        if isinstance(outcome, LabelFailure):
            if outcome.kind is FailureKind.SCF_NOT_CONVERGED:
                raise SCFNotConverged(outcome.message)
            raise CalculationFailed(f"{outcome.kind.value}: {outcome.message}")
        self.results["energy"] = self.results["free_energy"] = outcome.energy
        self.results["forces"] = outcome.forces
        if outcome.stress is not None:
            self.results["stress"] = outcome.stress
