"""The ``train`` subcommand: fit a fresh model (or a small ensemble) to any labelled dataset.

``aimspax-like train SOURCE`` reads a run directory (its train/valid frames; its test frames are
the held-out test set; its ``campaign.yaml`` gives the default model and training settings), a
``dataset.h5``, an extended XYZ file or an ASE database, fits ``--members`` models from scratch
(``models.fitting``) and writes, into ``--out`` (default ``RUN/final`` or ``<stem>_model`` beside
the file)::

    models/model.model           the model (member_k.model and best.model with --members > 1)
    train_report.json            strict JSON: data, references, settings, curve, errors
    train_report.md              the same for people, with the error table
    learning_curve.png           loss, force MAE and learning rate per epoch
    logs/train.jsonl             one JSON line per epoch (stderr gets every --log-every-th)

Every check that can fail (flags, files, keys, an empty or mixed-reference dataset, an output
folder in the way) runs before anything is written: a mistake is one ``error:`` line naming the
flag or file, exit code 2. Frames of split ``held`` or ``analysis`` are never trained on.

Progress lines have the event log's form (``t``, ``event``, strict JSON) but live in the
output folder, never in a run's ``logs/events.jsonl``: a fit is no decision of the campaign.
Events: ``train_start`` (source, kind, recipe, members, frame counts), ``train_epoch`` (one
``EpochRecord``: member, epoch, stage, lr, loss weights, train/valid loss, valid MAEs in eV
units), ``train_member`` (a member done: epochs, kept stage, switch epoch and reason, valid
loss after the E0 refit, seconds) and ``train_end`` (best member, wall seconds).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, TextIO

from aimspax_like.errors import SetupError

COMMANDS = ("train",)

# What train writes into its folder; --overwrite removes these and nothing else.
PRODUCED = ("models", "train_report.json", "train_report.md", "learning_curve.png", "logs")


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Register ``train`` on the front end's subparsers."""
    p = sub.add_parser(
        "train", help="fit a fresh MACE model (or ensemble) to convergence on a run or dataset",
        description="Fit a fresh model from scratch on a run directory, dataset.h5, extxyz file or ASE database.")
    p.add_argument("source", type=Path, metavar="DATASET|RUN",
                   help="run directory, dataset .h5, extended XYZ (.xyz/.extxyz) or ASE database (.db)")
    p.add_argument("--out", type=Path, help="output folder (default: RUN/final, or <stem>_model beside the file)")
    p.add_argument("--overwrite", action="store_true", help="replace what an earlier train wrote into --out")
    p.add_argument("--members", type=int, help="models to fit, seeds seed..seed+M-1 (default 1: a single model)")
    p.add_argument("--recipe", choices=("plain", "final"), default="plain",
                   help="plain: patience on the validation loss (the converge phase); final: the paper's final-"
                        "model recipe, reduce-on-plateau then stage two with raised energy weight (default: plain)")
    p.add_argument("--config", type=Path, metavar="FILE.yaml",
                   help="YAML with optional model: and training: sections (the campaign keys)")
    group = p.add_argument_group("model and training (override the run's campaign.yaml and --config)")
    group.add_argument("--channels", type=int)
    group.add_argument("--max-L", type=int, dest="max_L")
    group.add_argument("--r-max", type=float, dest="r_max")
    group.add_argument("--num-interactions", type=int)
    group.add_argument("--device", choices=("auto", "cpu", "cuda"))
    group.add_argument("--dtype", choices=("float32", "float64"))
    group.add_argument("--lr", type=float, help="learning rate of stage one")
    group.add_argument("--batch-size", type=int)
    group.add_argument("--seed", type=int, help="base seed (default: the run's seed, else 0)")
    group.add_argument("--max-epochs", type=int, help="epochs at most (default: the run's converge.max_epochs, "
                                                      "else 1000)")
    group.add_argument("--patience", type=int, help="epochs without improvement that end a stage (default: the "
                                                    "run's converge.patience, else 50)")
    final = p.add_argument_group("final recipe (--recipe final; mace_run_train's stage two)")
    final.add_argument("--swa-start", type=float, default=0.75,
                       help="stage two starts after this fraction of --max-epochs at the latest (default 0.75)")
    final.add_argument("--swa-lr", type=float, default=1e-3, help="learning rate of stage two (default 1e-3)")
    final.add_argument("--swa-energy-weight", type=float, default=1000.0, help="stage-two energy weight (1000)")
    final.add_argument("--swa-forces-weight", type=float, default=100.0, help="stage-two forces weight (100)")
    final.add_argument("--swa-stress-weight", type=float,
                       help="stage-two stress weight (default: the stress weight scaled like the forces')")
    final.add_argument("--lr-factor", type=float, default=0.8, help="plateau factor of the learning rate (0.8)")
    final.add_argument("--lr-patience", type=int, help="plateau patience in epochs (default: patience / 5)")
    final.add_argument("--switch-refit", action=argparse.BooleanOptionalAction, default=True,
                       help="refit the per-element E0s when stage two begins, so its energy weight goes to energy "
                            "differences, not a constant offset (default: on)")
    data = p.add_argument_group("data")
    data.add_argument("--valid-fraction", type=float, default=0.1,
                      help="share of train frames drawn (seeded) for validation when the data have none (0.1)")
    data.add_argument("--test", type=Path, metavar="FILE", help="extra test set (extxyz, .db, .h5 or run)")
    data.add_argument("--energy-key", default="REF_energy", help="energy key of extxyz/db files (REF_energy, "
                                                                 "else ASE's energy)")
    data.add_argument("--forces-key", default="REF_forces", help="forces key (REF_forces, else ASE's forces)")
    data.add_argument("--stress-key", default="REF_stress", help="stress key (REF_stress, else ASE's stress)")
    data.add_argument("--allow-mixed-references", action="store_true",
                      help="train even if the frames come from more than one reference fingerprint")
    p.add_argument("--log-every", type=int, default=5, help="a progress line on stderr every N epochs (5)")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")


def run(args: argparse.Namespace) -> int:
    """Dispatch ``train``; returns the exit code."""
    return train_command(args)


# --------------------------------------------------------------------------- checks


_POSITIVE_INT = ("members", "max_epochs", "patience", "channels", "num_interactions", "batch_size", "lr_patience",
                 "log_every")
_POSITIVE_FLOAT = ("r_max", "lr", "swa_lr")
_NON_NEGATIVE = ("max_L", "swa_energy_weight", "swa_forces_weight", "swa_stress_weight")
_OPEN_UNIT = ("valid_fraction", "swa_start", "lr_factor")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_flags(args: argparse.Namespace) -> None:
    """Range checks of the numeric flags, each failure one line naming the flag."""
    import math

    for name in (*_POSITIVE_INT, *_POSITIVE_FLOAT, *_NON_NEGATIVE, *_OPEN_UNIT):
        value = getattr(args, name)
        if value is None:
            continue
        if isinstance(value, float) and not math.isfinite(value):
            raise SetupError(f"{_flag(name)}: must be a finite number (got {value})")
        if name in (*_POSITIVE_INT, *_POSITIVE_FLOAT) and value <= 0:
            raise SetupError(f"{_flag(name)}: must be > 0 (got {value})")
        if name in _NON_NEGATIVE and value < 0:
            raise SetupError(f"{_flag(name)}: must be >= 0 (got {value})")
        if name in _OPEN_UNIT and not 0 < value < 1:
            raise SetupError(f"{_flag(name)}: must lie between 0 and 1 (got {value})")
    if args.recipe == "final" and args.max_epochs is not None and args.max_epochs < 2:
        raise SetupError(f"--max-epochs: the final recipe needs at least 2 epochs, one per stage (got "
                         f"{args.max_epochs})")


def output_folder(out: Path, overwrite: bool, protected: Sequence[Path], produced: Sequence[str]) -> Path:
    """Check that ``out`` may receive a command's files; refuse before anything is written.

    A folder that holds a campaign or the input data is never an output folder (``--overwrite``
    would remove its models); a non-empty one needs ``--overwrite``, which replaces only the
    entries named in ``produced``.
    """
    if out.exists() and not out.is_dir():
        raise SetupError(f"--out {out}: exists and is not a folder")
    resolved = out.resolve()
    for path in protected:
        target = Path(path).resolve()
        if target == resolved or resolved in target.parents or (out / "campaign.yaml").exists():
            raise SetupError(f"--out {out}: holds the run directory or the input data; choose another folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise SetupError(f"--out {out}: folder exists and is not empty; pass --overwrite to replace "
                         f"{', '.join(produced)} there")
    return out


def clear_outputs(out: Path, produced: Sequence[str]) -> None:
    """Remove what an earlier run of the command wrote (``--overwrite``); nothing else."""
    for name in produced:
        path = out / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()


# --------------------------------------------------------------------------- settings


def _campaign_of(source: Any) -> Any:
    """The run's config (defaults for model/training/epochs), or None for a dataset file."""
    if source.kind != "run":
        return None
    from aimspax_like.config import load_config

    return load_config(source.path / "campaign.yaml")


def _config_file(path: Path) -> dict[str, dict[str, Any]]:
    """``model:`` and ``training:`` of a train config file (other sections are a mistake)."""
    from aimspax_like.config import read_yaml

    data = read_yaml(path)
    if not isinstance(data, dict):
        raise SetupError(f"{path}: must be a mapping with model: and/or training: sections")
    sections: dict[str, dict[str, Any]] = {}
    for key, value in data.items():
        if key not in ("model", "training"):
            raise SetupError(f"{path}: {key}: unknown section (a train config holds model: and training:)")
        if value is None:
            continue
        if not isinstance(value, dict):
            raise SetupError(f"{path}: {key}: must be a mapping of settings")
        sections[key] = value
    return sections


def _validated(cls: Any, base: Any, updates: dict[str, Any], where: dict[str, str], prefix: str = "") -> Any:
    """``base`` with ``updates`` through the strict config model; a problem names its flag or key
    (``where`` maps fields to flags; any other field is named ``prefix + field``)."""
    from pydantic import ValidationError

    try:
        return cls.model_validate({**base.model_dump(), **updates})
    except ValidationError as exc:
        error = exc.errors()[0]
        field = str(error["loc"][0]) if error["loc"] else ""
        name = where.get(field, f"{prefix}{field}" if field else prefix.rstrip(". ") or cls.__name__)
        if error["type"] == "extra_forbidden":
            raise SetupError(f"{name}: unknown key") from None
        message = " ".join(str(error["msg"]).removeprefix("Value error, ").split())
        raise SetupError(f"{name}: {message} (got {error.get('input')!r})") from None


_SWITCH_WHY = {"epoch": "--swa-start reached", "lr_drops": "the learning rate dropped twice",
               "patience": "stage one stopped improving"}


def resolve_settings(args: argparse.Namespace, campaign: Any) -> Any:
    """The ``FitSettings``: the run's config (or the defaults), then --config, then the flags."""
    from aimspax_like.config import ConvergeConfig, ModelConfig, TrainingConfig
    from aimspax_like.models.fitting import FitSettings
    from aimspax_like.models.training import FinalRecipe

    # A fresh fit: the campaign's start models (model.start_from) are not where it begins.
    model = campaign.model.model_copy(update={"start_from": None}) if campaign is not None else ModelConfig()
    training = campaign.training if campaign is not None else TrainingConfig()
    file_model: dict[str, Any] = {}
    if args.config is not None:
        sections = _config_file(args.config)
        file_model = sections.get("model", {})
        model = _validated(ModelConfig, model, {"seeds": None, **file_model}, {}, f"{args.config}: model.")
        training = _validated(TrainingConfig, training, sections.get("training", {}), {},
                              f"{args.config}: training.")
    model_flags = {k: getattr(args, k) for k in ("channels", "max_L", "r_max", "num_interactions", "device", "dtype")}
    members = args.members or file_model.get("ensemble_size") or 1
    seed = args.seed if args.seed is not None else (campaign.seed if campaign is not None else 0)
    seeds = file_model.get("seeds") if isinstance(file_model.get("seeds"), list) else None
    if seeds is None or len(seeds) != members:
        seeds = [seed + k for k in range(members)]
    updates = {k: v for k, v in model_flags.items() if v is not None} | {"ensemble_size": members, "seeds": seeds}
    model = _validated(ModelConfig, model, updates, {k: _flag(k) for k in model_flags} | {"ensemble_size": "--members"})
    training_flags = {k: getattr(args, k) for k in ("lr", "batch_size") if getattr(args, k) is not None}
    training = _validated(TrainingConfig, training, training_flags, {k: _flag(k) for k in training_flags})
    converge = campaign.converge if campaign is not None else ConvergeConfig()
    max_epochs = args.max_epochs or converge.max_epochs
    patience = args.patience or converge.patience
    final = None
    if args.recipe == "final":
        if max_epochs < 2:
            raise SetupError(f"--max-epochs: the final recipe needs at least 2 epochs (got {max_epochs})")
        final = FinalRecipe(max_epochs=max_epochs, patience=patience, swa_start=args.swa_start, swa_lr=args.swa_lr,
                            swa_energy_weight=args.swa_energy_weight, swa_forces_weight=args.swa_forces_weight,
                            swa_stress_weight=args.swa_stress_weight, lr_factor=args.lr_factor,
                            lr_patience=args.lr_patience)
    if model.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise SetupError("--device: cuda asked for (model.device), but torch sees no GPU on this machine")
    return FitSettings(model=model, training=training, seeds=list(seeds), recipe=args.recipe,
                       max_epochs=max_epochs, patience=patience, final=final, refit_at_switch=args.switch_refit)


# --------------------------------------------------------------------------- progress


class Progress:
    """Progress as JSON lines (the event log's form): every line to ``logs/train.jsonl``, epochs
    to stderr every ``every``-th (and the first, and a stage's first) so a long fit shows life."""

    def __init__(self, log: Path, every: int, stream: TextIO | None) -> None:
        log.parent.mkdir(parents=True, exist_ok=True)
        self.handle = log.open("a", encoding="utf-8")
        self.every = every
        self.stream = stream
        self.stage: dict[int, int] = {}

    def emit(self, event: str, **fields: Any) -> None:
        self._emit(event, fields, loud=True)

    def _emit(self, event: str, fields: dict[str, Any], loud: bool) -> None:
        from aimspax_like.analysis.strict_json import dumps_strict

        line = dumps_strict({"t": round(time.time(), 3), "event": event, **fields}, indent=None)
        self.handle.write(line + "\n")
        self.handle.flush()
        if loud and self.stream is not None:
            print(line, file=self.stream, flush=True)

    def epoch(self, record: Any) -> None:
        new_stage = self.stage.get(record.member) != record.stage
        self.stage[record.member] = record.stage
        loud = new_stage or record.epoch == 1 or record.epoch % self.every == 0
        self._emit("train_epoch", asdict(record), loud)

    def close(self) -> None:
        self.handle.close()


# --------------------------------------------------------------------------- the command


def _frames(args: argparse.Namespace, source: Any, seed: int) -> tuple[list, list, list, list, int]:
    """Train, valid, test and left-out frames, and how many validation frames were drawn."""
    from aimspax_like.data.sources import NEVER_TRAINED, LabelKeys, read_source, with_validation

    frames, drawn = with_validation(source.frames, args.valid_fraction, seed)
    train = [f for f in frames if f.split == "train"]
    valid = [f for f in frames if f.split == "valid"]
    test = [f for f in frames if f.split == "test"]
    left_out = [f for f in frames if f.split in NEVER_TRAINED]
    if args.test is not None:
        keys = LabelKeys(args.energy_key, args.forces_key, args.stress_key)
        extra = read_source(args.test, keys, default_split="test").frames
        test += [f for f in extra if f.split not in NEVER_TRAINED]
    if not train:
        counts = ", ".join(f"{n} {s}" for s, n in source.counts().items() if n) or "no frames at all"
        raise SetupError(f"{args.source}: no training frames ({counts})")
    return train, valid, test, left_out, drawn


def train_command(args: argparse.Namespace) -> int:
    """``train``: check everything, fit, write the model and the report, print the table."""
    from aimspax_like.data.provenance import check_one_reference
    from aimspax_like.data.sources import LabelKeys, read_source

    started = time.perf_counter()
    check_flags(args)
    source = read_source(args.source, LabelKeys(args.energy_key, args.forces_key, args.stress_key))
    campaign = _campaign_of(source)
    settings = resolve_settings(args, campaign)
    seed = args.seed if args.seed is not None else (campaign.seed if campaign is not None else 0)
    train, valid, test, left_out, drawn = _frames(args, source, seed)
    references = check_one_reference(train + valid, allow_mixed=args.allow_mixed_references,
                                     key="--allow-mixed-references")
    default = source.path / "final" if source.kind == "run" else source.path.parent / f"{source.path.stem}_model"
    out = output_folder(args.out or default, args.overwrite, [source.path, *([args.test] if args.test else [])],
                        PRODUCED)
    clear_outputs(out, PRODUCED)
    out.mkdir(parents=True, exist_ok=True)
    progress = Progress(out / "logs" / "train.jsonl", args.log_every, None if args.quiet else sys.stderr)
    try:
        progress.emit("train_start", source=str(source.path), kind=source.kind, recipe=settings.recipe,
                      members=len(settings.seeds), train=len(train), valid=len(valid), test=len(test))
        result, model_files = _fit_and_save(settings, train, valid, test, out, progress)
        report = _report(args, source, settings, result, model_files, (train, valid, test, left_out), drawn,
                         references, out, time.perf_counter() - started)
        progress.emit("train_end", best_member=result.best, wall_s=round(time.perf_counter() - started, 2))
    finally:
        progress.close()
    _print_summary(report, out)
    return 0


def _fit_and_save(settings: Any, train: list, valid: list, test: list, out: Path, progress: Progress) -> tuple:
    from aimspax_like.models.fitting import fit

    numbers = sorted({int(z) for f in (*train, *valid, *test) for z in f.numbers})

    def member_done(member: Any) -> None:
        progress.emit("train_member", member=member.member, epochs=member.epochs, stage=member.stage,
                      switch_epoch=member.switch_epoch, switch_reason=member.switch_reason,
                      valid_loss=member.valid["loss"], valid_force_mae=member.valid["force_mae"],
                      seconds=round(member.seconds, 2))

    result = fit(settings, [f.to_atoms() for f in train], [f.to_atoms() for f in valid], numbers,
                 on_epoch=progress.epoch, on_member=member_done)
    models = out / "models"
    paths = result.ensemble.save(models)
    if len(paths) == 1:
        single = paths[0].replace(models / "model.model")
        return result, {"model": single, "members": [single]}
    best = models / "best.model"
    shutil.copyfile(paths[result.best], best)
    return result, {"model": best, "members": paths}


def _report(args: argparse.Namespace, source: Any, settings: Any, result: Any, model_files: dict[str, Any],
            splits: tuple[list, list, list, list], drawn: int, references: list[str], out: Path,
            wall_s: float) -> dict[str, Any]:
    from aimspax_like import fit_report
    from aimspax_like.models.torch_utils import resolve_device

    train, valid, test, left_out = splits
    device = str(resolve_device(settings.model.device))
    errors = {name: fit_report.split_errors(model_files["model"], frames, device, settings.model.dtype)
              for name, frames in (("train", train), ("valid", valid), ("test", test))}
    curve = [asdict(r) for m in result.members for r in m.curve]
    report: dict[str, Any] = {
        "format": "aimspax-like train report",
        "version": 1,
        "source": {"path": str(source.path), "kind": source.kind, "test_file": str(args.test) if args.test else None},
        "data": {"train": len(train), "valid": len(valid), "test": len(test), "not_trained": len(left_out),
                 "valid_drawn": drawn, "valid_fraction": args.valid_fraction if drawn else None,
                 "elements": sorted({int(z) for f in (*train, *valid, *test) for z in f.numbers})},
        "references": {"training": references, "test": sorted({f.reference for f in test})},
        "settings": {"recipe": settings.recipe, "seed": settings.seeds[0], "seeds": settings.seeds,
                     "max_epochs": settings.max_epochs, "patience": settings.patience, "device": device,
                     "model": settings.model.model_dump(mode="json"),
                     "training": settings.training.model_dump(mode="json"),
                     "final_recipe": asdict(settings.final) if settings.final is not None else None,
                     "refit_e0_at_switch": settings.refit_at_switch if settings.final is not None else None},
        "members": [{"member": m.member, "seed": m.seed, "epochs": m.epochs, "stage": m.stage,
                     "switch_epoch": m.switch_epoch, "switch_reason": m.switch_reason,
                     "best_valid_loss": m.best_valid_loss, "valid": m.valid, "e0_shifts": m.e0_shifts,
                     "seconds": round(m.seconds, 3)} for m in result.members],
        "best_member": result.best,
        "final_stage": result.members[result.best].stage,
        "errors": errors,
        "curve": curve,
        "files": {"model": str(model_files["model"].relative_to(out)),
                  "members": [str(p.relative_to(out)) for p in model_files["members"]],
                  "report_md": "train_report.md", "learning_curve": "learning_curve.png",
                  "log": "logs/train.jsonl"},
        "wall_s": round(wall_s, 2),
    }
    fit_report.write_json(out / "train_report.json", report)
    fit_report.write_markdown(out / "train_report.md", report)
    fit_report.learning_curve(out / "learning_curve.png", curve)
    return report


def _print_summary(report: dict[str, Any], out: Path) -> None:
    from aimspax_like.fit_report import error_table

    data, best = report["data"], report["members"][report["best_member"]]
    stage = f"stage {best['stage']}"
    if best["switch_epoch"] is not None:
        why = _SWITCH_WHY.get(best["switch_reason"], best["switch_reason"])
        stage += f" (stage two from epoch {best['switch_epoch']}: {why})"
    print(f"trained {len(report['members'])} model(s), recipe {report['settings']['recipe']}, on "
          f"{data['train']} train / {data['valid']} valid frames; best member {report['best_member']}: "
          f"{best['epochs']} epochs, kept {stage}")
    print(error_table(report["errors"]))
    for name in (report["files"]["model"], *[m for m in report["files"]["members"] if m != report["files"]["model"]],
                 "train_report.json", "train_report.md", "learning_curve.png", "logs/train.jsonl"):
        print(out / name)
