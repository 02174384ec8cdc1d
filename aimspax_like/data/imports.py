"""Labelled datasets a campaign starts from (``import_data``): read, checked, given provenance.

Users rarely start from nothing: an earlier campaign's export, a dataset from a paper, frames
labelled elsewhere. Each source is an extended XYZ file or an ASE database (read by
``data.sources``) whose labels live under configurable keys. Its frames become origin ``import``
with ``source`` = ``<file>#<index>`` and the reference the user declared for the file, so the
provenance guard (``data.provenance``) can refuse to train on two levels of theory at once.

A frame's identity in the store is (``import``, source number, index in the file), so a resumed
campaign never stores an imported frame twice. Everything is read and checked before the run
directory exists: a missing key, a non-finite number or an unreadable file is one line naming
the config key and the file, and nothing is written.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np

from aimspax_like.data.frames import LabelledFrame, source_tag
from aimspax_like.data.provenance import declared_reference
from aimspax_like.data.sources import DB_SUFFIXES, XYZ_SUFFIXES, LabelKeys
from aimspax_like.data.sources import read_source as read_labelled
from aimspax_like.errors import ConfigError, SetupError

ORIGIN = "import"
_NO_SPLIT = "held"


def read_import(source: Any, number: int, campaign_reference: str, n_members: int, seed: int) -> list[LabelledFrame]:
    """The frames of ``import_data[number]`` (an ``ImportSource``) as the campaign stores them.

    ``campaign_reference`` is the campaign's reference fingerprint (for ``reference: campaign``).
    Splits: a frame's own ``split`` (train or valid) is kept, frames without one are drawn with
    ``valid_ratio`` (seeded), and a file's test and analysis frames are not imported (they are
    held out where they come from). Training frames are dealt to the members in disjoint subsets
    unless the source is ``shared``.
    """
    key = f"import_data.{number}"
    path = Path(source.path)
    if path.suffix.lower() not in (*XYZ_SUFFIXES, *DB_SUFFIXES):
        raise ConfigError(f"{key}.path", f"{path}: expected an extended XYZ file ({'/'.join(XYZ_SUFFIXES)}) or "
                          f"an ASE database ({'/'.join(DB_SUFFIXES)})")
    keys = LabelKeys(source.energy_key, source.forces_key, source.stress_key)
    try:
        # "held" marks frames whose file names no split (a file's own held frames are drawn anew too).
        frames = read_labelled(path, keys, default_split=_NO_SPLIT).frames
    except SetupError as exc:
        message = str(exc).replace("--energy-key", f"{key}.energy_key").replace("--forces-key", f"{key}.forces_key")
        raise ConfigError(f"{key}.path", message) from None
    frames = [f for f in frames if f.split in ("train", "valid", _NO_SPLIT)]  # never a file's test frames
    if not frames:
        raise ConfigError(f"{key}.path", f"{path}: holds no frames to train on (test or analysis frames are "
                          "not imported)")
    rng = np.random.default_rng([seed & 0xFFFFFFFF, number, 11])
    order: list[int] = []
    out = []
    for i, frame in enumerate(frames):
        split = frame.split if frame.split in ("train", "valid") else (
            "valid" if rng.random() < source.valid_ratio else "train")
        member = -1
        if split == "train" and not source.shared:
            if not order:
                order = [int(k) for k in rng.permutation(n_members)]
            member = order.pop()
        out.append(dataclasses.replace(
            frame, split=split, origin=ORIGIN, trajectory=number, md_step=i, member=member,
            uncertainty=float("nan"), source=source_tag(path, i),
            reference=_reference(source.reference, frame, campaign_reference, f"{key}.reference", path, i),
        ))
    return out


def read_imports(config: Any, campaign_reference: str) -> list[LabelledFrame]:
    """Every ``import_data`` source of a campaign config, in order."""
    frames: list[LabelledFrame] = []
    for number, source in enumerate(config.import_data):
        frames.extend(read_import(source, number, campaign_reference, config.model.ensemble_size, config.seed))
    return frames


def _reference(declared: str, frame: LabelledFrame, campaign: str, key: str, path: Path, index: int) -> str:
    if declared == "campaign":
        return campaign
    if declared == "file":
        if not frame.reference:
            raise ConfigError(key, f"'file', but frame {index} of {path} has no 'reference' key")
        return declared_reference(frame.reference)
    return declared_reference(declared)
