"""Domain errors raised by the qplan library.

The library raises these; only the CLI turns them into messages and exit codes.
Every message says what is wrong, what is available, and what to do.
"""
from __future__ import annotations


class QplanError(Exception):
    """Base class of every error qplan raises on purpose."""

    exit_code = 2  # bad input, unless a subclass says otherwise


class BadInputError(QplanError):
    """The user gave something qplan cannot use (a flag value, a file, a config)."""


class UnknownModelError(BadInputError):
    """A model name that is neither in the catalogue nor a usable config."""


class UnknownGpuError(BadInputError):
    """A GPU name that is not in the catalogue and is not a memory size."""


class ConfigError(BadInputError):
    """A config.json (or plan file) that is missing fields or is malformed."""


class NotModelledError(BadInputError):
    """The memory model does not cover this architecture or setting."""


class NoGpuError(BadInputError):
    """No GPU was detected and none was named."""


class DoesNotFitError(QplanError):
    """Nothing (or the requested configuration) fits in the device memory.

    ``estimate`` is the estimate of the requested or smallest configuration;
    ``alternatives`` are nearby plans that do fit (may be empty).
    """

    exit_code = 3

    def __init__(self, message: str, estimate=None, alternatives=()):
        super().__init__(message)
        self.estimate = estimate
        self.alternatives = tuple(alternatives)


class PluginError(QplanError):
    """A plugin failed to load, or two plugins registered the same name."""


class RunError(QplanError):
    """A training run could not start or could not finish."""

    exit_code = 4
