"""The small typed exception tree of the engine.

Setup mistakes (bad config, unreadable files, unsupported elements) raise ``SetupError``
subclasses, which the CLI turns into one line and exit code 2. Failures of a single reference
calculation are *not* exceptions at the scheduler's level: they travel as data
(``aimspax_like.reference.results.LabelFailure``), so a failed SCF never crashes a campaign.
``CampaignInterrupted`` is no mistake at all: a campaign stopped cleanly after a signal.
"""

from __future__ import annotations

import signal


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


class CampaignInterrupted(AimspaxError):
    """Raised at a clean stopping point after a signal; the state to resume from is already on disk.

    Not a ``SetupError``: nothing needs fixing, and the CLI exits ``128 + signum`` (not 2) so a
    batch system sees the signal. It lives here, not beside the checkpoint code, because every
    phase and the scheduler raise it and none of them should depend on how state is saved.
    """

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(f"stopped by {signal.Signals(signum).name}; state saved, resume to continue")


class CampaignStopped(AimspaxError):
    """The campaign cannot go on for now, but its state is saved (CLI exit code 3, "resume to continue").

    Unlike a ``SetupError`` it is found mid-run (labels that keep failing, a full disk); unlike
    ``CampaignInterrupted`` nobody asked for it.
    """

    exit_code = 3


class LabelsKeepFailing(CampaignStopped):
    """The reference failed ``count`` times in a row: something systematic, not one bad geometry."""

    def __init__(self, count: int, phase: str, last: str) -> None:
        self.count = count
        self.phase = phase
        super().__init__(f"labels keep failing: {count} failed tries in a row ({phase}; last: {last}); "
                         "fix the reference, then resume to continue")


class DiskFull(CampaignStopped):
    """A write found no space left on the run directory's file system."""

    def __init__(self, path: str) -> None:
        super().__init__(f"{path}: no space left on the file system; state saved, free space and resume to continue")
