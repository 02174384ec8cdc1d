"""Counts and errors per chemical system, for campaigns over several molecules or cells.

A batch campaign (a folder of start structures: several molecules, or a molecule and its
dimer, or cells of different compositions) learns one model for all of them, and one pooled
error hides a system the model gets wrong. So the summary and the report break the labels and
the final model's errors down per system. A system is a composition (the Hill formula): start
structures of the same composition (conformers, supercells of one size) are one system, and every
stored frame belongs to the system of its composition, whichever phase labelled it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

from ase import Atoms

from aimspax_like.data import LabelledFrame

ORIGIN_COLUMNS = ("import", "idg", "al", "test", "analysis")


def formula(numbers: Sequence[int]) -> str:
    """The Hill formula of a composition (``C2H6O``), the name of its system."""
    return Atoms(numbers=list(numbers)).get_chemical_formula(mode="hill")


def system_table(
    structures: Sequence[Atoms], frames: Sequence[LabelledFrame], events: Sequence[dict[str, Any]],
    evaluate: Any = None,
) -> list[dict[str, Any]]:
    """One row per system: start structures, labels per origin, failed labels, and errors.

    ``evaluate(atoms_list) -> {"force_mae": ..., "energy_mae_per_atom": ...}`` (the final model)
    gives the validation and test errors per system; without it the rows hold counts only.
    Failed labels are counted where the event names its start structure (IDG and test-set
    labels, reference MD segments).
    """
    names = [formula(a.numbers) for a in structures]
    order = list(dict.fromkeys(names))
    by_system: dict[str, list[LabelledFrame]] = {}
    for frame in frames:
        name = formula(frame.numbers)
        by_system.setdefault(name, []).append(frame)
        if name not in order:
            order.append(name)
    failed: Counter[str] = Counter()
    for event in events:
        index = event.get("structure")
        if event.get("event") == "label_failed" and isinstance(index, int) and 0 <= index < len(names):
            failed[names[index]] += 1
    rows = []
    for name in order:
        mine = by_system.get(name, [])
        origins = Counter(f.origin for f in mine)
        row: dict[str, Any] = {
            "system": name,
            "atoms": len(mine[0]) if mine else len(structures[names.index(name)]),
            "start_structures": names.count(name),
            "labels": {origin: origins.get(origin, 0) for origin in ORIGIN_COLUMNS},
            "train": sum(f.split == "train" for f in mine),
            "failed": failed.get(name, 0),
            "valid": None,
            "test": None,
        }
        if evaluate is not None:
            for split in ("valid", "test"):
                atoms = [f.to_atoms() for f in mine if f.split == split]
                if atoms:
                    errors = evaluate(atoms)
                    row[split] = {"frames": len(atoms), "force_mae": errors["force_mae"],
                                  "energy_mae_per_atom": errors["energy_mae_per_atom"]}
        rows.append(row)
    return rows


def render_systems(rows: list[dict[str, Any]]) -> list[str]:
    """The summary's lines: one header and one line per system (nothing for a single system)."""
    if len(rows) < 2:
        return []
    lines = ["systems    system          atoms  starts  import  idg   al  test  failed   valid F MAE   "
             "test F MAE   test E MAE"]
    for row in rows:
        labels = row["labels"]
        lines.append(
            f"           {row['system']:<15} {row['atoms']:5d}  {row['start_structures']:6d}  {labels['import']:6d}"
            f"  {labels['idg']:3d}  {labels['al']:3d}  {labels['test']:4d}  {row['failed']:6d}   "
            f"{_milli(row['valid'], 'force_mae'):>11}   {_milli(row['test'], 'force_mae'):>10}   "
            f"{_milli(row['test'], 'energy_mae_per_atom', 2):>10}"
        )
    lines.append("           (errors of the final model in meV/A and meV/atom; frames grouped by composition)")
    return lines


def _milli(group: dict[str, Any] | None, key: str, digits: int = 1) -> str:
    if not group or group.get(key) is None:
        return "\u2014"
    return f"{group[key] * 1000:.{digits}f}"
