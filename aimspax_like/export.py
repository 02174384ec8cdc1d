"""The ``export`` subcommand: a run's data and models in the forms other tools read.

``aimspax-like export RUN`` writes, into ``--out`` (default ``RUN/export``)::

    train.xyz valid.xyz test.xyz       extended XYZ per split, labels under REF_energy,
                                       REF_forces, REF_stress (mace_run_train's default keys)
    substructures.xyz                  the substructures labelled for large frames (any split):
                                       REF_forces, with the force_mask column true for the core
                                       atoms whose forces are labels, parent_index, piece_energy.
                                       Kept apart because mace_run_train cannot mask atoms: it
                                       would train on the buffer's forces and the piece's energy
    models/best.model                  MACE model files, copied (--model best|members|all)
    models/member_<k>.model
    models/best.model-lammps.pt        a LAMMPS (pair_style mace) model, made by mace's own
                                       mace.cli.create_lammps_model (--no-lammps: skipped)
    manifest.json                      every file with its SHA-256, frame counts, reference
                                       fingerprints, the run's config, the LAMMPS outcome

``held`` and ``analysis`` frames are never exported: a held label is kept out of training by
the label gate, and analysis points measure the uncertainty of the very trajectories they were
taken from, so a model trained on them would be judged on its own training data.

The LAMMPS model is made by mace's tool in a child process (it sets process-wide torch switches
and asks on stdin when a model has several heads). Where that fails (a missing optional
dependency, a model it cannot compile) the export says so in one line and goes on; the manifest
keeps the reason. When it succeeds, the compiled model is evaluated once on an exported frame
beside the MACE model, and the manifest records the largest difference: evidence that it
computes the same potential, short of running LAMMPS itself.

RUN may also be a ``train --out`` folder: its model files (and LAMMPS model) are exported.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from aimspax_like.errors import SetupError

COMMANDS = ("export",)
SPLITS_EXPORTED = ("train", "valid", "test")
PRODUCED = ("train.xyz", "valid.xyz", "test.xyz", "substructures.xyz", "models", "manifest.json")
# mace-torch 0.3.16's mace_run_train reads these keys by default (mace/tools/default_keys.py).
MACE_KEYS = {"energy_key": "REF_energy", "forces_key": "REF_forces", "stress_key": "REF_stress"}
LAMMPS_TIMEOUT_S = 600


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Register ``export`` on the front end's subparsers."""
    p = sub.add_parser("export", help="export a run's data (extxyz per split) and models (MACE, LAMMPS)",
                       description="Write extxyz files per split, the MACE model files, a LAMMPS model and a "
                                   "manifest with checksums.")
    p.add_argument("run", type=Path, metavar="RUN", help="run directory (or a train --out folder)")
    p.add_argument("--out", type=Path, help="output folder (default: RUN/export)")
    p.add_argument("--model", choices=("best", "members", "all"), default="best",
                   help="which model files: best.model, the member files, or both (default: best)")
    p.add_argument("--lammps", action=argparse.BooleanOptionalAction, default=True,
                   help="also make a LAMMPS model of the best model with mace's create_lammps_model (default: on)")
    p.add_argument("--overwrite", action="store_true", help="replace what an earlier export wrote into --out")


def run(args: argparse.Namespace) -> int:
    """Dispatch ``export``; returns the exit code."""
    return export_command(args)


# --------------------------------------------------------------------------- what to export


def _kind(folder: Path) -> str:
    if not folder.exists():
        raise SetupError(f"{folder}: not found")
    if not folder.is_dir():
        raise SetupError(f"{folder}: not a run directory (a folder holding campaign.yaml)")
    if (folder / "campaign.yaml").is_file():
        return "run"
    if (folder / "train_report.json").is_file():
        return "train"
    raise SetupError(f"{folder}: not a run directory (no campaign.yaml) nor a train --out folder "
                     "(no train_report.json)")


def _models(folder: Path, kind: str, which: str) -> tuple[Path, list[Path]]:
    """(the primary model: best.model or a train folder's model.model, every file to copy)."""
    models = folder / "models"
    members = sorted(models.glob("member_*.model"), key=lambda p: int(p.stem.split("_")[-1]))
    best = models / "best.model"
    if kind == "train" and not best.is_file():
        best = models / "model.model"  # a single-model fit
        members = members or ([best] if best.is_file() else [])
    if which in ("best", "all") and not best.is_file():
        raise SetupError(f"{best}: not found (the run has not finished convergence); export the members with "
                         "--model members")
    if which == "members" and not members:
        raise SetupError(f"{models}: no member_<k>.model files to export")
    primary = best if best.is_file() else members[0]
    chosen = {"best": [best], "members": members, "all": [best, *members]}[which]
    return primary, list(dict.fromkeys(chosen))  # a single-model train folder lists model.model once


# --------------------------------------------------------------------------- the command


def export_command(args: argparse.Namespace) -> int:
    from aimspax_like.fit import clear_outputs, output_folder

    kind = _kind(args.run)
    primary, model_files = _models(args.run, kind, args.model)
    infos = {path: _model_info(path) for path in model_files}  # an unreadable model fails before any write
    frames = _frames(args.run) if kind == "run" else {}
    out = output_folder(args.out or args.run / "export", args.overwrite, [args.run], PRODUCED)
    clear_outputs(out, PRODUCED)
    out.mkdir(parents=True, exist_ok=True)
    from aimspax_like.data.xyz import export_extxyz

    written: list[Path] = []
    for split in (*SPLITS_EXPORTED, "substructures"):
        if frames.get(split):
            path = export_extxyz(frames[split], out / f"{split}.xyz")
            path.chmod(0o644)  # written through a private temp file; an export is meant to be shared
            written.append(path)
    (out / "models").mkdir(exist_ok=True)
    copies = []
    for path in model_files:
        target = out / "models" / path.name
        shutil.copyfile(path, target)
        copies.append((path, target))
        written.append(target)
    lammps: dict[str, Any] = {"written": False, "reason": "--no-lammps"}
    if args.lammps:
        sample = next((frames[s][0] for s in ("test", "valid", "train") if frames.get(s)), None)
        lammps = lammps_model(primary, out / "models", sample)
        if lammps["written"]:
            written.append(out / lammps["file"])
        else:
            print(f"note: LAMMPS model not written: {lammps['reason']}", file=sys.stderr)
    manifest = _manifest(args.run, kind, out, frames, [(src, dst, infos[src]) for src, dst in copies], lammps,
                         written)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    _print_summary(out, manifest)
    return 0


def _frames(run_dir: Path) -> dict[str, list]:
    from aimspax_like.data.store import DatasetStore

    frames = DatasetStore.open(run_dir / "data" / "dataset.h5").frames()
    by_split: dict[str, list] = {}
    for frame in frames:
        by_split.setdefault("substructures" if frame.is_piece else frame.split, []).append(frame)
    return by_split


# --------------------------------------------------------------------------- LAMMPS


def lammps_model(model: Path, folder: Path, sample: Any = None) -> dict[str, Any]:
    """``python -m mace.cli.create_lammps_model MODEL`` in a scratch folder; its ``MODEL-lammps.pt``
    moved into ``folder``. Returns the manifest entry: written or not, and why not."""
    import mace

    tool = f"mace.cli.create_lammps_model (mace-torch {getattr(mace, '__version__', '?')})"
    model, folder = model.resolve(), folder.resolve()  # the tool runs in the scratch folder
    with tempfile.TemporaryDirectory(prefix=".lammps-", dir=folder) as scratch:
        staged = Path(scratch) / model.name
        shutil.copyfile(model, staged)
        command = [sys.executable, "-m", "mace.cli.create_lammps_model", str(staged), "--dtype", "float64"]
        try:
            proc = subprocess.run(command, capture_output=True, text=True, timeout=LAMMPS_TIMEOUT_S,
                                  stdin=subprocess.DEVNULL, cwd=scratch, env={**os.environ}, check=False)
        except subprocess.TimeoutExpired:
            return {"written": False, "tool": tool, "reason": f"{tool} did not finish in {LAMMPS_TIMEOUT_S} s"}
        produced = staged.with_name(staged.name + "-lammps.pt")
        if proc.returncode != 0 or not produced.is_file():
            return {"written": False, "tool": tool, "reason": _last_error(proc.stderr, proc.returncode)}
        target = folder / produced.name
        produced.replace(target)
    entry: dict[str, Any] = {"written": True, "tool": tool, "file": f"{folder.name}/{target.name}",
                             "model": f"{folder.name}/{model.name}", "dtype": "float64",
                             "pair_style": "pair_style mace no_domain_decomposition"}
    entry["check"] = _check_lammps(target, model, sample) if sample is not None else None
    return entry


def _last_error(stderr: str, code: int) -> str:
    """The line of a failed child's stderr that names the error (a traceback's last line)."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip() and "Warning" not in line]
    named = [line for line in lines if "Error" in line or "error" in line]
    text = (named or lines or [f"exit code {code}"])[-1]
    return text[:300]


def _check_lammps(lammps_file: Path, model_file: Path, frame: Any) -> dict[str, Any]:
    """Energy and forces of the compiled LAMMPS model against the MACE model on one frame.

    The LAMMPS wrapper sums the energies of local atoms (all of them here) and differentiates
    that sum, as pair_style mace does without domain decomposition.
    """
    import numpy as np
    import torch

    from aimspax_like.validation.predict import load_model

    try:
        ensemble = load_model(model_file, device="cpu", dtype="float64")
        atoms = frame.to_atoms()
        expected = ensemble.predict([atoms])
        compiled = torch.jit.load(str(lammps_file), map_location="cpu")
        data = ensemble.graphs.md_batch([atoms], torch.device("cpu"))
        out = compiled(data, torch.ones(len(atoms), dtype=torch.float64), False)
        energy = float(out["total_energy_local"].detach()[0])
        forces = out["forces"].detach().numpy()
    except Exception as exc:  # the check is evidence, never a reason to fail the export
        return {"ok": False, "reason": f"{type(exc).__name__}: {str(exc)[:200]}"}
    de = abs(energy - float(expected.energies[0, 0]))
    df = float(np.abs(forces - expected.forces[0]).max())
    return {"ok": bool(de < 1e-6 and df < 1e-6), "frame_atoms": len(atoms), "energy_eV": energy,
            "energy_diff_eV": de, "max_force_diff_eV_A": df}


# --------------------------------------------------------------------------- manifest


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _model_info(path: Path) -> dict[str, Any]:
    """What a user of the file must know: cutoff, elements, heads and the dtype it was trained in
    (give MACECalculator that ``default_dtype``, or it converts the model and says so)."""
    import torch

    from aimspax_like.models.torch_utils import quiet_torchscript

    try:
        with quiet_torchscript():
            model = torch.load(path, map_location="cpu", weights_only=False)
        dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
        return {"r_max": float(model.r_max), "atomic_numbers": [int(z) for z in model.atomic_numbers],
                "heads": list(getattr(model, "heads", []) or []), "dtype": dtype, "type": type(model).__name__}
    except Exception as exc:  # a foreign or damaged file: torch/pickle raise many types
        detail = (str(exc).strip().splitlines() or [""])[0][:160]
        raise SetupError(f"{path}: could not load a MACE model ({type(exc).__name__}: {detail})") from None


def _config(run_dir: Path, kind: str) -> Any:
    """The run's config as written into it (not re-validated: an export never fails on it)."""
    if kind == "run":
        from aimspax_like.config import parse_yaml

        return parse_yaml((run_dir / "campaign.yaml").read_text(encoding="utf-8"))
    report = json.loads((run_dir / "train_report.json").read_text(encoding="utf-8"))
    return {"train_settings": report.get("settings"), "source": report.get("source")}


def _manifest(run_dir: Path, kind: str, out: Path, frames: dict[str, list],
              copies: list[tuple[Path, Path, dict[str, Any]]], lammps: dict[str, Any],
              written: list[Path]) -> dict[str, Any]:
    import ase
    import mace
    import torch

    from aimspax_like.analysis.strict_json import strict

    counts = {split: len(frames.get(split, [])) for split in SPLITS_EXPORTED}
    skipped = {split: len(frames.get(split, [])) for split in ("held", "analysis")}
    references: dict[str, dict[str, int]] = {}
    for split, items in frames.items():
        for frame in items:
            ref = references.setdefault(split, {})
            ref[frame.reference] = ref.get(frame.reference, 0) + 1
    files = [f"{s}.xyz" for s in SPLITS_EXPORTED if counts[s]]
    return strict({
        "format": "aimspax-like export",
        "version": 1,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "source": {"path": str(run_dir), "kind": kind},
        "frames": counts,
        "substructures": len(frames.get("substructures", [])),
        "not_exported": skipped,
        "references": references,
        "mace_keys": MACE_KEYS,
        "mace_run_train": ("mace_run_train " + " ".join(f"--{s}_file {s}.xyz" for s in SPLITS_EXPORTED if counts[s])
                           + " " + " ".join(f"--{k} {v}" for k, v in MACE_KEYS.items())) if files else None,
        "models": [{"file": str(target.relative_to(out)), "from": str(source), **info}
                   for source, target, info in copies],
        "lammps": lammps,
        "config": _config(run_dir, kind),
        "versions": {"mace-torch": getattr(mace, "__version__", None), "torch": torch.__version__,
                     "ase": ase.__version__},
        "files": [{"path": str(p.relative_to(out)), "bytes": p.stat().st_size, "sha256": _sha256(p)}
                  for p in written],
    })


def _print_summary(out: Path, manifest: dict[str, Any]) -> None:
    frames = manifest["frames"]
    skipped = ", ".join(f"{n} {s}" for s, n in manifest["not_exported"].items() if n)
    pieces = manifest.get("substructures", 0)
    print(f"exported {frames['train']} train, {frames['valid']} valid, {frames['test']} test frames"
          + (f", {pieces} substructures" if pieces else "")
          + (f" ({skipped} frames not exported)" if skipped else "") + f" and {len(manifest['models'])} model(s)")
    for entry in manifest["files"]:
        print(f"{entry['bytes']:>10}  {out / entry['path']}")
    lammps = manifest["lammps"]
    if lammps.get("written") and lammps.get("check"):
        check = lammps["check"]
        if check.get("ok") is not None and "energy_diff_eV" in check:
            print(f"LAMMPS model checked against the MACE model on one frame: energy diff "
                  f"{check['energy_diff_eV']:.2e} eV, max force diff {check['max_force_diff_eV_A']:.2e} eV/Å")
    print(out / "manifest.json")
