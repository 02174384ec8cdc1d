"""The small typed exception tree of the engine.

Setup mistakes (bad config, unreadable files, unsupported elements) raise ``SetupError``
subclasses, which the CLI turns into one line and exit code 2. Failures of a single reference
calculation are *not* exceptions at the scheduler's level: they travel as data
(``aimspax_like.reference.results.LabelFailure``), so a failed SCF never crashes a campaign.
"""

from __future__ import annotations


class AimspaxError(Exception):
    """Base class of every error the engine raises on purpose."""


class SetupError(AimspaxError):
    """Something the user must fix before a campaign can start (exit code 2)."""


class ConfigError(SetupError):
    """An invalid campaign config; ``key`` names the offending dotted key or file."""

    def __init__(self, key: str, message: str) -> None:
        self.key = key
        self.message = message
        super().__init__(f"{key}: {message}")


class RunDirectoryError(SetupError):
    """The run directory is in a state that forbids the requested action."""
