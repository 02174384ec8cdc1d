"""``aimspax-like label FRAMES --config CONFIG``: label bare frames with a campaign's reference.

Why. ``harvest`` writes the frames of someone's own MD that the committee is least sure of, as
bare geometries: questions for a reference, not answers. A campaign takes labelled frames only
(``import_data``), so between the two someone has to run the reference on exactly those frames,
with exactly the settings the campaign uses, and write the answers where ``import_data`` looks
for them. That is this command: harvest -> label -> import_data.

What. Every frame of FRAMES (any file ASE reads; ``--index`` picks a slice, and each frame keeps
its index in the file) is labelled by ``reference.label.label`` with CONFIG's ``reference``
section (stress too, for periodic frames, when ``reference.compute_stress`` is set), one scratch
folder per frame under a temporary directory, in-process or on ``--workers`` processes. The
labelled frames are written as extended XYZ under the keys ``import_data`` reads by default
(``REF_energy``, ``REF_forces``, ``REF_stress``), with ``label_source`` (``FRAMES#<index>``),
``label_wall_s``, the reference fingerprint in ``reference`` (what ``import_data`` reads with
``reference: file``) and the harvest keys the frame had. Numbers are written with ``repr``
precision (not ASE's ``%16.8f``), so the file holds the very geometry that was labelled and the
very numbers the reference returned.

A failed label is no error: the frame is left out and named on stderr. Every bad input (the
file, the config, an element the reference cannot do, an existing output) is one line and exit
code 2 before any label runs; no label at all is exit code 3, and nothing is written then.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aimspax_like.errors import SetupError

if TYPE_CHECKING:
    from ase import Atoms

    from aimspax_like.reference.results import LabelFailure, LabelOutcome

COMMANDS = ("label",)
EXIT_NONE_LABELLED = 3
INFO_SOURCE = "label_source"
INFO_WALL = "label_wall_s"
INFO_REFERENCE = "reference"  # what import_data reads with reference: file
# What ``harvest`` wrote about a frame (aimspax_like.harvest.INFO_*); kept on the labelled frame.
HARVEST_KEYS = ("harvest_uncertainty", "harvest_energy_std_per_atom", "harvest_source")
PROGRESS_EVERY_S = 10.0
PER_FRAME_PROGRESS = 20  # up to this many frames, a progress line per frame


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Register ``label`` on the front end's subparsers."""
    cmd = sub.add_parser(
        "label", help="label frames (e.g. harvest's) with a campaign's reference, for import_data",
        description="Labels every frame of FRAMES with the reference of CONFIG and writes them as extxyz with "
                    "REF_energy/REF_forces(/REF_stress), the keys a campaign's import_data reads by default. "
                    "Frames whose label fails are left out and named on stderr.")
    cmd.add_argument("frames", type=Path, help="frames to label, any file ASE reads (e.g. harvest's output)")
    cmd.add_argument("--config", type=Path, required=True, help="campaign YAML whose 'reference' labels the frames")
    cmd.add_argument("--output", type=Path, help="extxyz to write (default: <stem>_labelled.xyz beside FRAMES)")
    cmd.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    cmd.add_argument("--workers", type=int, default=1,
                     help="label processes (default 1: labels run one after another in this process)")
    cmd.add_argument("--index", default=":", help="frames to read, a number or slice like '100:' (default ':')")


def run(args: argparse.Namespace) -> int:
    """The command: exit 0 some frames labelled, 2 bad input, 3 no frame labelled."""
    result = label_file(args.frames, args.config, output=args.output, overwrite=args.overwrite,
                        workers=args.workers, index=args.index, on_progress=_stderr_lines())
    for index, failure in result.failures:
        print(f"frame {index}: {failure.kind.value}: {failure.message}", file=sys.stderr)
    counts = f"frames: {result.n_read} read, {result.n_labelled} labelled, {len(result.failures)} failed"
    if result.output is None:
        print(f"{counts}; nothing written (reference {result.fingerprint})")
        return EXIT_NONE_LABELLED
    print(f"{counts} -> {result.output} (reference {result.fingerprint})")
    return 0


def _stderr_lines() -> Callable[[str], None]:
    start = time.perf_counter()
    return lambda message: print(f"[{time.perf_counter() - start:6.1f} s] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- inputs


def default_output(frames: Path) -> Path:
    """``<stem>_labelled.xyz`` beside FRAMES."""
    return frames.with_name(f"{frames.stem}_labelled.xyz")


def read_frames(path: Path, index: str = ":") -> list[tuple[int, Atoms]]:
    """(index in the file, frame) for every frame of ``index``; one-line errors name the file."""
    from aimspax_like.harvest import read_trajectory

    return read_trajectory(path, index, what="frames", missing="frames file")


def load_reference(config_path: Path) -> tuple[Any, dict[str, Any]]:
    """The campaign config and its ``reference`` as the plain dict ``label`` takes."""
    from aimspax_like.config import load_config

    if not config_path.is_file():
        raise SetupError(f"{config_path}: config not found" if not config_path.exists() else f"{config_path}: "
                         "not a file")
    config = load_config(config_path)
    return config, config.reference.model_dump(mode="json")


def check_reference(config: Any, spec: dict[str, Any], frames: Sequence[tuple[int, Atoms]]) -> None:
    """What a campaign checks of its reference before it starts, for these frames."""
    from aimspax_like.reference.calculators import check_reference_setup

    structures = [atoms for _, atoms in frames]
    numbers = {int(z) for atoms in structures for z in atoms.numbers}
    check_reference_setup(spec, numbers, structures)
    if spec["kind"] == "pyscf":
        from aimspax_like.campaign import check_spin

        check_spin(config.reference.charge, config.reference.spin, structures)


# --------------------------------------------------------------------------- labelling


def _bare(atoms: Atoms) -> Atoms:
    from ase import Atoms

    return Atoms(numbers=atoms.numbers, positions=atoms.get_positions(), cell=atoms.cell, pbc=atoms.pbc)


def label_frames(
    frames: Sequence[tuple[int, Atoms]],
    spec: dict[str, Any],
    scratch: Path,
    workers: int = 1,
    on_done: Callable[[int, LabelOutcome], None] | None = None,
) -> dict[int, LabelOutcome]:
    """Label every frame (scratch folder ``scratch/frame_<index>``); outcome by index in the file.

    ``workers`` 1 labels in this process; more use a pool of fresh (spawned) processes, which
    keep their warm calculator from label to label. A worker that dies (a crash in a C
    extension) turns the labels it took down into ``crashed`` failures, never an exception.
    """
    from aimspax_like.reference.label import label

    outcomes: dict[int, LabelOutcome] = {}

    def done(index: int, outcome: LabelOutcome) -> None:
        outcomes[index] = outcome
        if on_done is not None:
            on_done(index, outcome)

    if workers == 1 or len(frames) == 1:
        for index, atoms in frames:
            done(index, label(_bare(atoms), spec, str(scratch / f"frame_{index}")))
        return outcomes
    import multiprocessing

    from aimspax_like.reference.results import FailureKind, LabelFailure

    context = multiprocessing.get_context("spawn")  # no fork of a process that may hold threads
    with ProcessPoolExecutor(max_workers=min(workers, len(frames)), mp_context=context) as pool:
        pending: dict[Future[LabelOutcome], int] = {
            pool.submit(label, _bare(atoms), spec, str(scratch / f"frame_{index}")): index for index, atoms in frames
        }
        try:
            while pending:
                finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in finished:
                    index = pending.pop(future)
                    try:
                        outcome = future.result()
                    except Exception as exc:  # BrokenProcessPool and the like: the worker died
                        message = f"label worker died ({type(exc).__name__}: {exc})"
                        outcome = LabelFailure(FailureKind.CRASHED, message, str(scratch / f"frame_{index}"), 0.0)
                    done(index, outcome)
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)
            raise
    return outcomes


def labelled_atoms(atoms: Atoms, outcome: Any, source: str, fingerprint: str) -> Atoms:
    """The frame's geometry with its label (``REF_*``) and where it came from (``source``: ``FRAMES#<index>``)."""
    import numpy as np

    bare = _bare(atoms)
    for key in HARVEST_KEYS:
        if key in atoms.info:
            bare.info[key] = atoms.info[key]
    bare.info["REF_energy"] = float(outcome.energy)
    bare.arrays["REF_forces"] = np.array(outcome.forces, dtype=float).reshape(len(bare), 3)
    if outcome.stress is not None:
        bare.info["REF_stress"] = np.array(outcome.stress, dtype=float).reshape(6)
    bare.info[INFO_SOURCE] = source
    bare.info[INFO_WALL] = float(outcome.wall_s)
    bare.info[INFO_REFERENCE] = fingerprint
    return bare


def _finite(outcome: Any) -> bool:
    import numpy as np

    values = [np.atleast_1d(outcome.energy), np.asarray(outcome.forces).ravel()]
    if outcome.stress is not None:
        values.append(np.asarray(outcome.stress).ravel())
    return all(np.isfinite(v).all() for v in values)


# --------------------------------------------------------------------------- output


def _info_text(info: dict[str, Any]) -> str:
    """The comment-line keys; a string ASE would read back as a number (a fingerprint of digits
    only, ``123e45...``) goes in the ``_JSON`` form, the one way to get the exact text back."""
    from ase.io.extxyz import key_val_dict_to_str, key_val_str_to_dict

    safe: dict[str, Any] = {}
    for key, value in info.items():
        if isinstance(value, str) and key_val_str_to_dict(key_val_dict_to_str({key: value})).get(key) != value:
            value = "_JSON " + json.dumps(value)
        safe[key] = value
    return key_val_dict_to_str(safe)


def frame_text(atoms: Atoms) -> str:
    """One labelled frame as extxyz, every number with ``repr`` precision (ASE's writer rounds
    positions and forces to 8 decimals: the file would no longer hold what was labelled)."""
    from ase.data import chemical_symbols

    info = {k: v for k, v in atoms.info.items() if k != "pbc"}
    info["pbc"] = atoms.pbc
    header = "Properties=species:S:1:pos:R:3:REF_forces:R:3 " + _info_text(info)
    cell = atoms.cell.array
    if cell.any():
        header = 'Lattice="' + " ".join(repr(float(x)) for x in cell.reshape(9)) + '" ' + header
    lines = [str(len(atoms)), header]
    for z, pos, force in zip(atoms.numbers, atoms.positions, atoms.arrays["REF_forces"], strict=True):
        lines.append(" ".join([chemical_symbols[z], *(repr(float(x)) for x in (*pos, *force))]))
    return "\n".join(lines) + "\n"


def write_labelled(path: Path, images: Sequence[Atoms]) -> Path:
    """Write atomically (``state.write_atomic``: a temporary file beside it, fsynced, then
    renamed): no reader ever sees half a file, and a crash leaves the old file or none."""
    from aimspax_like.state import write_atomic

    write_atomic(path, "".join(frame_text(atoms) for atoms in images).encode("utf-8"))
    return path


# --------------------------------------------------------------------------- the whole command


@dataclass
class LabelFileResult:
    n_read: int
    n_labelled: int
    failures: list[tuple[int, LabelFailure]] = field(default_factory=list)  # (index in the file, failure)
    output: Path | None = None  # None: no frame was labelled, nothing written
    fingerprint: str = ""


def label_file(
    frames_path: Path,
    config_path: Path,
    output: Path | None = None,
    overwrite: bool = False,
    workers: int = 1,
    index: str = ":",
    on_progress: Callable[[str], None] | None = None,
    scratch_root: Path | None = None,
) -> LabelFileResult:
    """Check every input, label, write. Every bad input is a ``SetupError`` raised before the first
    label and before the output is touched. ``scratch_root``: where the temporary scratch folder
    goes (default: the system's temporary directory)."""
    from aimspax_like.data import reference_fingerprint
    from aimspax_like.data.frames import source_tag
    from aimspax_like.data.xyz import check_new_file
    from aimspax_like.reference.results import FailureKind, LabelFailure

    if workers < 1:
        raise SetupError(f"--workers: must be at least 1 (got {workers})")
    config, spec = load_reference(config_path)
    output = output if output is not None else default_output(frames_path)
    check_new_file(output, overwrite, "with --output")
    frames = read_frames(frames_path, index)
    check_reference(config, spec, frames)
    fingerprint = reference_fingerprint(spec)

    total = len(frames)
    state = {"done": 0, "failed": 0, "last": time.monotonic()}

    def progress(frame: int, outcome: LabelOutcome) -> None:
        state["done"] += 1
        state["failed"] += 0 if outcome.ok else 1
        now = time.monotonic()
        if on_progress is None:
            return
        if total <= PER_FRAME_PROGRESS or now - state["last"] >= PROGRESS_EVERY_S or state["done"] == total:
            state["last"] = now
            what = "labelled" if outcome.ok else "failed"
            on_progress(f"label: {state['done']}/{total} frames done ({state['failed']} failed; "
                        f"frame {frame} {what} in {outcome.wall_s:.1f} s)")

    if on_progress is not None:
        procs = "in this process" if workers == 1 else f"on {min(workers, total)} worker processes"
        on_progress(f"label: {total} frame(s) of {frames_path} with reference {spec['kind']} ({fingerprint}) {procs}")
    with tempfile.TemporaryDirectory(prefix="aimspax-label-", dir=scratch_root) as scratch:
        outcomes = label_frames(frames, spec, Path(scratch), workers, progress)

    images: list[Atoms] = []
    failures: list[tuple[int, LabelFailure]] = []
    for frame_index, atoms in frames:
        outcome = outcomes[frame_index]
        if outcome.ok and not _finite(outcome):  # label() already refuses these; never written
            outcome = LabelFailure(FailureKind.INVALID_RESULT, "non-finite energy, forces or stress", None,
                                   outcome.wall_s)
        if not outcome.ok:
            failures.append((frame_index, outcome))
            continue
        images.append(labelled_atoms(atoms, outcome, source_tag(frames_path, frame_index), fingerprint))
    result = LabelFileResult(len(frames), len(images), failures, None, fingerprint)
    if images:
        result.output = write_labelled(output, images)
    return result


__all__ = [
    "COMMANDS",
    "LabelFileResult",
    "add_parsers",
    "default_output",
    "frame_text",
    "label_file",
    "label_frames",
    "labelled_atoms",
    "read_frames",
    "run",
    "write_labelled",
]
