"""``aimspax-like label``: harvested (bare) frames labelled with a campaign's reference, ready for
``import_data``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from ase import Atoms
from ase.calculators.emt import EMT
from ase.io import read, write
from campaign_helpers import tiny_cluster, tiny_config

from aimspax_like.cli import main
from aimspax_like.config import config_from_dict, load_config
from aimspax_like.data import reference_fingerprint
from aimspax_like.data.imports import read_imports

# Our own module, for the 'import' kind ('module:Name'); pytest decides its import name.
HERE = __name__


class FlakyEMT(EMT):
    """EMT that gives up on geometries whose first atom sits at negative x (the frames a test marks)."""

    def calculate(self, atoms: Any = None, properties: Any = ("energy",), system_changes: Any = ()) -> None:
        if atoms is not None and atoms.positions[0, 0] < -0.01:
            raise RuntimeError("SCF not converged in 50 cycles")
        super().calculate(atoms, properties, system_changes)


class BrokenEMT(EMT):
    """Fails on every geometry (but can be built: the setup check passes)."""

    def calculate(self, atoms: Any = None, properties: Any = ("energy",), system_changes: Any = ()) -> None:
        raise RuntimeError("licence server unreachable")


def rattled(n: int = 5, failing: tuple[int, ...] = ()) -> list[Atoms]:
    """``n`` rattled clusters carrying harvest's info keys; frames in ``failing`` get atom 0 at x < 0."""
    frames = []
    for i in range(n):
        atoms = tiny_cluster()
        atoms.rattle(stdev=0.05, seed=i)
        atoms.positions[0, 0] = -0.05 if i in failing else 0.02
        atoms.info.update(harvest_uncertainty=0.1 * (i + 1), harvest_energy_std_per_atom=0.001,
                          harvest_source=f"md.xyz#{10 * i}")
        frames.append(atoms)
    return frames


def setup(tmp_path: Path, reference: dict[str, Any] | None = None, failing: tuple[int, ...] = ()) -> tuple[Path, Path]:
    config = tiny_config(tmp_path)
    if reference is not None:
        config["reference"] = reference
    config_path = tmp_path / "campaign.yaml"
    config_path.write_text(yaml.safe_dump(config))
    frames = tmp_path / "md_harvest.xyz"
    write(frames, rattled(failing=failing), format="extxyz")
    return frames, config_path


def emt_of(atoms: Atoms) -> tuple[float, np.ndarray]:
    atoms = Atoms(numbers=atoms.numbers, positions=atoms.positions)
    atoms.calc = EMT()
    return atoms.get_potential_energy(), atoms.get_forces()


def test_label_writes_exact_emt_labels_that_import_data_accepts(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    frames, config_path = setup(tmp_path)
    assert main(["label", str(frames), "--config", str(config_path)]) == 0
    out = tmp_path / "md_harvest_labelled.xyz"
    fingerprint = reference_fingerprint(load_config(config_path).reference)
    captured = capsys.readouterr()
    assert captured.out.strip() == f"frames: 5 read, 5 labelled, 0 failed -> {out} (reference {fingerprint})"
    assert "5/5 frames done" in captured.err

    originals = read(frames, ":")
    written = read(out, ":")
    assert len(written) == 5
    for i, (original, atoms) in enumerate(zip(originals, written, strict=True)):
        energy, forces = emt_of(original)
        np.testing.assert_array_equal(atoms.positions, original.positions)
        assert atoms.info["REF_energy"] == energy  # exactly: repr precision, no rounding
        np.testing.assert_array_equal(atoms.arrays["REF_forces"], forces)
        assert "REF_stress" not in atoms.info  # a cluster has no stress
        assert atoms.info["label_source"] == f"{frames}#{i}"
        assert atoms.info["reference"] == fingerprint
        assert atoms.info["label_wall_s"] >= 0
        assert atoms.info["harvest_source"] == f"md.xyz#{10 * i}"
        assert atoms.info["harvest_uncertainty"] == pytest.approx(0.1 * (i + 1))
        assert atoms.calc is None  # no plain energy/forces a reader could take instead

    raw = tiny_config(tmp_path)
    raw["import_data"] = [{"path": str(out), "reference": "campaign"}]
    config = config_from_dict(raw)
    imported = read_imports(config, reference_fingerprint(config.reference))
    assert len(imported) == 5
    energy, forces = emt_of(originals[3])
    assert imported[3].energy == energy
    np.testing.assert_array_equal(imported[3].forces, forces)
    assert {f.reference for f in imported} == {fingerprint}
    assert {f.origin for f in imported} == {"import"}
    # reference: file takes the fingerprint written with each frame: the same one.
    raw["import_data"] = [{"path": str(out), "reference": "file"}]
    config = config_from_dict(raw)
    assert {f.reference for f in read_imports(config, reference_fingerprint(config.reference))} == {fingerprint}


def test_workers_give_the_same_numbers(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    frames, config_path = setup(tmp_path)
    one, two = tmp_path / "one.xyz", tmp_path / "two.xyz"
    assert main(["label", str(frames), "--config", str(config_path), "--output", str(one), "--index", "1:4"]) == 0
    assert main(["label", str(frames), "--config", str(config_path), "--output", str(two), "--index", "1:4",
                 "--workers", "2"]) == 0
    captured = capsys.readouterr()
    assert captured.out.count("frames: 3 read, 3 labelled, 0 failed") == 2
    assert "on 2 worker processes" in captured.err
    a, b = read(one, ":"), read(two, ":")
    assert [x.info["label_source"] for x in b] == [f"{frames}#{i}" for i in (1, 2, 3)]
    for x, y in zip(a, b, strict=True):
        assert x.info["REF_energy"] == y.info["REF_energy"]
        np.testing.assert_array_equal(x.arrays["REF_forces"], y.arrays["REF_forces"])


@pytest.mark.parametrize("workers", ["1", "2"])
def test_failed_labels_are_skipped_and_reported(tmp_path: Path, capsys: pytest.CaptureFixture, workers: str) -> None:
    frames, config_path = setup(tmp_path, {"kind": "import", "path": f"{HERE}:FlakyEMT"}, failing=(1, 3))
    out = tmp_path / "labelled.xyz"
    assert main(["label", str(frames), "--config", str(config_path), "--output", str(out), "--workers", workers]) == 0
    captured = capsys.readouterr()
    failures = [line for line in captured.err.splitlines() if line.startswith("frame ")]
    assert failures == [f"frame {i}: scf_not_converged: RuntimeError: SCF not converged in 50 cycles" for i in (1, 3)]
    assert "5 read, 3 labelled, 2 failed" in captured.out
    assert [a.info["label_source"] for a in read(out, ":")] == [f"{frames}#{i}" for i in (0, 2, 4)]


def test_no_label_at_all_is_exit_3_and_no_file(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    frames, config_path = setup(tmp_path, {"kind": "import", "path": f"{HERE}:BrokenEMT"})
    out = tmp_path / "labelled.xyz"
    assert main(["label", str(frames), "--config", str(config_path), "--output", str(out), "--index", ":2"]) == 3
    captured = capsys.readouterr()
    assert [line for line in captured.err.splitlines() if line.startswith("frame ")] == [
        f"frame {i}: crashed: RuntimeError: licence server unreachable" for i in (0, 1)]
    assert "2 read, 0 labelled, 2 failed; nothing written" in captured.out
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["campaign.yaml", "cluster.xyz", "md_harvest.xyz"]


@pytest.mark.parametrize("case", ["missing", "unreadable", "bad_config", "element", "exists", "workers", "empty"])
def test_bad_input_is_one_error_line_and_nothing_written(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                         case: str) -> None:
    frames, config_path = setup(tmp_path)
    out = tmp_path / "labelled.xyz"
    args = ["label", str(frames), "--config", str(config_path), "--output", str(out)]
    expect = ""
    if case == "missing":
        args[1], expect = str(tmp_path / "nope.xyz"), "nope.xyz: frames file not found"
    elif case == "unreadable":
        (tmp_path / "junk.xyz").write_text("not\na frame\n")
        args[1], expect = str(tmp_path / "junk.xyz"), "ASE cannot read the frames"
    elif case == "bad_config":
        config_path.write_text(yaml.safe_dump({**tiny_config(tmp_path), "reference": {"kind": "emtt"}}))
        expect = "reference"
    elif case == "element":
        write(frames, Atoms("CuU", positions=[[0, 0, 0], [2.4, 0, 0]]))
        expect = "reference.kind:"
    elif case == "exists":
        out.write_text("keep me\n")
        expect = "file exists; pass --overwrite"
    elif case == "workers":
        args += ["--workers", "0"]
        expect = "--workers: must be at least 1"
    elif case == "empty":
        args += ["--index", "7:"]
        expect = "no frames in --index 7:"
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main(args) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expect in lines[0], lines
    assert captured.out == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    if case == "exists":
        assert out.read_text() == "keep me\n"


def test_periodic_frames_get_the_stress_and_import_reads_it(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from ase.build import bulk

    frames = []
    for seed in range(2):
        atoms = bulk("Cu", "fcc", a=3.6, cubic=True).repeat((2, 1, 1))
        atoms.rattle(stdev=0.05, seed=seed)
        frames.append(atoms)
    write(tmp_path / "bulk.xyz", frames, format="extxyz")
    config = tiny_config(tmp_path)
    config["reference"] = {"kind": "emt", "compute_stress": True}
    (tmp_path / "campaign.yaml").write_text(yaml.safe_dump(config))
    out = tmp_path / "bulk_labelled.xyz"
    assert main(["label", str(tmp_path / "bulk.xyz"), "--config", str(tmp_path / "campaign.yaml")]) == 0
    capsys.readouterr()
    frames = read(tmp_path / "bulk.xyz", ":")  # the geometry as labelled (ASE wrote it with 8 decimals)
    for original, atoms in zip(frames, read(out, ":"), strict=True):
        original.calc = EMT()
        np.testing.assert_array_equal(atoms.cell.array, original.cell.array)
        np.testing.assert_array_equal(atoms.info["REF_stress"], original.get_stress(voigt=True))
    raw = {**config, "import_data": [{"path": str(out), "reference": "campaign", "shared": True}]}
    imported = read_imports(config_from_dict(raw), "x")
    assert imported[1].stress is not None
    np.testing.assert_array_equal(imported[1].stress, frames[1].get_stress(voigt=True))


def test_number_like_strings_survive_the_file(tmp_path: Path) -> None:
    from aimspax_like.label_frames import labelled_atoms, write_labelled
    from aimspax_like.reference.results import LabelResult

    outcome = LabelResult(-1.5, np.zeros((6, 3)), None, None, 0.25)
    atoms = labelled_atoms(tiny_cluster(), outcome, "0123e5#0", "1234567890123456")
    back = read(write_labelled(tmp_path / "x.xyz", [atoms]))
    assert back.info["reference"] == "1234567890123456"
    assert back.info["label_source"] == "0123e5#0"
    assert back.info["REF_energy"] == -1.5
