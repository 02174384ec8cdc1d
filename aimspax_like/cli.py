"""The ``aimspax-like`` command.

``run CONFIG`` runs IDG, AL and convergence; ``idg``, ``al`` and ``converge`` run one phase
(``al``/``converge`` continue the run directory written by the phase before). ``init`` writes a
commented template, ``schema`` prints the config's JSON schema. Every setup problem prints one
line, ``error: <key or file>: <what>``, and exits with code 2 before anything is written.

``resume RUN_DIR`` (or ``run CONFIG --resume``) continues a campaign from its checkpoint. While a
campaign runs, SIGTERM (what SLURM sends before the walltime kill) or SIGINT saves the state and
stops at the next loop iteration with exit code 128 + the signal number (143, 130).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from importlib import resources
from pathlib import Path

from aimspax_like.errors import SetupError

EXIT_SETUP = 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="aimspax-like", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in (
        ("run", "initial dataset generation, active learning and convergence"),
        ("idg", "initial dataset generation only (creates the run directory)"),
        ("al", "active learning only (continues a run directory after idg)"),
        ("converge", "convergence training and test set only (after al)"),
    ):
        cmd = sub.add_parser(name, help=text)
        cmd.add_argument("config", type=Path, help="campaign YAML")
        cmd.add_argument("--overwrite", action="store_true", help="start the phase(s) over if already run")
        cmd.add_argument("--output", type=Path, help="run directory (overrides output.directory)")
        cmd.add_argument("--quiet", action="store_true", help="no progress line")
        if name == "run":
            cmd.add_argument("--resume", action="store_true",
                             help="continue the run directory from its checkpoint (start it if missing)")
    resume = sub.add_parser("resume", help="continue a run directory from its checkpoint")
    resume.add_argument("run_dir", type=Path, help="run directory (holds campaign.yaml)")
    resume.add_argument("--quiet", action="store_true", help="no progress line")
    init = sub.add_parser("init", help="write a commented campaign template")
    init.add_argument("path", type=Path, nargs="?", default=Path("campaign.yaml"))
    init.add_argument("--force", action="store_true", help="overwrite an existing file")
    sub.add_parser("schema", help="print the JSON schema of the campaign YAML")
    return parser


PHASES_OF = {"run": ("idg", "al", "converge"), "idg": ("idg",), "al": ("al",), "converge": ("converge",)}


def _run(args: argparse.Namespace) -> int:
    from aimspax_like.config import load_config
    from aimspax_like.errors import RunDirectoryError

    if args.command == "resume":
        if not (args.run_dir / "campaign.yaml").is_file():
            raise RunDirectoryError(f"{args.run_dir}: not a run directory (no campaign.yaml)")
        config = load_config(args.run_dir / "campaign.yaml")
        config.output.directory = args.run_dir
        args.overwrite, resume, phases = False, True, PHASES_OF["run"]
    else:
        config = load_config(args.config)
        if args.output is not None:
            config.output.directory = args.output
        resume, phases = getattr(args, "resume", False), PHASES_OF[args.command]
    from aimspax_like.analysis.summary import render
    from aimspax_like.campaign import run_campaign
    from aimspax_like.progress import ProgressLine
    from aimspax_like.state import CampaignInterrupted, StopFlag

    progress = None if args.quiet else ProgressLine()
    stop = StopFlag().install()
    try:
        summary = run_campaign(config, phases, overwrite=args.overwrite, on_progress=progress, resume=resume,
                               should_stop=lambda: stop.signum)
    except CampaignInterrupted as exc:
        print(f"{exc} (aimspax-like resume {config.output.directory})", file=sys.stderr)
        return 128 + exc.signum
    finally:
        stop.uninstall()
        if progress is not None:
            progress.close()
    if summary.get("already_finished"):
        print(f"campaign {summary['directory']} already finished; nothing to do")
        return 0
    print(render(summary))
    return 0


def _init(args: argparse.Namespace) -> int:
    if args.path.exists() and not args.force:
        raise SetupError(f"{args.path}: file exists; pass --force to overwrite")
    text = resources.files("aimspax_like").joinpath("templates/campaign.yaml").read_text()
    args.path.write_text(text)
    print(f"wrote {args.path}")
    return 0


def _default_threads() -> None:
    """One OpenMP thread in the driver unless the user says otherwise (OMP_NUM_THREADS).

    torch and the xTB/DFT libraries run in one process during reference-driven IDG; their two
    OpenMP pools fight over the cores and an xTB step gets ~10x slower (measured: 1.4 ms with one
    thread, 13 ms with two, on ethanol). Label workers get their own setting from the executor.
    Must run before torch is imported.
    """
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    # mace sets TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD for its own model files; torch then warns on
    # every load, which tells a user nothing they can act on.
    warnings.filterwarnings("ignore", message=".*TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD.*")


def main(argv: list[str] | None = None) -> int:
    _default_threads()
    args = _parser().parse_args(argv)
    try:
        if args.command == "init":
            return _init(args)
        if args.command == "schema":
            from aimspax_like.config import json_schema

            print(json.dumps(json_schema(), indent=2))
            return 0
        return _run(args)
    except SetupError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_SETUP
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
