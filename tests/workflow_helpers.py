"""Load a script of ``workflows/`` (not a package) as a module, so tests can call its functions."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

WORKFLOWS = Path(__file__).resolve().parents[1] / "workflows"


def load_workflow(name: str) -> ModuleType:
    """``workflows/<name>.py`` imported as module ``name`` (registered: dataclasses look it up)."""
    spec = importlib.util.spec_from_file_location(name, WORKFLOWS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(name, module)
    spec.loader.exec_module(module)
    return module
