"""``aimspax-like convert``: an aims-PAX pair (``aimsPAX.yaml``, ``model.yaml``) as one campaign YAML.

Coming from aims-PAX, a user holds two files and a working folder (geometry, ``control.in``, a
teacher model). This command writes the equivalent campaign of this project. Every aims-PAX key
is either mapped or kept as one ``#`` comment line in the output that says what the key was and
why it has no equivalent here (or what this project does instead): aims-PAX ignores unknown keys
without a word, so a typo there ran as a default; here nothing is dropped silently.

Where the two projects count the same setting differently, the converter writes the setting
that reproduces aims-PAX's run, not the same number under another meaning:

- ``max_train_set_size`` counts per member in aims-PAX (a member's own IDG training points plus
  the shared AL ones): written as ``al.train_set_counts: per_member``. Under this project's
  ``shared`` rule the IDG frames of all members count at once, and a ported budget of 40 after
  a 40-frame IDG left the AL phase with nothing to label.
- ``n_points_per_sampling_step_idg`` counts training and validation points per member and
  round; ``idg.points_per_member`` counts training points only, so it becomes
  ``n x (1 - valid_ratio)``.
- aims-PAX has no committee probe after IDG, which could add IDG rounds: ``idg.probe_steps: 0``.
  This project's geometry guards and energy gate stay on (they never label, or never train on,
  a broken frame), with a comment saying so.

What aims-PAX's keys mean here is in ``aimspax_like.aimspax_keys``; this module walks the files.

Paths are rewritten relative to the output file (the campaign reader resolves them against the
config's folder), so the output may be written anywhere. The result is validated with the
campaign reader before anything is written; bad input is one ``SetupError`` line naming the
file and key.
"""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path
from typing import Any

import yaml

from aimspax_like.aimspax_keys import (
    AL,
    DIRECT,
    FIXED,
    IDG,
    NO_EQUIVALENT,
    ORDER,
    SECTIONS,
    AimsPaxFile,
    is_a,
    read_control,
    shown,
    walltime,
)
from aimspax_like.errors import ConfigError, SetupError

COMMANDS = ("convert",)


class Conversion:
    """The campaign being built: settings by dotted key, comment lines by section, origins."""

    def __init__(self, aimspax: Path, model: Path, output: Path) -> None:
        self.files = {"aimsPAX": AimsPaxFile("aimsPAX", aimspax), "model": AimsPaxFile("model", model)}
        self.folder = aimspax.resolve().parent  # aims-PAX's working folder
        self.out_dir = output.resolve().parent
        self.data: dict[str, Any] = {}
        self.notes: dict[str, list[str]] = {}
        self.origin: dict[str, str] = {}
        self.mapped = 0  # aims-PAX keys mapped
        self.commented = 0  # aims-PAX keys kept as comment lines

    # ------------------------------------------------------------------ building blocks

    def set(self, dotted: str, value: Any, origin: str | None = None) -> None:
        node = self.data
        *parents, last = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
        if origin:
            self.origin[dotted] = origin
            self.mapped += 1

    def note(self, section: str, text: str) -> None:
        self.notes.setdefault(section, []).append(f"# {' '.join(text.split())}")

    def unmapped(self, role: str, section: str, key: str, value: Any, why: str, where: str = "unmapped") -> None:
        """One comment line for an aims-PAX key this project has no setting for, and why."""
        self.note(where, f"{self.files[role].name} {section}.{key}: {shown(value)} -> {why}")
        self.commented += 1

    def take(self, role: str, section: str, key: str, want: str = "any") -> Any:
        return self.files[role].take(section, key, want)

    def path_for(self, raw: str | Path, beside_config: bool = True) -> str:
        """A path of the aims-PAX folder as the output file must spell it.

        Keys the campaign reader resolves against the config's folder get a path relative to the
        output file; others (``reference.species_dir``) an absolute one, which holds from any folder.
        """
        target = Path(raw).expanduser()
        if target.is_absolute() and not beside_config:
            return str(target)
        target = (target if target.is_absolute() else self.folder / target).resolve()
        return os.path.relpath(target, self.out_dir) if beside_config else str(target)

    # ------------------------------------------------------------------ the mapping

    def run(self) -> dict[str, Any]:
        """Map every key; returns the campaign settings (the comment lines wait in ``notes``)."""
        self._system()
        self._reference()
        self._ensemble()
        self._idg()
        self._budget()
        self._md()
        self._cluster()
        self._model_file()
        self._direct()
        self._leftovers()
        return self.data

    def _system(self) -> None:
        where = self.files["aimsPAX"].where("MISC", "path_to_geometry")
        geometry = self.take("aimsPAX", "MISC", "path_to_geometry", "a_string")
        if geometry is None:
            geometry = "geometry.in"
            self.note("system", "no MISC.path_to_geometry: aims-PAX's default geometry.in in its folder")
        self.set("system.structures", [self.path_for(geometry)], where)
        if not (self.folder / geometry).exists():
            self.note("system", f"{geometry} is not in {self.folder} yet: put the start geometry there before running")

    def _reference(self) -> None:
        source = self.files["aimsPAX"]
        teachers = []
        for section in (IDG, AL):
            use = self.take("aimsPAX", section, "use_teacher_reference", "true_or_false")
            settings = self.take("aimsPAX", section, "teacher_reference_settings", "a_mapping")
            if use and settings is not None:
                teachers.append((section, dict(settings)))
            elif settings is not None:
                self.unmapped("aimsPAX", section, "teacher_reference_settings", settings,
                              "unused: use_teacher_reference is not true", "reference")
        species = [self.take("aimsPAX", s, "species_dir", "a_string") for s in (IDG, AL)]
        launch = self.take("aimsPAX", "CLUSTER", "launch_str", "a_string")
        clean = self.take("aimsPAX", "CLUSTER", "clean_dirs", "true_or_false")
        if clean is not None:
            self.set("reference.keep_workdir", not clean, source.where("CLUSTER", "clean_dirs"))
        if teachers and self._teacher(teachers):
            for section, value in zip((IDG, AL), species, strict=True):
                if value is not None:
                    self.unmapped("aimsPAX", section, "species_dir", value,
                                  "unused: the teacher labels instead of FHI-aims", "reference")
            if launch is not None:
                self.unmapped("aimsPAX", "CLUSTER", "launch_str", launch,
                              "unused: the teacher labels instead of FHI-aims", "reference")
            return
        self._aims_reference(next((s for s in species if s), None), launch)

    def _teacher(self, teachers: list[tuple[str, dict[str, Any]]]) -> bool:
        """The first phase's teacher as a ``mace`` reference; False when it is no MACE model file."""
        section, settings = teachers[0]
        where = self.files["aimsPAX"].where(section, "teacher_reference_settings")
        model_type, path = settings.pop("model_type", "mace"), settings.pop("model_path", None)
        if str(model_type).lower() != "mace" or not isinstance(path, str):
            self.note("reference", f"{where}: model_type {model_type}, model_path {path} -> only a MACE teacher "
                      "(model_type: mace, model_path: FILE) is a reference kind here; FHI-aims below instead")
            self.commented += 1
            return False
        self.set("reference.kind", "mace", where)
        self.set("reference.model", self.path_for(path), where)
        self.note("reference", "use_teacher_reference: the MACE teacher model labels every frame of every phase")
        if not (self.folder / path).is_file():
            self.note("reference", f"{path} is not in {self.folder} yet: put the teacher model there")
        for key, value in settings.items():
            self.note("reference", f"{where}.{key}: {shown(value)} -> no such teacher setting here "
                      "(reference.device and reference.dtype are)")
            self.commented += 1
        for other, other_settings in teachers[1:]:
            if other_settings.get("model_path") != path or str(other_settings.get("model_type", "mace")) != model_type:
                self.unmapped("aimsPAX", other, "teacher_reference_settings", other_settings,
                              f"one reference for every phase here: the {section} teacher", "reference")
        return True

    def _aims_reference(self, species_dir: str | None, launch: str | None) -> None:
        self.set("reference.kind", "aims")
        if launch:
            # ASE's Aims writes aims.out itself: a redirection in aims-PAX's launch line is dropped.
            command = launch.split(">", 1)[0].strip()
            self.set("reference.command", command, self.files["aimsPAX"].where("CLUSTER", "launch_str"))
            if command != launch.strip():
                self.note("reference", f"CLUSTER.launch_str: {launch.strip()} -> reference.command without the "
                          "redirection (the output goes to aims.out in each label's folder)")
        else:
            self.note("reference", "no CLUSTER.launch_str: reference.command is aims.x; set it to how FHI-aims "
                      "runs here (e.g. 'srun aims.x')")
        if species_dir:
            self.set("reference.species_dir", self.path_for(species_dir, beside_config=False),
                     f"{self.files['aimsPAX'].name} species_dir")
        else:
            self.note("reference", "fill in reference.species_dir: the FHI-aims species_defaults folder (e.g. "
                      ".../species_defaults/defaults_2020/light)")
        control = self.folder / "control.in"
        if not control.is_file():
            self.note("reference", f"no control.in in {self.folder}: set reference.xc and reference.parameters "
                      "(extra control.in keys) by hand")
            return
        xc, parameters, skipped = read_control(control)
        if xc:
            self.set("reference.xc", xc, "control.in xc")
        if parameters:
            self.set("reference.parameters", parameters, "control.in")
        self.note("reference", f"xc and parameters read from {control} (species blocks come from species_dir)")
        for line in skipped:
            self.note("reference", f"control.in line not taken: {line}")

    def _ensemble(self) -> None:
        sizes = {s: self.take("aimsPAX", s, "ensemble_size", "an_integer") for s in (IDG, AL)}
        given = [(s, n) for s, n in sizes.items() if n is not None]
        if given:
            self.set("model.ensemble_size", given[0][1], self.files["aimsPAX"].where(given[0][0], "ensemble_size"))
            for section, n in given[1:]:
                if n != given[0][1]:
                    self.unmapped("aimsPAX", section, "ensemble_size", n,
                                  f"one committee for every phase here: model.ensemble_size {given[0][1]}", "model")
        best = self.take("aimsPAX", AL, "converge_best", "true_or_false")
        if best is not None:
            self.set("converge.members", "best" if best else "all", self.files["aimsPAX"].where(AL, "converge_best"))
        parallel = self.take("aimsPAX", AL, "parallel", "true_or_false")
        if parallel is not None:
            self.set("al.mode", "parallel" if parallel else "serial", self.files["aimsPAX"].where(AL, "parallel"))

    def _idg(self) -> None:
        source = self.files["aimsPAX"]
        points = self.take("aimsPAX", IDG, "n_points_per_sampling_step_idg", "an_integer")
        if points is not None:
            ratio = source.sections.get(IDG, {}).get("valid_ratio", 0.1)
            ratio = ratio if is_a(ratio, "a_number") else 0.1
            train = max(1, round(points * (1 - ratio)))
            self.set("idg.points_per_member", train, source.where(IDG, "n_points_per_sampling_step_idg"))
            self.note("idg", f"n_points_per_sampling_step_idg: {points} counts training and validation points per "
                      f"member and round; idg.points_per_member counts training points only: {points} x (1 - "
                      f"valid_ratio {ratio}) = {points * (1 - ratio):g}"
                      f"{'' if math.isclose(train, points * (1 - ratio)) else f', rounded to {train}'}")
        self.note("al", "al.guards and al.guards.energy_outlier stay on (aims-PAX has neither): frames that fail a "
                  "geometry guard are never labelled, labels far above the thermal energies are held out of training")
        self.set("idg.probe_steps", 0)
        self.note("idg", "idg.probe_steps: 0 as aims-PAX (no committee MD probe after IDG); a positive value lets IDG "
                  "go on while the committee cannot yet run MD from the start structures")
        sampling = self.take("aimsPAX", IDG, "initial_sampling", "a_string")
        name = self.take("aimsPAX", IDG, "foundational_model", "a_string")
        settings = self.take("aimsPAX", IDG, "foundational_model_settings", "a_mapping") or {}
        if sampling is not None and sampling.lower() in ("aimd", "dft", "ab_initio"):
            self.set("idg.sampler", "reference", source.where(IDG, "initial_sampling"))
            if name or settings:
                self.unmapped("aimsPAX", IDG, "foundational_model", name or settings,
                              "unused: initial_sampling samples with the reference", "idg")
            return
        model = self._foundation(name, settings)
        self.set("idg.sampler", "foundation", source.where(IDG, "initial_sampling"))
        self.set("idg.foundation_model", model, source.where(IDG, "foundational_model"))

    def _foundation(self, name: str | None, settings: dict[str, Any]) -> str:
        settings = dict(settings)
        where = self.files["aimsPAX"].where(IDG, "foundational_model_settings")
        if name is not None and name.lower() not in ("mace-mp", "mace_mp", "mace-mp0", "mace-mp-0"):
            self.unmapped("aimsPAX", IDG, "foundational_model", name,
                          "no such foundation model here (MACE-MP-0, CHGNet or a MACE model file): mace-mp-0-small "
                          "instead", "idg")
            return "mace-mp-0-small"
        choice = settings.pop("mace_model", None) or settings.pop("model_size", None)
        for key, value in settings.items():
            self.note("idg", f"{where}.{key}: {shown(value)} -> no equivalent for the foundation model here")
        if choice is None:
            self.note("idg", "no foundational_model_settings.mace_model: MACE-MP-0 small, aims-PAX's recommended size")
            return "mace-mp-0-small"
        choice = str(choice)
        if choice.lower() in ("small", "medium", "large"):
            return f"mace-mp-0-{choice.lower()}"
        if (self.folder / choice).is_file() or Path(choice).suffix:
            return self.path_for(choice)
        return choice

    def _budget(self) -> None:
        source = self.files["aimsPAX"]
        size = self.take("aimsPAX", AL, "max_train_set_size", "an_integer")
        if size is None:
            return
        self.set("al.max_train_set_size", size, source.where(AL, "max_train_set_size"))
        self.set("al.train_set_counts", "per_member", source.where(AL, "max_train_set_size"))
        self.note("al", f"max_train_set_size: {size} counts per member in aims-PAX (a member's own IDG training "
                  "frames plus the shared AL ones), hence al.train_set_counts: per_member; under 'shared' the IDG "
                  "frames of all members would count at once and AL could end before its first label")

    def _md(self) -> None:
        source = self.files["aimsPAX"]
        if "MD" not in source.sections:
            return
        block: dict[str, Any] = {}
        ensemble = self.take("aimsPAX", "MD", "stat_ensemble", "a_string")
        thermostat = self.take("aimsPAX", "MD", "thermostat", "a_string")
        kind = {("nvt", "langevin"): "langevin", ("nvt", None): "langevin", ("nve", None): "nve",
                ("nvt", "bussi"): "bussi", ("nvt", "nose-hoover"): "nose_hoover", ("nvt", "nosehoover"): "nose_hoover"}
        key = ((ensemble or "nvt").lower(), thermostat.lower() if thermostat else None)
        if ensemble and ensemble.lower() == "nve":
            key = ("nve", None)
        if key in kind:
            block["ensemble"] = kind[key]
        else:
            self.unmapped("aimsPAX", "MD", "stat_ensemble", f"{ensemble} {thermostat or ''}".strip(),
                          "not converted: set idg.md/al.md by hand (langevin, nve, bussi, nose_hoover, npt_*)", "al")
        for aims_key, ours, want in (("temperature", "temperature_K", "a_number"),
                                     ("timestep", "timestep_fs", "a_number"),
                                     ("friction", "friction_per_fs", "a_number")):
            value = self.take("aimsPAX", "MD", aims_key, want)
            if value is not None:
                block[ours] = value
                self.origin[f"al.md.{ours}"] = source.where("MD", aims_key)
                self.mapped += 1
        for section in ("idg", "al", "test_set"):
            self.set(f"{section}.md", dict(block))
        self.note("test_set", "no test set in aims-PAX: this project labels held-out frames at the end "
                  "(test_set.size per temperature; temperatures: the AL one and 1.4 x it); size: 0 turns it off")

    def _cluster(self) -> None:
        source = self.files["aimsPAX"]
        kind = self.take("aimsPAX", "CLUSTER", "type", "a_string")
        workers = self.take("aimsPAX", "CLUSTER", "max_workers", "an_integer")
        if kind is None and workers is None and "CLUSTER" not in source.sections:
            return
        if (kind or "local").lower() != "slurm":
            self.set("cluster.kind", "local", source.where("CLUSTER", "type"))
            if workers is not None:
                self.set("cluster.max_workers", workers, source.where("CLUSTER", "max_workers"))
            return
        self.set("cluster.kind", "slurm", source.where("CLUSTER", "type"))
        if workers is not None:
            self.unmapped("aimsPAX", "CLUSTER", "max_workers", workers,
                          "with SLURM, labels at once = blocks x cluster.executor.workers_per_node", "cluster")
        options = self.take("aimsPAX", "CLUSTER", "parsl_options", "a_mapping") or {}
        for key in ("nodes_per_block", "init_blocks", "min_blocks", "max_blocks"):
            if key in options:
                self.set(f"cluster.provider.{key}", options.pop(key), source.where("CLUSTER", f"parsl_options.{key}"))
        for key, value in options.items():
            self.unmapped("aimsPAX", "CLUSTER", f"parsl_options.{key}", value, NO_EQUIVALENT.get(key, "no equivalent"
                          " here"), "cluster")
        self._sbatch(self.take("aimsPAX", "CLUSTER", "slurm_str", "a_string"))
        worker = self.take("aimsPAX", "CLUSTER", "worker_str", "a_string")
        if worker:
            self.set("cluster.provider.worker_init", [line.strip() for line in worker.splitlines() if line.strip()],
                     source.where("CLUSTER", "worker_str"))
        self.note("cluster", "a SLURM skeleton: check cluster.provider (partition, account, walltime) and "
                  "cluster.executor (workers_per_node, cores_per_worker) against your machine")

    def _sbatch(self, text: str | None) -> None:
        if not text:
            return
        where = self.files["aimsPAX"].where("CLUSTER", "slurm_str")
        extra = []
        for line in (raw.strip() for raw in text.splitlines()):
            option = line.removeprefix("#SBATCH").strip()
            if not option.startswith("-"):
                if line and not line.startswith("#!"):
                    self.note("cluster", f"{where} line not taken: {line}")
                continue
            name, _, value = option.lstrip("-").partition("=")
            name, value = name.strip(), value.strip()
            field = {"partition": "partition", "p": "partition", "account": "account", "A": "account", "qos": "qos",
                     "constraint": "constraint", "C": "constraint", "time": "walltime", "t": "walltime"}.get(name)
            if field == "walltime":
                value = walltime(value)
            if field and value:
                self.set(f"cluster.provider.{field}", value, where)
            elif name in ("job-name", "J", "nodes", "N", "ntasks-per-node", "output", "o", "error", "e"):
                self.note("cluster", f"{where} line not taken: {line} (Parsl writes its own)")
            elif name == "exclusive":
                self.set("cluster.provider.exclusive", True, where)
            else:
                extra.append(line if line.startswith("#SBATCH") else f"#SBATCH {option}")
        if extra:
            self.set("cluster.provider.scheduler_options", extra, where)

    def _model_file(self) -> None:
        source = self.files["model"]
        name = self.take("model", "GENERAL", "name_exp", "a_string")
        if name:
            self.set("output.directory", f"runs/{name}", source.where("GENERAL", "name_exp"))
        device = self.take("model", "MISC", "device", "a_string")
        if device is not None:
            mapped = "cuda" if device.lower().startswith(("cuda", "gpu")) else device.lower()
            self.set("model.device", mapped, source.where("MISC", "device"))
        ema = self.take("model", "TRAINING", "ema", "true_or_false")
        decay = self.take("model", "TRAINING", "ema_decay", "a_number")
        if ema is False:
            self.set("training.ema_decay", None, source.where("TRAINING", "ema"))
        elif decay is not None:
            self.set("training.ema_decay", decay, source.where("TRAINING", "ema_decay"))
        for (section, key), (same, what) in FIXED.items():
            value = self.take("model", section, key)
            if value is None:
                continue
            if str(value).lower().replace("_", "") in same:
                self.unmapped("model", section, key, value, f"nothing to set: {what}", "model")
            else:
                self.unmapped("model", section, key, value, f"not available: {what}", "model")

    def _direct(self) -> None:
        wants = {"idg.stride": "an_integer", "model.dtype": "a_string", "model.mlp_irreps": "a_string",
                 "converge.enabled": "true_or_false", "training.amsgrad": "true_or_false",
                 "reference.compute_stress": "true_or_false", "model.radial_mlp": "any"}
        for (role, section, key), ours in DIRECT.items():
            value = self.take(role, section, key, wants.get(ours, "a_number"))
            if value is not None:
                self.set(ours, value, self.files[role].where(section, key))

    def _leftovers(self) -> None:
        for role, source in self.files.items():
            known = SECTIONS[role]
            for section, body in source.sections.items():
                for key, value in body.items():
                    why = NO_EQUIVALENT.get(f"{key}@{section}") or NO_EQUIVALENT.get(key)
                    if why is None:
                        why = ("unknown section; not used" if section not in known
                               else "unknown key (aims-PAX ignores those too); not used")
                    self.unmapped(role, section, key, value, why)

    # ------------------------------------------------------------------ output

    def render(self, config: Any) -> str:
        """The YAML text: header, each section under its comment lines, keys in the schema's order
        (``config``, the validated campaign, knows it), then the keys with no section here."""
        files = self.files
        lines = [
            "# Campaign converted from aims-PAX by `aimspax-like convert`",
            f"# from {files['aimsPAX'].path} and {files['model'].path}.",
            "# Every aims-PAX key is mapped below or kept as one '#' line saying why it has no equivalent.",
            "# Settings this project adds (exploration guards, the test set) keep their defaults unless a",
            "# comment below says why not; `aimspax-like init` writes a template with every key.",
        ]
        lines += self.notes.pop("header", [])
        dumper = _dumper()
        for section in ORDER:
            if section not in self.data and section not in self.notes:
                continue
            lines.append("")
            lines += self.notes.pop(section, [])
            if section in self.data:
                value = _ordered(self.data[section], getattr(config, section))
                text = yaml.dump({section: value}, Dumper=dumper, sort_keys=False,
                                 default_flow_style=False, width=120)
                lines += text.rstrip("\n").splitlines()
        rest = [line for section in list(self.notes) for line in self.notes.pop(section)]
        if rest:
            lines += ["", "# aims-PAX keys with no equivalent here:", *rest]
        return "\n".join(lines) + "\n"


def _ordered(value: Any, model: Any) -> Any:
    """``value`` with its keys in the order the config model declares them (as ``init`` writes)."""
    if not isinstance(value, dict) or not hasattr(type(model), "model_fields"):
        return value
    fields = list(type(model).model_fields)
    keys = sorted(value, key=lambda k: fields.index(k) if k in fields else len(fields))
    return {k: _ordered(value[k], getattr(model, k, None)) for k in keys}


def _dumper() -> type[yaml.SafeDumper]:
    """The config writer's dumper (it quotes strings the reader would take for numbers), with
    lists of scalars on one line (``radial_mlp: [32, 32, 32]``) and mappings as blocks."""
    from aimspax_like.config import _ConfigDumper

    class Dumper(_ConfigDumper):
        def represent_list(self, data: Any) -> yaml.Node:
            flat = all(not isinstance(item, dict | list) for item in data)
            return self.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flat)

    Dumper.add_representer(list, Dumper.represent_list)
    return Dumper


def convert(aimspax: Path, model: Path, output: Path) -> tuple[str, Conversion]:
    """The campaign YAML text for an aims-PAX pair, validated; nothing is written."""
    from aimspax_like.config import config_from_dict, parse_yaml

    conversion = Conversion(aimspax, model, output)
    data = conversion.run()
    try:
        text = conversion.render(config_from_dict(data, source=str(output)))
        config_from_dict(parse_yaml(text), source=str(output))  # the text reads back as the same campaign
    except ConfigError as exc:
        origin = conversion.origin.get(exc.key) or next(
            (o for k, o in conversion.origin.items() if exc.key.startswith(k) or k.startswith(exc.key)), None)
        raise SetupError(f"{origin or exc.key}: {exc.message} (as {exc.key} of the converted campaign)") from None
    return text, conversion


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Register ``convert`` on the front end's subparsers."""
    cmd = sub.add_parser("convert", help="convert an aims-PAX aimsPAX.yaml + model.yaml into a campaign YAML",
                         description="Writes the equivalent campaign YAML; aims-PAX keys without an equivalent "
                                     "are kept as '#' comment lines saying why.")
    cmd.add_argument("aimspax", type=Path, help="aims-PAX settings file (aimsPAX.yaml)")
    cmd.add_argument("model", type=Path, help="aims-PAX model file (model.yaml)")
    cmd.add_argument("--output", type=Path, default=Path("campaign.yaml"),
                     help="file to write (default: campaign.yaml)")
    cmd.add_argument("--force", action="store_true", help="overwrite an existing output file")


def run(args: argparse.Namespace) -> int:
    output: Path = args.output
    if output.is_dir():
        raise SetupError(f"{output}: is a folder; give the path of the file to write")
    if output.exists() and not args.force:
        raise SetupError(f"{output}: file exists; pass --force to overwrite")
    text, conversion = convert(args.aimspax, args.model, output)
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        tmp = output.with_name(f".{output.name}.tmp")
        tmp.write_text(text)
        tmp.replace(output)
    except OSError as exc:
        raise SetupError(f"{output}: cannot be written ({exc.strerror or exc.__class__.__name__})") from None
    print(f"wrote {output}: {conversion.mapped} aims-PAX settings mapped, {conversion.commented} kept as "
          f"comments (read them); run it with: aimspax-like run {output}")
    return 0
