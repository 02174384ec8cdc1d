"""Turn the reference section of the config into an ASE calculator, and check it up front.

``spec`` is ``config.reference.model_dump(mode="json")``: a plain dict, because it is shipped
to remote label workers that should not need pydantic models. Heavy backends (tblite, PySCF,
FHI-aims' ASE glue) are imported only when their kind is asked for, so a worker that labels
with EMT never pays for them.

The ``mace`` kind (a MACE model file as the reference) is the one kind that brings torch and
MACE into a label worker; its calculator is loaded once per process and kept (``_mace_calculator``),
so a worker pays for the model file once, not once per label.

``check_reference_setup`` runs once before a campaign starts: an unsupported element or a
missing executable should stop the run with a one-line ``ConfigError`` instead of turning
every label into a crash hours later.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import logging
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ase import Atoms
from ase.calculators.calculator import BaseCalculator
from ase.data import chemical_symbols

from aimspax_like.errors import ConfigError, SetupError

_XTB_ELEMENTS = frozenset(range(1, 87))  # GFN1/GFN2-xTB are parametrised for H..Rn


def make_calculator(spec: dict[str, Any], workdir: str | Path) -> BaseCalculator:
    """A fresh ASE calculator for one label; file-based codes write into ``workdir``.

    Typed as ``BaseCalculator`` because ASE's ``Aims`` is a file-IO calculator that does not
    derive from ``Calculator``; every other kind returns a ``Calculator``.
    """
    kind = spec["kind"]
    if kind == "emt":
        from ase.calculators.emt import EMT

        return EMT()
    if kind == "lj":
        from ase.calculators.lj import LennardJones

        return LennardJones(
            sigma=spec.get("sigma", 1.0),
            epsilon=spec.get("epsilon", 1.0),
            rc=spec.get("rc"),
            smooth=spec.get("smooth", True),
        )
    if kind == "xtb":
        from tblite.ase import TBLite

        return TBLite(
            method=spec.get("method", "GFN2-xTB"),
            accuracy=spec.get("accuracy", 1.0),
            electronic_temperature=spec.get("electronic_temperature", 300.0),
            max_iterations=spec.get("max_iterations", 250),
            charge=spec.get("charge", 0),
            multiplicity=spec.get("multiplicity", 1),
            verbosity=0,
        )
    if kind == "pyscf":
        from aimspax_like.reference.pyscf_calc import PySCFCalculator

        keys = ("xc", "basis", "charge", "spin", "max_cycle", "conv_tol")
        return PySCFCalculator(directory=str(workdir), warm=bool(spec.get("warm", True)),
                               **{k: spec[k] for k in keys if k in spec})
    if kind == "aims":
        from aimspax_like.reference.aims import make_aims_calculator

        return make_aims_calculator(spec, workdir)
    if kind == "cp2k":
        from aimspax_like.reference.cp2k import CP2KCalculator

        return CP2KCalculator(spec, directory=str(workdir))
    if kind == "import":
        return _imported_calculator(spec)
    if kind == "mace":
        return mace_reference_calculator(spec)
    raise SetupError(f"unknown reference kind {kind!r}")


def keep_in_scratch(calc: BaseCalculator, workdir: str | Path) -> None:
    """Point a file-writing calculator left in the working folder (ASE's default, ``.``) at the
    label's scratch folder, so that its inputs and outputs never land where the driver runs.

    ASE's older calculators keep ``directory`` as a string, its newer file-IO ones as a ``Path``:
    the new value keeps the type.
    """
    current = getattr(calc, "directory", None)
    if current is not None and str(current) in (".", ""):
        calc.directory = Path(workdir) if isinstance(current, Path) else str(workdir)


def mace_reference_calculator(spec: dict[str, Any]) -> BaseCalculator:
    """The ``mace`` reference's calculator, shared by every label of this process.

    Keyed on the file's size and modification time as well as its path, so a model file
    replaced in place is loaded again rather than served stale, and on the thread: one ASE
    calculator holds the atoms and results of one calculation, so threads that label at once
    (a thread pool) must not share it. Its folder is reset to the working folder each time it
    is handed out (``label`` points it at the current scratch folder, which is removed after
    the label; ASE would create a calculator's folder again on its next calculation).
    """
    model = Path(str(spec["model"]))
    try:
        stat = model.stat()
    except OSError:
        raise SetupError(f"reference.model: model file not found: {model}") from None
    calc = _mace_calculator(str(model), spec.get("device", "cpu"), spec.get("dtype", "float64"),
                            (stat.st_size, stat.st_mtime_ns), threading.get_ident())
    calc.directory = "."
    return calc


@functools.lru_cache(maxsize=8)
def _mace_calculator(model: str, device: str, dtype: str, stamp: tuple[int, int], thread: int) -> BaseCalculator:
    """The MACE reference of this process, loaded on its first label and reused for every other.

    Loading a model file (unpickling, TorchScript set-up) costs far more than one evaluation of
    a small molecule. Reusing the calculator is safe: ASE recomputes whenever the atoms differ
    from the ones it last saw. mace is imported before anything pulls in e3nn on its own, as mace
    sets e3nn's options when it is imported. ``stamp`` and ``thread`` only key the cache.
    """
    import mace.calculators  # noqa: F401  (first: before e3nn, see above)
    from mace.calculators import MACECalculator

    from aimspax_like.models.torch_utils import quiet_torchscript

    # mace logs a root-logger warning when the file's dtype differs from the one asked for
    # (a float32 teacher evaluated in float64): the conversion is the point, not news.
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with quiet_torchscript():
            return MACECalculator(model_paths=model, device=device, default_dtype=dtype)
    finally:
        logging.disable(previous)


def supported_elements(spec: dict[str, Any]) -> frozenset[int] | None:
    """Atomic numbers the reference can label; None when it has no fixed element list."""
    kind = spec["kind"]
    if kind == "emt":
        from ase.calculators.emt import parameters

        return frozenset(chemical_symbols.index(symbol) for symbol in parameters)
    if kind == "xtb":
        return _XTB_ELEMENTS
    return None


def check_reference_setup(spec: dict[str, Any], numbers: set[int], structures: Iterable[Atoms] | None = None) -> None:
    """Raise ``ConfigError`` naming the config key to fix when this reference cannot run.

    ``structures`` (optional) lets references that label periodic cells only (CP2K) say so now.
    """
    kind = spec["kind"]
    allowed = supported_elements(spec)
    if allowed is not None:
        bad = sorted(set(numbers) - allowed)
        if bad:
            names = ", ".join(chemical_symbols[z] for z in bad)
            raise ConfigError("reference.kind", f"{_describe(spec)} cannot label {names}")
    for package, needed_by in (("tblite", "xtb"), ("pyscf", "pyscf")):
        if kind == needed_by and importlib.util.find_spec(package) is None:
            raise ConfigError(
                "reference.kind", f"kind {kind!r} needs the {package!r} package, which is not installed"
            )
    if kind == "aims":
        _check_aims(spec, numbers)
    if kind == "cp2k":
        from aimspax_like.reference.cp2k import CP2KSetupProblem, check_cp2k_setup

        try:
            check_cp2k_setup(spec, set(numbers), structures)
        except CP2KSetupProblem as exc:
            raise ConfigError(f"reference.{exc.key}", exc.message) from None
    if kind == "import":
        _check_import(spec)
    if kind == "mace":
        _check_mace(spec, numbers)


def _check_mace(spec: dict[str, Any], numbers: set[int]) -> None:
    """The model file must exist, load, and know every element of the structures.

    Loaded here once in the driver (before any folder exists), so a wrong path, a file that is
    no MACE model or an element the model never saw is one line, not a crash on every label.
    """
    model = Path(str(spec["model"]))
    if not model.is_file():
        raise ConfigError("reference.model", f"model file not found: {model}")
    if spec.get("device") == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("reference.device", "cuda asked for, but torch sees no GPU here")
    try:
        calc = mace_reference_calculator(spec)
    except Exception as exc:  # a corrupt or foreign file can fail in any way while unpickling
        text = " ".join(str(exc).split())
        raise ConfigError("reference.model", f"cannot load {model} as a MACE model "
                          f"({type(exc).__name__}{': ' + text[:160] if text else ''})") from None
    known = {int(z) for z in calc.z_table.zs}
    missing = sorted(set(numbers) - known)
    if missing:
        names = ", ".join(chemical_symbols[z] for z in missing)
        raise ConfigError("reference.model", f"{model} was not trained on {names}")


def _check_import(spec: dict[str, Any]) -> None:
    """The imported object must make an ASE calculator: checked before any folder exists.

    The class or factory is called once with its kwargs (as every label will call it), so a
    constructor that fails (a missing licence, a wrong keyword) or a factory that returns
    something else is one line here, not a traceback after the run directory exists.
    """
    try:
        target = _resolve(spec["path"])
    except (ImportError, AttributeError, ValueError) as exc:
        raise ConfigError("reference.path", f"cannot import {spec['path']!r} ({exc})") from None
    if isinstance(target, type) and not issubclass(target, BaseCalculator):
        raise ConfigError("reference.path", f"{spec['path']!r} is the class {target.__name__}, "
                          "not an ASE calculator class")
    if not callable(target):
        raise ConfigError("reference.path", f"{spec['path']!r} is a {type(target).__name__}, "
                          "neither an ASE calculator class nor a function returning one")
    try:
        _imported_calculator(spec)
    except SetupError as exc:
        raise ConfigError("reference.path", str(exc).split(": ", 1)[-1]) from None
    except Exception as exc:  # a factory of any kind may fail in any way
        raise ConfigError("reference.path", f"calling {spec['path']!r} failed ({type(exc).__name__}: "
                          f"{str(exc).splitlines()[0] if str(exc) else ''})") from None


def _describe(spec: dict[str, Any]) -> str:
    if spec["kind"] == "xtb":
        return str(spec.get("method", "GFN2-xTB"))
    return str(spec["kind"]).upper()


def _check_aims(spec: dict[str, Any], numbers: set[int]) -> None:
    from aimspax_like.reference.aims import missing_programs, missing_species_files

    command = spec.get("command") or "aims.x"
    try:
        missing = missing_programs(command)
    except ValueError as exc:
        raise ConfigError("reference.command", f"cannot parse {command!r}: {exc}") from None
    if missing:
        raise ConfigError("reference.command", f"{', '.join(missing)} not found (command {command!r})")
    species_dir = spec.get("species_dir")
    if not species_dir:
        raise ConfigError("reference.species_dir", "FHI-aims needs the species_defaults folder to use")
    if not Path(species_dir).is_dir():
        raise ConfigError("reference.species_dir", f"{species_dir} is not a folder")
    absent = missing_species_files(species_dir, set(numbers))
    if absent:
        raise ConfigError("reference.species_dir", f"{species_dir} lacks {', '.join(absent)}")


def _resolve(path: str) -> Any:
    module_name, _, attribute = path.partition(":")
    if not module_name or not attribute:
        raise ValueError("expected 'package.module:Name'")
    return getattr(importlib.import_module(module_name), attribute)


def _imported_calculator(spec: dict[str, Any]) -> BaseCalculator:
    """Call the configured class or factory; anything but an ASE calculator is a setup error."""
    try:
        factory = _resolve(spec["path"])
    except (ImportError, AttributeError, ValueError) as exc:
        raise SetupError(f"reference.path: cannot import {spec['path']!r} ({exc})") from None
    calc = factory(**(spec.get("kwargs") or {}))
    if not isinstance(calc, BaseCalculator):
        raise SetupError(
            f"reference.path: {spec['path']!r} returned {type(calc).__name__}, not an ASE calculator"
        )
    return calc
