"""The MACE committee: batched prediction, save/load through mace's own calculator, foundations."""

from __future__ import annotations

import importlib.util
import math

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import bulk
from ase.calculators.emt import EMT

from aimspax_like.config import ModelConfig
from aimspax_like.errors import ConfigError, SetupError
from aimspax_like.models.ensemble import (
    EnsemblePrediction,
    MACEEnsemble,
    atomic_energies_from_data,
    average_neighbors,
    force_scale,
)
from aimspax_like.models.foundation import load_foundation_calculator

TINY = {"channels": 8, "max_L": 1, "r_max": 4.5, "num_interactions": 2, "correlation": 2,
        "radial_mlp": [8], "max_ell": 2, "device": "cpu"}


def bipyramid(symbols: str = "Cu5Au2") -> Atoms:
    """A pentagonal bipyramid with 2.55 A bonds: a compact 7-atom metal cluster."""
    r = 2.55 / (2 * math.sin(math.pi / 5))
    h = math.sqrt(2.55**2 - r**2)
    ring = [[r * math.cos(2 * math.pi * i / 5), r * math.sin(2 * math.pi * i / 5), 0.0] for i in range(5)]
    return Atoms(symbols, positions=[*ring, [0, 0, h], [0, 0, -h]])


def labelled(atoms: Atoms) -> Atoms:
    atoms.calc = EMT()
    atoms.info["REF_energy"] = atoms.get_potential_energy()
    atoms.arrays["REF_forces"] = atoms.get_forces()
    atoms.calc = None
    return atoms


def rattled(n: int, seed: int = 0, stdev: float = 0.15) -> list[Atoms]:
    rng = np.random.default_rng(seed)
    frames = []
    for _ in range(n):
        atoms = bipyramid()
        atoms.positions += rng.normal(scale=stdev, size=atoms.positions.shape)
        frames.append(labelled(atoms))
    return frames


def mixed_systems() -> list[Atoms]:
    """Different sizes, periodic and not, both elements."""
    rng = np.random.default_rng(7)
    cluster = bipyramid()
    cluster.positions += rng.normal(scale=0.1, size=(7, 3))
    crystal = bulk("Cu", "fcc", a=3.6, cubic=True)
    crystal.positions += rng.normal(scale=0.05, size=(4, 3))
    trimer = Atoms("AuCuAu", positions=[[0, 0, 0], [2.5, 0.1, 0], [1.2, 2.2, 0.3]])
    return [cluster, crystal, trimer]


@pytest.fixture(scope="module")
def ensemble() -> MACEEnsemble:
    frames = rattled(6)
    zs = [29, 79]
    return MACEEnsemble.build(
        ModelConfig(**TINY, ensemble_size=3), seeds=[0, 1, 2], atomic_numbers=zs,
        atomic_energies=atomic_energies_from_data(frames, zs),
        avg_num_neighbors=average_neighbors(frames, 4.5), scale=force_scale(frames),
    )


def test_prediction_shapes_and_per_system_views(ensemble):
    systems = mixed_systems()
    pred = ensemble.predict(systems)
    assert isinstance(pred, EnsemblePrediction)
    assert pred.energies.shape == (3, 3)
    assert pred.forces.shape == (3, 14, 3)
    np.testing.assert_array_equal(pred.system_idx, [0] * 7 + [1] * 4 + [2] * 3)
    assert pred.forces_of(1).shape == (3, 4, 3)
    np.testing.assert_array_equal(pred.forces_of(2), pred.forces[:, 11:, :])
    np.testing.assert_allclose(pred.mean_forces, pred.forces.mean(axis=0))
    assert pred.mean_energies.shape == (3,)
    assert np.isfinite(pred.energies).all() and np.isfinite(pred.forces).all()
    with pytest.raises(IndexError):
        pred.forces_of(3)


def test_batched_prediction_equals_one_structure_at_a_time(ensemble):
    systems = mixed_systems()
    batched = ensemble.predict(systems)
    for i, atoms in enumerate(systems):
        alone = ensemble.predict([atoms])
        np.testing.assert_allclose(batched.forces_of(i), alone.forces, rtol=0, atol=1e-10)
        np.testing.assert_allclose(batched.energies[:, i], alone.energies[:, 0], rtol=0, atol=1e-10)


def test_md_graphs_equal_maces_own_pipeline_key_by_key(ensemble):
    """The lean MD path must hand the members exactly what mace's collation would: same edges in
    the same order, same shifts and cells (periodic, partly periodic, not periodic), same dtype."""
    from ase.build import fcc111

    slab = fcc111("Cu", size=(2, 2, 2), vacuum=4.0)  # periodic in x and y only
    slab.positions += np.random.default_rng(3).normal(scale=0.05, size=slab.positions.shape)
    frames = [*mixed_systems(), slab, mixed_systems()[0]]  # a repeated composition reuses its one-hot rows
    lean = ensemble.graphs.md_batch(frames, ensemble.device)
    full = ensemble.graphs.batch(frames, ensemble.device, cache=False).to_dict()
    assert set(lean) <= set(full)
    for key, tensor in lean.items():
        assert tensor.dtype == full[key].dtype, key
        assert torch.equal(tensor, full[key]), key
    assert lean["edge_index"].shape[1] > 0 and not lean["edge_index"].requires_grad
    for member in ensemble.members:  # and the members' outputs agree to the last bit
        ours = member(ensemble.graphs.md_batch(frames, ensemble.device), training=False, compute_force=True)
        theirs = member(full, training=False, compute_force=True)
        assert torch.equal(ours["forces"], theirs["forces"]) and torch.equal(ours["energy"], theirs["energy"])


def test_stage_timer_splits_predict_into_graphs_and_member_calls(ensemble):
    """The benchmark's overhead column rests on this: an attached timer sees every predict call
    in two stages, a detached one sees nothing, and the results do not change."""
    from aimspax_like.models.torch_utils import StageTimer

    systems = mixed_systems()
    plain = ensemble.predict(systems)
    ticks = iter(range(1000))
    timer = StageTimer("cpu", clock=lambda: float(next(ticks)))  # every reading one "second" later
    ensemble.timer = timer
    try:
        timed = ensemble.predict(systems)
        ensemble.predict(systems[:1])
    finally:
        ensemble.timer = None
    ensemble.predict(systems)
    np.testing.assert_array_equal(timed.forces, plain.forces)
    assert dict(timer.calls) == {"graphs": 2, "members": 2}
    assert timer.totals["graphs"] == timer.totals["members"] == 2.0
    timer.reset()
    assert not timer.totals and not timer.calls


def test_members_with_different_seeds_disagree(ensemble):
    forces = ensemble.predict(mixed_systems()).forces
    for a in range(3):
        for b in range(a + 1, 3):
            assert np.abs(forces[a] - forces[b]).max() > 1e-3


def test_forces_are_minus_the_energy_gradient(ensemble):
    atoms = mixed_systems()[1]  # the periodic one: exercises the shift vectors
    forces = ensemble.predict([atoms]).forces[0]
    step = 1e-5
    for atom, axis in [(0, 0), (2, 1), (3, 2)]:
        plus, minus = atoms.copy(), atoms.copy()
        plus.positions[atom, axis] += step
        minus.positions[atom, axis] -= step
        e = ensemble.predict([plus, minus]).energies[0]
        assert forces[atom, axis] == pytest.approx(-(e[0] - e[1]) / (2 * step), abs=1e-6)


def test_build_leaves_default_dtype_alone_and_float32_works():
    before = torch.get_default_dtype()
    cfg = ModelConfig(**{**TINY, "dtype": "float32"})
    ens = MACEEnsemble.build(cfg, [3], [29, 79], {29: 0.0, 79: 0.0}, avg_num_neighbors=6.0)
    assert torch.get_default_dtype() == before
    assert next(ens.members[0].parameters()).dtype == torch.float32
    pred = ens.predict(mixed_systems())
    assert pred.forces.dtype == np.float64 and np.isfinite(pred.forces).all()


def test_save_then_mace_calculator_and_load_reproduce_the_members(ensemble, tmp_path):
    from mace.calculators import MACECalculator

    paths = ensemble.save(tmp_path / "models")
    assert [p.name for p in paths] == ["member_0.model", "member_1.model", "member_2.model"]
    systems = mixed_systems()
    pred = ensemble.predict(systems)
    calc = MACECalculator(model_paths=str(paths[1]), device="cpu", default_dtype="float64")
    for i, atoms in enumerate(systems):
        atoms = atoms.copy()
        atoms.calc = calc
        np.testing.assert_allclose(atoms.get_forces(), pred.forces_of(i)[1], rtol=0, atol=1e-10)
        assert atoms.get_potential_energy() == pytest.approx(pred.energies[1, i], abs=1e-9)
    loaded = MACEEnsemble.load(paths, device="cpu", dtype="float64")
    assert loaded.r_max == ensemble.r_max and list(loaded.z_table.zs) == [29, 79]
    np.testing.assert_allclose(loaded.predict(systems).forces, pred.forces, rtol=0, atol=1e-12)


def test_committee_calculator_returns_the_mean(ensemble):
    atoms = mixed_systems()[0]
    pred = ensemble.predict([atoms])
    atoms.calc = ensemble.to_calculator()
    np.testing.assert_allclose(atoms.get_forces(), pred.mean_forces, atol=1e-12)
    assert atoms.get_potential_energy() == pytest.approx(pred.mean_energies[0], abs=1e-10)
    assert atoms.calc.results["member_forces"].shape == (3, 7, 3)
    atoms.calc = ensemble.to_calculator(member=2)
    np.testing.assert_allclose(atoms.get_forces(), pred.forces[2], atol=1e-12)


def test_unknown_element_is_a_setup_error(ensemble):
    with pytest.raises(SetupError, match=r"\[8\]"):
        ensemble.predict([Atoms("CuO", positions=[[0, 0, 0], [1.8, 0, 0]])])


def test_graph_cache_is_keyed_by_content_and_bounded(ensemble):
    builder = ensemble.graphs
    builder.clear()
    frame = rattled(1, seed=3)[0]
    first = builder.cached(frame)
    assert builder.cached(frame.copy()) is first  # a new object with the same content hits
    moved = frame.copy()
    moved.positions[0, 0] += 0.1
    relabelled = frame.copy()
    relabelled.info["REF_energy"] += 1.0
    assert builder.cached(moved) is not first and builder.cached(relabelled) is not first
    assert float(builder.cached(relabelled).energy) == pytest.approx(frame.info["REF_energy"] + 1.0)
    assert len(builder) == 3
    builder.max_cached = 2
    builder.cached(rattled(1, seed=4)[0])
    assert len(builder) == 2 and builder.cached(frame) is not first  # the oldest was evicted
    builder.max_cached = 20000


# ------------------------------------------------------------------ statistics


def test_atomic_energies_recover_exact_references_and_split_a_single_composition():
    e0 = {29: -1.5, 79: -2.25}
    frames = []
    for symbols in ["Cu5Au2", "Cu3Au4", "Cu7"]:
        atoms = Atoms(symbols)
        atoms.info["REF_energy"] = sum(e0[z] for z in atoms.numbers)
        frames.append(atoms)
    fitted = atomic_energies_from_data(frames, [29, 79])
    assert fitted == pytest.approx(e0)
    # One composition: minimum-norm split, E0_z = n_z E / sum(n^2); one element -> E per atom.
    fitted = atomic_energies_from_data(frames[:1], [29, 79])
    energy = frames[0].info["REF_energy"]
    assert fitted[29] == pytest.approx(5 * energy / 29) and fitted[79] == pytest.approx(2 * energy / 29)
    assert atomic_energies_from_data(frames[2:], [29, 79, 47]) == pytest.approx(
        {29: frames[2].info["REF_energy"] / 7, 79: 0.0, 47: 0.0}
    )


def test_neighbour_count_matches_mace_on_real_graphs(ensemble):
    from mace.modules import compute_avg_num_neighbors

    from aimspax_like.models.graphs import loader

    frames = [*rattled(4, seed=9), mixed_systems()[1]]
    expected = compute_avg_num_neighbors(loader(ensemble.graphs.graphs(frames, cache=False), batch_size=2))
    assert average_neighbors(frames, ensemble.r_max) == pytest.approx(expected)


def test_neighbour_count_and_force_scale():
    line = Atoms("Cu3", positions=[[0, 0, 0], [2.0, 0, 0], [4.0, 0, 0]])
    assert average_neighbors([line], r_max=2.5) == pytest.approx(4 / 3)
    assert average_neighbors([line], r_max=4.5) == pytest.approx(2.0)
    line.arrays["REF_forces"] = np.array([[3.0, 0, 0], [0, 0, 0], [0, -3.0, 0]])
    assert force_scale([line]) == pytest.approx(math.sqrt(18 / 9))
    assert force_scale([Atoms("Cu")]) == 1.0


# ------------------------------------------------------------------ foundation models


def test_local_model_file_is_a_foundation_model(ensemble, tmp_path):
    path = ensemble.save(tmp_path)[0]
    calc = load_foundation_calculator(str(path), device="cpu", dtype="float64")
    atoms = mixed_systems()[1]
    expected = ensemble.predict([atoms]).forces[0]
    atoms.calc = calc
    np.testing.assert_allclose(atoms.get_forces(), expected, rtol=0, atol=1e-10)


def test_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_foundation_calculator(str(tmp_path / "nope.model"))
    assert info.value.key == "idg.foundation_model"


@pytest.mark.parametrize("name", ["mace-mp-0", "mace-mp-0-small", "chgnet", "no-such-model"])
def test_unavailable_named_models_are_config_errors(name, tmp_path, monkeypatch):
    if name == "chgnet" and importlib.util.find_spec("chgnet") is not None:
        pytest.skip("chgnet is installed here (and ships its weights), so it would load")
    # An empty cache: mace_mp must try (and, offline, fail) to download instead of finding a file.
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr("socket.getaddrinfo", _no_network)
    with pytest.raises(ConfigError) as info:
        load_foundation_calculator(name)
    assert info.value.key == "idg.foundation_model"
    assert "\n" not in info.value.message


def _no_network(*args, **kwargs):
    """Stands in for DNS so the test behaves the same with or without internet access."""
    raise OSError("network disabled in tests")


def test_pair_repulsion_pushes_fused_atoms_apart_and_survives_a_save(tmp_path):
    from mace.calculators import MACECalculator

    frames = rattled(4)
    zs = [29, 79]
    kwargs = dict(atomic_numbers=zs, atomic_energies=atomic_energies_from_data(frames, zs),
                  avg_num_neighbors=average_neighbors(frames, 4.5), scale=force_scale(frames))
    plain = MACEEnsemble.build(ModelConfig(**TINY, ensemble_size=1), seeds=[0], **kwargs)
    zbl = MACEEnsemble.build(ModelConfig(**TINY, ensemble_size=1, pair_repulsion=True), seeds=[0], **kwargs)
    dimers = [Atoms("Cu2", positions=[[0, 0, 0], [d, 0, 0]]) for d in (0.4, 2.5)]
    close, far = zbl.predict(dimers).energies[0] - plain.predict(dimers).energies[0]
    assert close > 10.0 and abs(far) < 1e-3  # strong at 0.4 A, nothing left at 2.5 A (cut off)
    # The atoms are pushed apart: the force on atom 1 points along +x.
    assert zbl.predict(dimers[:1]).forces_of(0)[0, 1, 0] > 10.0
    path = zbl.save(tmp_path)[0]
    atoms = dimers[0].copy()
    atoms.calc = MACECalculator(model_paths=str(path), device="cpu", default_dtype="float64")
    assert atoms.get_potential_energy() == pytest.approx(zbl.predict(dimers[:1]).energies[0, 0], abs=1e-8)
