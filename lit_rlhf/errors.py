"""Errors a user can fix. ``lit-rlhf`` prints them as one line (what, which field, the fix) and exits 2;
``LIT_RLHF_DEBUG=1`` (or ``--debug``) shows the traceback as well."""

from __future__ import annotations


class LitRLHFError(Exception):
    """A problem with the recipe, the data or the models, explained in its message."""


class ConfigError(LitRLHFError, ValueError):
    """A setting, a file or a model that cannot work; found before or while the run starts."""


class TrainingError(LitRLHFError, RuntimeError):
    """A run that had to stop (e.g. non-finite updates); its last good state is saved."""
