"""Checking user input before any work: integers, counts, options, prompts, attached hooks.

Every public function validates its arguments with these helpers so a mistake ends in a
:class:`~mechcna.errors.MechcnaError` subclass naming it (``docs/errors.md`` lists them all),
never in a traceback from deep inside torch or in a plausible wrong number.

The rule for component indices is the same everywhere: layers, heads and neurons are
non-negative integers below their count (``-1`` is rejected, not read as the last layer).
"""

import math
import operator
import warnings
from collections.abc import Iterable, Sequence
from typing import Any

import torch

from mechcna.errors import (
    ComponentIndexError,
    DeviceError,
    DtypeError,
    EmptyInputError,
    InvalidOptionError,
    MissingWeightsError,
    PromptTypeError,
    UserHookWarning,
)
from mechcna.models.backend import Model, is_bridge

_WARNED_ATTR = "_mechcna_warned_hooks"


def as_int(value: Any, what: str) -> int:
    """``value`` as a Python int; bools, floats and strings are rejected."""
    if isinstance(value, (bool, float, str, bytes)) or (
        isinstance(value, torch.Tensor) and (value.ndim != 0 or value.is_floating_point())
    ):
        raise ComponentIndexError(f"{what} must be an integer, not {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise ComponentIndexError(f"{what} must be an integer, not {value!r}") from None


def index_in(value: Any, size: int, what: str) -> int:
    """A non-negative integer index below ``size`` (``what`` names it)."""
    i = as_int(value, what)
    if not 0 <= i < size:
        rule = " (indices are non-negative: -1 does not mean the last)" if i < 0 else ""
        raise ComponentIndexError(f"{what} {i} out of range: must be in 0..{size - 1}{rule}")
    return i


def pair(value: Any, what: str) -> tuple[Any, Any]:
    """A two-element tuple/list, e.g. a ``(layer, head)`` pair."""
    if isinstance(value, (str, bytes, torch.Tensor)) or not isinstance(value, Sequence):
        raise ComponentIndexError(f"{what} must be a pair of integers, not {value!r}")
    if len(value) != 2:
        raise ComponentIndexError(f"{what} must be a pair of integers, not {value!r}")
    return value[0], value[1]


def positive_int(value: Any, what: str) -> int:
    """An integer of at least 1 (e.g. ``k`` of ``.top(k)``)."""
    if isinstance(value, (bool, float, str)):
        raise InvalidOptionError(f"{what} must be a positive integer, not {value!r}")
    try:
        v = operator.index(value)
    except TypeError:
        raise InvalidOptionError(f"{what} must be a positive integer, not {value!r}") from None
    if v < 1:
        raise InvalidOptionError(f"{what} must be a positive integer, not {v}")
    return v


def tolerance(value: Any) -> float:
    """A certification tolerance: a finite number of at least 0 (0: every score exact)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidOptionError(f"tol must be a number, not {value!r}")
    if not math.isfinite(value) or value < 0:
        raise InvalidOptionError(f"tol must be a finite number of at least 0, not {value!r}")
    return float(value)


def non_negative(value: Any, what: str) -> float:
    """A finite number of at least 0 (e.g. a threshold)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidOptionError(f"{what} must be a number, not {value!r}")
    if not math.isfinite(value) or value < 0:
        raise InvalidOptionError(f"{what} must be a finite number of at least 0, not {value!r}")
    return value


def edit_value(op: str, value: Any) -> float:
    """The value of a neuron edit: none for ``"zero"`` (stored as 0), a finite number for
    ``"scale"`` and ``"set"`` (a missing one would silently scale by 0)."""
    if op == "zero":
        if value not in (None, 0):
            raise InvalidOptionError(f"NeuronEdit(mode='zero') takes no value, got {value!r}")
        return 0.0
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise InvalidOptionError(f"NeuronEdit(mode={op!r}) needs a finite value=..., not {value!r}")
    return float(value)


def choice(value: Any, options: Iterable[Any], what: str) -> Any:
    """``value`` if it is one of ``options``; else a clear error listing them."""
    opts = tuple(options)
    if not isinstance(value, (str, int)) or value not in opts:
        listed = ", ".join(repr(o) for o in opts)
        raise InvalidOptionError(f"{what} must be one of {listed}, not {value!r}")
    return value


def check_prompt_list(prompts: Any) -> tuple[str, ...]:
    """A string or a non-empty sequence of strings, as a tuple."""
    if isinstance(prompts, str):
        return (prompts,)
    if not isinstance(prompts, Iterable):
        raise PromptTypeError(
            f"prompts must be a string, a list of strings or token ids, not {type(prompts)}"
        )
    out = tuple(prompts)
    if not out:
        raise EmptyInputError("no prompts given")
    for i, p in enumerate(out):
        if not isinstance(p, str):
            raise PromptTypeError(f"prompt {i} is {type(p).__name__} {p!r}, not a string")
    return out


def _attached_hooks(model: Model) -> list[str]:
    names = []
    # A bridge hooks the Hugging Face modules it wraps itself (GPT-2's joint QKV split):
    # only its hook points carry users' hooks.
    modules = model.hook_dict.items() if is_bridge(model) else model.named_modules()
    for name, module in modules:
        if module._forward_hooks or module._forward_pre_hooks or module._backward_hooks:
            names.append(name or "<model>")
    return names


def warn_user_hooks(model: Model) -> None:
    """Warn (once per model) when hooks are attached before an analysis adds its own.

    Hooks that change activations break the identities scores rest on (layer scores no
    longer telescope); pass changes as ``interventions=`` instead.
    """
    names = _attached_hooks(model)
    if not names or getattr(model, _WARNED_ATTR, False):
        return
    object.__setattr__(model, _WARNED_ATTR, True)
    shown = ", ".join(names[:3]) + (" ..." if len(names) > 3 else "")
    warnings.warn(
        f"hooks are attached to the model ({shown}); scores assume an unmodified forward "
        "pass (layer scores no longer telescope): pass changes as interventions= instead, or "
        "remove them with model.reset_hooks()",
        UserHookWarning,
        stacklevel=3,
    )


def check_dtype(dtype: Any) -> torch.dtype:
    """A floating-point ``torch.dtype`` (a string such as ``"float16"`` is refused, naming
    the ``torch.float16`` to pass instead)."""
    if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
        return dtype
    if isinstance(dtype, str):
        hint = getattr(torch, dtype.removeprefix("torch."), None)
        if isinstance(hint, torch.dtype):
            raise DtypeError(f"dtype must be a torch.dtype: pass {hint} instead of {dtype!r}")
        raise DtypeError(f"unknown dtype {dtype!r}: pass a torch.dtype such as torch.float32")
    raise DtypeError(f"dtype must be a floating-point torch.dtype, not {dtype!r}")


def check_device(device: Any) -> torch.device:
    """A device that exists on this machine (``"cuda"`` without CUDA is refused)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise DeviceError(f"unknown device {device!r}: use 'cpu', 'cuda' or 'cuda:N'") from None
    available = {
        "cpu": True,
        "cuda": torch.cuda.is_available(),
        "mps": torch.backends.mps.is_available(),
    }
    missing = dev.type == "cuda" and (dev.index or 0) >= torch.cuda.device_count()
    if not available.get(dev.type, False) or missing:
        raise DeviceError(f"device {device!r} is not available on this machine")
    return dev


WEIGHT_FILES = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.gguf")


def check_weight_files(path: Any) -> None:
    """A Hugging Face checkpoint directory must hold weight files next to ``config.json``."""
    from pathlib import Path

    if not any(any(Path(path).glob(p)) for p in WEIGHT_FILES):
        raise MissingWeightsError(
            f"{path} has config.json but no weights ({', '.join(WEIGHT_FILES)}); download the "
            "model files too, or pass the directory that holds them"
        )
