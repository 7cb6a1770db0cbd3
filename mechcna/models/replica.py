"""Independent copies of a model (either backend), for interventions written into weights."""

import copy
from typing import Any

from mechcna.errors import UnsupportedArchitectureError
from mechcna.models.backend import Model, is_bridge
from mechcna.models.bridge import bridge_from_hf_model
from mechcna.models.processing import NO_PROCESSING


def copy_model(model: Model) -> Model:
    """A deep copy of ``model``.

    A TransformerBridge with joint-QKV attention (GPT-2) cannot be deep-copied (TL 3.9 and
    4.3: its split Q/K/V weights are not graph leaves); an unprocessed one is copied by
    wrapping a deep copy of its Hugging Face model in a new bridge, with the same tokenizer,
    BOS default and mechcna records.

    Raises:
        UnsupportedArchitectureError: the model cannot be copied (a processed joint-QKV
            bridge: re-processing the copy would not reproduce its weights exactly).
    """
    try:
        return copy.deepcopy(model)
    except RuntimeError as err:
        if is_bridge(model) and not getattr(model, "_weights_processed", False):
            return _rewrap_bridge(model)
        raise UnsupportedArchitectureError(
            f"this {type(model).__name__} cannot be deep-copied ({err}); apply the "
            "intervention with hooks (mechcna.intervene), or load a second copy"
        ) from err


def _rewrap_bridge(model: Model) -> Model:
    hf: Any = copy.deepcopy(getattr(model, "original_model"))  # noqa: B009
    param = next(hf.parameters())
    new = bridge_from_hf_model(
        hf,
        model.cfg.model_name,
        tokenizer=model.tokenizer,
        device=param.device,
        dtype=param.dtype,
        processing=NO_PROCESSING,
    )
    new.cfg.default_prepend_bos = model.cfg.default_prepend_bos
    for name, value in vars(model).items():
        if name.startswith("_mechcna_"):
            object.__setattr__(new, name, value)
    return new
