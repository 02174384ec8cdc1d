"""The data-efficiency study (workflows/data_efficiency.py), end to end in miniature.

The study's numbers are only as good as its bookkeeping: which frames a data set holds, how many
reference calls they cost, and whether the physical check catches an unphysical label. The pure
parts are pinned to hand-counted values; one run of every part (test sets, MD pool, an engine
campaign, six trainings, the tables) on a 6-atom EMT cluster checks that they fit together.
"""

from __future__ import annotations

import math

import numpy as np
from ase import Atoms
from campaign_helpers import tiny_cluster
from workflow_helpers import load_workflow

from aimspax_like.data import LabelledFrame

study = load_workflow("data_efficiency")

TINY_MODEL = {"channels": 8, "max_L": 0, "r_max": 4.5, "num_interactions": 1, "correlation": 2,
              "radial_mlp": [8], "num_radial_basis": 6, "dtype": "float64", "device": "cpu"}


def _pool(n_frames: int, stride: int) -> list[Atoms]:
    frames = []
    for k in range(1, n_frames + 1):
        atoms = Atoms("Cu2", positions=[[0, 0, 0], [2.5, 0, 0]])
        atoms.info = {"md_step": k * stride, "REF_energy": -1.0}
        frames.append(atoms)
    return frames


def test_uniform_and_random_sets_follow_the_engine_split_and_count_md_steps():
    settings = study.Settings(sizes=[4, 8], seeds=[0], sample_stride=20, random_stride=5)
    assert [study.frames_needed(n, 0.2) for n in (4, 8, 25, 200)] == [4, 9, 31, 249]
    pool = _pool(9 * 4, 5)  # MD steps 5, 10, ..., 180: nine stride-20 frames
    uniform = study.uniform_set(pool, 8, settings)
    assert (len(uniform.train), len(uniform.valid), uniform.calls) == (8, 1, 180)
    assert uniform.valid[0].info["md_step"] == 100  # the 5th frame is the first validation frame
    assert study.uniform_set(pool, 9, settings) is None
    drawn = study.random_set(pool, 8, settings, seed=0)
    assert (len(drawn.train), len(drawn.valid)) == (8, 1)
    assert drawn.calls == max(a.info["md_step"] for a in drawn.train + drawn.valid)


def _frame(origin: str, split: str, md_step: int, created: float) -> LabelledFrame:
    return LabelledFrame(numbers=[29], positions=[[0, 0, 0]], cell=np.zeros((3, 3)), pbc=False, energy=-1.0,
                         forces=[[0, 0, 0]], stress=None, split=split, origin=origin, trajectory=0,
                         md_step=md_step, created=created)


def test_prefix_calls_count_idg_md_steps_al_labels_and_earlier_failures():
    idg = [_frame("idg", "train", 20 * (k + 1), created=k) for k in range(3)]
    al = [_frame("al", "train", 7, created=10.0), _frame("al", "valid", 9, created=12.0)]
    failures = [11.0, 13.0]
    assert study.prefix_calls(idg[:2], 100, failures) == 40  # inside IDG: steps up to its last frame
    assert study.prefix_calls([*idg, al[0]], 100, failures) == 100 + 1  # the failure came later
    assert study.prefix_calls([*idg, *al], 100, failures) == 100 + 2 + 1


def test_the_physical_check_flags_fused_atoms_and_energies_out_of_range():
    frames = [Atoms("Cu2", positions=[[0, 0, 0], [2.5, 0, 0]], info={"REF_energy": e}) for e in (-2.0, -1.0)]
    window = study.energy_window(frames, margin=1.0)
    assert window == (-1.5, 0.0)  # per atom: [-1, -0.5] widened by 0.5 each side
    good = frames[0]
    assert study.physical_problems(good, -2.0, window, 0.7) == []
    fused = good.copy()
    fused.positions[1] = [0.3, 0, 0]
    assert study.physical_problems(fused, -2.0, window, 0.7) == ["fused"]
    assert study.physical_problems(good, -4.0, window, 0.7) == ["energy"]


def test_the_study_runs_end_to_end_on_a_tiny_cluster(tmp_path, parsl_executor):
    system = study.SystemSpec("tiny", tiny_cluster, {"kind": "emt"})
    settings = study.Settings(
        sizes=[4, 8], seeds=[0], test_size=4, patience=2, max_epochs=4, idg_frames_per_member=2,
        sample_stride=5, random_stride=1, equilibration_steps=10, temperature_K=400.0, ensemble_size=2,
        model=dict(TINY_MODEL), training={"batch_size": 4}, al_max_md_steps=300,
        campaign_overrides={"idg": {"intermediate_epochs": 3},
                            "al": {"num_trajectories": 3, "check_every": 2, "warmup": 4}},
    )
    results = study.empty_results()
    study.run_system(system, settings, tmp_path, results, executor=parsl_executor)

    for method in ("uniform", "random", "al"):
        for size in settings.sizes:
            entry = results["runs"][study.run_key("tiny", method, size, 0)]
            assert entry["n_train"] == size
            assert all(math.isfinite(v) for v in entry["force_mae"].values())
            assert entry["calls"] > 0
    assert results["runs"][study.run_key("tiny", "uniform", 4, 0)]["calls"] == 4 * 5  # four frames, every 5th MD step
    assert "tiny|al_campaign|8|0" in results["runs"]

    rows = study.table_equal_size(results, ["tiny"], settings)
    assert [(r[1], r[2]) for r in rows[1:]] == [
        (m, str(n)) for m in ("uniform", "random", "al") for n in (4, 8)] + [("al_campaign", "8")]
    for row in rows[1:]:
        assert all(math.isfinite(float(cell.split(" ± ")[0])) for cell in row[3:7])
    health = results["health"]["tiny|0"]
    assert health["al_labels"] >= 4
    assert 0 <= health["check_failing"] <= health["al_labels"]

    text = study.render(results, ["tiny"], settings)
    assert "Table 2" in text and "Table 3" in text
    # The cached parts are reused: a second pass trains nothing and runs no campaign again.
    trained = {k: v["train_s"] for k, v in results["runs"].items() if "train_s" in v}
    study.run_system(system, settings, tmp_path, results, executor=parsl_executor)
    assert {k: v["train_s"] for k, v in results["runs"].items() if "train_s" in v} == trained
