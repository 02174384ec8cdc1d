"""Start structures from files or folders, with one-line errors naming the path."""

from __future__ import annotations

from pathlib import Path

from ase import Atoms
from ase.io import read

from aimspax_like.errors import ConfigError


def read_structures(paths: list[Path], index: str = ":") -> list[Atoms]:
    """Every frame of every file (folders: every file inside, sorted by name)."""
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            inside = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
            if not inside:
                raise ConfigError("system.structures", f"folder has no structure files: {path}")
            files.extend(inside)
        elif path.is_file():
            files.append(path)
        else:
            raise ConfigError("system.structures", f"file not found: {path}")
    structures: list[Atoms] = []
    for file in files:
        try:
            frames = read(file, index=index)
        except Exception as exc:  # ASE raises many types for unreadable files
            raise ConfigError("system.structures", f"ASE cannot read {file} ({type(exc).__name__})") from None
        frames = frames if isinstance(frames, list) else [frames]
        if not frames or any(len(a) == 0 for a in frames):
            raise ConfigError("system.structures", f"no atoms in {file}")
        for atoms in frames:
            atoms.calc = None
        structures.extend(frames)
    return structures
