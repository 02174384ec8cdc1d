"""What every config section shares: strict validation and the list-of-lines reader.

Kept apart from ``config`` so that the sections that live in their own modules
(``cluster_config``) and the campaign model use one and the same rules.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict


class _Strict(BaseModel):
    """Base of every config section: unknown keys, loose scalars and non-finite floats are errors.

    pydantic's lax mode would read YAML ``true`` as 1 and the string ``"5"`` as 5, so a slip in
    the YAML would run as some other setting; strict mode takes only real ints (and ints for
    floats). ``1e400`` (inf) or ``.nan`` would pass a ``gt=0`` bound check and be written into the
    run directory's ``campaign.yaml`` as null, so floats must be finite. Paths are the exception
    (``_Path`` in ``config``): YAML has no path type, they come as strings.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True, strict=True, allow_inf_nan=False)


def lines(value: Any) -> Any:
    """One string with newlines or a list of lines -> a list of lines (blank lines dropped).

    Items that are not strings are left for the ``list[str]`` validation to name, not stripped.
    """
    if isinstance(value, str):
        value = value.splitlines()
    if not isinstance(value, list):
        return value
    return [line.strip() if isinstance(line, str) else line for line in value
            if not isinstance(line, str) or line.strip()]
