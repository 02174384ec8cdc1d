"""What ``aimspax-like train`` writes about a fit: errors per split, the report files, the curve.

The errors are measured on the *written* model file (loaded back as the validation code loads
any model), so the numbers describe exactly what a user deploys, after the E0 refit. Units are
the ones force fields are judged in: meV/atom for energies, meV/A for force components (every
Cartesian component one sample, as mace counts), meV/A^3 for the six Voigt stress components of
the frames that carry a stress label. The learning curve keeps the trainer's units (eV).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from aimspax_like.analysis.strict_json import dumps_strict
from aimspax_like.data.frames import LabelledFrame
from aimspax_like.validation.errors import mae_rmse

SPLIT_ORDER = ("train", "valid", "test")
_COLUMNS = (
    ("energy_mae_meV_atom", "energy MAE (meV/atom)"),
    ("energy_rmse_meV_atom", "energy RMSE (meV/atom)"),
    ("force_mae_meV_A", "force MAE (meV/Å)"),
    ("force_rmse_meV_A", "force RMSE (meV/Å)"),
)
_STRESS_COLUMNS = (("stress_mae_meV_A3", "stress MAE (meV/Å³)"), ("stress_rmse_meV_A3", "stress RMSE (meV/Å³)"))


def split_errors(model_path: Path, frames: Sequence[LabelledFrame], device: str, dtype: str) -> dict[str, Any] | None:
    """MAE and RMSE of the model file on labelled frames (``None`` without frames)."""
    if not frames:
        return None
    from aimspax_like.validation.predict import load_model, predict

    model = load_model(model_path, device=device, dtype=dtype)
    wanted = [f.stress is not None and bool(np.all(f.pbc)) for f in frames]
    pred = predict(model, [f.to_atoms() for f in frames], wanted)
    energy = np.array([(pred.energies[i] - f.energy) / len(f) for i, f in enumerate(frames)])
    forces = np.concatenate([pred.forces[i] - f.forces for i, f in enumerate(frames)])
    stress = [pred.stresses[i] - f.stress for i, f in enumerate(frames)
              if f.stress is not None and pred.stresses[i] is not None]
    e_mae, e_rmse = mae_rmse(energy)
    f_mae, f_rmse = mae_rmse(forces)
    s_mae, s_rmse = mae_rmse(np.concatenate(stress)) if stress else (None, None)
    return {
        "frames": len(frames),
        "energy_mae_meV_atom": _milli(e_mae), "energy_rmse_meV_atom": _milli(e_rmse),
        "force_mae_meV_A": _milli(f_mae), "force_rmse_meV_A": _milli(f_rmse),
        "stress_frames": len(stress),
        "stress_mae_meV_A3": _milli(s_mae), "stress_rmse_meV_A3": _milli(s_rmse),
    }


def _milli(value: float | None) -> float | None:
    return None if value is None else 1000.0 * value


def error_table(errors: dict[str, dict[str, Any] | None]) -> str:
    """The errors as a markdown table, one row per split (stress columns only where labelled)."""
    stress = any(e is not None and e.get("stress_frames") for e in errors.values())
    columns = (*_COLUMNS, *(_STRESS_COLUMNS if stress else ()))
    lines = ["| set | frames | " + " | ".join(title for _, title in columns) + " |",
             "|---|---:|" + "---:|" * len(columns)]
    for name in SPLIT_ORDER:
        entry = errors.get(name)
        if entry is None:
            lines.append(f"| {name} | 0 | " + " | ".join("-" for _ in columns) + " |")
            continue
        cells = [_cell(entry.get(key)) for key, _ in columns]
        lines.append(f"| {name} | {entry['frames']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _cell(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"


def write_json(path: Path, report: dict[str, Any]) -> Path:
    path.write_text(dumps_strict(report) + "\n", encoding="utf-8")
    return path


def write_markdown(path: Path, report: dict[str, Any]) -> Path:
    """A short human-readable account: data, settings, how each member ended, the error table."""
    data, settings = report["data"], report["settings"]
    lines = [
        "# Training report",
        "",
        f"Source: `{report['source']['path']}` ({report['source']['kind']})",
        "",
        f"Frames: {data['train']} train, {data['valid']} valid, {data['test']} test"
        + (f" ({data['valid_drawn']} validation frames drawn at random, seed {settings['seed']})"
           if data["valid_drawn"] else "")
        + (f"; {data['not_trained']} held/analysis frames left out" if data["not_trained"] else "") + ".",
        "",
        "Reference fingerprint(s) of the training data: "
        + (", ".join(f"`{r or '(none)'}`" for r in report["references"]["training"]) or "-"),
        "",
        f"Recipe `{settings['recipe']}`, {len(settings['seeds'])} member(s), seeds {settings['seeds']}, "
        f"max {settings['max_epochs']} epochs, patience {settings['patience']}; model "
        f"{settings['model']['channels']} channels, max_L {settings['model']['max_L']}, "
        f"r_max {settings['model']['r_max']} Å, {settings['model']['num_interactions']} interactions.",
        "",
        "| member | seed | epochs | kept stage | stage two from epoch | why | valid loss |",
        "|---:|---:|---:|---:|---:|---|---:|",
    ]
    for m in report["members"]:
        switch = m["switch_epoch"] if m["switch_epoch"] is not None else "-"
        lines.append(f"| {m['member']}{' (best)' if m['member'] == report['best_member'] else ''} | {m['seed']} | "
                     f"{m['epochs']} | {m['stage']} | {switch} | {m['switch_reason'] or '-'} | "
                     f"{_cell(m['valid']['loss'])} |")
    lines += ["", f"Errors of `{report['files']['model']}` (after the E0 refit):", "",
              error_table(report["errors"]), ""]
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def learning_curve(path: Path, curve: Sequence[dict[str, Any]]) -> Path:
    """Validation loss, validation force MAE and learning rate per epoch, one line per member;
    a dotted line where a member's stage two began (its loss weights change there)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    figure = Figure(figsize=(7.0, 8.0), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    loss_ax, mae_ax, lr_ax = figure.subplots(3, 1, sharex=True)
    members = sorted({int(r["member"]) for r in curve})
    for k in members:
        rows = [r for r in curve if r["member"] == k]
        epochs = np.array([r["epoch"] for r in rows])
        colour = f"C{k % 10}"
        loss_ax.plot(epochs, [_num(r["valid_loss"]) for r in rows], color=colour, label=f"member {k} valid")
        loss_ax.plot(epochs, [_num(r["train_loss"]) for r in rows], color=colour, linestyle="--", alpha=0.6,
                     label=f"member {k} train")
        mae_ax.plot(epochs, [1000 * _num(r["valid_force_mae"]) for r in rows], color=colour)
        lr_ax.step(epochs, [_num(r["lr"]) for r in rows], where="mid", color=colour, label=f"member {k}")
        switch = next((r["epoch"] for r in rows if r["stage"] == 2), None)
        if switch is not None:
            for ax in (loss_ax, mae_ax, lr_ax):
                ax.axvline(switch - 0.5, color=colour, linestyle=":", linewidth=1)
    loss_ax.set_ylabel("loss (stage's weights)")
    loss_ax.set_yscale("log")
    loss_ax.legend(fontsize=7)
    mae_ax.set_ylabel("valid force MAE (meV/Å)")
    lr_ax.set_ylabel("learning rate")
    lr_ax.set_yscale("log")
    lr_ax.set_xlabel("epoch (dotted: stage two begins)")
    lr_ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    figure.savefig(path)
    return path


def _num(value: Any) -> float:
    return float("nan") if value is None else float(value)
