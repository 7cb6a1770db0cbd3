"""Errors mechcna raises for user mistakes, so they never surface as torch tracebacks."""


class MechcnaError(ValueError):
    """Base class for every error mechcna raises on bad input."""


class UnsupportedArchitectureError(MechcnaError):
    """The model uses an architecture whose hooks or weights mechcna does not support."""


class ModelNotFoundError(MechcnaError, FileNotFoundError):
    """A model name or checkpoint directory could not be resolved."""


class ModelCheckError(MechcnaError, AssertionError):
    """A residual-stream self-check failed (see :func:`mechcna.check_model`)."""


class TokenizationError(MechcnaError):
    """A target or prompt could not be tokenised as required (e.g. not a single token)."""
