"""The labelled-frame store: exact round trips, filters, durability under SIGKILL, extxyz I/O."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
import textwrap
from dataclasses import fields
from pathlib import Path

import ase.io
import h5py
import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk
from ase.calculators.singlepoint import SinglePointCalculator

from aimspax_like.data import (
    DatasetStore,
    LabelledFrame,
    export_extxyz,
    import_extxyz,
    reference_fingerprint,
)
from aimspax_like.errors import SetupError

REPO = Path(__file__).resolve().parents[1]


def molecule(rng: np.random.Generator, **prov) -> LabelledFrame:
    """Three atoms, no cell, no stress."""
    atoms = Atoms("H2O", positions=rng.normal(size=(3, 3)))
    prov = {"split": "train", "origin": "idg", **prov}
    return LabelledFrame.from_atoms(atoms, energy=rng.normal() * 100, forces=rng.normal(size=(3, 3)), **prov)


def crystal(rng: np.random.Generator, **prov) -> LabelledFrame:
    """Eight periodic atoms with stress and every provenance field set."""
    atoms = bulk("Si", "diamond", a=5.43, cubic=True)
    atoms.positions += rng.normal(scale=0.05, size=atoms.positions.shape)
    prov = {
        "split": "valid",
        "origin": "al",
        "trajectory": 3,
        "md_step": 1200,
        "uncertainty": 0.0421,
        "member": 2,
        "reference": "0000000000003e12",
        "label_wall_s": 12.5,
        "source": "/data/études/earlier run.xyz#17",
        **prov,
    }
    return LabelledFrame.from_atoms(
        atoms, energy=-43.123456789012345, forces=rng.normal(size=(8, 3)), stress=rng.normal(size=6), **prov
    )


def assert_same(a: LabelledFrame, b: LabelledFrame) -> None:
    for f in fields(LabelledFrame):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if isinstance(x, np.ndarray) or isinstance(y, np.ndarray):
            assert x is not None and y is not None, f.name
            assert x.dtype.kind == y.dtype.kind and x.shape == y.shape, f.name
            assert np.array_equal(x, y, equal_nan=x.dtype.kind == "f"), f.name
        elif isinstance(x, float) and math.isnan(x):
            assert isinstance(y, float) and math.isnan(y), f.name
        else:
            assert x == y and type(x) is type(y), f.name


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(7)


def piece(rng: np.random.Generator, **prov) -> LabelledFrame:
    """A substructure of five atoms: two core atoms, three buffer atoms, parent indices."""
    atoms = Atoms("Cu5", positions=rng.normal(scale=2.0, size=(5, 3)))
    prov = {"split": "train", "origin": "al", "trajectory": 1, "md_step": 40, "piece": 1,
            "force_mask": [True, False, True, False, False], "parent_index": [17, 3, 250, 9, 11], **prov}
    return LabelledFrame.from_atoms(atoms, energy=-12.5, forces=rng.normal(size=(5, 3)), **prov)


def test_round_trip_preserves_every_field(tmp_path, rng):
    frames = [molecule(rng), crystal(rng), piece(rng), molecule(rng, split="test", origin="test")]
    store = DatasetStore.create(tmp_path / "data.h5")
    assert [store.append(f) for f in frames] == [0, 1, 2, 3]
    reopened = DatasetStore.open(tmp_path / "data.h5")
    assert len(reopened) == 4
    for a, b in zip(frames, reopened.frames(), strict=True):
        assert_same(a, b)
    assert reopened.frames()[0].stress is None
    assert reopened.keys()[2] == ("al", 1, 40, 1) and reopened.keys()[1] == ("al", 3, 1200, -1)
    with h5py.File(tmp_path / "data.h5", "r") as h5:
        assert h5.attrs["format_version"] == 3 and h5.attrs["n_frames"] == 4


def test_a_piece_trains_on_its_core_forces_only_and_has_no_energy_label(rng):
    frame = piece(rng)
    atoms = frame.to_atoms()
    assert "REF_energy" not in atoms.info and atoms.info["piece_energy"] == -12.5
    assert atoms.arrays["force_mask"].tolist() == [True, False, True, False, False]
    assert atoms.arrays["parent_index"].tolist() == [17, 3, 250, 9, 11]
    whole = molecule(rng).to_atoms()
    assert "force_mask" not in whole.arrays and "REF_energy" in whole.info
    with pytest.raises(ValueError, match="needs its force_mask"):
        piece(rng, force_mask=None)
    with pytest.raises(ValueError, match="at least one core atom"):
        piece(rng, force_mask=[False] * 5)
    with pytest.raises(ValueError, match="belongs to a substructure"):
        piece(rng, piece=-1)


def test_a_format_1_store_reads_without_sources_and_is_upgraded_by_the_next_write(tmp_path, rng):
    path = tmp_path / "old.h5"
    store = DatasetStore.create(path)
    store.extend([molecule(rng), crystal(rng, source="")])
    with h5py.File(path, "r+") as h5:  # what a store written before sources and pieces existed looks like
        for name in ("source", "piece", "force_mask", "parent_index"):
            del h5[name]
        h5.attrs["format_version"] = 1
    old = DatasetStore.open(path)
    assert [f.source for f in old.frames()] == ["", ""]
    assert old.keys() == [("idg", -1, -1, -1), ("al", 3, 1200, -1)]
    old.append(piece(rng, source="x.xyz#3"))
    with h5py.File(path, "r") as h5:
        assert h5.attrs["format_version"] == 3 and h5["source"].shape[0] >= 3
        assert h5["force_mask"][:11].all() and (h5["parent_index"][:11] == -1).all()  # the 3 + 8 old atoms
    frames = DatasetStore.open(path).frames()
    assert [f.source for f in frames] == ["", "", "x.xyz#3"]
    assert [f.piece for f in frames] == [-1, -1, 1] and frames[0].force_mask is None
    assert frames[2].force_mask.tolist() == [True, False, True, False, False]


def test_source_tag_fits_the_store_and_keeps_the_file_name():
    from aimspax_like.data.frames import SOURCE_BYTES, source_tag

    assert source_tag("a/b.xyz", 4) == "a/b.xyz#4"
    long = "/scratch/" + "deep/" * 80 + "frames.xyz"
    tag = source_tag(long, 12345)
    assert len(tag.encode()) <= SOURCE_BYTES and tag.startswith("...") and tag.endswith("frames.xyz#12345")
    with pytest.raises(ValueError, match="source must fit"):
        LabelledFrame.from_atoms(Atoms("H"), 0.0, np.zeros((1, 3)), split="train", origin="import", source=long)


def test_ragged_sizes_and_extend(tmp_path, rng):
    frames = []
    for n in (1, 5, 2, 17, 8):
        atoms = Atoms(numbers=rng.integers(1, 30, size=n), positions=rng.normal(size=(n, 3)))
        frames.append(
            LabelledFrame.from_atoms(
                atoms, energy=float(n), forces=rng.normal(size=(n, 3)), split="train", origin="al", md_step=n
            )
        )
    assert DatasetStore(tmp_path / "new" / "data.h5").frames() == []  # a reader sees a missing file as empty
    store = DatasetStore.create(tmp_path / "new" / "data.h5")
    assert len(store) == 0 and store.frames() == []
    assert store.extend(frames[:3]) == [0, 1, 2]
    assert store.append(frames[3]) == 3
    assert store.extend(frames[4:]) == [4]
    back = store.frames()
    assert [len(f) for f in back] == [1, 5, 2, 17, 8]
    for a, b in zip(frames, back, strict=True):
        assert_same(a, b)


def test_filters_and_counts(tmp_path, rng):
    store = DatasetStore.create(tmp_path / "data.h5")
    store.extend(
        [
            molecule(rng, split="train", origin="idg", member=0),
            molecule(rng, split="train", origin="idg", member=1),
            molecule(rng, split="valid", origin="idg", member=-1),
            crystal(rng, split="train", origin="al", member=-1),
            crystal(rng, split="test", origin="test", member=-1),
        ]
    )
    assert len(store.frames(split="train")) == 3
    assert len(store.frames(origin="idg")) == 3
    assert len(store.frames(split="train", origin="al")) == 1
    assert [f.member for f in store.frames(member=0)] == [0, -1, -1, -1]
    assert [f.member for f in store.frames(split="train", member=1)] == [1, -1]
    assert store.frames(split="valid", origin="al") == []
    assert store.counts() == {
        "total": 5,
        "split": {"train": 3, "valid": 1, "test": 1, "held": 0, "analysis": 0},
        "origin": {"idg": 3, "al": 1, "test": 1, "analysis": 0, "import": 0},
    }
    atoms = store.atoms(split="test")
    assert len(atoms) == 1 and atoms[0].info["origin"] == "test"


def test_create_refuses_existing_file(tmp_path):
    path = tmp_path / "data.h5"
    DatasetStore.create(path)
    with pytest.raises(SetupError, match=re.escape(str(path))):
        DatasetStore.create(path)


@pytest.mark.parametrize("damage", ["missing", "garbage", "truncated", "foreign_hdf5"])
def test_open_refuses_bad_files(tmp_path, rng, damage):
    path = tmp_path / "data.h5"
    if damage == "garbage":
        path.write_bytes(b"this is not an HDF5 file\n" * 100)
    elif damage == "truncated":
        DatasetStore.create(path).extend([crystal(rng) for _ in range(20)])
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif damage == "foreign_hdf5":
        with h5py.File(path, "w") as h5:
            h5["x"] = [1, 2, 3]
    with pytest.raises(SetupError, match=re.escape(str(path))) as err:
        DatasetStore.open(path)
    assert "\n" not in str(err.value)


def test_appended_frames_survive_sigkill(tmp_path):
    path = tmp_path / "data.h5"
    script = textwrap.dedent(f"""
        import os, signal
        import numpy as np
        from ase.build import molecule
        from aimspax_like.data import DatasetStore, LabelledFrame
        store = DatasetStore.create({str(path)!r})
        for i in range(5):
            f = LabelledFrame.from_atoms(molecule("H2O"), energy=float(i), forces=np.full((3, 3), i),
                                         split="train", origin="al", md_step=i)
            assert store.append(f) == i
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, timeout=120)
    assert proc.returncode == -9, proc.stderr.decode()
    frames = DatasetStore.open(path).frames()
    assert [f.energy for f in frames] == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert [f.md_step for f in frames] == [0, 1, 2, 3, 4]


def test_rows_beyond_n_frames_are_ignored_and_overwritten(tmp_path, rng):
    """What an append killed half-way leaves behind must not leak into reads or later appends."""
    path = tmp_path / "data.h5"
    store = DatasetStore.create(path)
    store.extend([molecule(rng), molecule(rng)])
    with h5py.File(path, "r+") as h5:  # a half-finished append: data written, counter not
        for name in ("numbers", "positions", "forces"):
            h5[name].resize(h5[name].shape[0] + 4, axis=0)
        for name in ("energy", "split", "atom_offset", "n_atoms"):
            h5[name].resize(3, axis=0)
        h5["energy"][2] = 999.0
    assert len(store) == 2
    third = crystal(rng)
    assert store.append(third) == 2
    assert_same(store.frames()[2], third)


def test_to_atoms_carries_label_and_provenance(rng):
    frame = crystal(rng)
    atoms = frame.to_atoms()
    assert atoms.get_potential_energy() == frame.energy
    assert np.array_equal(atoms.get_forces(), frame.forces)
    assert np.array_equal(atoms.get_stress(), frame.stress)
    assert atoms.info["REF_energy"] == frame.energy
    assert np.array_equal(atoms.arrays["REF_forces"], frame.forces)
    assert np.array_equal(atoms.info["REF_stress"], frame.stress)
    for key in ("split", "origin", "trajectory", "md_step", "uncertainty", "member"):
        assert atoms.info[key] == getattr(frame, key)
    assert "REF_stress" not in molecule(rng).to_atoms().info


def test_frame_validation(rng):
    with pytest.raises(ValueError, match="split"):
        molecule(rng, split="training")
    with pytest.raises(ValueError, match="origin"):
        molecule(rng, origin="md")
    with pytest.raises(ValueError, match="forces"):
        LabelledFrame.from_atoms(Atoms("H2"), energy=0.0, forces=np.zeros((3, 3)), split="train", origin="al")
    full = np.arange(9.0).reshape(3, 3)
    frame = LabelledFrame.from_atoms(
        Atoms("H"), 0.0, np.zeros((1, 3)), stress=full, split="train", origin="al"
    )
    assert np.array_equal(frame.stress, [0.0, 4.0, 8.0, 5.0, 2.0, 1.0])


def test_export_extxyz_is_read_back_identically_by_ase(tmp_path, rng):
    frames = [molecule(rng), crystal(rng), molecule(rng, uncertainty=0.5)]
    path = export_extxyz(frames, tmp_path / "train.xyz")
    images = ase.io.read(path, ":")
    assert not list(tmp_path.glob(".train.xyz.*"))  # no temp file left behind
    for frame, atoms in zip(frames, images, strict=True):
        assert atoms.calc is None  # the label exists once, under REF_* only
        assert atoms.info["REF_energy"] == frame.energy
        assert np.array_equal(atoms.arrays["REF_forces"], frame.forces)
        assert np.array_equal(atoms.positions, frame.positions)
        assert np.array_equal(atoms.cell.array, frame.cell)
        assert np.array_equal(atoms.pbc, frame.pbc)
    assert np.array_equal(images[1].info["REF_stress"], frames[1].stress)
    assert "REF_stress" not in images[0].info


def test_import_extxyz_round_trip(tmp_path, rng):
    frames = [molecule(rng), crystal(rng), crystal(rng, split="test", origin="test")]
    back = import_extxyz(export_extxyz(frames, tmp_path / "all.xyz"))
    for a, b in zip(frames, back, strict=True):
        assert_same(a, b)
    relabelled = import_extxyz(tmp_path / "all.xyz", split="train", member=4)
    assert {f.split for f in relabelled} == {"train"} and {f.member for f in relabelled} == {4}


def test_import_extxyz_reads_plain_calculator_labels(tmp_path, rng):
    atoms = bulk("Cu", "fcc", a=3.6, cubic=True)
    forces, stress = rng.normal(size=(4, 3)), rng.normal(size=6)
    atoms.calc = SinglePointCalculator(atoms, energy=-14.5, forces=forces, stress=stress)
    ase.io.write(tmp_path / "plain.xyz", [atoms, atoms], format="extxyz")
    frames = import_extxyz(tmp_path / "plain.xyz", split="train", origin="idg")
    assert len(frames) == 2 and frames[0].energy == -14.5
    assert np.allclose(frames[0].forces, forces, atol=1e-7)
    assert np.allclose(frames[0].stress, stress)
    with pytest.raises(SetupError, match="split"):
        import_extxyz(tmp_path / "plain.xyz", origin="idg")
    (tmp_path / "bad.xyz").write_text("not\nan xyz file\n")
    with pytest.raises(SetupError, match=re.escape(str(tmp_path / "bad.xyz"))):
        import_extxyz(tmp_path / "bad.xyz", split="train", origin="idg")


def test_reference_fingerprint():
    spec = {"kind": "pyscf", "xc": "PBE", "basis": "def2-SVP", "timeout_s": 60.0}
    fp = reference_fingerprint(spec)
    assert len(fp) == 16 and int(fp, 16) >= 0
    assert reference_fingerprint(dict(reversed(spec.items()))) == fp
    assert reference_fingerprint({**spec, "timeout_s": 3600.0, "keep_workdir": True}) == fp
    assert reference_fingerprint({k: v for k, v in spec.items() if k != "timeout_s"}) == fp
    assert reference_fingerprint({**spec, "xc": "B3LYP"}) != fp
    aims = {"kind": "aims", "xc": "pbe", "command": "aims.x"}
    assert reference_fingerprint({**aims, "command": "srun -n 128 aims.x"}) == reference_fingerprint(aims)


def test_overlong_reference_is_refused_before_writing(tmp_path, rng):
    store = DatasetStore.create(tmp_path / "data.h5")
    store.append(molecule(rng))
    with pytest.raises(ValueError, match="reference"):
        store.extend([molecule(rng), molecule(rng, reference="x" * 65)])
    assert len(store) == 1


def test_data_package_stays_import_light():
    code = "import sys, aimspax_like.data; print(sorted({'torch', 'mace', 'parsl'} & set(sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        check=True,
    )
    assert out.stdout.strip() == "[]"


def test_a_held_frame_is_released_durably(tmp_path, rng):
    store = DatasetStore.create(tmp_path / "data.h5")
    store.extend([molecule(rng, split="train", origin="al", trajectory=0, md_step=10),
                  molecule(rng, split="held", origin="al", trajectory=1, md_step=20)])
    assert store.counts()["split"]["held"] == 1
    index = store.index_of("al", 1, 20)
    store.set_split(index, "train")
    again = DatasetStore.open(tmp_path / "data.h5")
    assert [f.split for f in again.frames()] == ["train", "train"]
    assert again.frames()[1].md_step == 20  # nothing else in the row changed
    assert again.frame(1).split == "train" and again.frame(1).md_step == 20
    with pytest.raises(IndexError):
        again.frame(2)
    with pytest.raises(ValueError):
        again.set_split(0, "bogus")
    with pytest.raises(KeyError):
        again.index_of("al", 5, 5)


def _frame(md_step: int = 0, **change: object) -> LabelledFrame:
    atoms = Atoms("H2", positions=[[0, 0, 0], [0.74, 0, 0]])
    fields = {"energy": -1.0, "forces": np.zeros((2, 3)), "split": "train", "origin": "al", "md_step": md_step}
    fields.update(change)
    return LabelledFrame.from_atoms(atoms, **fields)


def test_a_deleted_store_is_never_recreated(tmp_path: Path) -> None:
    """Only the creating writer initialises a store: a file deleted mid-run stops the writer."""
    store = DatasetStore.create(tmp_path / "data.h5")
    store.append(_frame(0))
    (tmp_path / "data.h5").unlink()
    with pytest.raises(SetupError, match="disappeared"):
        store.append(_frame(1))
    with pytest.raises(SetupError, match="disappeared"):
        store.frames()
    assert not (tmp_path / "data.h5").exists()
    with pytest.raises(SetupError, match="not found"):
        DatasetStore(tmp_path / "data.h5").append(_frame(2))
    assert not (tmp_path / "data.h5").exists()


@pytest.mark.parametrize("field", ["energy", "forces", "positions", "stress"])
def test_non_finite_frames_are_refused(tmp_path: Path, field: str) -> None:
    store = DatasetStore.create(tmp_path / "data.h5")
    good = _frame(0, stress=np.zeros(6))
    bad = _frame(1, stress=np.zeros(6))
    value = getattr(bad, field)
    if field == "energy":
        bad.energy = float("nan")
    else:
        value = np.array(value, dtype=float)
        value.flat[0] = np.inf
        setattr(bad, field, value)
    with pytest.raises(ValueError, match=f"non-finite {field}"):
        store.extend([good, bad])
    assert len(store) == 0  # the whole batch is refused before the file is touched
    with pytest.raises(ValueError, match="non-finite"):
        LabelledFrame.from_atoms(Atoms("H", positions=[[0, 0, np.nan]]), energy=0.0, forces=np.zeros((1, 3)),
                                 split="train", origin="al")


def test_atomic_writers_leave_files_readable_as_plain_open_would(tmp_path) -> None:
    """mkstemp's private 0600 must not survive the rename: shared project folders need the
    usual mode (0666 less the umask)."""
    import stat

    from ase.build import molecule

    from aimspax_like.data.xyz import export_extxyz, write_images

    umask = os.umask(0o022)
    try:
        images = write_images(tmp_path / "images.xyz", [molecule("H2O")])
        frame = LabelledFrame.from_atoms(molecule("H2O"), energy=-1.0, forces=np.zeros((3, 3)), split="train",
                                         origin="idg")
        frames = export_extxyz([frame], tmp_path / "frames.xyz")
    finally:
        os.umask(umask)
    for path in (images, frames):
        assert stat.S_IMODE(path.stat().st_mode) == 0o644
