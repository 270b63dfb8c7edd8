"""The exceptions moee-ref raises for bad input, each a documented type.

Every message names the problem and says what to do about it. All of them
derive from MoEERefError, so a caller (and the `moee` command line) can catch
the expected failures in one place and let real bugs surface as tracebacks.
"""

import signal


class MoEERefError(Exception):
    """Base class of every expected moee-ref error."""


class ConfigError(MoEERefError, ValueError):
    """config.json is missing a field, has an inconsistent one, or names an unsupported model."""


class CheckpointError(MoEERefError):
    """The weights cannot be found, read or matched to the model (missing, corrupt, wrong shape)."""


class UnsafeCheckpointError(CheckpointError):
    """The checkpoint only offers pickle-based weights (.bin/.pt), which are never loaded."""


class ModelNotFoundError(CheckpointError):
    """A hub id could not be resolved (offline, or no such repository) and no local copy exists."""


class MissingExtraError(MoEERefError):
    """An optional dependency (an extra of moee-ref) is not installed."""


class InputError(MoEERefError, ValueError):
    """Bad model or embedding input: token ids, batch shape, texts, options."""


class UnknownOptionError(InputError, TypeError):
    """A keyword argument the method does not take (a TypeError too, as Python's own would be)."""


class UsageError(MoEERefError):
    """Options that parse but do not fit together, or a flag that cannot apply to the input (the CLI's exit 2)."""


class NumericalError(MoEERefError, ArithmeticError):
    """The model's outputs hold NaN or infinite values (damaged weights, a bad config, or overflow)."""


class Stopped(BaseException):
    """A stop signal arrived. Raised in the main thread like KeyboardInterrupt for Ctrl-C, so that every
    `finally` runs: the temporary output and the spill directory are removed before the process ends."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
