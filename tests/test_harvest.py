"""``aimspax-like harvest``: committee-uncertainty ranking of an MD trajectory's frames.

An untrained two-member committee disagrees most where the geometry is far from anything sane,
so a trajectory of gently rattled clusters with a few squeezed, strongly rattled frames has a
known answer: those frames rank first.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from ase import Atoms
from ase.calculators.emt import EMT
from ase.io import read, write

from aimspax_like.cli import main
from aimspax_like.config import ModelConfig
from aimspax_like.errors import SetupError
from aimspax_like.harvest import (
    INFO_ENERGY_STD,
    INFO_SOURCE,
    INFO_UNCERTAINTY,
    FrameScore,
    load_committee,
    read_trajectory,
    score_frames,
    select,
)
from aimspax_like.models.ensemble import MACEEnsemble, atomic_energies_from_data, average_neighbors, force_scale
from aimspax_like.structures import read_structures

ZS = [29, 79]


def tiny(r_max: float = 4.5, ensemble_size: int = 2) -> ModelConfig:
    """A committee that builds in seconds (as in test_models_training)."""
    return ModelConfig(channels=8, max_L=0, r_max=r_max, num_interactions=2, correlation=2, radial_mlp=[8],
                       max_ell=2, ensemble_size=ensemble_size, device="cpu")


def bipyramid() -> Atoms:
    """Cu5Au2 pentagonal bipyramid with 2.55 A bonds."""
    r = 2.55 / (2 * math.sin(math.pi / 5))
    h = math.sqrt(2.55**2 - r**2)
    ring = [[r * math.cos(2 * math.pi * i / 5), r * math.sin(2 * math.pi * i / 5), 0.0] for i in range(5)]
    return Atoms("Cu5Au2", positions=[*ring, [0, 0, h], [0, 0, -h]])


def build_committee(seeds: list[int], r_max: float = 4.5) -> MACEEnsemble:
    """Untrained members; EMT frames only set the per-element energies and scales."""
    rng = np.random.default_rng(0)
    train = []
    for _ in range(6):
        atoms = bipyramid()
        atoms.positions += rng.normal(scale=0.15, size=atoms.positions.shape)
        atoms.calc = EMT()
        atoms.info["REF_energy"] = atoms.get_potential_energy()
        atoms.arrays["REF_forces"] = atoms.get_forces()
        atoms.calc = None
        train.append(atoms)
    return MACEEnsemble.build(tiny(r_max, len(seeds)), seeds, ZS, atomic_energies_from_data(train, ZS),
                              average_neighbors(train, r_max), force_scale(train))


N_FRAMES = 40
DISTORTED = (5, 6, 22, 33)  # 5 and 6 are neighbours: the separation rule keeps only one of them


def trajectory_frames() -> list[Atoms]:
    rng = np.random.default_rng(1)
    frames = []
    for i in range(N_FRAMES):
        atoms = bipyramid()
        atoms.positions += rng.normal(scale=0.03, size=atoms.positions.shape)
        if i in DISTORTED:
            atoms.positions *= 0.8
            atoms.positions += rng.normal(scale=0.2, size=atoms.positions.shape)
        # What an MD file carries along: energies and forces that are no reference labels.
        atoms.info["REF_energy"] = -1.0
        atoms.arrays["forces"] = np.ones((len(atoms), 3))
        frames.append(atoms)
    return frames


@pytest.fixture(scope="module")
def committee(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run-directory-shaped folder with models/member_{0,1}.model."""
    run = tmp_path_factory.mktemp("run")
    build_committee([0, 1]).save(run / "models")
    return run


@pytest.fixture
def trajectory(tmp_path: Path) -> Path:
    path = tmp_path / "md.xyz"
    write(path, trajectory_frames(), format="extxyz")
    return path


def harvest_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*harvest*"))


def test_distorted_frames_rank_first(committee, trajectory):
    ensemble = load_committee(sorted((committee / "models").glob("member_*.model")))
    scores = score_frames(ensemble, read_trajectory(trajectory), batch=16)
    assert [s.index for s in scores] == list(range(N_FRAMES))
    ranked = select(scores, top=len(DISTORTED), min_separation=0)
    assert {s.index for s in ranked} == set(DISTORTED)
    assert all(s.energy_std_per_atom >= 0 and math.isfinite(s.energy_std_per_atom) for s in scores)
    # batching does not change a frame's score
    again = score_frames(ensemble, read_trajectory(trajectory), batch=7)
    assert [s.uncertainty for s in again] == pytest.approx([s.uncertainty for s in scores], rel=1e-9)


def test_min_separation_is_greedy_on_the_frame_index():
    values = {0: 0.9, 3: 0.95, 9: 0.5, 10: 0.8, 12: 0.7, 25: 0.1}
    scores = [FrameScore(i, v, 0.0) for i, v in values.items()]
    # 3 first; 0 (3 away) dropped; 10 (7 away) dropped with 5, kept with 7; 12 is 2 from 10
    assert [s.index for s in select(scores, top=10, min_separation=5)] == [3, 10, 25]
    assert [s.index for s in select(scores, top=10, min_separation=7)] == [3, 10, 25]
    assert [s.index for s in select(scores, top=10, min_separation=8)] == [3, 12, 25]
    assert [s.index for s in select(scores, top=2, min_separation=0)] == [3, 0]
    assert [s.index for s in select(scores, above=0.6, min_separation=5)] == [3, 10]
    assert select(scores, above=0.99) == []
    nan_first = [FrameScore(1, math.nan, 0.0), *scores]
    assert select(nan_first, top=1, min_separation=0)[0].index == 3  # a blown-up member says nothing


def test_top_writes_unlabelled_decorrelated_frames(committee, trajectory, capsys):
    assert main(["harvest", str(trajectory), "--model", str(committee), "--top", "3"]) == 0
    out = capsys.readouterr().out
    output = trajectory.with_name("md_harvest.xyz")
    frames = read(output, ":")
    indices = [int(a.info[INFO_SOURCE].rsplit("#", 1)[1]) for a in frames]
    assert len(indices) == 3 and {22, 33} < set(indices) and len({5, 6} & set(indices)) == 1
    uncertainties = [a.info[INFO_UNCERTAINTY] for a in frames]
    assert uncertainties == sorted(uncertainties, reverse=True)
    for atoms, index in zip(frames, indices, strict=True):
        assert atoms.info[INFO_SOURCE] == f"{trajectory}#{index}"
        assert atoms.info[INFO_ENERGY_STD] >= 0
        assert atoms.calc is None and "forces" not in atoms.arrays and "REF_energy" not in atoms.info
        assert np.allclose(atoms.positions, read(trajectory, index).positions)
    assert "rank" in out and "frames: 40 read, 3 written" in out and str(output) in out
    # the path that takes unlabelled structure files (system.structures) reads it as is
    assert len(read_structures([output])) == 3


def test_above_threshold_and_index_slice(committee, trajectory, tmp_path, capsys):
    output = tmp_path / "picked.xyz"
    assert main(["harvest", str(trajectory), "--model", *map(str, sorted((committee / "models").glob("*.model"))),
                 "--above", "0.1", "--min-separation", "1", "--output", str(output), "--index", "10:"]) == 0
    out = capsys.readouterr().out
    indices = sorted(int(a.info[INFO_SOURCE].rsplit("#", 1)[1]) for a in read(output, ":"))
    assert indices == [22, 33]  # 5 and 6 lie outside --index 10:; indices are the file's
    assert "frames: 30 read, 2 above 0.1 eV/A, 2 written" in out


def test_refuses_to_overwrite(committee, trajectory, capsys):
    output = trajectory.with_name("md_harvest.xyz")
    output.write_text("keep me\n")
    assert main(["harvest", str(trajectory), "--model", str(committee), "--top", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(output) in err[0] and "--overwrite" in err[0]
    assert output.read_text() == "keep me\n"
    assert main(["harvest", str(trajectory), "--model", str(committee), "--top", "2", "--overwrite"]) == 0
    assert len(read(output, ":")) == 2


@pytest.fixture(scope="module")
def other_cutoff(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A member file with another cutoff: cannot sit in one committee with the others."""
    folder = tmp_path_factory.mktemp("other")
    build_committee([0], r_max=3.5).save(folder)
    return folder / "member_0.model"


def _bad_cases(folder: Path, committee: Path, other: Path) -> list[tuple[list[str], str]]:
    traj = folder / "md.xyz"
    member0 = committee / "models" / "member_0.model"
    (folder / "garbage.xyz").write_text("this is not\na trajectory\n")
    write(folder / "silver.xyz", [*trajectory_frames()[:3], Atoms("Ag2", positions=[[0, 0, 0], [0, 0, 2.6]])])
    (folder / "notamodel.model").write_text("no")
    model = ["--model", str(committee)]
    return [
        ([str(folder / "missing.xyz"), *model, "--top", "2"], "missing.xyz"),
        ([str(folder / "garbage.xyz"), *model, "--top", "2"], "garbage.xyz"),
        ([str(folder / "silver.xyz"), *model, "--top", "2"], "Ag"),
        ([str(traj), "--model", str(member0), str(other), "--top", "2"], "disagree"),
        ([str(traj), "--model", str(member0), str(folder / "notamodel.model"), "--top", "2"], "notamodel.model"),
        ([str(traj), "--model", str(member0), "--top", "2"], "--model"),
        ([str(traj), *model, "--top", "0"], "--top"),
        ([str(traj), *model], "--top/--above"),
        ([str(traj), *model, "--top", "2", "--above", "0.1"], "--top/--above"),
        ([str(traj), *model, "--top", "2", "--index", "a:b"], "--index"),
        ([str(traj), *model, "--top", "2", "--batch", "0"], "--batch"),
    ]


def test_bad_input_is_one_line_exit_2_and_writes_nothing(committee, other_cutoff, trajectory, capsys):
    folder = trajectory.parent
    for argv, named in _bad_cases(folder, committee, other_cutoff):
        before = sorted(p.name for p in folder.iterdir())
        assert main(["harvest", *argv]) == 2, argv
        captured = capsys.readouterr()
        err = captured.err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and named in err[0], (argv, captured.err)
        assert captured.out == ""
        assert sorted(p.name for p in folder.iterdir()) == before, argv
        assert harvest_files(folder) == [], argv


def test_select_checks_its_flags():
    with pytest.raises(SetupError, match="--min-separation"):
        select([], top=1, min_separation=-1)
    with pytest.raises(SetupError, match="--above"):
        select([], above=math.inf)
