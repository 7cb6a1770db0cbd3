"""Errors mechcna raises for user mistakes, so they never surface as torch tracebacks.

Every error is a :class:`MechcnaError` (a ``ValueError``) subclass naming the mistake, raised
before any work. ``docs/errors.md`` lists each bad input with the message it gets.
"""


class MechcnaError(ValueError):
    """Base class for every error mechcna raises on bad input."""


class UnsupportedArchitectureError(MechcnaError):
    """The model uses an architecture whose hooks or weights mechcna does not support."""


class ModelNotFoundError(MechcnaError, FileNotFoundError):
    """A model name or checkpoint directory could not be resolved."""


class MissingWeightsError(ModelNotFoundError):
    """A checkpoint directory has a config but no weight files."""


class ModelCheckError(MechcnaError, AssertionError):
    """A residual-stream self-check failed (see :func:`mechcna.check_model`)."""


class NonFiniteError(ModelCheckError):
    """A weight, activation or score is NaN or infinite (the message names the layer)."""


class TokenizationError(MechcnaError):
    """A target or prompt could not be tokenised as required (e.g. not a single token)."""


class UnknownTokenError(TokenizationError):
    """A prompt word is not in the vocabulary: it maps to the tokenizer's unknown token."""


class EmptyPromptError(TokenizationError):
    """A prompt is empty (or tokenises to no tokens)."""


class TokenIdError(TokenizationError, IndexError):
    """A token id lies outside the model's vocabulary."""


class PromptTypeError(MechcnaError, TypeError):
    """Prompts are not strings or integer token ids."""


class EmptyInputError(MechcnaError):
    """No prompts, cases, heads or neurons were given where some are needed."""


class ComponentIndexError(MechcnaError, IndexError):
    """A layer, head or neuron is malformed, negative or out of range."""


class PositionError(MechcnaError, IndexError):
    """A position lies outside a prompt's real tokens."""


class InvalidOptionError(MechcnaError):
    """An option is not one of its allowed values (e.g. ``method="fast"``), or a count such as
    ``k`` is not a positive integer."""


class DeviceError(MechcnaError):
    """A device is unknown or not available on this machine."""


class DtypeError(MechcnaError, TypeError):
    """A dtype is not a floating-point ``torch.dtype``."""


class WeightProcessingError(MechcnaError):
    """The model's weights were processed (LayerNorm folded, weights centred, value biases
    folded) in a way that changes this analysis's scores."""


class PathOrderError(MechcnaError):
    """A transfer path runs a vector through an attention layer that cannot read it."""


class UserHookWarning(UserWarning):
    """An analysis ran while a hook of the user's was attached to the model."""
