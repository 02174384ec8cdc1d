"""Small torch helpers shared by the model modules: dtype/device spelling and scoped state.

Scoped means restored on the way out, errors included: the engine runs label workers, MD and
training in one process, so a leaked default dtype or warning filter would change other code.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterator

import torch

DTYPES = {"float32": torch.float32, "float64": torch.float64}

# e3nn compiles its codegen modules with TorchScript whenever a MACE block is built or
# unpickled; TorchScript's AST checker then warns (attributed to the stdlib module ``ast``)
# about an annotation style inside e3nn. Nothing we can act on, so it is silenced locally.
_TORCHSCRIPT_NOISE = "The TorchScript type system doesn't support instance-level annotations"


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """Accept the config's string spelling or a torch dtype."""
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return DTYPES[dtype]
    except KeyError:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}") from None


def resolve_device(device: str | torch.device) -> torch.device:
    """'auto' means the GPU when torch sees one, else the CPU."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Scope torch's default dtype; mace builds tensors and buffers with whatever is set.

    Unlike ``mace.tools.torch_tools.default_dtype`` this restores the old value on errors too,
    so a failed build never leaves the rest of the process in float64.
    """
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


@contextlib.contextmanager
def quiet_torchscript() -> Iterator[None]:
    """Silence only TorchScript's annotation warning while MACE modules are built or loaded."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_TORCHSCRIPT_NOISE, category=UserWarning)
        yield


class StageTimer:
    """Seconds spent in named stages of the ML code (graph building, member calls), summed.

    A GPU runs asynchronously, so the device is synchronised at each stage's edges: the time
    of a kernel lands in the stage that queued it. That costs a little, which is why the
    timer is only attached when asked for (``MACEEnsemble.timer``), e.g. by the benchmarks.
    """

    def __init__(self, device: torch.device | str = "cpu", clock: Callable[[], float] = time.perf_counter) -> None:
        self.device = torch.device(device)
        self.clock = clock
        self.totals: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextlib.contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        self.sync()
        begin = self.clock()
        try:
            yield
        finally:
            self.sync()
            self.totals[stage] += self.clock() - begin
            self.calls[stage] += 1

    def reset(self) -> None:
        self.totals.clear()
        self.calls.clear()


@contextlib.contextmanager
def no_timer(stage: str) -> Iterator[None]:
    """Stand-in for a ``StageTimer`` when nothing is timed."""
    yield
