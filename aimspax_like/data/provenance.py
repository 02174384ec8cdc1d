"""One level of theory per training set: the provenance guard.

A frame's ``reference`` is the fingerprint of the settings that labelled it (or a level of
theory a user declared for imported data). A model trained on frames from two references learns
neither: energies of PBE and PBE0 differ by far more than the errors a force field is judged by,
and nothing in the loss can tell which frame belongs to which. So every path that trains
(a campaign's phases, ``aimspax-like train``) asks ``check_one_reference`` first, and mixing is
refused with a message naming both references, unless the user says it is intended
(``training.allow_mixed_references``, ``train --allow-mixed-references``): for example two
codes known to agree, or a declared name for data labelled with the very same settings.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Iterable

from aimspax_like.data.frames import LabelledFrame
from aimspax_like.errors import SetupError

_REFERENCE_WIDTH = 64  # the store's width of ``reference``


class MixedReferences(SetupError):
    """Frames of more than one reference fingerprint would be trained on together."""


def declared_reference(text: str) -> str:
    """The ``reference`` stored for frames whose level of theory a user named (``PBE0/def2-TZVP``).

    Kept readable when it fits the store's 64 ASCII characters, so the guard's message says
    what the user wrote; anything else becomes ``declared:`` and a hash of the text.
    """
    text = text.strip()
    if text and text.isascii() and len(text) <= _REFERENCE_WIDTH:
        return text
    return "declared:" + hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def check_one_reference(
    frames: Iterable[LabelledFrame],
    allow_mixed: bool = False,
    key: str = "training.allow_mixed_references",
    campaign_reference: str | None = None,
) -> list[str]:
    """The distinct references of the frames, most frequent first; more than one is refused.

    ``key`` names the switch that allows mixing in the message (the config key, or the command
    line flag of ``aimspax-like train``). ``campaign_reference``: the fingerprint of labels still
    to come (a campaign's own reference), counted as one more reference before they exist.
    """
    counts: Counter[str] = Counter()
    origins: dict[str, Counter[str]] = {}
    example: dict[str, str] = {}
    if campaign_reference is not None:
        counts[campaign_reference] += 0
        origins[campaign_reference] = Counter()
    for frame in frames:
        counts[frame.reference] += 1
        origins.setdefault(frame.reference, Counter())[frame.origin] += 1
        if frame.source and frame.reference not in example:
            example[frame.reference] = frame.source
    found = [ref for ref, _ in counts.most_common()]
    if len(found) > 1 and not allow_mixed:
        described = [_describe(ref, counts[ref], origins[ref], example.get(ref), ref == campaign_reference)
                     for ref in found[:2]]
        more = f" (and {len(found) - 2} more)" if len(found) > 2 else ""
        raise MixedReferences(
            f"{key}: the training data mix two references, {described[0]} and {described[1]}{more}; "
            "a model cannot learn both levels of theory at once. Relabel one part with the other "
            "(aimspax-like recompute), leave it out, or set "
            f"{key} if the labels are known to agree"
        )
    return found


def _describe(reference: str, count: int, origins: Counter[str], source: str | None, campaign: bool) -> str:
    if not count:
        return f"'{reference}' (this campaign's reference, labels to come)"
    kinds = ", ".join(f"{n} {origin}" for origin, n in origins.most_common())
    where = f", e.g. {source}" if source else ""
    mine = "; this campaign's reference" if campaign else ""
    return f"'{reference or '(none)'}' ({count} frames: {kinds}{where}{mine})"
