"""What the keys of an aims-PAX pair mean here: the tables and small readers behind ``convert``.

Kept apart from ``aimspax_like.convert`` (which walks the files and writes the campaign) so the
knowledge about aims-PAX's keys can be read, and extended, in one place: keys that mean the same
thing in both projects (``DIRECT``), keys that name what this project always does (``FIXED``),
keys with no equivalent and what happens here instead (``NO_EQUIVALENT``); the readers of an
FHI-aims ``control.in`` and of SLURM time spellings; and ``AimsPaxFile``, one aims-PAX file whose
keys are taken (type-checked) one by one, so that every key left over can be reported.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import yaml

from aimspax_like.errors import SetupError

IDG, AL = "INITIAL_DATASET_GENERATION", "ACTIVE_LEARNING"
SECTIONS = {"aimsPAX": (IDG, AL, "MD", "MISC", "CLUSTER"), "model": ("GENERAL", "ARCHITECTURE", "TRAINING", "MISC")}
ORDER = ("system", "reference", "model", "training", "idg", "al", "converge", "test_set", "cluster", "output", "seed")

# (file, section, key) -> campaign key, for keys that mean the same thing in both projects.
DIRECT: dict[tuple[str, str, str], str] = {
    ("aimsPAX", IDG, "skip_step_initial"): "idg.stride",
    ("aimsPAX", IDG, "intermediate_epochs_idg"): "idg.intermediate_epochs",
    ("aimsPAX", IDG, "max_initial_epochs"): "idg.max_epochs",
    ("aimsPAX", IDG, "valid_ratio"): "idg.valid_ratio",
    ("aimsPAX", IDG, "desired_acc"): "idg.desired_acc",
    ("aimsPAX", IDG, "desired_acc_scale_idg"): "idg.desired_acc_scale",
    ("aimsPAX", AL, "num_trajectories"): "al.num_trajectories",
    ("aimsPAX", AL, "c_x"): "al.c_x",
    ("aimsPAX", AL, "skip_step_mlff"): "al.check_every",
    ("aimsPAX", AL, "epochs_per_worker"): "al.max_epochs_per_point",
    ("aimsPAX", AL, "intermediate_epochs_al"): "al.intermediate_epochs",
    ("aimsPAX", AL, "valid_ratio"): "al.valid_ratio",
    ("aimsPAX", AL, "desired_acc"): "al.desired_acc",
    ("aimsPAX", AL, "max_MD_steps"): "al.max_md_steps",
    ("aimsPAX", AL, "freeze_threshold_dataset"): "al.freeze_threshold_at",
    ("aimsPAX", AL, "converge_al"): "converge.enabled",
    ("aimsPAX", AL, "max_convergence_epochs"): "converge.max_epochs",
    ("aimsPAX", AL, "convergence_patience"): "converge.patience",
    ("model", "GENERAL", "seed"): "seed",
    ("model", "GENERAL", "default_dtype"): "model.dtype",
    ("model", "GENERAL", "compute_stress"): "reference.compute_stress",
    ("model", "ARCHITECTURE", "r_max"): "model.r_max",
    ("model", "ARCHITECTURE", "num_channels"): "model.channels",
    ("model", "ARCHITECTURE", "max_L"): "model.max_L",
    ("model", "ARCHITECTURE", "max_ell"): "model.max_ell",
    ("model", "ARCHITECTURE", "num_interactions"): "model.num_interactions",
    ("model", "ARCHITECTURE", "correlation"): "model.correlation",
    ("model", "ARCHITECTURE", "radial_MLP"): "model.radial_mlp",
    ("model", "ARCHITECTURE", "num_radial_basis"): "model.num_radial_basis",
    ("model", "ARCHITECTURE", "num_cutoff_basis"): "model.num_cutoff_basis",
    ("model", "ARCHITECTURE", "MLP_irreps"): "model.mlp_irreps",
    ("model", "TRAINING", "batch_size"): "training.batch_size",
    ("model", "TRAINING", "valid_batch_size"): "training.valid_batch_size",
    ("model", "TRAINING", "lr"): "training.lr",
    ("model", "TRAINING", "amsgrad"): "training.amsgrad",
    ("model", "TRAINING", "weight_decay"): "training.weight_decay",
    ("model", "TRAINING", "energy_weight"): "training.energy_weight",
    ("model", "TRAINING", "forces_weight"): "training.forces_weight",
    ("model", "TRAINING", "stress_weight"): "training.stress_weight",
    ("model", "TRAINING", "clip_grad"): "training.clip_grad",
}

# Keys that fix what this project always does: nothing to set when the value is this one.
FIXED: dict[tuple[str, str], tuple[tuple[str, ...], str]] = {
    ("ARCHITECTURE", "model_choice"): (("mace",), "MACE is the model here"),
    ("ARCHITECTURE", "model"): (("mace", "scaleshiftmace"), "every member is a ScaleShiftMACE here"),
    ("ARCHITECTURE", "interaction"): (("realagnosticresidualinteractionblock",),
                                      "RealAgnosticResidualInteractionBlock is the interaction block here"),
    ("ARCHITECTURE", "interaction_first"): (("realagnosticinteractionblock",),
                                            "RealAgnosticInteractionBlock is the first interaction block here"),
    ("ARCHITECTURE", "gate"): (("silu",), "SiLU is the gate here"),
    ("ARCHITECTURE", "radial_type"): (("bessel",), "Bessel functions are the radial basis here"),
    ("TRAINING", "optimizer"): (("adam",), "Adam is the optimizer here (AMSGrad unless training.amsgrad is false)"),
    ("TRAINING", "loss"): (("weighted",), "the loss here is weighted energy, forces (and stress) terms"),
}

_RUN_DIR = "the run directory holds everything (logs/, state/, data/, models/ under output.directory)"
_NO_SCHEDULER = "no learning-rate scheduler here; a member's optimizer state is reset when it stops improving"
# Keys without an equivalent here, and what this project does instead.
NO_EQUIVALENT: dict[str, str] = {
    "create_restart": "always on here: state/ is checkpointed after every label and training round; "
                      "continue with `aimspax-like resume RUN`",
    "MD_seed": "MD seeds derive from the top-level seed here",
    "seed@MD": "MD seeds derive from the top-level seed here",
    "valid_skip": "members are validated after every training round here",
    "scheduler_initial": _NO_SCHEDULER,
    "converge_initial": "no convergence after IDG here; the converge phase runs once, after AL",
    "margin": "any decrease of the validation loss counts as an improvement here",
    "uncertainty_type": "Eq. 1 (largest per-atom committee force spread) is the uncertainty here",
    "analysis": "set al.analysis_every to label ground-truth analysis points for the report",
    "analysis_skip": "set al.analysis_every to label ground-truth analysis points for the report",
    "aims_lib_path": "FHI-aims runs as an executable here (reference.command), not as a library",
    "max_initial_set_size": "idg.max_set_size counts every IDG label (train and valid, all members); set it by hand",
    "dataset_dir": _RUN_DIR, "log_dir": _RUN_DIR, "checkpoints_dir": _RUN_DIR, "model_dir": _RUN_DIR,
    "results_dir": _RUN_DIR, "loss_dir": _RUN_DIR, "calc_dir": "labels run in RUN/labels/ here",
    "project_name": "no Parsl project name here", "label": "no Parsl label here",
    "atomic_energies": "E0s are fitted to the labelled data here (and refitted to the whole set at the end)",
    "compute_avg_num_neighbors": "always computed from the data here",
    "scaling": "forces are scaled by the rms force of the data here (mace_run_train's default)",
    "scheduler": _NO_SCHEDULER, "lr_scheduler_gamma": _NO_SCHEDULER, "lr_factor": _NO_SCHEDULER,
    "scheduler_patience": _NO_SCHEDULER,
    "swa": "no stochastic weight averaging here",
    "valid_fraction": "the splits follow the valid_ratio of each phase here",
    "max_num_epochs": "epochs are set per phase here (idg, al, converge)",
    "patience": "converge.patience is the only patience here",
    "eval_interval": "members are validated after every training round here",
    "config_type_weights": "all frames weigh the same here",
    "virials_weight": "stress, not virials, is trained here (training.stress_weight)",
    "keep_checkpoints": _RUN_DIR, "restart_latest": "resume with `aimspax-like resume RUN`",
    "error_table": "errors are reported per phase in logs/events.jsonl and report/",
    "log_level": "every decision is logged in logs/events.jsonl",
}


def walltime(value: str) -> str:
    """SLURM's time spellings (D-HH:MM:SS, HH:MM:SS, MM:SS, minutes) as HH:MM:SS."""
    days, _, clock = value.rpartition("-")
    parts = [int(p) for p in clock.split(":") if p.isdigit()]
    if not parts or len(parts) != len(clock.split(":")) or (days and not days.isdigit()):
        return value  # left for the campaign reader to name
    if len(parts) == 1:
        parts = [0, parts[0], 0]
    elif len(parts) == 2:
        parts = [0, *parts]
    hours = parts[0] + 24 * int(days or 0)
    return f"{hours:02d}:{parts[1]:02d}:{parts[2]:02d}"


def read_control(path: Path) -> tuple[str | None, dict[str, Any], list[str]]:
    """xc, the other control.in keys (as ASE's Aims takes them) and lines left out, up to the species blocks."""
    xc, parameters, skipped = None, {}, []
    for raw in path.read_text(errors="replace").splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        key, *values = line.split()
        if key == "species":
            break
        if key == "xc":
            xc = " ".join(values)
        elif key == "compute_forces":
            continue
        elif key in parameters:
            skipped.append(f"{line} (given twice)")
        else:
            parameters[key] = _control_value(values)
    return xc, parameters, skipped


def _control_value(values: list[str]) -> Any:
    if not values:
        return ""
    if len(values) == 1:
        for kind in (int, float):
            try:
                number = kind(values[0].lower().replace("d", "e")) if kind is float else kind(values[0])
            except ValueError:
                continue
            if isinstance(number, float) and not math.isfinite(number):
                break
            return number
    return " ".join(values)


class AimsPaxFile:
    """One aims-PAX file: its sections, and which keys are still to be mapped."""

    def __init__(self, role: str, path: Path) -> None:
        self.role, self.path, self.name = role, path, path.name
        data = _read_yaml(path)
        self.sections: dict[str, dict[str, Any]] = {}
        for section, body in data.items():
            if body is None:
                body = {}
            if not isinstance(body, dict):
                raise SetupError(f"{path}: {section}: must be a mapping of keys, not {_kind(body)}")
            self.sections[str(section)] = dict(body)

    def take(self, section: str, key: str, want: str = "any") -> Any:
        """The value of ``section.key`` (None when absent), checked and marked as mapped."""
        body = self.sections.get(section, {})
        if key not in body:
            return None
        value = body.pop(key)
        if not is_a(value, want):
            raise SetupError(f"{self.path}: {section}.{key}: expected {want.replace('_', ' ')}, got {value!r}")
        return value

    def where(self, section: str, key: str) -> str:
        return f"{self.name} {section}.{key}"


def _read_yaml(path: Path) -> dict[str, Any]:
    """The mapping in an aims-PAX file, read as config files are (a key given twice is an error)."""
    from aimspax_like.config import parse_yaml

    if not path.exists():
        raise SetupError(f"{path}: file not found")
    if not path.is_file():
        raise SetupError(f"{path}: not a file")
    try:
        data = parse_yaml(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise SetupError(f"{path}: cannot be read as text ({type(exc).__name__})") from None
    except yaml.YAMLError as exc:
        raise SetupError(f"{path}: not valid YAML ({' '.join(str(exc).split())[:160]})") from None
    if not isinstance(data, dict):
        raise SetupError(f"{path}: the top level must be a mapping of sections, not {_kind(data)}")
    return data


def _kind(value: Any) -> str:
    """What a value is, in the words of an error line."""
    return "nothing" if value is None else "a list" if isinstance(value, list) else f"a {type(value).__name__}"


def is_a(value: Any, want: str) -> bool:
    """Whether ``value`` is of the kind ``want`` names; YAML's ``true`` is no integer here either,
    so a slip in an aims-PAX file is named at its own key, not as some campaign key later."""
    checks = {
        "any": lambda v: True,
        "an_integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
        "a_number": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
        "true_or_false": lambda v: isinstance(v, bool),
        "a_string": lambda v: isinstance(v, str),
        "a_mapping": lambda v: isinstance(v, dict),
    }
    return checks[want](value)


def shown(value: Any) -> str:
    """A value on one line, as a comment line shows it (a multi-line string as its line count)."""
    if isinstance(value, str) and "\n" in value.strip():
        return f"<{len(value.strip().splitlines())} lines>"
    text = yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
    return text.removesuffix("\n...").removesuffix("...").strip()
