"""Exception types raised by ist_ds.

Every error a user can cause (a bad config, a model without adapters, a data file in the wrong
format, a checkpoint that does not fit) is raised as a subclass of :class:`ISTError`, with a message
that names the offending key, file or value. They also derive from ``ValueError`` so that callers
that already catch ``ValueError`` keep working.
"""


class ISTError(ValueError):
    """Base class of every user-facing ist_ds error."""


class ISTConfigError(ISTError):
    """The ``ist`` block (or a training recipe) is invalid."""


class ISTModelError(ISTError):
    """The model cannot be used with IST (no PEFT adapters, no transformer blocks, ...)."""


class ISTDataError(ISTError):
    """A data file is missing or not in the expected format."""


class ISTCheckpointError(ISTError):
    """A checkpoint is missing, corrupted, or belongs to a different model or configuration."""


class ISTLaunchError(ISTError, RuntimeError):
    """The job could not be formed: launcher variables missing or inconsistent, the master unreachable,
    or peers that never joined. The message names the address and what to check."""


class ISTAgreementError(RuntimeError):
    """Ranks disagree on the IST state (selection, scores or step).

    Raised on every rank at the same collective, so the job stops with a message instead of
    hanging or silently training different layers on different ranks.
    """
