"""The ``aimspax-like`` command.

``run CONFIG`` runs IDG, AL and convergence; ``idg``, ``al`` and ``converge`` run one phase
(``al``/``converge`` continue the run directory written by the phase before). ``init`` writes a
commented template, ``schema`` prints the config's JSON schema. Every setup problem prints one
line, ``error: <key or file>: <what>``, and exits with code 2 before anything is written.

``status RUN_DIR [--json]`` shows where a running or finished campaign stands (the picture the
driver draws live on stderr while it runs; ``--quiet`` turns that off). ``report RUN_DIR`` writes
the run's figures, ``report/summary.md`` and one self-contained ``report/index.html`` (also done
at the end of every campaign); it prints the paths it wrote.

``validate RUN_DIR`` measures a model's test errors, MD stability and RDF into
``report/validation.json``; ``testset CONFIG_OR_RUN --output FILE.xyz`` makes a held-out test
set (both in ``aimspax_like.validation``).

``harvest TRAJ --model RUN_OR_FILES (--top K | --above X)`` writes the frames of an MD trajectory
the committee disagrees on most (Eq. 1), decorrelated, as unlabelled extxyz (``aimspax_like.harvest``).
``label FRAMES --config CONFIG`` labels such frames with the campaign's reference, for ``import_data``.

``resume RUN_DIR`` (or ``run CONFIG --resume``) continues a campaign from its checkpoint. While a
campaign runs, SIGTERM (what SLURM sends before the walltime kill) or SIGINT saves the state and
stops within seconds with exit code 128 + the signal number (143, 130).

Exit codes: 0 done; 2 a setup problem (one line naming the key or file; nothing written when it
could be known before the start, and a run directory in use by another driver is one of them);
3 stopped mid-run with the state saved (labels keep failing, the disk is full): fix the cause,
then resume; 130/143 interrupted by a signal, resume to continue.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import importlib.abc
import importlib.machinery
import io
import json
import logging
import os
import signal
import sys
import types
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

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
        cmd.add_argument("--quiet", action="store_true", help="no live status display")
        cmd.add_argument("--site", help="site profile, a name or a file (default: the config's 'site', "
                         "else $AIMSPAX_SITE)")
        if name == "run":
            cmd.add_argument("--resume", action="store_true",
                             help="continue the run directory from its checkpoint (start it if missing)")
    resume = sub.add_parser("resume", help="continue a run directory from its checkpoint")
    resume.add_argument("run_dir", type=Path, help="run directory (holds campaign.yaml)")
    resume.add_argument("--quiet", action="store_true", help="no live status display")
    init = sub.add_parser("init", help="write a commented campaign template")
    init.add_argument("path", type=Path, nargs="?", default=Path("campaign.yaml"))
    init.add_argument("--force", action="store_true", help="overwrite an existing file")
    sub.add_parser("schema", help="print the JSON schema of the campaign YAML")
    status = sub.add_parser("status", help="where a running or finished campaign stands")
    status.add_argument("run_dir", type=Path, help="run directory (holds campaign.yaml)")
    status.add_argument("--json", action="store_true", help="print the status as strict JSON")
    status.add_argument("--line", action="store_true", help="print the status as one plain line")
    report = sub.add_parser("report", help="write report/ of a run: figures, summary.md and index.html")
    report.add_argument("run_dir", type=Path, help="run directory (holds campaign.yaml)")
    harvest = sub.add_parser("harvest", help="the frames of an MD trajectory the committee is least sure of",
                             description="Scores every frame with Eq. 1 and writes the most uncertain ones, at "
                                         "least --min-separation frames apart, as unlabelled extxyz.")
    harvest.add_argument("trajectory", type=Path, help="any trajectory ASE reads (extxyz, .traj, ...)")
    harvest.add_argument("--model", type=Path, nargs="+", required=True, metavar="RUN_DIR_OR_MODEL",
                         help="a run directory (its models/member_*.model) or two or more MACE model files")
    harvest.add_argument("--top", type=int, help="write the K most uncertain frames")
    harvest.add_argument("--above", type=float, help="write every frame above this Eq. 1 value (eV/A)")
    harvest.add_argument("--output", type=Path, help="extxyz to write (default: <stem>_harvest.xyz beside it)")
    harvest.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    harvest.add_argument("--min-separation", type=int, default=10,
                         help="frames picked are at least this many frames apart in the file (default: 10)")
    harvest.add_argument("--index", default=":", help="frames to read, a number or slice like '100:' (default ':')")
    harvest.add_argument("--device", default="cpu", help="torch device: cpu, cuda, auto (default: cpu)")
    harvest.add_argument("--dtype", choices=("float32", "float64"), default="float64")
    harvest.add_argument("--batch", type=int, default=32, help="frames per committee call (default: 32)")
    otf = sub.add_parser("otf", help="on-the-fly MD: the committee drives, the reference labels where it is unsure",
                         description="Runs the config's otf section: MD on the committee that labels, stores and "
                                     "trains wherever its uncertainty exceeds the trigger (resumable).")
    otf.add_argument("config", type=Path, help="campaign YAML with an otf section")
    otf.add_argument("--output", type=Path, help="run directory (overrides output.directory)")
    otf.add_argument("--overwrite", action="store_true", help="start over if the run directory exists")
    otf.add_argument("--resume", action="store_true", help="continue the run directory from its checkpoint")
    otf.add_argument("--quiet", action="store_true", help="no progress line")
    otf.add_argument("--site", help="site profile, a name or a file")
    import importlib

    for module in COMMAND_MODULES:
        importlib.import_module(module).add_parsers(sub)
    return parser


# Modules that bring their own subcommands: each has ``COMMANDS`` (the names it registers),
# ``add_parsers(sub)`` and ``run(args) -> exit code``. They import nothing heavy at top level.
COMMAND_MODULES = (
    "aimspax_like.validation.commands",  # validate, testset
    "aimspax_like.fit",  # train
    "aimspax_like.export",  # export
    "aimspax_like.convert",  # convert (an aims-PAX pair into a campaign YAML)
    "aimspax_like.recompute",  # recompute
    "aimspax_like.jobscripts",  # jobscripts (the driver's batch script and a label block's)
    "aimspax_like.label_frames",  # label
)


def _module_of(command: str) -> str | None:
    import importlib

    return next((m for m in COMMAND_MODULES if command in importlib.import_module(m).COMMANDS), None)


PHASES_OF = {"run": ("idg", "al", "converge"), "idg": ("idg",), "al": ("al",), "converge": ("converge",)}


def _run(args: argparse.Namespace) -> int:
    from aimspax_like.config import load_config
    from aimspax_like.errors import RunDirectoryError

    if args.command == "resume":
        if not (args.run_dir / "campaign.yaml").is_file():
            raise RunDirectoryError(f"{args.run_dir}: not a run directory (no campaign.yaml)")
        config = load_config(args.run_dir / "campaign.yaml")
        config.output.directory = args.run_dir
        from aimspax_like.otf_run import is_otf_run

        if is_otf_run(args.run_dir):
            args.resume = True
            return _otf(args, config)
        args.overwrite, resume, phases = False, True, PHASES_OF["run"]
    else:
        config = load_config(args.config, site=args.site)
        if args.output is not None:
            config.output.directory = args.output
        resume, phases = getattr(args, "resume", False), PHASES_OF[args.command]
    from aimspax_like.analysis.summary import render
    from aimspax_like.campaign import run_campaign
    from aimspax_like.errors import CampaignInterrupted, CampaignStopped
    from aimspax_like.live import LiveStatus
    from aimspax_like.signals import StopFlag

    live = None if args.quiet else LiveStatus(config=config.model_dump(mode="json"))
    stop = StopFlag().install()
    try:
        try:
            summary = run_campaign(config, phases, overwrite=args.overwrite, on_progress=live, resume=resume,
                                   should_stop=lambda: stop.signum, on_event=live.on_event if live else None)
        finally:
            if live is not None:
                live.close()  # the last picture goes before any message about how the run ended
    except (CampaignInterrupted, CampaignStopped, OSError) as exc:
        code = stopped_exit(exc, f"aimspax-like resume {config.output.directory}", str(config.output.directory))
        if code is None:
            raise
        return code
    finally:
        stop.uninstall()
    if summary.get("already_finished"):
        print(f"campaign {summary['directory']} already finished; nothing to do")
        return 0
    print(render(summary))
    return 0


def _otf(args: argparse.Namespace, config: Any = None) -> int:
    """``otf CONFIG``: an on-the-fly MD run (``aimspax_like.otf_run``); ``resume`` of such a run lands here too."""
    from aimspax_like.errors import CampaignInterrupted, CampaignStopped
    from aimspax_like.otf_report import render_markdown
    from aimspax_like.otf_run import ProgressLine, run_otf
    from aimspax_like.signals import StopFlag

    if config is None:
        from aimspax_like.config import load_config

        config = load_config(args.config, site=args.site)
        if args.output is not None:
            config.output.directory = args.output
    progress = None if args.quiet else ProgressLine()
    stop = StopFlag().install()
    try:
        try:
            summary = run_otf(config, overwrite=getattr(args, "overwrite", False), resume=args.resume,
                              should_stop=lambda: stop.signum, progress=progress)
        finally:
            if progress is not None:
                progress.close()
    except (CampaignInterrupted, CampaignStopped, OSError) as exc:
        root = config.output.directory
        code = stopped_exit(exc, f"aimspax-like resume {root}", str(root))
        if code is None:
            raise
        return code
    finally:
        stop.uninstall()
    print(render_markdown(summary))
    print(f"report: {Path(summary['directory']) / 'report' / 'otf.md'}")
    return 0


def _status(args: argparse.Namespace) -> int:
    """``status RUN``: the live display's picture of a run directory, from any shell."""
    from aimspax_like.otf_run import is_otf_run

    if is_otf_run(args.run_dir):
        from aimspax_like.otf_report import otf_status, render_status

        status = otf_status(args.run_dir)
        print(json.dumps(status, indent=2, allow_nan=False) if args.json else render_status(status))
        return 0
    from aimspax_like.analysis.status import status_of
    from aimspax_like.analysis.status_render import render, render_line

    status = status_of(args.run_dir)
    if args.json:
        print(json.dumps(status, indent=2, allow_nan=False))
    elif args.line:
        print(render_line(status))
    else:
        from rich.console import Console

        Console().print(render(status))
    return 0


def _report(args: argparse.Namespace) -> int:
    """``report RUN``: figures, summary.md and a self-contained index.html under RUN/report/.

    Works on a finished, running or interrupted campaign; a folder that is not a run directory
    is a ``RunDirectoryError`` (one line, exit 2) before anything is written.
    """
    from aimspax_like.otf_run import is_otf_run

    if is_otf_run(args.run_dir):
        from aimspax_like.otf_report import render_markdown, report_run

        print(render_markdown(report_run(args.run_dir)))
        for name in ("otf.md", "otf.json", "otf.png"):
            print(args.run_dir / "report" / name)
        return 0
    from aimspax_like.analysis.report import make_report

    report = make_report(args.run_dir)
    for path in report.paths:
        print(path)
    for note in report.notes:
        print(f"note: {note}", file=sys.stderr)
    return 0


def _harvest(args: argparse.Namespace) -> int:
    """``harvest TRAJ --model ...``: rank frames by Eq. 1 and write the decorrelated top ones
    (``aimspax_like.harvest``). Flags are checked there, not by argparse, so that a missing or
    doubled --top/--above is one ``error:`` line like every other bad input."""
    from aimspax_like.harvest import harvest, render_table

    result = harvest(args.trajectory, args.model, top=args.top, above=args.above, output=args.output,
                     overwrite=args.overwrite, min_separation=args.min_separation, index=args.index,
                     device=args.device, dtype=args.dtype, batch=args.batch)
    if result.picked:
        print(render_table(result.picked))
    above = "" if result.n_above is None else f", {result.n_above} above {args.above:g} eV/A"
    where = f" -> {result.output}" if result.output is not None else " (nothing written)"
    short = args.top is not None and len(result.picked) < args.top
    why = f" ({args.top} asked; every other frame is within --min-separation {args.min_separation})" if short else ""
    print(f"frames: {result.n_read} read{above}, {len(result.picked)} written{where}{why}")
    return 0


def stopped_exit(exc: BaseException, resume: str, where: str, interrupted: str | None = None) -> int | None:
    """The exit code of a command that stopped mid-run with its state saved, after one stderr line.

    ``resume`` is the command that continues; ``where`` names the path of a full disk that h5py
    reported without a file name; ``interrupted`` replaces the line for a signal (``{signal}``
    stands for its name). None: ``exc`` is no such stop (an ``OSError`` other than a full disk).
    """
    from aimspax_like.errors import CampaignInterrupted, CampaignStopped, DiskFull

    if isinstance(exc, CampaignInterrupted):
        line = f"{exc} ({resume})" if interrupted is None else interrupted.replace(
            "{signal}", signal.Signals(exc.signum).name)
        print(line, file=sys.stderr)
        return 128 + exc.signum
    if isinstance(exc, OSError):
        if not disk_full(exc):
            return None
        exc = DiskFull(exc.filename or where)
    if isinstance(exc, CampaignStopped):
        print(f"stopped: {exc} ({resume})", file=sys.stderr)
        return exc.exit_code
    return None


def disk_full(exc: BaseException | None) -> bool:
    """Whether an error (or one it was raised from) is a full disk or an exceeded quota.

    h5py reports it without an errno, in the message only.
    """
    while exc is not None:
        if getattr(exc, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or "No space left" in str(exc):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _init(args: argparse.Namespace) -> int:
    """Write the commented template, rendered from the config models at run time.

    No template file ships with the package: ``config_template.template_yaml`` writes every key of the
    schema with its default and description, so the template cannot fall behind the schema.
    """
    from aimspax_like.config_template import template_yaml

    if args.path.is_dir():
        raise SetupError(f"{args.path}: is a folder; give the path of the file to write")
    if args.path.exists() and not args.force:
        raise SetupError(f"{args.path}: file exists; pass --force to overwrite")
    try:
        args.path.write_text(template_yaml())
    except OSError as exc:
        raise SetupError(f"{args.path}: cannot be written ({exc.strerror or exc.__class__.__name__})") from None
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


_NOISY_MODULE = "mace.tools.cg"


class _QuietLoader(importlib.abc.Loader):
    """Runs a module's top level with stdout discarded; everything else goes to the real loader."""

    def __init__(self, inner: importlib.abc.Loader) -> None:
        self._inner = inner

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType | None:
        return self._inner.create_module(spec)

    def exec_module(self, module: types.ModuleType) -> None:
        with contextlib.redirect_stdout(io.StringIO()):
            self._inner.exec_module(module)

    def __getattr__(self, name: str) -> Any:  # get_source, get_filename, ... (inspect, TorchScript)
        return getattr(self._inner, name)


class _QuietImport(importlib.abc.MetaPathFinder):
    """One-shot import hook: finds one module as usual and gives it a ``_QuietLoader``."""

    def __init__(self, name: str) -> None:
        self.name = name

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: types.ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname != self.name:
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(fullname, path, target)
        if spec is None or spec.loader is None:
            return None  # not a plain source module: the other finders import it as usual
        spec.loader = _QuietLoader(spec.loader)
        return spec


def _silence_mace_notice() -> None:
    """Keep mace's import-time cuequivariance notice off the terminal.

    Without the optional cuequivariance package, importing ``mace.tools.cg`` runs a bare
    ``print("cuequivariance or cuequivariance_torch is not available. ...")``: no warning or log
    record that a filter could catch. A user of this CLI cannot act on it, and it landed in front
    of the one line a setup error prints. The hook runs only that module's top level with stdout
    discarded, and only when some command imports mace (most never do).
    """
    if _NOISY_MODULE in sys.modules or any(isinstance(finder, _QuietImport) for finder in sys.meta_path):
        return
    sys.meta_path.insert(0, _QuietImport(_NOISY_MODULE))


def main(argv: list[str] | None = None) -> int:
    # A log handler that cannot write (a full disk under the run directory) must not print a
    # traceback per message over the one line that says what happened.
    logging.raiseExceptions = False
    _default_threads()
    _silence_mace_notice()
    args = _parser().parse_args(argv)
    try:
        if args.command == "init":
            return _init(args)
        if args.command == "status":
            return _status(args)
        if args.command == "report":
            return _report(args)
        if args.command == "harvest":
            return _harvest(args)
        if args.command == "otf":
            return _otf(args)
        module = _module_of(args.command)
        if module is not None:
            import importlib

            return int(importlib.import_module(module).run(args))
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
