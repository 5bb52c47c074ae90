"""Errors the user sees, and the one-warning fallback used by every stage."""
from __future__ import annotations

import warnings


class FusionError(Exception):
    """Base class of errors raised by fusion."""


class FusionInputError(FusionError, TypeError):
    """The API was called with something it cannot use; the message says what to pass instead."""


class FusionFallbackWarning(UserWarning):
    """An internal stage failed; the original graph (or the graph before that stage) runs instead."""


def warn_fallback(stage: str, detail: str, *, what_runs: str) -> None:
    warnings.warn(
        f"fusion: the {stage} stage failed ({detail}); {what_runs}. "
        f"Results are unaffected; set fusion.Config(fallback=False) to raise instead.",
        FusionFallbackWarning,
        stacklevel=3,
    )
