"""The ``validate`` and ``testset`` subcommands: their arguments and what they print.

Kept out of ``aimspax_like/cli.py`` so that the front end only registers them and dispatches;
the options live beside the code that reads them. Setup problems are ``SetupError``s, which
the front end prints as one line with exit code 2; labels that keep failing while a test set is
labelled stop the command with exit code 3, as they would stop a campaign.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

COMMANDS = ("validate", "testset")


def _temperatures(text: str) -> list[float]:
    """``300,500,700`` or ``300 500 700`` (argparse collects the latter with nargs)."""
    try:
        return [float(part) for part in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of temperatures in K: {text!r}") from None


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Register ``validate`` and ``testset`` on the front end's subparsers."""
    validate = sub.add_parser("validate", help="test errors, MD stability and RDF of a model on a run",
                              description="Errors per temperature and element, MD stability (aims-PAX Table III) "
                                          "and the RDF of model vs reference MD; writes RUN/report/validation.json "
                                          "and figures.")
    validate.add_argument("run_dir", type=Path, help="run directory (holds campaign.yaml)")
    validate.add_argument("--model", type=Path, help="MACE model file (default: RUN/models/best.model)")
    validate.add_argument("--test", type=Path, help="extxyz test set (default: the run's own test frames)")
    validate.add_argument("--energy-key", default="energy", help="energy key of --test frames (default: energy)")
    validate.add_argument("--forces-key", default="forces", help="forces key of --test frames (default: forces)")
    validate.add_argument("--stress-key", default=None,
                          help="stress key of --test frames (default: stress, where every frame has it)")
    validate.add_argument("--temperature-key", default="temperature_K",
                          help="atoms.info key that groups --test frames by temperature (default: temperature_K)")
    validate.add_argument("--no-stability", action="store_true", help="no MD stability runs")
    validate.add_argument("--no-rdf", action="store_true", help="no radial distribution comparison")
    validate.add_argument("--stability-runs", type=int, default=4, help="MD runs per temperature (default: 4)")
    validate.add_argument("--stability-steps", type=int, default=2000, help="MD steps per run (default: 2000)")
    validate.add_argument("--temperatures", type=_temperatures,
                          help="stability temperatures in K, e.g. 300,500,700 (default: the test set's)")
    validate.add_argument("--timestep", type=float, default=1.0, help="MD timestep in fs (default: 1)")
    validate.add_argument("--max-bond", type=float, default=2.0,
                          help="molecules: bonded atoms farther apart than this (A) are unstable (default: 2)")
    validate.add_argument("--min-distance-factor", type=float, default=0.6,
                          help="solids: atoms closer than this x their covalent-radius sum are unstable (default: 0.6)")
    validate.add_argument("--volume-factor", type=float, default=1.5,
                          help="solids: a volume outside [1/f, f] x the start is unstable (default: 1.5)")
    validate.add_argument("--rdf-temperature", type=float, help="temperature of the RDF comparison (K)")
    validate.add_argument("--reference-md", action="store_true",
                          help="run reference MD for the RDF even with an expensive reference (pyscf, aims)")
    validate.add_argument("--seed", type=int, help="seed of the MD velocities and noise (default: the run's seed)")
    validate.add_argument("--device", help="torch device for the model (default: the run's model.device)")
    validate.add_argument("--quiet", action="store_true", help="no progress lines on stderr")

    testset = sub.add_parser("testset", help="make a held-out test set (extxyz) by MD and farthest point sampling",
                             description="MD at several temperatures, strided, frames picked by farthest point "
                                         "sampling on MACE descriptors, labelled by the reference.")
    testset.add_argument("source", type=Path, help="campaign YAML or run directory")
    testset.add_argument("--output", type=Path, required=True, help="extxyz file to write")
    testset.add_argument("--sampler", choices=("reference", "model"), default="reference",
                         help="what drives the MD (default: reference)")
    testset.add_argument("--model", type=Path,
                         help="MACE model file: drives model MD and gives the descriptors (default: RUN's best.model)")
    testset.add_argument("--temperatures", type=_temperatures,
                         help="temperatures in K, e.g. 300,500,700 (default: the campaign's test temperatures)")
    testset.add_argument("--stride", type=int, help="MD steps between candidate frames (default: test_set.stride)")
    testset.add_argument("--frames", type=int, help="frames per temperature (default: test_set.size)")
    testset.add_argument("--pool", type=int, default=4,
                         help="candidates per wanted frame for farthest point sampling; 1 keeps every strided "
                              "frame and needs no model (default: 4)")
    testset.add_argument("--seed", type=int, help="MD seed (default: the config's seed)")
    testset.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    testset.add_argument("--quiet", action="store_true", help="no progress lines on stderr")


def run(args: argparse.Namespace) -> int:
    """Dispatch one of ``COMMANDS``; returns the exit code."""
    return _validate(args) if args.command == "validate" else _testset(args)


def _say(args: argparse.Namespace):
    if args.quiet:
        return None
    start = time.perf_counter()
    return lambda message: print(f"[{time.perf_counter() - start:6.1f} s] {message}", file=sys.stderr, flush=True)


def _validate(args: argparse.Namespace) -> int:
    from aimspax_like.validation.report import ValidateOptions, render, validate_run

    options = ValidateOptions(
        model=args.model, test=args.test, energy_key=args.energy_key, forces_key=args.forces_key,
        stress_key=args.stress_key, temperature_key=args.temperature_key, stability=not args.no_stability,
        stability_runs=args.stability_runs, stability_steps=args.stability_steps, temperatures=args.temperatures,
        timestep_fs=args.timestep, max_bond_A=args.max_bond, min_distance_factor=args.min_distance_factor,
        volume_factor=args.volume_factor, rdf=not args.no_rdf, rdf_temperature=args.rdf_temperature,
        reference_md=args.reference_md, seed=args.seed, device=args.device, on_progress=_say(args),
    )
    print(render(validate_run(args.run_dir, options)))
    _refresh_report(args.run_dir)
    return 0


def _refresh_report(run_dir: Path) -> None:
    """Write the run's report again so that its page carries the validation just made.

    The validation itself is saved already (``report/validation.json``): a report that cannot be
    drawn is one warning line, never a failed validation.
    """
    from aimspax_like.analysis.report import write_report

    try:
        page = write_report(run_dir)
    except Exception as exc:  # any plotting or file error
        print(f"warning: report not updated ({type(exc).__name__}: {exc}); run: aimspax-like report {run_dir}",
              file=sys.stderr)
        return
    print(f"report      {page}")


def _testset(args: argparse.Namespace) -> int:
    from aimspax_like.errors import CampaignStopped
    from aimspax_like.validation.make_testset import TestsetOptions, make_test_set

    options = TestsetOptions(
        output=args.output, sampler=args.sampler, model=args.model, temperatures=args.temperatures,
        stride=args.stride, frames=args.frames, pool=args.pool, seed=args.seed, overwrite=args.overwrite,
        on_progress=_say(args),
    )
    try:
        result = make_test_set(args.source, options)
    except CampaignStopped as exc:
        print(f"stopped: {exc}", file=sys.stderr)
        return exc.exit_code
    print(result.render())
    return 0
