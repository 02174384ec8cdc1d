"""The one campaign YAML, as strict pydantic models.

Every number the aims-PAX paper gives is a *default* here and nowhere else: the moving-average
window (400), c_x (0), the IDG stride (every 20th step), the MD settings (Langevin, 500 K, 1 fs,
friction 0.001/fs), the optimiser (AMSGrad, lr 0.01, EMA 0.99, clip 10), the loss weights
(energy 1, forces 1000), batch size 5, the model (32 channels, max_L 1, r_max 6, 8 Bessel
functions, 2 interactions, correlation 3, radial MLP 3 x 32) and the convergence patience (50).

Unknown keys are forbidden everywhere, so a typo is an error instead of a silently ignored
setting. Scalars are strict (``true`` is no integer, ``"5"`` no number), every float must be finite,
and the YAML reader refuses duplicate keys, so no typo can pass as a different value either.
``load_config`` turns any validation problem, and any file that is no YAML mapping at all, into a
one-line ``ConfigError`` naming the dotted key or the file. ``template_yaml`` renders the models
themselves as the commented template ``aimspax-like init`` writes, so it never misses a key.
"""

from __future__ import annotations

import itertools
import json
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    Field,
    PrivateAttr,
    Strict,
    ValidationError,
    field_validator,
    model_validator,
)

from aimspax_like.cluster_config import (  # noqa: F401  (the cluster section's names, as before)
    BatchCluster,
    ClusterConfig,
    ExecutorConfig,
    LauncherConfig,
    LocalCluster,
    ProviderConfig,
    SlurmCluster,
    walltime_seconds,
)
from aimspax_like.config_base import _Strict
from aimspax_like.errors import ConfigError

_Path = Annotated[Path, Strict(False)]
"""A path field: a YAML string or a ``Path`` (strict mode alone would take only ``Path``)."""


def _finite_tree(value: Any, where: str = "") -> Any:
    """Reject non-finite floats and self-containing containers anywhere in a free-form value.

    ``dict[str, Any]`` fields (extra control.in keys, calculator kwargs) are outside the typed
    schema, so ``allow_inf_nan`` does not see them; an inf there would be written as null.
    """
    _check_finite(value, where, set(), set())
    return value


def _check_finite(value: Any, where: str, open_ids: set[int], done_ids: set[int]) -> None:
    # YAML anchors share one container between several keys: each is checked once (done_ids),
    # and one that holds itself (open_ids, the containers above this one) is refused outright.
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{where or 'value'} must be a finite number, not {value!r}")
    if not isinstance(value, dict | list | tuple) or id(value) in done_ids:
        return
    if id(value) in open_ids:
        raise ValueError(f"{where or 'value'} contains itself")
    open_ids.add(id(value))
    items = value.items() if isinstance(value, dict) else enumerate(value)
    for key, item in items:
        _check_finite(item, f"{where}.{key}" if where else str(key), open_ids, done_ids)
    open_ids.discard(id(value))
    done_ids.add(id(value))


_FreeForm = Annotated[dict[str, Any], AfterValidator(_finite_tree)]


# --------------------------------------------------------------------------- system


class SystemConfig(_Strict):
    """Start structures: files ASE can read, or folders of them (every file inside is read)."""

    structures: list[_Path] = Field(
        min_length=1, examples=[["geometry.xyz"]],
        description="Structure files or folders (relative to the config file).",
    )
    index: str = Field(":", description="ASE index applied to each file (':' = every frame).")
    relax: bool = Field(
        False, description="Relax every start structure with the reference (BFGS) before IDG; the "
        "relaxed structures are kept in state/start_structures.xyz.",
    )
    relax_fmax: float = Field(0.05, gt=0, description="Force convergence of system.relax (eV/A).")
    relax_steps: int = Field(200, ge=1, description="Optimizer steps at most per structure.")

    @field_validator("structures", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return [value] if isinstance(value, str | Path) else value


class ImportSource(_Strict):
    """A labelled dataset a campaign starts from (extended XYZ or an ASE database)."""

    path: _Path = Field(description="Extended XYZ file (.xyz/.extxyz) or ASE database (.db), relative to the "
                        "config file.")
    energy_key: str = Field("REF_energy", description="atoms.info key of the energy; falls back to the "
                            "calculator results ASE read (plain 'energy').")
    forces_key: str = Field("REF_forces", description="atoms.arrays key of the forces (fallback: 'forces').")
    stress_key: str = Field("REF_stress", description="atoms.info key of the stress, where labelled "
                            "(fallback: 'stress').")
    reference: str = Field(
        examples=["campaign", "file", "PBE/tight FHI-aims"],
        description="Which level of theory labelled the frames: 'campaign' (exactly this campaign's "
        "reference settings), 'file' (the frames' own 'reference' key, as this engine exports them), "
        "or a name of your choosing. Frames of another level than the campaign's reference are not "
        "trained on together with its labels unless training.allow_mixed_references is true.",
    )
    valid_ratio: float = Field(0.1, ge=0, lt=1, description="Share of validation frames among frames "
                               "without a 'split' key of train/valid.")
    shared: bool = Field(False, description="false: training frames are dealt to the members in disjoint "
                         "subsets (as IDG frames are); true: every member trains on all of them.")

    @field_validator("reference")
    @classmethod
    def _named(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must name the level of theory ('campaign', 'file' or a name)")
        return value


# --------------------------------------------------------------------------- reference


class _ReferenceBase(_Strict):
    compute_stress: bool = Field(False, description="Also label stress for periodic cells.")
    timeout_s: float | None = Field(None, gt=0, description="Wall limit of one label (seconds); null: none.")
    keep_workdir: bool = Field(False, description="Keep each label's scratch folder on success.")
    warm: bool = Field(
        True, description="Warm label workers: keep the calculator and its SCF density between a worker's "
        "labels (pyscf, xtb, emt, lj; mace and import keep the process) and, with timeout_s, one persistent "
        "child per worker instead of a fresh one per label; false: every label starts cold. aims always "
        "starts fresh; cp2k always keeps its shell, and with false forgets its density before each label.",
    )


class EMTReference(_ReferenceBase):
    kind: Literal["emt"] = "emt"


class LJReference(_ReferenceBase):
    kind: Literal["lj"] = "lj"
    sigma: float = Field(1.0, gt=0)
    epsilon: float = Field(1.0, gt=0)
    rc: float | None = Field(None, gt=0, description="Cutoff; ASE's default 3 sigma when unset.")
    smooth: bool = True


class XTBReference(_ReferenceBase):
    kind: Literal["xtb"] = "xtb"
    method: Literal["GFN2-xTB", "GFN1-xTB", "IPEA1-xTB"] = "GFN2-xTB"
    accuracy: float = Field(1.0, gt=0)
    electronic_temperature: float = Field(300.0, gt=0)
    max_iterations: int = Field(250, gt=0)
    charge: int = 0
    multiplicity: int = Field(1, ge=1)


class PySCFReference(_ReferenceBase):
    kind: Literal["pyscf"] = "pyscf"
    xc: str = Field("PBE", description="Functional; 'HF' runs Hartree-Fock.")
    basis: str = "def2-SVP"
    charge: int = 0
    spin: int = Field(0, ge=0, description="2S, as PySCF counts it.")
    max_cycle: int = Field(100, gt=0)
    conv_tol: float = Field(1e-9, gt=0)


class AimsReference(_ReferenceBase):
    kind: Literal["aims"] = "aims"
    command: str = Field("aims.x", description="Launch command, e.g. 'srun -n 128 aims.x'.")
    species_dir: _Path | None = Field(None, description="FHI-aims species defaults folder.")
    xc: str = "pbe"
    parameters: _FreeForm = Field(default_factory=dict, description="Extra control.in keys.")


class CP2KReference(_ReferenceBase):
    """Periodic DFT with CP2K (Quickstep, GPW) through one persistent cp2k_shell per worker."""

    kind: Literal["cp2k"] = "cp2k"
    command: str = Field(
        "cp2k_shell", description="Command that starts CP2K in shell mode, e.g. 'cp2k.psmp --shell' "
        "or on a cluster 'srun -n 64 cp2k.psmp --shell'; started once per worker and kept running.",
    )
    xc: str = Field("PBE", description="Functional (CP2K XC_FUNCTIONAL section name, e.g. PBE, BLYP).")
    basis_set: str = Field("DZVP-MOLOPT-SR-GTH", description="Basis set name in basis_set_file, for every element.")
    basis_set_file: str = Field("BASIS_MOLOPT", description="Basis set file (in data_dir unless absolute).")
    pseudo_potential: str = Field(
        "auto", description="Pseudopotential name in potential_file; 'auto': GTH-<xc> (GTH-PBE for others).",
    )
    potential_file: str = Field("GTH_POTENTIALS", description="Pseudopotential file (in data_dir unless absolute).")
    cutoff_Ry: float = Field(400.0, gt=0, description="Plane-wave cutoff of the finest grid (Rydberg).")
    kpoints: list[Annotated[int, Field(ge=1)]] | None = Field(
        None, min_length=3, max_length=3, description="Monkhorst-Pack grid [n1, n2, n3]; null: Gamma point only.",
    )
    max_scf: int = Field(50, gt=0, description="SCF iterations at most; past it the label is scf_not_converged.")
    eps_scf: float = Field(1e-6, gt=0, description="SCF convergence threshold (CP2K EPS_SCF).")
    charge: int = 0
    multiplicity: int = Field(1, ge=1, description="2S+1; above 1 runs unrestricted Kohn-Sham.")
    smearing_K: float | None = Field(
        None, gt=0, description="Fermi-Dirac smearing temperature (K) for metals; null: none (gapped systems).",
    )
    data_dir: _Path | None = Field(
        None, description="Folder of the basis and potential files; null: $CP2K_DATA_DIR, beside the "
        "executable, or /usr/share/cp2k.",
    )


class ImportReference(_ReferenceBase):
    kind: Literal["import"] = "import"
    path: str = Field(
        examples=["package.module:Calculator"], description="'module:Name' of an ASE calculator class or factory."
    )
    kwargs: _FreeForm = Field(default_factory=dict, description="Keyword arguments of that class or factory.")

    @field_validator("path")
    @classmethod
    def _module_colon_name(cls, value: str) -> str:
        if value.count(":") != 1 or not all(value.split(":")):
            raise ValueError("must look like 'package.module:Name'")
        return value


class MACEReference(_ReferenceBase):
    """A MACE model file as the reference (aims-PAX's teacher reference).

    For method studies and tests: a campaign that learns a known model costs no DFT, and its
    true errors are known everywhere. The label workers load the file once per process.
    """

    kind: Literal["mace"] = "mace"
    model: _Path = Field(examples=["teacher.model"], description="MACE model file (relative to the config file).")
    device: Literal["cpu", "cuda"] = Field("cpu", description="Where the label workers evaluate the model.")
    dtype: Literal["float32", "float64"] = Field("float64", description="Precision the model is evaluated in.")


ReferenceConfig = Annotated[
    EMTReference | LJReference | XTBReference | PySCFReference | AimsReference | CP2KReference
    | ImportReference | MACEReference,
    Field(discriminator="kind"),
]


class FaultInjection(_Strict):
    """Wraps the reference to inject failures (tests and benchmarks only)."""

    scf_failure: float = Field(0.0, ge=0, le=1)
    crash: float = Field(0.0, ge=0, le=1)
    hang: float = Field(0.0, ge=0, le=1)
    hang_s: float = Field(3600.0, gt=0)
    delay_s: float = Field(0.0, ge=0, description="Extra wall time per label (stands for DFT cost).")


# --------------------------------------------------------------------------- model / training


class ModelConfig(_Strict):
    """MACE architecture of every ensemble member (the paper's small peptide model)."""

    ensemble_size: int = Field(4, ge=1)
    seeds: list[int] | None = Field(None, description="One seed per member; default 0..M-1 + seed.")
    channels: int = Field(32, ge=1)
    max_L: int = Field(1, ge=0, le=3)
    r_max: float = Field(6.0, gt=0)
    num_radial_basis: int = Field(8, ge=1)
    num_cutoff_basis: int = Field(5, ge=1)
    num_interactions: int = Field(2, ge=1)
    correlation: int = Field(3, ge=1)
    radial_mlp: list[int] = Field(default_factory=lambda: [32, 32, 32], min_length=1)
    mlp_irreps: str = "16x0e"
    max_ell: int = Field(3, ge=0, description="Spherical harmonics order of the edges.")
    pair_repulsion: bool = Field(
        False, description="Add MACE's ZBL short-range pair repulsion to every member: atoms repel "
        "at short range even where no training frame was.",
    )
    start_from: list[str] | None = Field(
        None, description="Start every member from existing MACE weights instead of fresh ones: one "
        "model file for all members (fine-tuning, e.g. a foundation model file), one file per member "
        "(an earlier ensemble), or 'mace-mp-0[-small|-medium|-large]' (needs the internet once). The "
        "files' architecture replaces this section's; their E0s are refitted to the data.",
    )
    dtype: Literal["float32", "float64"] = Field("float64", description="float32 is faster on GPUs.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: the GPU when torch sees one.")

    @field_validator("start_from", mode="before")
    @classmethod
    def _one_or_many_models(cls, value: Any) -> Any:
        return [value] if isinstance(value, str | Path) else value

    @model_validator(mode="after")
    def _seeds_match(self) -> ModelConfig:
        if self.seeds is not None and len(self.seeds) != self.ensemble_size:
            raise ValueError(f"seeds has {len(self.seeds)} entries, ensemble_size is {self.ensemble_size}")
        if self.start_from is not None and len(self.start_from) not in (1, self.ensemble_size):
            raise ValueError(f"start_from has {len(self.start_from)} files: give one for all members or one per "
                             f"member ({self.ensemble_size})")
        return self


class TrainingConfig(_Strict):
    """Optimiser and loss of every member."""

    lr: float = Field(0.01, gt=0, description="Learning rate of Adam (AMSGrad unless amsgrad is false).")
    amsgrad: bool = True
    weight_decay: float = Field(5e-7, ge=0)
    ema_decay: float | None = Field(0.99, gt=0, lt=1, description="Weight EMA decay; null disables the EMA.")
    clip_grad: float | None = Field(10.0, gt=0, description="Gradient norm clip; null: none.")
    energy_weight: float = Field(1.0, ge=0)
    forces_weight: float = Field(1000.0, ge=0)
    stress_weight: float = Field(
        1000.0, ge=0, description="Weight of the stress term (eV/A^3 squared) for frames with stress labels "
        "(reference.compute_stress); 0 trains on energies and forces only.",
    )
    batch_size: int = Field(5, ge=1)
    valid_batch_size: int = Field(20, ge=1)
    batched_members: Literal["auto", "on", "off"] = Field(
        "auto", description="Train all members in one batched pass (torch.func over the stacked members). "
        "auto: on a GPU with more than one member; off: one member after another.",
    )
    allow_mixed_references: bool = Field(
        False, description="Train on frames labelled by different references (different reference "
        "fingerprints or declared levels of theory) together; refused by default.",
    )


class ConvergeConfig(_Strict):
    """The final phase: train to convergence with patience on the validation loss.

    ``members: best`` trains the member with the lowest validation loss, ``all`` trains every
    member and keeps the best of them afterwards. Either way every saved member gets its
    per-element reference energies (E0) refitted to the whole training set at the end, also
    the members that were not trained to convergence (one ``e0_refit`` event per member), so
    the saved committee has no per-member energy offsets and its spread means uncertainty.
    """

    enabled: bool = Field(True, description="false: the members stay as AL left them (the test set still runs).")
    members: Literal["best", "all"] = Field(
        "best", description="best: converge the best member; all: every member (the E0s of all are refitted)."
    )
    patience: int = Field(50, ge=1)
    max_epochs: int = Field(1000, ge=1)


# --------------------------------------------------------------------------- sampling


class MDConfig(_Strict):
    """One trajectory's integrator. Trajectories with different blocks still share one batch.

    ``langevin``: BAOAB with ``friction_per_fs``. ``nve``: velocity Verlet. ``bussi``: stochastic
    velocity rescaling, ``nose_hoover``: a deterministic Nose-Hoover chain, both with time
    constant ``taut_fs``. ``npt_crescale`` / ``npt_berendsen`` (periodic cells only): Bussi
    thermostat plus isotropic stochastic cell rescaling (correct volume fluctuations) or its
    noise-free Berendsen limit, towards ``pressure_bar`` with ``taup_fs`` and the
    ``compressibility_per_bar`` estimate (it sets only how fast the volume relaxes).
    ``npt_mtk`` (periodic cells only): Martyna-Tobias-Klein NPT, deterministic, with Nose-Hoover
    chains on particles (``taut_fs``) and barostat (``taup_fs``; it also sets the barostat mass
    as ASE does) and a conserved extended energy; ``cell_flexibility`` picks which cell changes.
    """

    ensemble: Literal[
        "langevin", "nve", "bussi", "nose_hoover", "npt_crescale", "npt_berendsen", "npt_mtk"
    ] = "langevin"
    temperature_K: float = Field(500.0, gt=0)
    timestep_fs: float = Field(1.0, gt=0)
    friction_per_fs: float = Field(0.001, ge=0, description="Langevin friction (langevin).")
    taut_fs: float = Field(100.0, gt=0, description="Thermostat time constant (bussi, nose_hoover, npt_*).")
    pressure_bar: float = Field(0.0, description="Target pressure (npt_*).")
    taup_fs: float = Field(1000.0, gt=0, description="Barostat time constant (npt_*).")
    compressibility_per_bar: float = Field(
        4.6e-5, gt=0, description="Isothermal compressibility estimate (npt_crescale/berendsen); water's by default."
    )
    cell_flexibility: Literal["isotropic", "anisotropic"] = Field(
        "isotropic", description="npt_mtk: isotropic scales the cell uniformly (shape kept); anisotropic "
        "lets all six independent cell components (lengths and angles) fluctuate, without rotation.",
    )


class IDGConfig(_Strict):
    """Initial dataset generation: sample, label every ``stride``-th frame, train, repeat."""

    enabled: bool = Field(True, description="false: no IDG; the members start untrained and AL labels from scratch.")
    sampler: Literal["reference", "foundation"] = Field(
        "reference", description="What drives the IDG MD: the reference itself or idg.foundation_model."
    )
    foundation_model: str | None = Field(
        None, description="'mace-mp-0[-small|-medium|-large]', or a path to a MACE model file."
    )
    stride: int = Field(20, ge=1, description="Label every stride-th MD frame.")
    points_per_member: int = Field(5, ge=1, description="New points per member per round.")
    intermediate_epochs: int = Field(5, ge=1)
    valid_ratio: float = Field(0.1, gt=0, lt=1)
    max_epochs: int = Field(50, ge=1)
    max_set_size: int = Field(100, ge=1, description="Labelled frames (train + valid).")
    desired_acc: float | None = Field(None, gt=0, description="Target valid force MAE (eV/A).")
    desired_acc_scale: float = Field(
        10.0, gt=0, description="IDG stops when the valid force MAE drops below desired_acc x desired_acc_scale."
    )
    probe_steps: int = Field(
        100, ge=0, description="Guarded committee MD steps from the start structures at the AL "
        "temperatures after IDG; IDG goes on while the probe fails (0: no probe).",
    )
    probe_extra_rounds: int = Field(
        10, ge=0, description="IDG rounds allowed past max_epochs while the probe fails (max_set_size still holds).",
    )
    hot_start_factor: float = Field(
        2.0, gt=1, description="Warn when IDG MD of a start structure runs hotter than this x its "
        "target temperature: the structure is far from a minimum (relax it: system.relax).",
    )
    trajectories_per_structure: int | None = Field(
        None, ge=1, description="Reference-driven IDG MD trajectories per start structure, each run in "
        "segments of 'stride' steps on the label workers; null: enough to keep every worker busy "
        "(label workers // start structures, at least 1).",
    )
    converge: bool = Field(
        False, description="Train every member to convergence (converge.patience, converge.max_epochs) "
        "at the end of IDG, before active learning: a stronger initial committee explores less wildly.",
    )
    md: MDConfig = Field(default_factory=MDConfig)

    @model_validator(mode="after")
    def _foundation_named(self) -> IDGConfig:
        if self.sampler == "foundation" and not self.foundation_model:
            raise ValueError("sampler 'foundation' needs foundation_model")
        return self


class LabelFailurePolicy(_Strict):
    """What happens to a failed label, in every phase that labels (IDG, AL, the test set).

    A retry sends the same frame again (a fresh scratch folder, a fresh fault draw): a crash is
    often the node, not the geometry. A non-converged SCF is never retried (the same geometry
    with the same settings fails again), and a timed-out label only when asked (each try costs
    ``reference.timeout_s``). A label whose tries are used up is discarded (in AL its trajectory
    restarts from its checkpoint geometry). Every failed try is a ``label_failed`` event. A run
    of ``max_consecutive`` failed tries in a row means the reference itself is broken: the
    campaign saves its state and stops (exit code 3) instead of discarding label after label.
    """

    crashed_retries: int = Field(1, ge=0, description="Tries after a crash before discarding.")
    timed_out_retries: int = Field(0, ge=0, description="Tries after a timeout before discarding.")
    max_consecutive: int | None = Field(
        10, ge=1, description="Failed tries in a row (any phase) that stop the campaign; null: never stop."
    )


class GuardsConfig(_Strict):
    """Physical sanity checks on every AL MD step (``aimspax_like.guards``), on by default.

    A frame that fails a guard is never labelled and never enters Eq. 2's window: its trajectory
    restarts from its checkpoint geometry with fresh velocities (an ``md_unstable`` event). Limits
    follow the system's own chemistry: distances in units of covalent-radius sums, bonds as
    multiples of their start length, the temperature as a multiple of the target.
    """

    enabled: bool = Field(True, description="false keeps only the non-finite check.")
    min_distance_factor: float = Field(
        0.6, gt=0, lt=1, description="Any two atoms closer than this x their covalent-radius sum fail."
    )
    topology: Literal["auto", "on", "off"] = Field(
        "auto", description="Molecular topology checks; auto: on when the start structure has bonds "
        "between non-metal atoms.",
    )
    bond_stretch_factor: float = Field(
        1.5, gt=1, description="A start bond longer than this x its start length fails (topology)."
    )
    bond_compress_factor: float = Field(
        0.75, gt=0, lt=1, description="A start bond shorter than this x its start length fails (topology)."
    )
    nonbonded_factor: float = Field(
        1.2, gt=0, description="Non-metal atoms not bonded at the start closer than this x their "
        "covalent-radius sum fail (a new bond; topology).",
    )
    temperature_factor: float = Field(3.0, gt=1, description="Kinetic temperature above this x the target fails.")
    volume_factor: float = Field(1.5, gt=1, description="Periodic cells: volume outside [1/f, f] x start fails.")
    energy_outlier: float | None = Field(
        6.0, gt=0, description="A label whose energy per atom lies more than this many spreads above "
        "the IDG reference frames (same composition) is stored as 'held', kept out of training until an "
        "accepted label lands within one spread of it, and rewinds its trajectory; frames the committee "
        "already places past that bound are not labelled. null switches this off.",
    )
    trust_factor: float | None = Field(
        None, gt=1, description="DP-GEN's upper trust bound: a frame whose uncertainty exceeds this x "
        "the threshold is not labelled (outside the region where a label helps) and its trajectory "
        "rewinds; null: every frame above the threshold is labelled.",
    )

    @field_validator("topology", mode="before")
    @classmethod
    def _yaml_on_off(cls, value: Any) -> Any:
        # YAML 1.1 reads a bare on/off as a boolean; 'topology: off' means the word.
        return {True: "on", False: "off"}.get(value, value) if isinstance(value, bool) else value


class RoundsConfig(_Strict):
    """What one active-learning training round trains each member on.

    ``full`` (the paper's continual learning): every round is a pass over the member's whole
    training set, so a campaign's training cost grows with the square of its labels. ``replay``
    bounds a round: the new points (frames that have not yet had ``al.max_epochs_per_point``
    epochs) plus ``replay_size`` earlier frames drawn afresh each round, and a full pass every
    ``full_every``-th round so that no frame is forgotten for long. ``replay_weighting: error``
    draws earlier frames with a probability that grows with the member's force error on them
    (measured at each full pass), half of it uniform so that no frame is starved.
    """

    mode: Literal["full", "replay"] = Field(
        "full", description="full: every round passes over the whole training set; replay: new points "
        "plus a replay sample, a full pass every full_every rounds.",
    )
    replay_size: int = Field(16, ge=1, description="Earlier training frames replayed per member and round (replay).")
    replay_weighting: Literal["uniform", "error"] = Field(
        "uniform", description="uniform, or error: earlier frames drawn by the member's force error on them.",
    )
    full_every: int = Field(8, ge=1, description="Every full_every-th AL round is a full pass (replay).")


# References that label periodic cells only: their substructures must be periodic boxes.
PERIODIC_ONLY_REFERENCES = frozenset({"cp2k"})


class SubstructureConfig(_Strict):
    """Label the uncertain substructures of a large frame instead of the frame (IDEAL's scheme).

    A frame of at least ``min_atoms`` atoms that Eq. 1 sends to the reference is not labelled
    whole: the atoms whose own Eq. 1 term exceeds ``atom_threshold`` (default: the AL threshold)
    are grouped (atoms within ``group_radius`` of the most uncertain one share a piece; at most
    ``max_per_frame`` pieces), and around each group's centre a piece is carved: a core of every
    atom within ``core_radius`` of it, whose forces become labels, and a buffer of
    ``buffer`` more angstroms, whose forces do not. Each piece is labelled on its own, stored with
    its parent frame, core mask and parent atom indices, and trains on its core forces only.
    """

    enabled: bool = Field(False, description="true: large frames are labelled as substructures.")
    min_atoms: int = Field(200, ge=1, description="Frames with fewer atoms are labelled whole.")
    core_radius: float | None = Field(
        None, gt=0, description="A; atoms this close to an uncertain atom are the core (their forces train). "
        "null: the model's receptive field, model.r_max x model.num_interactions.",
    )
    buffer: float = Field(
        6.0, ge=0, description="A of buffer shell around the core; its atoms give the core its neighbours and "
        "their forces are not used. Measure what your reference needs: workflows/ideal_locality.py.",
    )
    group_radius: float | None = Field(
        None, ge=0, description="A; uncertain atoms this close to a piece's centre share it (at most core_radius, "
        "so they are in its core). null: core_radius.",
    )
    max_per_frame: int = Field(2, ge=1, description="Pieces carved from one frame at most (most uncertain first).")
    atom_threshold: float | None = Field(
        None, gt=0, description="Per-atom uncertainty (eV/A, Eq. 1's term) marking an atom uncertain; "
        "null: the AL threshold at the time of the check.",
    )
    box: Literal["auto", "vacuum", "periodic"] = Field(
        "auto", description="vacuum: the piece is a cluster (molecules, clusters, surfaces); periodic: a "
        "hexahedral box cut from a bulk frame, periodic itself; auto: periodic when the frame is periodic "
        "in all three directions and the box fits its minimum image, else vacuum.",
    )
    crop_tries: int = Field(
        32, ge=1, description="Random crop boundaries tried for a periodic box (no atoms too close across "
        "its faces, stoichiometry closest to the frame's).",
    )
    cap_hydrogen: bool = Field(
        False, description="Vacuum pieces: put a hydrogen on every covalent bond the carving cut (molecular "
        "systems); the caps are buffer atoms.",
    )
    relax_buffer_steps: int = Field(
        0, ge=0, description="Steps of gradient descent of the committee's disagreement on the buffer atoms "
        "(core frozen) before labelling: IDEAL's in-distribution embedding. 0: off.",
    )
    relax_buffer_max_step: float = Field(0.05, gt=0, description="A; largest move of a buffer atom per step.")

    @model_validator(mode="after")
    def _group_inside_core(self) -> SubstructureConfig:
        if self.group_radius is not None and self.core_radius is not None and self.group_radius > self.core_radius:
            raise ValueError(f"group_radius ({self.group_radius:g} A) must not exceed core_radius "
                             f"({self.core_radius:g} A): a grouped atom outside the core would not be labelled")
        return self


class ALConfig(_Strict):
    """Parallel active learning (Eq. 1, Eq. 2 and the per-trajectory state machine)."""

    enabled: bool = Field(True, description="false: straight from IDG to converge.")
    mode: Literal["serial", "parallel"] = Field(
        "parallel", description="serial: everything waits for each label; parallel: the trajectories run on."
    )
    num_trajectories: int = Field(4, ge=1)
    check_every: int = Field(10, ge=1, description="MD steps between uncertainty checks.")
    window: int = Field(400, gt=0, description="Moving-average window N of Eq. 2.")
    warmup: int = Field(10, ge=1, description="Uncertainties seen before the threshold is finite.")
    c_x: float = Field(0.0, gt=-1, description="Threshold = (1 + c_x) x the moving average of Eq. 2.")
    freeze_threshold_at: int | None = Field(
        None, ge=1, description="Training-set size that freezes the threshold; null: never frozen."
    )
    valid_ratio: float = Field(0.1, gt=0, lt=1)
    intermediate_epochs: int = Field(1, ge=1)
    max_epochs_per_point: int = Field(
        2, ge=1, description="Epochs per new point; also the epochs without improvement before an optimizer reset."
    )
    rounds: RoundsConfig = Field(default_factory=RoundsConfig)
    max_train_set_size: int = Field(200, ge=1)
    train_set_counts: Literal["shared", "per_member"] = Field(
        "shared", description="What max_train_set_size counts. shared: the shared training set, IDG "
        "frames of every member included; per_member (aims-PAX's rule): each member's own IDG training "
        "frames plus the shared AL ones, and AL stops when the largest member's count reaches the budget.",
    )
    desired_acc: float | None = Field(
        None, gt=0, description="Stop AL when the valid force MAE (eV/A) drops below this; null: never."
    )
    max_md_steps: int = Field(10000, ge=1, description="MD steps per trajectory.")
    max_labels_in_flight: int | None = Field(None, ge=1, description="Default: one per trajectory.")
    while_labelling: Literal["wait", "continue"] = Field(
        "wait",
        description="wait: the paper's scheme (a trajectory waits for its label, then trains); "
        "continue: it samples on while its labels run and training rounds interleave with sampling.",
    )
    labels_per_trajectory: int = Field(1, ge=1, description="Labels in flight per trajectory ('continue').")
    stress_uncertainty: float | None = Field(
        None, gt=0, description="Also label a checked frame of an NPT trajectory whose committee stress "
        "disagreement (largest member standard deviation of a stress component, eV/A^3; 0.001 eV/A^3 = "
        "0.16 GPa) exceeds this, whatever Eq. 1 says; null: Eq. 1 alone decides.",
    )
    analysis_every: int | None = Field(
        None, ge=1, description="Ground-truth analysis points: label every trajectory's frame at each "
        "analysis_every-th MD step whatever its uncertainty, stored with origin 'analysis', never trained "
        "on, to record the true max-atom force error next to Eq. 1's uncertainty (the report's "
        "uncertainty-error figures); costs one extra reference call per point. null: none.",
    )
    failures: LabelFailurePolicy = Field(default_factory=LabelFailurePolicy)
    guards: GuardsConfig = Field(default_factory=GuardsConfig)
    substructures: SubstructureConfig = Field(default_factory=SubstructureConfig)
    md: MDConfig | list[MDConfig] = Field(
        default_factory=MDConfig,
        description="One block for every trajectory, or a list with one block per trajectory (mixed ensembles "
        "share a batch).",
    )

    @model_validator(mode="after")
    def _md_per_trajectory(self) -> ALConfig:
        if isinstance(self.md, list) and len(self.md) != self.num_trajectories:
            raise ValueError(f"md has {len(self.md)} blocks for {self.num_trajectories} trajectories")
        return self

    @model_validator(mode="after")
    def _several_labels_need_continue(self) -> ALConfig:
        if self.labels_per_trajectory > 1 and self.while_labelling == "wait":
            raise ValueError("labels_per_trajectory > 1 needs while_labelling: continue")
        return self

    def md_for(self, trajectory: int) -> MDConfig:
        return self.md[trajectory] if isinstance(self.md, list) else self.md


class TestSetConfig(_Strict):
    """Held-out frames sampled at the end, never by the model under test, to report its error.

    MD runs at each of ``temperatures_K`` (default: the AL temperatures plus one 1.4 times the
    highest of them), ``size`` frames per temperature, every ``stride``-th step. ``sampler:
    reference`` drives the MD with the reference itself in the driver process (the frames keep
    the reference's own energy and forces); ``foundation`` drives it with ``idg.foundation_model``
    and the reference labels the frames on the label workers; ``auto`` follows ``idg.sampler``.
    ``md`` sets the integrator; its ``temperature_K`` is replaced by each temperature in turn.
    """

    size: int = Field(20, ge=0, description="Frames per temperature; 0 disables the test set.")
    stride: int = Field(20, ge=1)
    sampler: Literal["auto", "reference", "foundation"] = Field(
        "auto", description="What drives the test MD; auto: the kind of idg.sampler."
    )
    temperatures_K: list[Annotated[float, Field(gt=0)]] | None = Field(
        None, min_length=1,
        description="Test MD temperatures; null: the AL temperatures plus 1.4 x the highest of them.",
    )
    md: MDConfig = Field(
        default_factory=MDConfig, description="Integrator of the test MD (temperature_K is replaced per temperature)."
    )


class OTFTriggerConfig(_Strict):
    """When the on-the-fly run asks the reference instead of trusting the committee.

    ``measure: energy`` is FALCON's energy disagreement (standard deviation of the members' total
    energies, per atom with ``energy_per_atom``); ``forces`` is Eq. 1. ``threshold`` is a fixed
    value on that measure (FALCON's epsilon) or ``moving_average`` (Eq. 2 with ``window``,
    ``c_x`` and ``warmup``, fed only by the steps the committee answered).
    """

    measure: Literal["energy", "forces"] = Field(
        "energy", description="energy: spread of the members' energies (FALCON); forces: Eq. 1 (eV/A).",
    )
    threshold: float | Literal["moving_average"] = Field(
        0.1, description="Fixed trigger on the measure (eV, eV/atom with energy_per_atom, or eV/A), or "
        "moving_average (Eq. 2).",
    )
    energy_per_atom: bool = Field(False, description="measure energy: divide the spread by the atom count.")
    window: int = Field(400, ge=1, description="moving_average: window N of Eq. 2.")
    c_x: float = Field(0.0, gt=-1, description="moving_average: threshold = (1 + c_x) x the average.")
    warmup: int = Field(10, ge=1, description="moving_average: steps seen before the threshold is finite.")
    min_train: int = Field(
        0, ge=0, description="Label every step while the committee holds fewer training frames than this.",
    )
    calibrate: bool = Field(
        False, description="Scale the uncertainty by the committee's measured error/uncertainty ratio at its "
        "latest labels (median, at least 1), so a fixed threshold bounds the expected error rather than the "
        "members' disagreement.",
    )

    @model_validator(mode="after")
    def _calibrate_needs_a_fixed_threshold(self) -> OTFTriggerConfig:
        if self.calibrate and self.threshold == "moving_average":
            raise ValueError("calibrate needs a fixed threshold")
        return self

    @field_validator("threshold", mode="before")
    @classmethod
    def _number_or_moving_average(cls, value: Any) -> Any:
        if isinstance(value, str) and value != "moving_average":
            raise ValueError(f"must be a number or 'moving_average', got {value!r}")
        return value

    @field_validator("threshold")
    @classmethod
    def _positive(cls, value: float | str) -> float | str:
        if not isinstance(value, str) and not value > 0:
            raise ValueError(f"a fixed threshold must be positive, got {value}")
        return value


class OTFStartConfig(_Strict):
    """The committee an on-the-fly run starts from.

    ``models``: member files, or one run directory (its ``models/member_*.model``; its labelled
    frames are copied into this run's dataset so the committee keeps training on them). Without
    ``models``, a fresh committee is fitted on ``frames`` reference labels of the first start
    structure: ``relax`` (FALCON's start) relaxes a copy rattled by ``rattle_A`` with the
    reference and labels frames spread along that path; ``rattle`` labels the structure and
    rattled copies of it.
    """

    models: list[_Path] | None = Field(
        None, description="Member model files or one run directory; null: a fresh committee.",
    )
    frames: int = Field(5, ge=1, description="Reference frames a fresh committee is fitted on.")
    source: Literal["relax", "rattle"] = Field("relax", description="Where a fresh committee's frames come from.")
    rattle_A: float = Field(0.05, ge=0, description="Standard deviation of the displacements (A).")
    epochs: int = Field(30, ge=0, description="Epochs the fresh committee is fitted before the MD starts.")


class OTFConfig(_Strict):
    """An on-the-fly MD run (``aimspax-like otf``): the committee drives the MD and learns where unsure.

    The first start structure runs ``steps`` MD steps of ``md``. ``temperature_ramp`` (pairs of
    [MD step, K], linear in between, held after the last) replaces ``md.temperature_K`` when set.
    Each label trains the members ``epochs_per_label`` epochs on the rounds ``rounds`` plans.
    """

    steps: int = Field(10000, ge=1, description="MD steps of the run.")
    md: MDConfig = Field(default_factory=lambda: MDConfig(temperature_K=300.0))
    temperature_ramp: list[Annotated[list[float], Field(min_length=2, max_length=2)]] | None = Field(
        None, min_length=1, description="[[step, K], ...]: the thermostat target, linear between points, held "
        "after the last; null: md.temperature_K throughout.",
    )
    trigger: OTFTriggerConfig = Field(default_factory=OTFTriggerConfig)
    start: OTFStartConfig = Field(default_factory=OTFStartConfig)
    epochs_per_label: int = Field(2, ge=1, description="Training epochs after each label.")
    valid_ratio: float = Field(0.1, ge=0, lt=1, description="Share of labels kept for validation.")
    rounds: RoundsConfig = Field(
        default_factory=lambda: RoundsConfig(mode="replay"),
        description="What each training round covers; replay keeps the cost per label bounded.",
    )
    max_failures: int = Field(
        5, ge=1, description="Failed labels in a row (each rewinds the MD) before the run stops.",
    )
    write_every: int = Field(10, ge=1, description="MD steps between frames written to otf/trajectory.xyz.")
    checkpoint_every: int = Field(200, ge=1, description="MD steps between checkpoints (also after every label).")
    log_every: int = Field(50, ge=1, description="MD steps between otf_step events (labels are always logged).")
    validate_frames: int = Field(
        50, ge=0, description="Written trajectory frames the reference recomputes at the end for the report's "
        "errors (extra reference calls, never trained on); 0: none.",
    )
    substructures: SubstructureConfig = Field(
        default_factory=SubstructureConfig, description="Label large frames as substructures (as al.substructures; "
        "a labelled call then answers with the committee retrained on the pieces).",
    )

    @field_validator("temperature_ramp")
    @classmethod
    def _ramp_in_order(cls, value: list[list[float]] | None) -> list[list[float]] | None:
        if value is None:
            return value
        if any(step < 0 or kelvin <= 0 for step, kelvin in value):
            raise ValueError("temperature_ramp needs [step >= 0, K > 0] pairs")
        if any(b[0] <= a[0] for a, b in itertools.pairwise(value)):
            raise ValueError("temperature_ramp steps must increase")
        return value

    def temperature_at(self, step: int) -> float:
        """The thermostat target at an MD step."""
        if not self.temperature_ramp:
            return self.md.temperature_K
        points = self.temperature_ramp
        if step <= points[0][0]:
            return float(points[0][1])
        for (s0, t0), (s1, t1) in itertools.pairwise(points):
            if step <= s1:
                return float(t0 + (t1 - t0) * (step - s0) / (s1 - s0))
        return float(points[-1][1])


class OutputConfig(_Strict):
    """Where the run directory goes."""

    directory: _Path = Field(Path("runs/campaign"), description="Run directory (the CLI's --output overrides it).")
    export_xyz: bool = Field(
        True, description="Also write the train, valid and test frames as extended XYZ (data/*.xyz)."
    )


_BLOCK_START_S = 60
"""Seconds a block's walltime must leave beyond one label: worker start-up and staging."""


class CampaignConfig(_Strict):
    system: SystemConfig
    import_data: list[ImportSource] = Field(
        default_factory=list, description="Labelled datasets to start from, stored with origin 'import' "
        "before IDG (which then adds to them, or is switched off).",
    )
    reference: ReferenceConfig = Field(description="Who labels the frames.")
    faults: FaultInjection | None = Field(None, description="Failure injection (tests and benchmarks); null: off.")
    model: ModelConfig = Field(default_factory=ModelConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    idg: IDGConfig = Field(default_factory=IDGConfig)
    al: ALConfig = Field(default_factory=ALConfig)
    converge: ConvergeConfig = Field(default_factory=ConvergeConfig)
    test_set: TestSetConfig = Field(default_factory=TestSetConfig)
    otf: OTFConfig = Field(
        default_factory=OTFConfig, description="The on-the-fly MD run of 'aimspax-like otf' (campaigns ignore it).",
    )
    cluster: ClusterConfig = Field(default_factory=LocalCluster, description="Where the labels run.")
    output: OutputConfig = Field(default_factory=OutputConfig)
    seed: int = Field(0, description="Base seed; member k gets seed + k unless model.seeds is set.")
    site: str | None = Field(
        None, description="Site profile (a name or a file) with this machine's settings; its values are "
        "filled in when the file is read and recorded in the run's site.yaml, so the run's campaign.yaml "
        "holds them and says null here.",
    )
    _site_record: dict[str, Any] | None = PrivateAttr(None)

    @property
    def site_record(self) -> dict[str, Any] | None:
        """The site profile this config was read with: name, file and the values it set."""
        return self._site_record

    @model_validator(mode="after")
    def _labels_fit_in_a_block(self) -> CampaignConfig:
        """A label's time limit must fit in a block's walltime, with a minute for the worker to
        start: otherwise the scheduler, not the engine, ends every long label, and the label is
        retried in another block that ends it the same way."""
        timeout_s = self.reference.timeout_s
        if timeout_s and isinstance(self.cluster, BatchCluster):
            walltime = self.cluster.provider.walltime
            if timeout_s + _BLOCK_START_S > walltime_seconds(walltime):
                raise ConfigError("reference.timeout_s", f"{timeout_s:g} s + {_BLOCK_START_S} s to start a "
                                  f"worker exceeds cluster.provider.walltime ({walltime}); lower the one or "
                                  "raise the other")
        return self

    @model_validator(mode="after")
    def _pieces_the_reference_can_label(self) -> CampaignConfig:
        """A reference that labels periodic cells only (CP2K here) cannot label a piece in vacuum."""
        if self.reference.kind in PERIODIC_ONLY_REFERENCES:
            for key, section in (("al", self.al.substructures), ("otf", self.otf.substructures)):
                if section.enabled and section.box == "vacuum":
                    raise ConfigError(f"{key}.substructures.box", f"the {self.reference.kind} reference labels "
                                      "periodic cells only: use box: periodic (or auto) for its pieces")
        return self

    def member_seeds(self) -> list[int]:
        if self.model.seeds is not None:
            return list(self.model.seeds)
        return [self.seed + k for k in range(self.model.ensemble_size)]

    def resolved_yaml(self) -> str:
        """Every setting, defaults included, as the YAML saved into the run directory.

        Written with the config reader's own resolvers, so a string that reader would take for a
        number (``'1e-5'``) is quoted and reads back as the same string.
        """
        return yaml.dump(json.loads(self.model_dump_json()), Dumper=_ConfigDumper, sort_keys=False)


# --------------------------------------------------------------------------- YAML reading

# PyYAML follows YAML 1.1, where a float needs a dot and a signed exponent: '1e-9' and '1e400'
# are strings there. Config authors mean numbers (YAML 1.2 agrees), and strict validation refuses
# strings for numbers, so the reader and the writer of configs both resolve exponent floats.
_EXPONENT_FLOAT = re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9][0-9_]*)[eE][-+]?[0-9]+$")
_FLOAT_TAG = "tag:yaml.org,2002:float"
_MERGE_TAG = "tag:yaml.org,2002:merge"
_MAX_CONFIG_BYTES = 16 * 1024 * 1024


class _KeyProblem(yaml.YAMLError):
    """A problem of the YAML text itself at a known key (a key given twice)."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key
        self.message = message


class _ConfigLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key given twice in one mapping is an error.

    PyYAML silently keeps the last of two equal keys, so a second ``reference:`` section or a
    repeated ``seed`` would override the first without a word. The dotted path of every mapping
    is indexed before construction so that the error names the key the way validation errors do.
    Keys merged in with ``<<: *anchor`` may be overridden, as YAML intends.
    """

    def construct_document(self, node: yaml.Node) -> Any:
        self._paths: dict[int, tuple[str, ...]] = {}
        self._index(node, (), set())
        return super().construct_document(node)

    def _index(self, node: yaml.Node, path: tuple[str, ...], seen: set[int]) -> None:
        if id(node) in seen:  # an alias: indexed where its anchor is
            return
        seen.add(id(node))
        if isinstance(node, yaml.MappingNode):
            self._paths[id(node)] = path
            for key, value in node.value:
                self._index(value, (*path, key.value if isinstance(key, yaml.ScalarNode) else "?"), seen)
        elif isinstance(node, yaml.SequenceNode):
            for number, item in enumerate(node.value):
                self._index(item, (*path, str(number)), seen)

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        if isinstance(node, yaml.MappingNode):
            first_line: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == _MERGE_TAG:
                    continue
                key = self.construct_object(key_node, deep=True)
                line = key_node.start_mark.line + 1
                try:
                    earlier = first_line.get(key)
                except TypeError:  # an unhashable key: the base class reports it
                    continue
                if earlier is not None:
                    dotted = ".".join((*self._paths.get(id(node), ()), str(key)))
                    raise _KeyProblem(dotted, f"duplicate key at line {line} (first given at line {earlier})")
                first_line[key] = line
        return super().construct_mapping(node, deep=deep)


class _ConfigDumper(yaml.SafeDumper):
    """PyYAML's safe dumper with the reader's float resolver, so it quotes strings like '1e-5'."""


for _resolving in (_ConfigLoader, _ConfigDumper):
    _resolving.add_implicit_resolver(_FLOAT_TAG, _EXPONENT_FLOAT, list("-+.0123456789"))


def parse_yaml(text: str) -> Any:
    """YAML text read the way config files are: a key given twice is an error, ``1e-9`` a float.

    For settings that come from elsewhere than a config file (``key=value`` overrides on a
    command line) so that they mean what they would mean in the file. Raises ``yaml.YAMLError``.
    """
    return yaml.load(text, Loader=_ConfigLoader)  # a SafeLoader subclass: builds no Python objects


def dotted_settings(items: Sequence[str]) -> dict[str, Any]:
    """``["al.guards.energy_outlier=12"]`` -> ``{"al": {"guards": {"energy_outlier": 12}}}``: settings
    given as dotted keys with YAML values (``parse_yaml``), as a nested dict to merge into a config."""
    out: dict[str, Any] = {}
    for item in items:
        key, _, value = item.partition("=")
        node = out
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = parse_yaml(value)
    return out


def merge_settings(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``extra`` merged in, nested dicts key by key (``extra`` wins); neither is changed."""
    out = dict(base)
    for key, value in extra.items():
        both = isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = merge_settings(out[key], value) if both else value
    return out


def read_yaml(path: Path) -> Any:
    """The one YAML document in a config file; a file that holds none is a ``ConfigError``.

    A config path can point at anything: a folder, a structure file, a gzip archive, an empty
    file. Each gets one line naming the file instead of a decoder's or the parser's traceback.
    """
    name = str(path)
    if not path.exists():
        raise ConfigError(name, "config file not found")
    if path.is_dir():
        raise ConfigError(name, "is a folder, not a config file")
    if not path.is_file():
        raise ConfigError(name, "not a regular file")
    try:
        with path.open("rb") as handle:
            raw = handle.read(_MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise ConfigError(name, f"cannot be read ({exc.strerror or exc.__class__.__name__})") from None
    if len(raw) > _MAX_CONFIG_BYTES:
        raise ConfigError(name, f"larger than {_MAX_CONFIG_BYTES // 2**20} MiB; not a campaign YAML")
    if not raw.strip():
        raise ConfigError(name, "the file is empty")
    if b"\0" in raw:
        raise ConfigError(name, "a binary file, not a campaign YAML")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(name, f"not UTF-8 text (byte {exc.start}); not a campaign YAML") from None
    try:
        return parse_yaml(text)
    except _KeyProblem as exc:
        raise ConfigError(exc.key, f"{exc.message} of {name}") from None
    except yaml.MarkedYAMLError as exc:
        where = f" at line {exc.problem_mark.line + 1}" if exc.problem_mark is not None else ""
        raise ConfigError(name, f"not valid YAML: {_one_line(exc.problem or exc.context)}{where}") from None
    except yaml.YAMLError as exc:  # the reader: a control character that is no text
        raise ConfigError(name, f"not valid YAML: {_one_line(str(exc))}") from None
    except RecursionError:
        raise ConfigError(name, "not valid YAML: nested too deeply") from None


def _one_line(text: Any, limit: int = 160) -> str:
    """``text`` squeezed onto one line of at most ``limit`` characters (the CLI prints one line)."""
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def _dotted(loc: tuple[Any, ...]) -> str:
    # Drop pydantic's union-tag segments (e.g. 'xtb') that are not keys the user wrote.
    parts = [str(p) for p in loc if not (isinstance(p, str) and p in _UNION_TAGS)]
    return ".".join(parts) or "<root>"


_UNION_TAGS = {"emt", "lj", "xtb", "pyscf", "aims", "cp2k", "import", "mace", "MDConfig", "list[MDConfig]", "local",
               "slurm", "pbspro", "lsf", "sge", "torque", "condor"}


def _what(data: Any) -> str:
    if data is None:
        return "nothing (the file holds only comments)"
    return "a list" if isinstance(data, list) else f"a single {type(data).__name__} value"


def config_from_dict(data: Any, source: str = "config") -> CampaignConfig:
    """Validate a mapping; the first problem becomes a one-line ``ConfigError``."""
    if not isinstance(data, dict):
        raise ConfigError(source, f"the top level must be a mapping of sections, not {_what(data)}")
    try:
        return CampaignConfig.model_validate(data)
    except ValidationError as exc:
        # Of a union's alternatives, the deepest error is the one the user meant (a list of MD
        # blocks with a typo should name the typo, not say "not a mapping").
        errors = exc.errors()
        first = max(errors, key=lambda e: len(e["loc"])) if len(errors) > 1 else errors[0]
        key = _dotted(first["loc"])
        kind = first["type"]
        if kind == "extra_forbidden":
            raise ConfigError(key, "unknown key") from None
        if kind == "missing":
            raise ConfigError(key, "required key is missing") from None
        message = _one_line(first["msg"].removeprefix("Value error, "), limit=400)
        raise ConfigError(key, f"{message} (got {_one_line(repr(first.get('input')), limit=80)})") from None


def load_config(path: str | Path, site: str | None = None) -> CampaignConfig:
    """Read and validate a campaign YAML; relative structure paths resolve against its folder.

    So do a ``mace`` reference's model file, an ``idg.foundation_model`` file found there, the
    ``import_data`` files and the ``model.start_from`` files. A site profile (``site``, else the
    file's ``site`` key, else ``$AIMSPAX_SITE``) fills in what the file leaves out
    (``aimspax_like.site``).
    """
    from aimspax_like.site import apply_profile, chosen_profile, find_profile, read_profile

    path = Path(path)
    raw = read_yaml(path)
    record = None
    name = chosen_profile(raw, site) if isinstance(raw, dict) else None
    if name is not None:
        profile_path = find_profile(name, relative_to=path.resolve().parent)
        profile = read_profile(profile_path)
        raw, applied = apply_profile(raw, profile)
        raw["site"] = None
        record = {"name": profile.name or profile_path.stem, "file": str(profile_path), "applied": applied}
    try:
        config = config_from_dict(raw, source=str(path))
    except ConfigError as exc:
        if record is not None and any(exc.key == key or exc.key.startswith(f"{key}.") or key.startswith(f"{exc.key}.")
                                      for key in record["applied"]):
            raise ConfigError(exc.key, f"{exc.message} (set by site profile {record['file']})") from None
        raise
    config._site_record = record
    base = path.resolve().parent
    config.system.structures = [p if p.is_absolute() else base / p for p in config.system.structures]
    if isinstance(config.reference, MACEReference) and not config.reference.model.is_absolute():
        config.reference.model = base / config.reference.model
    foundation = config.idg.foundation_model
    if foundation and not Path(foundation).is_absolute() and (base / foundation).is_file():
        # A model file beside the config (a converted aims-PAX folder) is found from any folder;
        # anything else (a MACE-MP name, a path from the working folder) is left as written.
        config.idg.foundation_model = str(base / foundation)
    for source in config.import_data:
        source.path = source.path if source.path.is_absolute() else base / source.path
    if config.model.start_from is not None:
        config.model.start_from = [_resolve_model(name, base) for name in config.model.start_from]
    if config.otf.start.models is not None:
        config.otf.start.models = [p if p.is_absolute() else base / p for p in config.otf.start.models]
    return config


def _resolve_model(name: str, base: Path) -> str:
    """A model file relative to the config's folder; foundation names stay as they are."""
    if name.startswith(("mace-mp", "chgnet")) or Path(name).is_absolute():
        return name
    return str(base / name)


def json_schema() -> dict[str, Any]:
    return CampaignConfig.model_json_schema()


# --------------------------------------------------------------------------- the init template
