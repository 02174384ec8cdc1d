"""Site profiles: what belongs to a machine, kept out of the campaign file.

A campaign says what to compute; a site profile says how this machine runs it: the batch
scheduler and its queue, partition and account, the worker environment (``worker_init``), the
DFT launch commands and species or pseudopotential folders, a container prefix, and how the
driver job itself is submitted. The campaign names a profile (``site: NAME`` or a path, or
``--site`` on the command line, or ``$AIMSPAX_SITE``), so the same campaign file runs unchanged
on every machine that has a profile of that name.

A profile's values are defaults: what the campaign file sets itself wins. The profile's
``cluster`` applies when the campaign leaves ``cluster.kind`` out or names the same kind; its
``reference`` holds one block per reference kind, merged into the campaign's reference when the
kinds match. ``~`` and ``$VARS`` are expanded in the profile's paths and commands when it is read
(an unset variable is an error naming the key), never in shell lines (``worker_init``,
``scheduler_options``, ``driver.setup``), which the batch job's shell expands where it runs.
What the profile set is recorded in the run directory (``site.yaml``) and in the event log.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError, field_validator

from aimspax_like.cluster_config import check_walltime, walltime_seconds
from aimspax_like.config_base import _Strict, lines
from aimspax_like.errors import ConfigError

SITE_ENV = "AIMSPAX_SITE"
SITE_DIR_ENV = "AIMSPAX_SITE_DIR"
USER_SITE_DIR = Path("~/.config/aimspax-like/sites")

# Shell lines: expanded by the job's shell on the compute node, not here.
_SHELL_KEYS = frozenset({"worker_init", "scheduler_options", "setup", "directives"})
_VARIABLE = re.compile(r"\$(?:\{(\w+)\}|(\w+))")


class DriverJob(_Strict):
    """How the driver runs as a batch job that outlives its walltime (``aimspax-like jobscripts``).

    The job asks for a warning signal ``grace_s`` seconds before its walltime, the driver saves
    its state within that grace, and the job requeues (SLURM) or resubmits itself and continues
    with ``--resume``, at most ``max_restarts`` times.
    """

    scheduler: str | None = Field(None, description="Scheduler of the driver job; default: cluster.kind.")
    walltime: str = Field("24:00:00", description="Wall limit of one driver job, HH:MM:SS.")
    grace_s: int = Field(300, ge=30, description="Seconds before the walltime at which the driver is told to save.")
    max_restarts: int = Field(20, ge=0, description="Requeues or resubmissions before the job gives up.")
    restart: str = Field("requeue", description="'requeue' (SLURM: the same job id again) or 'resubmit' (a new job).")
    directives: list[str] = Field(
        default_factory=list, description="Option lines of the driver job ('--partition=gpu', '-q gpu', ...)."
    )
    setup: list[str] = Field(
        default_factory=list, description="Shell lines before the driver starts (module load, venv activation)."
    )

    _split_lines = field_validator("directives", "setup", mode="before")(lines)

    _hh_mm_ss = field_validator("walltime")(check_walltime)

    @field_validator("restart")
    @classmethod
    def _known_restart(cls, value: str) -> str:
        if value not in ("requeue", "resubmit"):
            raise ValueError("must be 'requeue' or 'resubmit'")
        return value


class SiteProfile(_Strict):
    """One machine's settings; every section is optional."""

    name: str | None = Field(None, description="A name for the machine, recorded in the run.")
    cluster: dict[str, Any] = Field(default_factory=dict, description="Defaults of the campaign's cluster section.")
    reference: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="Per reference kind (aims, cp2k, ...): defaults of the reference section."
    )
    container_prefix: str | None = Field(
        None, description="Put before the reference's command, e.g. 'apptainer exec --bind /scratch dft.sif'."
    )
    driver: DriverJob = Field(default_factory=DriverJob)

    def check_grace(self) -> None:
        if self.driver.grace_s >= walltime_seconds(self.driver.walltime):
            raise ConfigError("driver.grace_s", f"{self.driver.grace_s} s is not shorter than driver.walltime "
                              f"({self.driver.walltime})")


def find_profile(name: str, relative_to: Path | None = None) -> Path:
    """The file of a profile named ``name`` (or ``name`` itself when it is a path)."""
    expanded = expand(name, "site")
    looks_like_path = "/" in expanded or expanded.endswith((".yaml", ".yml"))
    if looks_like_path:
        path = Path(expanded)
        if not path.is_absolute() and relative_to is not None and not path.is_file():
            path = relative_to / path
        if not path.is_file():
            raise ConfigError("site", f"site profile not found: {path}")
        return path.resolve()
    folders = [Path(os.environ[SITE_DIR_ENV]).expanduser()] if os.environ.get(SITE_DIR_ENV) else []
    folders.append(USER_SITE_DIR.expanduser())
    for folder in folders:
        for suffix in (".yaml", ".yml"):
            if (folder / f"{name}{suffix}").is_file():
                return (folder / f"{name}{suffix}").resolve()
    where = " or ".join(str(folder) for folder in folders)
    raise ConfigError("site", f"no site profile named {name!r} in {where}")


def expand(value: str, where: str) -> str:
    """``~`` at the start of any word and ``$VAR`` / ``${VAR}`` replaced; an unset variable is an
    error naming ``where``."""
    for match in _VARIABLE.finditer(value):
        variable = match.group(1) or match.group(2)
        if variable not in os.environ:
            raise ConfigError(where, f"${variable} is not set (in {value!r})")
    home = str(Path("~").expanduser())
    value = re.sub(r"(^|(?<=[\s=:]))~(?=/|\s|$)", lambda _: home, value)
    return os.path.expandvars(value)


def _expand_tree(value: Any, where: str) -> Any:
    if isinstance(value, str):
        return expand(value, where)
    if isinstance(value, dict):
        return {key: item if key in _SHELL_KEYS else _expand_tree(item, f"{where}.{key}")
                for key, item in value.items()}
    if isinstance(value, list):
        return [_expand_tree(item, f"{where}.{i}") for i, item in enumerate(value)]
    return value


def read_profile(path: Path) -> SiteProfile:
    """Read and check a profile file; errors name the key (``site.cluster.provider.queue``)."""
    from aimspax_like.config import _dotted, read_yaml

    data = read_yaml(path)
    if not isinstance(data, dict):
        raise ConfigError(str(path), "a site profile must be a mapping of sections")
    try:
        profile = SiteProfile.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        key = f"site.{_dotted(first['loc'])}"
        message = "unknown key" if first["type"] == "extra_forbidden" else first["msg"].removeprefix("Value error, ")
        raise ConfigError(key, f"{message} (in {path})") from None
    try:
        profile.check_grace()
    except ConfigError as exc:
        raise ConfigError(f"site.{exc.key}", f"{exc.message} (in {path})") from None
    profile.cluster = _expand_tree(profile.cluster, "site.cluster")
    profile.reference = _expand_tree(profile.reference, "site.reference")
    if profile.container_prefix:
        profile.container_prefix = expand(profile.container_prefix, "site.container_prefix")
    return profile


def _merge(defaults: dict[str, Any], explicit: dict[str, Any], prefix: str, applied: dict[str, Any]) -> dict:
    """``explicit`` over ``defaults``, mappings merged key by key; ``applied`` collects what the
    defaults contributed (dotted key -> value)."""
    merged = dict(explicit)
    for key, value in defaults.items():
        where = f"{prefix}.{key}"
        if key not in merged:
            merged[key] = value
            applied.update(_leaves(value, where))
        elif isinstance(value, dict) and isinstance(merged[key], dict):
            merged[key] = _merge(value, merged[key], where, applied)
    return merged


def _leaves(value: Any, where: str) -> dict[str, Any]:
    """A value by dotted key down to its leaves (lists are leaves)."""
    if not isinstance(value, dict) or not value:
        return {where: value}
    leaves: dict[str, Any] = {}
    for key, item in value.items():
        leaves.update(_leaves(item, f"{where}.{key}"))
    return leaves


def apply_profile(raw: dict[str, Any], profile: SiteProfile) -> tuple[dict[str, Any], dict[str, Any]]:
    """The campaign mapping with the profile's defaults filled in, and what they filled in."""
    applied: dict[str, Any] = {}
    merged = dict(raw)
    cluster = raw.get("cluster")
    site_kind = profile.cluster.get("kind", "local")
    if profile.cluster:
        if cluster is None:
            merged["cluster"] = _merge(profile.cluster, {}, "cluster", applied)
        elif isinstance(cluster, dict) and cluster.get("kind", site_kind) == site_kind:
            merged["cluster"] = _merge(profile.cluster, cluster, "cluster", applied)
    reference = raw.get("reference")
    if isinstance(reference, dict):
        block = profile.reference.get(str(reference.get("kind")))
        if block:
            reference = _merge(block, reference, "reference", applied)
        if profile.container_prefix and isinstance(reference.get("command"), str) \
                and not reference["command"].startswith(profile.container_prefix):
            reference = {**reference, "command": f"{profile.container_prefix} {reference['command']}"}
            applied["reference.command"] = reference["command"]
        merged["reference"] = reference
    return merged, applied


def chosen_profile(raw: dict[str, Any], override: str | None) -> str | None:
    """Which profile applies: ``--site``, else the campaign's ``site`` key, else ``$AIMSPAX_SITE``
    (only when the campaign has no ``site`` key at all: ``site: null`` means none)."""
    if override:
        return override
    if "site" in raw:
        return raw["site"] if isinstance(raw["site"], str) and raw["site"] else None
    return os.environ.get(SITE_ENV) or None
