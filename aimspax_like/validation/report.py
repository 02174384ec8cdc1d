"""``aimspax-like validate RUN``: errors, MD stability and RDF of a model, into ``report/validation.json``.

Order matters for the CLI's promise "bad input: one line, exit 2, nothing written": every input
(run directory, model file, test set and its keys, start structures, elements) is read and
checked before anything is computed, and the figures and the JSON are written only at the end,
into ``RUN/report/`` (the JSON atomically, strict: non-finite numbers become ``null``).

``validation.json`` is read by ``aimspax-like report``; its field names are a contract:

    {"model", "test_set": {"source", "frames"},
     "errors": {"per_temperature": [...], "all": {...}, "per_element": [...]},
     "stability": {"criterion", "steps", "timestep_fs", "runs", "per_temperature": [...]} | null,
     "rdf": {"temperature_K", "reference", "file"} | null,
     "figures": [{"file", "caption"}, ...]}
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from aimspax_like.data.xyz import shareable
from aimspax_like.errors import RunDirectoryError, SetupError
from aimspax_like.validation.testdata import TestSet, read_test_file, run_test_set

PARITY_FILE = "validation_parity.png"
RDF_FILE = "validation_rdf.png"
JSON_FILE = "validation.json"


@dataclass
class ValidateOptions:
    model: Path | None = None  # default: RUN/models/best.model
    test: Path | None = None  # default: the run's own test frames
    energy_key: str = "energy"
    forces_key: str = "forces"
    stress_key: str | None = None  # None: "stress" where every frame has it
    temperature_key: str = "temperature_K"
    stability: bool = True
    stability_runs: int = 4
    stability_steps: int = 2000
    temperatures: list[float] | None = None  # default: the test set's temperatures, else the run's test_set ones
    timestep_fs: float = 1.0
    friction_per_fs: float = 0.001
    max_bond_A: float = 2.0
    min_distance_factor: float = 0.6
    volume_factor: float = 1.5
    rdf: bool = True
    rdf_temperature: float | None = None  # default: the AL temperature if validated at, else the first
    rdf_every: int = 10  # model-MD frames for the RDF: one every this many steps, after the first 10 %
    reference_md: bool = False  # run reference MD for the RDF even for expensive references
    seed: int | None = None  # default: the run's seed
    device: str | None = None  # default: the run's model.device
    dtype: str | None = None  # default: the run's model.dtype
    on_progress: Callable[[str], None] | None = None


@dataclass
class Inputs:
    """Everything read and checked before any computation."""

    run_dir: Path
    config: Any
    model_path: Path
    test: TestSet
    starts: list
    temperatures: list[float]
    rdf_temperature: float | None


@dataclass
class Validation:
    report: dict[str, Any]  # the content of validation.json
    timings: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    written: list[Path] = field(default_factory=list)


# --------------------------------------------------------------------------- inputs


def read_inputs(run_dir: Path, options: ValidateOptions) -> Inputs:
    """Read and check every input; a problem is a ``SetupError`` and nothing has been written."""
    from aimspax_like.config import load_config
    from aimspax_like.structures import read_structures
    from aimspax_like.testset import temperatures_of

    run_dir = Path(run_dir)
    if not (run_dir / "campaign.yaml").is_file():
        raise RunDirectoryError(f"{run_dir}: not a run directory (no campaign.yaml)")
    config = load_config(run_dir / "campaign.yaml")
    model_path = Path(options.model) if options.model is not None else run_dir / "models" / "best.model"
    if not model_path.is_file():
        hint = "" if options.model is not None else " (the run has no converged model; pass --model PATH)"
        raise SetupError(f"{model_path}: model file not found{hint}")
    if options.test is not None:
        test = read_test_file(Path(options.test), options.energy_key, options.forces_key, options.stress_key,
                              options.temperature_key)
    else:
        test = run_test_set(run_dir)
    # The start structures seed the MD of the stability runs and the RDF; errors alone need none
    # (a --test file validates a model even where the run's structure files have moved).
    needs_md = options.stability or options.rdf
    starts = read_structures(config.system.structures, config.system.index) if needs_md else []
    if options.temperatures:
        temperatures = [float(t) for t in options.temperatures]
    else:
        # The temperatures the model is tested at; a --test file without any: the run's test-set
        # temperatures (its AL temperatures plus 1.4 x the highest, unless configured).
        known = sorted({f.temperature_K for f in test.frames if f.temperature_K is not None})
        temperatures = [float(t) for t in known or temperatures_of(config)]
    for name, value in (("--stability-runs", options.stability_runs), ("--stability-steps", options.stability_steps)):
        if value < 1:
            raise SetupError(f"{name}: must be at least 1, got {value}")
    if any(not (math.isfinite(t) and t > 0) for t in temperatures):
        raise SetupError(f"--temperatures: must be positive numbers, got {temperatures}")
    rdf_temperature = None
    if options.rdf:
        if options.rdf_temperature is not None:
            rdf_temperature = float(options.rdf_temperature)
        else:
            al = float(config.al.md_for(0).temperature_K)
            rdf_temperature = al if al in temperatures else temperatures[0]
    _check_writable(run_dir / "report")
    return Inputs(run_dir, config, model_path, test, starts, temperatures, rdf_temperature)


def _check_writable(folder: Path) -> None:
    target = folder if folder.exists() else folder.parent
    if target.exists() and not target.is_dir():
        raise SetupError(f"{target}: is a file, the report folder cannot be made there")
    if not os.access(target, os.W_OK):
        raise SetupError(f"{target}: not writable; copy the run directory and validate the copy")


def _check_elements(model: Any, model_path: Path, inputs: Inputs) -> None:
    known = set(int(z) for z in model.z_table.zs)
    for label, frames in (("test frames", [f.atoms for f in inputs.test.frames]), ("start structures", inputs.starts)):
        unknown = sorted({int(z) for atoms in frames for z in atoms.numbers} - known)
        if unknown:
            raise SetupError(f"{model_path}: the model has no elements {unknown} of the {label} "
                             f"(it knows {sorted(known)})")


# --------------------------------------------------------------------------- the whole validation


def validate_run(run_dir: Path, options: ValidateOptions | None = None) -> Validation:
    """Errors, stability and RDF of the model on the run; writes ``RUN/report/`` (see module doc)."""
    from aimspax_like.validation import errors as err
    from aimspax_like.validation.predict import load_model, predict

    options = options or ValidateOptions()
    say = options.on_progress or (lambda message: None)
    timings: dict[str, float] = {}
    start = time.perf_counter()
    inputs = read_inputs(Path(run_dir), options)
    if options.seed is None:  # the run's own seed, so that a rerun repeats the same MD
        options = replace(options, seed=int(inputs.config.seed))
    device = options.device or str(inputs.config.model.device)
    dtype = options.dtype or str(inputs.config.model.dtype)
    model = load_model(inputs.model_path, device=device, dtype=dtype)
    _check_elements(model, inputs.model_path, inputs)
    timings["setup"] = time.perf_counter() - start

    say(f"errors on {len(inputs.test.frames)} test frames")
    t0 = time.perf_counter()
    frames = inputs.test.frames
    predictions = predict(model, [f.atoms for f in frames], [f.stress is not None for f in frames])
    errors = err.error_report(frames, predictions)
    timings["errors"] = time.perf_counter() - t0

    notes: list[str] = []
    t0 = time.perf_counter()
    stability, samples = _model_md(model, inputs, options, notes, say, timings)
    if samples is not None:
        timings["md"] = time.perf_counter() - t0
    figures = [_parity_figure(inputs, predictions, errors)]
    rdf = None
    if inputs.rdf_temperature is not None:
        t0 = time.perf_counter()
        rdf, figure = _rdf(inputs, options, (samples or {}).get(inputs.rdf_temperature, []), notes, say)
        if figure is not None:
            figures.append(figure)
        timings["rdf"] = time.perf_counter() - t0

    report = {
        "model": str(inputs.model_path),
        "test_set": {"source": inputs.test.source, "frames": len(frames)},
        "errors": errors,
        "stability": stability,
        "rdf": rdf,
        "figures": [{"file": name, "caption": caption} for name, _, caption in figures],
    }
    report_dir = inputs.run_dir / "report"
    report_dir.mkdir(parents=True, exist_ok=True)
    if all(name != RDF_FILE for name, _, _ in figures):  # no stale RDF of an earlier validation
        (report_dir / RDF_FILE).unlink(missing_ok=True)
    written = [draw(report_dir / name) for name, draw, _ in figures]
    written.append(write_json(report_dir / JSON_FILE, report))
    timings["total"] = time.perf_counter() - start
    return Validation(strict(report), timings, notes, written)


def _model_md(model: Any, inputs: Inputs, options: ValidateOptions, notes: list[str], say: Callable[[str], None],
              timings: dict[str, float]) -> tuple[dict[str, Any] | None, dict[float, list] | None]:
    """The stability runs (``stability`` of the report) and the model-MD frames the RDF needs.

    One batch serves both: the RDF temperature joins the stability temperatures (and is not
    reported as a stability result unless it is one of them). ``(None, None)``: no MD was asked.
    """
    from aimspax_like.validation.predict import force_fn
    from aimspax_like.validation.stability import StabilityCriterion, run_stability

    sample_temperatures = [inputs.rdf_temperature] if inputs.rdf_temperature is not None else []
    temperatures = list(inputs.temperatures) if options.stability else []
    temperatures += [t for t in sample_temperatures if t not in temperatures]
    if not temperatures:
        return None, None
    steps = options.stability_steps
    say(f"model MD: {options.stability_runs} runs x {len(temperatures)} temperatures x {steps} steps")

    def criterion(start: Any) -> StabilityCriterion:
        return StabilityCriterion.from_start(start, options.max_bond_A, min_distance_factor=options.min_distance_factor,
                                             volume_factor=options.volume_factor)

    result = run_stability(
        force_fn(model), inputs.starts, temperatures, options.stability_runs, steps,
        timestep_fs=options.timestep_fs, friction_per_fs=options.friction_per_fs, seed=options.seed,
        criterion=criterion, sample_temperatures=sample_temperatures, sample_every=options.rdf_every,
        sample_after=steps // 10, max_atoms_per_call=md_atoms_per_call(model.device),
        on_step=_md_progress(say, steps, options.stability_runs * len(temperatures)),
    )
    timings["md_trajectory_steps"] = float(result.md_steps)
    if not options.stability:
        return None, result.samples
    failures = [o for o in result.outcomes if o.failed_at is not None and o.temperature_K in inputs.temperatures]
    for o in failures[:5]:
        notes.append(f"unstable: {o.temperature_K:g} K run {o.run} at step {o.failed_at}: {o.reason}")
    stability = {
        "criterion": result.criterion, "steps": steps, "timestep_fs": float(options.timestep_fs),
        "runs": options.stability_runs, "per_temperature": result.per_temperature(inputs.temperatures),
    }
    return stability, result.samples


def _parity_figure(inputs: Inputs, predictions: Any, errors: dict[str, Any]) -> tuple[str, Callable, str]:
    """``(file, draw, caption)`` of the parity figure, one colour per temperature group."""
    from aimspax_like.validation import plots
    from aimspax_like.validation.errors import temperature_groups

    frames = inputs.test.frames
    groups = temperature_groups(frames)
    energy = [(t, np.array([frames[i].energy / len(frames[i].atoms) for i in idx]),
               np.array([predictions.energies[i] / len(frames[i].atoms) for i in idx])) for t, idx in groups]
    forces = [(t, np.concatenate([frames[i].forces.reshape(-1) for i in idx]),
               np.concatenate([predictions.forces[i].reshape(-1) for i in idx])) for t, idx in groups]
    title = f"{inputs.model_path.name} on {len(frames)} test frames ({inputs.test.label})"
    overall = errors["all"]
    caption = (f"Parity of {inputs.model_path.name} on {len(frames)} test frames: energy per atom "
               f"(MAE {_milli(overall['energy_mae_per_atom'])} meV/atom) and force components "
               f"(MAE {_milli(overall['force_mae'])} meV/A), coloured by temperature.")
    return PARITY_FILE, lambda path: plots.parity_plot(path, energy, forces, title), caption


def _md_progress(say: Callable[[str], None], steps: int, runs: int) -> Callable[[int, int], None]:
    """Report the model MD every tenth of its steps (a long run should not look hung)."""
    every = max(1, steps // 10)

    def on_step(step: int, running: int) -> None:
        if step % every == 0 or step == steps:
            say(f"model MD step {step}/{steps}: {running} of {runs} runs stable")

    return on_step


def md_atoms_per_call(device: Any) -> int | None:
    """Chunk size of the model-MD force call: the engine's, scaled to one model instead of a committee.

    The engine's CPU chunk (``sampling.batch.CPU_ATOMS_PER_CALL``) was measured for a committee of
    four, where a call is four member passes; one model's pass costs about a quarter of that,
    so four times the atoms share one call's fixed overhead (measured on the quickstart's
    ethanol, 8 runs: 20 ms per step in one call against 28 ms in chunks of 64 atoms).
    """
    from aimspax_like.sampling.batch import atoms_per_call

    chunk = atoms_per_call(str(device))
    return None if chunk is None else 4 * chunk


def _rdf(inputs: Inputs, options: ValidateOptions, model_frames: list, notes: list[str],
         say: Callable[[str], None]) -> tuple[dict[str, Any] | None, tuple | None]:
    """Reference frames for the RDF, the curves, and the figure to draw (or a note why not)."""
    from aimspax_like.validation import plots
    from aimspax_like.validation import rdf as rdf_mod

    temperature = float(inputs.rdf_temperature)
    spec = inputs.config.reference.model_dump(mode="json")
    kind = spec["kind"]
    from_test = [f.atoms for f in inputs.test.frames
                 if f.temperature_K is not None and abs(f.temperature_K - temperature) < 1e-6]
    if inputs.test.sampler == "reference" and from_test:
        reference, source = from_test, f"the run's test frames at {temperature:g} K (reference MD, {kind})"
    elif kind in rdf_mod.CHEAP_REFERENCES or options.reference_md:
        n = max(1, len(model_frames) // max(1, options.stability_runs)) if model_frames else 50
        say(f"reference MD ({kind}) at {temperature:g} K: {n} frames x {options.rdf_every} steps")
        with tempfile.TemporaryDirectory(prefix="aimspax_rdf_") as workdir:
            reference = rdf_mod.reference_md_frames(
                spec, inputs.starts, temperature, n, options.rdf_every, seed=options.seed + 4242, workdir=workdir,
                timestep_fs=options.timestep_fs, friction_per_fs=options.friction_per_fs)
        source = f"reference MD in-process ({kind}), {len(reference)} frames every {options.rdf_every} steps"
    else:
        notes.append(f"rdf skipped: reference MD with {kind!r} is expensive and the test frames are not reference "
                     "MD samples (pass --reference-md to run it anyway)")
        return None, None
    if not model_frames:
        notes.append(f"rdf skipped: no stable model-MD frames at {temperature:g} K")
        return None, None
    r, model_curve = rdf_mod.distribution(model_frames)
    _, reference_curve = rdf_mod.distribution(reference)
    periodic = bool(reference[0].pbc.all())
    shared = rdf_mod.overlap(model_curve, reference_curve, r)
    model_label = f"model MD ({len(model_frames)} frames)"
    reference_label = f"reference MD ({len(reference)} frames)"
    title = f"{temperature:g} K: model vs reference MD (overlap {shared:.2f})"
    caption = (f"{'Radial distribution function' if periodic else 'Pair-distance distribution'} at {temperature:g} K: "
               f"MD with the model ({len(model_frames)} frames) vs {source}; overlap of the two curves {shared:.2f}.")
    figure = (RDF_FILE, lambda p: plots.rdf_plot(p, r, model_curve, reference_curve, periodic, model_label,
                                                reference_label, title), caption)
    return {"temperature_K": temperature, "reference": source, "file": RDF_FILE}, figure


# --------------------------------------------------------------------------- output


def strict(value: Any) -> Any:
    """A copy that strict JSON can hold: non-finite floats become None, numpy scalars Python ones."""
    if isinstance(value, dict):
        return {str(k): strict(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [strict(v) for v in value]
    if isinstance(value, np.ndarray):
        return [strict(v) for v in value.tolist()]
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, float | np.floating):
        return float(value) if math.isfinite(float(value)) else None
    return value


def write_json(path: Path, report: dict[str, Any]) -> Path:
    """Strict JSON (``allow_nan=False``), written to a temporary file and renamed into place."""
    text = json.dumps(strict(report), indent=2, allow_nan=False)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        shareable(fd)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text + "\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _milli(value: float | None) -> str:
    return "-" if value is None else f"{1000.0 * value:.3g}"


def _temperature_label(temperature: float | None) -> str:
    return "no temperature" if temperature is None else f"{temperature:g} K"


def render(validation: Validation) -> str:
    """The tables printed by ``validate`` (meV/atom, meV/A; stress in meV/A^3)."""
    report = validation.report
    lines = [f"model       {report['model']}",
             f"test set    {report['test_set']['frames']} frames: {report['test_set']['source']}", ""]
    errors = report["errors"]
    has_stress = errors["all"]["stress_mae"] is not None
    header = (f"{'errors':<14}{'frames':>7}{'E MAE':>10}{'E RMSE':>10}{'F MAE':>10}{'F RMSE':>10}"
              + (f"{'S MAE':>10}{'S RMSE':>10}" if has_stress else ""))
    units = (f"{'':<14}{'':>7}{'meV/atom':>10}{'meV/atom':>10}{'meV/A':>10}{'meV/A':>10}"
             + (f"{'meV/A^3':>10}{'meV/A^3':>10}" if has_stress else ""))
    lines += [header, units]
    rows = [*errors["per_temperature"], {**errors["all"], "label": "all"}]
    for row in rows:
        label = row.get("label") or _temperature_label(row["temperature_K"])
        line = (f"{label:<14}{row['frames']:>7}{_milli(row['energy_mae_per_atom']):>10}"
                f"{_milli(row['energy_rmse_per_atom']):>10}{_milli(row['force_mae']):>10}{_milli(row['force_rmse']):>10}")
        if has_stress:
            line += f"{_milli(row['stress_mae']):>10}{_milli(row['stress_rmse']):>10}"
        lines.append(line)
    lines += ["", f"{'element':<14}{'atoms':>7}{'F MAE':>10}{'F RMSE':>10}",
              f"{'':<14}{'':>7}{'meV/A':>10}{'meV/A':>10}"]
    for row in errors["per_element"]:
        lines.append(f"{row['element']:<14}{row['atoms']:>7}{_milli(row['force_mae']):>10}{_milli(row['force_rmse']):>10}")
    stability = report["stability"]
    if stability is not None:
        lines += ["", f"stability   Langevin {stability['timestep_fs']:g} fs, {stability['steps']} steps, "
                      f"{stability['runs']} runs per temperature",
                  f"            {stability['criterion']}",
                  f"{'temperature':<14}{'stable / runs':>14}   failed at steps"]
        for row in stability["per_temperature"]:
            failed = ", ".join(str(s) for s in row["failed_at_steps"]) or "-"
            lines.append(f"{row['temperature_K']:g} K".ljust(14) + f"{row['stable']} / {row['runs']}".rjust(14)
                         + f"   {failed}")
    if report["rdf"] is not None:
        lines += ["", f"rdf         {report['rdf']['temperature_K']:g} K: model MD vs {report['rdf']['reference']}"]
    lines += [f"note        {note}" for note in validation.notes]
    if validation.written:
        folder = validation.written[0].parent
        lines += ["", f"wrote       {', '.join(p.name for p in validation.written)} in {folder}"]
    timing = validation.timings
    parts = [f"{name} {timing[name]:.1f} s" for name in ("setup", "errors", "md", "rdf") if name in timing]
    if "total" in timing:
        lines.append(f"time        {timing['total']:.1f} s ({', '.join(parts)})")
    return "\n".join(lines)
