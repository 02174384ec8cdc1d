"""``aimspax-like init``: the commented campaign template, rendered from the config models.

A hand-written template falls behind the schema whenever a key is added; this one is generated
from ``aimspax_like.config`` itself, so every key is in it with its default and description.
"""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import to_jsonable_python

from aimspax_like.config import CampaignConfig, SystemConfig, XTBReference, _ConfigDumper

_TEMPLATE_WIDTH = 100
_TEMPLATE_HEADER = """\
# aimspax-like campaign, written by `aimspax-like init` from the config models themselves: every key
# is here, set to its default (the aims-PAX paper's numbers). Only system.structures and reference
# are required (geometry.xyz and xTB below are placeholders to edit); keys left out keep their
# defaults. Unknown keys are errors. `aimspax-like schema` prints the JSON schema with every bound."""


def template_config() -> CampaignConfig:
    """The campaign ``aimspax-like init`` writes: every default, GFN2-xTB labels of ./geometry.xyz.

    ``system.structures`` and ``reference`` have no defaults; the template takes the schema's
    example file and the xTB reference, which needs no input files and runs on a laptop.
    """
    return CampaignConfig(system=SystemConfig(structures=[Path("geometry.xyz")]), reference=XTBReference())


def template_yaml() -> str:
    """``template_config`` as commented YAML, rendered from the models so that no key is missing.

    A hand-written template falls behind the schema whenever a key is added. Here every field is
    written with its default and, above it, its description and choices; a section is introduced
    by its description or its class's docstring. The other kinds of a discriminated section
    (``reference``, ``cluster``) follow it commented out, with their own keys; an optional section
    that is off by default (``faults``) is ``null`` with its keys commented out.
    """
    config = template_config()
    lines = [_TEMPLATE_HEADER]
    for name, field in CampaignConfig.model_fields.items():
        lines.append("")
        lines += _template_field(name, field, getattr(config, name), indent=0, comments=True)
    return "\n".join(lines) + "\n"


def _template_model(model: BaseModel, indent: int, comments: bool, only: set[str] | None = None) -> list[str]:
    # A discriminator ('kind') goes first: it decides which of the other keys exist.
    fields = sorted(type(model).model_fields.items(), key=lambda item: item[0] != "kind")
    lines: list[str] = []
    for name, field in fields:
        if only is None or name in only:
            lines += _template_field(name, field, getattr(model, name), indent, comments)
    return lines


def _template_field(name: str, field: FieldInfo, value: Any, indent: int, comments: bool) -> list[str]:
    pad = " " * indent
    lines = _template_comment(_template_note(field, value), indent) if comments else []
    if isinstance(value, BaseModel):
        lines.append(f"{pad}{name}:")
        lines += _template_model(value, indent + 2, comments)
        if field.discriminator is not None and comments:
            lines += _template_other_kinds(name, field, value, indent)
        return lines
    optional_section = _section_type(field.annotation)
    lines.append(f"{pad}{name}: {_flow(value)}")
    if value is None and optional_section is not None and comments:
        lines += _template_comment("To switch it on, replace null by these keys:", indent)
        example = [f"{pad}{name}:", *_template_model(optional_section(), indent + 2, comments=False)]
        lines += [_commented_out(line, indent) for line in example]
    return lines


def _template_other_kinds(name: str, field: FieldInfo, value: BaseModel, indent: int) -> list[str]:
    """The other variants of a discriminated section, commented out, with the keys of their own."""
    shared = set(type(value).model_fields)
    lines = _template_comment(f"Other kinds of {name}, with their own keys (the shared ones as above):", indent)
    for variant in _variants(field):
        if variant is type(value):
            continue
        required = {key: f.examples[0] for key, f in variant.model_fields.items() if f.is_required() and f.examples}
        own = {key for key in variant.model_fields if key not in shared} | {field.discriminator}
        example = [f"{' ' * indent}{name}:", *_template_model(variant.model_validate(required), indent + 2, False, own)]
        lines += [_commented_out(line, indent) for line in example]
    return lines


def _template_note(field: FieldInfo, value: Any) -> str:
    note = field.description or (_doc_summary(type(value)) if isinstance(value, BaseModel) else "")
    if field.discriminator is not None:
        kinds = [kind for v in _variants(field) for kind in get_args(v.model_fields[field.discriminator].annotation)]
        note = f"{note} {field.discriminator}: {' | '.join(kinds)}.".strip()
    choices = _choices(field.annotation)
    if len(choices) > 1:
        note = f"{note} One of: {' | '.join(map(str, choices))}.".strip()
    return note


def _doc_summary(cls: type) -> str:
    """The first paragraph of a class's own docstring on one line ('' without one)."""
    doc = (cls.__dict__.get("__doc__") or "").replace("``", "")
    return " ".join(textwrap.dedent(doc).strip().split("\n\n")[0].split())


def _variants(field: FieldInfo) -> list[type[BaseModel]]:
    return [arg for arg in get_args(field.annotation) if isinstance(arg, type) and issubclass(arg, BaseModel)]


def _section_type(annotation: Any) -> type[BaseModel] | None:
    """The model of an optional section (``FaultInjection | None``), else None."""
    args = [arg for arg in get_args(annotation) if arg is not type(None)]
    if len(args) == 1 and isinstance(args[0], type) and issubclass(args[0], BaseModel):
        return args[0]
    return None


def _choices(annotation: Any) -> tuple[Any, ...]:
    """The values of a ``Literal`` field, optional or not; () for any other type."""
    if get_origin(annotation) is Literal:
        return get_args(annotation)
    return next((get_args(arg) for arg in get_args(annotation) if get_origin(arg) is Literal), ())


def _flow(value: Any) -> str:
    """One value as YAML on one line, quoted wherever the config reader would misread it."""
    text = yaml.dump(to_jsonable_python(value), Dumper=_ConfigDumper, default_flow_style=True, width=10**6)
    return text.removesuffix("\n...\n").strip()


def _template_comment(text: str, indent: int) -> list[str]:
    pad = " " * indent
    return [f"{pad}# {line}" for line in textwrap.wrap(text, width=_TEMPLATE_WIDTH - indent - 2)]


def _commented_out(line: str, indent: int) -> str:
    # '# ' goes at the section's indentation so that deleting it leaves valid YAML.
    return f"{' ' * indent}# {line[indent:]}"
