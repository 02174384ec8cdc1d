"""Warm label workers: keep the reference's calculator, and its SCF density, between labels.

A label worker (a Parsl worker process, or a thread of the local thread pool) labels one
structure after another, usually frames of the same molecule a few femtoseconds apart. Building
the calculator afresh for every label, in a fresh interpreter when ``timeout_s`` is set, makes
every label pay for Python start-up and imports, and starts every SCF from the atomic guess;
for small molecules that is most of a label's cost (the reason aims-PAX runs FHI-aims as a
library). CP2K already keeps one ``cp2k_shell`` per worker (``reference/cp2k.py``); this module
does the same for the in-process Python references.

Two layers, both switched off by ``reference.warm: false``:

* The calculator cache (``label_calculator``). For the kinds in ``KEEP_CALCULATOR`` (pyscf,
  xtb) the worker keeps one calculator per reference spec and thread and hands it to every
  label. PySCF then starts each SCF from the last converged density when the AO basis is the
  same (``PySCFCalculator``), tblite from its previous wavefunction. Any label that fails (an
  SCF that did not converge, a crash, an injected fault, a non-finite result) drops the
  calculators of its spec on that thread (``run_target``), so a failure never leaves a warm
  state behind for the next label. Other kinds get a fresh calculator every label: nothing says
  an arbitrary imported calculator can be reused, FHI-aims is a file-based MPI program, and EMT
  or LJ have no SCF to warm. A warm label agrees with a cold one to the SCF tolerance, not to
  the last bit: its numbers depend, at that level, on what the worker labelled before.
* The label server (``run_on_server``). With ``timeout_s`` set a label must run in a process
  that can be killed. Instead of a fresh interpreter per label, the worker keeps ONE child
  process (per thread that labels at once) that reads pickled tasks from a pipe, runs them and
  keeps its calculator cache between them. The child has its own session, so on a timeout its
  whole process group is killed, as before; it is then dropped, and the next label starts a new
  one, cold. A child that dies (a segfault in a compiled backend) is a CRASHED label, and is
  replaced too. Kinds in ``SERVED`` use the server; FHI-aims keeps a fresh child per label
  (its own MPI launcher under it), CP2K its own watchdog.

The server writes each outcome to the label's scratch folder (as the fresh child did) and one
byte on a second pipe to say it is done; its stdout and stderr go to the label's
``label_child.log`` while that label runs. The outcome carries the CPU the server spent on the
label (``cpu_s``): the worker never reaps a server that lives on, so it cannot count it itself.
This module imports only the standard library, ``results`` and ``cpu_time``: ``label`` imports
it on every worker.
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import json
import os
import pickle
import select
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aimspax_like.reference.results import FailureKind, LabelFailure

__all__ = [
    "KEEP_CALCULATOR",
    "SERVED",
    "close_all_servers",
    "forget_calculators",
    "is_warm",
    "label_calculator",
    "run_on_server",
    "run_target",
    "servers_started",
    "serves",
]

# Kinds whose calculator a worker keeps between labels: in-process SCF codes that restart from
# their previous density or wavefunction. Analytic potentials (emt, lj) gain nothing from it and
# stay exactly independent of what the worker labelled before.
KEEP_CALCULATOR = frozenset({"pyscf", "xtb"})
# Kinds whose timed labels run on a persistent label server instead of a fresh child each. The
# ``mace`` kind keeps its model loaded per process anyway (``calculators._mace_calculator``);
# emt, lj and imported calculators get a fresh instance per label, but no fresh interpreter.
SERVED = KEEP_CALCULATOR | {"emt", "lj", "mace", "import"}
# A server is replaced (cold) after this many labels: bounds what a leaking backend can hold.
MAX_TASKS_PER_SERVER = 500
# Calculators kept per process (all specs and threads together), least recently used dropped.
_CACHE_SIZE = 8
_TERM_GRACE_S = 2.0


def is_warm(spec: dict[str, Any]) -> bool:
    """True unless ``reference.warm`` is false (a spec without the key is warm, as the config's default)."""
    return bool(spec.get("warm", True))


def serves(spec: dict[str, Any]) -> bool:
    """Whether this spec's timed labels run on a persistent label server."""
    return is_warm(spec) and spec["kind"] in SERVED


# --------------------------------------------------------------------------- calculator cache

_cache: collections.OrderedDict[tuple[str, int], Any] = collections.OrderedDict()
_cache_lock = threading.Lock()


def _spec_key(spec: dict[str, Any]) -> str:
    """Specs that compute the same thing share a calculator (limits and scratch handling do not matter)."""
    relevant = {k: v for k, v in spec.items() if k not in ("timeout_s", "keep_workdir")}
    return json.dumps(relevant, sort_keys=True, default=str)


def label_calculator(spec: dict[str, Any], workdir: str) -> Any:
    """The calculator for one label: this worker's kept one when warm, else a fresh one.

    Kept calculators are per thread (one ASE calculator holds the atoms and results of one
    calculation) and point at the current label's scratch folder.
    """
    from aimspax_like.reference.calculators import make_calculator

    if not is_warm(spec) or spec["kind"] not in KEEP_CALCULATOR:
        return make_calculator(spec, workdir)
    key = (_spec_key(spec), threading.get_ident())
    with _cache_lock:
        calc = _cache.pop(key, None)
    if calc is None:
        calc = make_calculator(spec, workdir)
    calc.directory = workdir
    with _cache_lock:
        _cache[key] = calc
        while len(_cache) > _CACHE_SIZE:
            _cache.popitem(last=False)
    return calc


def forget_calculators(spec: dict[str, Any] | None = None) -> None:
    """Drop this thread's kept calculator of ``spec`` (None: every kept calculator of the process)."""
    with _cache_lock:
        if spec is None:
            _cache.clear()
        else:
            _cache.pop((_spec_key(spec), threading.get_ident()), None)


def run_target(target: Callable[..., Any], args: tuple[Any, ...]) -> Any:
    """``target(*args)`` (``args[1]`` is the spec) with this worker's warm state guarded.

    A failed outcome (or an exception) drops the kept calculator, so the next label starts cold
    instead of from whatever the failure left behind. With ``warm: false`` a CP2K shell
    forgets its density before the label.
    """
    spec = args[1]
    if spec["kind"] == "cp2k" and not is_warm(spec):
        _forget_cp2k_density(spec)
    try:
        outcome = target(*args)
    except BaseException:
        forget_calculators(spec)
        raise
    if not getattr(outcome, "ok", False):
        forget_calculators(spec)
    return outcome


def _forget_cp2k_density(spec: dict[str, Any]) -> None:
    """Make this worker's idle CP2K shells of ``spec`` start the next SCF from the atomic guess."""
    from aimspax_like.reference import cp2k

    key = cp2k.spec_key(spec)
    sessions = []
    while (session := cp2k._POOL.take(key)) is not None:
        sessions.append(session)
    for session in reversed(sessions):  # back in the same order
        with contextlib.suppress(Exception):
            session.forget_density()
        cp2k._POOL.give_back(session)


# --------------------------------------------------------------------------- label server

# The server re-creates the parent's import path before unpickling anything of ours.
_SERVER_CODE = (
    "import pickle, sys; sys.path[:0] = pickle.load(sys.stdin.buffer); "
    "from aimspax_like.reference.warm_worker import _serve; _serve(int(sys.argv[1]))"
)


class _Server:
    """One persistent label process: task pipe (its stdin), done pipe, and how many labels it ran."""

    def __init__(self, key: tuple[Any, ...], log_path: Path) -> None:
        self.key = key
        self.tasks = 0
        done_read, done_write = os.pipe()
        try:
            with open(log_path, "ab") as log:
                self.proc = subprocess.Popen(
                    [sys.executable, "-c", _SERVER_CODE, str(done_write)],
                    stdin=subprocess.PIPE,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    pass_fds=(done_write,),
                    start_new_session=True,
                )
        except BaseException:
            os.close(done_read)
            raise
        finally:
            os.close(done_write)
        self.done_fd = done_read
        assert self.proc.stdin is not None
        self.task_fd = self.proc.stdin.fileno()
        os.set_blocking(self.task_fd, False)
        self._send(pickle.dumps(list(sys.path)), None)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def _send(self, data: bytes, deadline: float | None) -> bool:
        """Write ``data`` to the task pipe; False when the server is gone or the time ran out."""
        view = memoryview(data)
        while view:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return False
            if deadline is not None:
                _, writable, _ = select.select([], [self.task_fd], [], remaining)
                if not writable:
                    continue
            try:
                view = view[os.write(self.task_fd, view) :]
            except BlockingIOError:
                if deadline is None:
                    select.select([], [self.task_fd], [], 1.0)
            except (BrokenPipeError, OSError):
                return False
        return True

    def run(self, target: Callable[..., Any], args: tuple[Any, ...], workdir: str, deadline: float) -> str:
        """Send one task and wait for it: 'done', 'died' (the server ended while on it),
        'unsent' (it was gone before it took the task) or 'timeout'."""
        self.tasks += 1
        task = pickle.dumps(list(sys.path)) + pickle.dumps((target, args, workdir))
        if not self._send(task, deadline):
            return "timeout" if time.monotonic() >= deadline else "unsent"
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return "timeout"
            readable, _, _ = select.select([self.done_fd], [], [], remaining)
            if readable:
                try:
                    return "done" if os.read(self.done_fd, 1) else "died"
                except OSError:
                    return "died"

    def kill(self) -> None:
        """SIGTERM the server's process group, wait a little, then SIGKILL whatever is left."""
        from aimspax_like.reference.label import _kill_group

        _kill_group(self.proc)
        self._close_pipes()

    def close(self) -> None:
        """End an idle server: close its task pipe (it exits on end of input), or kill it."""
        self._close_pipes()
        try:
            self.proc.wait(timeout=_TERM_GRACE_S)
        except subprocess.TimeoutExpired:
            self.kill()

    def _close_pipes(self) -> None:
        if self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
        if self.done_fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.done_fd)
            self.done_fd = -1


class _ServerPool:
    """Idle servers of this process; a label borrows one and gives it back (thread-safe).

    Servers are keyed on what a fresh child would have inherited at the time (interpreter,
    working folder, environment), so a worker whose environment changed starts a new one. A
    forked copy of this process never uses (or ends) its parent's servers.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._idle: list[_Server] = []
        self._pid = os.getpid()
        self.started = 0

    @staticmethod
    def key() -> tuple[Any, ...]:
        return (sys.executable, os.getcwd(), hash(frozenset(os.environ.items())))

    def take(self, key: tuple[Any, ...]) -> _Server | None:
        stale: list[_Server] = []
        found = None
        with self._lock:
            if self._pid != os.getpid():  # forked: those servers belong to the parent
                self._idle, self._pid = [], os.getpid()
            for server in reversed(self._idle):
                if server.key == key and found is None and server.alive():
                    found = server
                elif not server.alive():
                    stale.append(server)
            self._idle = [s for s in self._idle if s is not found and s not in stale]
        for server in stale:
            server.kill()
        return found

    def give_back(self, server: _Server) -> None:
        if server.tasks >= MAX_TASKS_PER_SERVER:
            server.close()
            return
        with self._lock:
            if self._pid == os.getpid():
                self._idle.append(server)
                return
        server.close()

    def new(self, key: tuple[Any, ...], log_path: Path) -> _Server:
        server = _Server(key, log_path)
        with self._lock:
            self.started += 1
        return server

    def close_all(self) -> None:
        with self._lock:
            servers = self._idle if self._pid == os.getpid() else []
            self._idle = []
        for server in servers:
            server.close()


_POOL = _ServerPool()
atexit.register(_POOL.close_all)


def servers_started() -> int:
    """Label servers started by this process so far (tests and benchmarks read it)."""
    return _POOL.started


def close_all_servers() -> None:
    """End this process's idle label servers (they also end when it exits)."""
    _POOL.close_all()


def run_on_server(
    target: Callable[..., Any],
    args: tuple[Any, ...],
    workdir: str,
    timeout_s: float,
    start: float,
) -> Any:
    """Run ``target(*args)`` on one of this worker's label servers; kill it at ``start + timeout_s``.

    Same contract as ``label._run_with_timeout``: the outcome, a TIMED_OUT failure (the server's
    process group killed), or a CRASHED one when the server died without a result.
    """
    from aimspax_like.reference.label import _LOG_FILE, _OUTCOME_FILE, _collect

    folder = Path(workdir)
    (folder / _OUTCOME_FILE).unlink(missing_ok=True)
    key = _POOL.key()
    deadline = start + timeout_s
    server = _POOL.take(key)
    for _ in range(2):  # an idle server found dead when the task is sent is replaced once
        if server is None:
            server = _POOL.new(key, folder / _LOG_FILE)
        try:
            status = server.run(target, args, workdir, deadline)
        except BaseException:  # interrupted: leave no server in an unknown state
            server.kill()
            raise
        if status != "unsent" or server.tasks == 1:
            break
        server.kill()
        server = None
    if status == "unsent":
        status = "died"
    if status == "timeout":
        server.kill()
        message = f"no result after {timeout_s:g} s; label process killed"
        return LabelFailure(FailureKind.TIMED_OUT, message, workdir, 0.0)
    if status == "died":
        server.kill()  # what it started dies with it; its own exit status is already set
        code = server.proc.returncode
        return _collect(folder, code if code is not None else -1, workdir)
    _POOL.give_back(server)
    return _collect(folder, 0, workdir)


def _serve(done_fd: int) -> None:
    """The label server's loop: read a task, run it, leave its outcome in its folder, say done.

    Ends at the end of its input (the worker closed the pipe or is gone). While a task runs,
    fds 1 and 2 are the task's ``label_child.log``; between tasks they go to /dev/null.
    """
    import dataclasses

    from aimspax_like.reference.cpu_time import CpuMeter
    from aimspax_like.reference.label import _LOG_FILE, _OUTCOME_FILE

    os.set_inheritable(done_fd, False)  # no program a label starts may hold it open
    devnull = os.open(os.devnull, os.O_WRONLY)
    tasks = sys.stdin.buffer
    first = True
    while True:
        try:
            paths = pickle.load(tasks)
            for path in reversed(paths):
                if path not in sys.path:
                    sys.path.insert(0, path)
            target, args, workdir = pickle.load(tasks)
        except EOFError:
            return
        folder = Path(workdir)
        with open(folder / _LOG_FILE, "ab" if first else "wb") as log:
            first = False
            _redirect(log.fileno())
            cpu = CpuMeter()  # the server outlives the label: it reports its share (``label.run_in_scratch``)
            try:
                outcome = run_target(target, args)
            except Exception as exc:  # targets return failures; this is a last resort
                from aimspax_like.reference.results import classify_exception

                kind, message = classify_exception(exc)
                outcome = LabelFailure(kind, message, workdir, 0.0)
            finally:
                _redirect(devnull)
        with contextlib.suppress(TypeError, ValueError):  # an outcome type without cpu_s goes as it is
            outcome = dataclasses.replace(outcome, cpu_s=cpu.seconds())
        result = folder / _OUTCOME_FILE
        partial = result.with_suffix(".partial")
        partial.write_bytes(pickle.dumps(outcome))
        partial.replace(result)  # atomic: the worker never reads half a pickle
        try:
            os.write(done_fd, b"1")
        except OSError:  # the worker is gone
            return


def _redirect(fd: int) -> None:
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
