"""Loading models as TransformerLens ``TransformerBridge`` objects, offline.

:func:`load_bridge` is what ``load_model(..., backend="bridge")`` runs. It takes the same
sources as the HookedTransformer loader except a config (random initialisation needs
``backend="hooked"``):

* a local Hugging Face checkpoint folder: the model is loaded from it and wrapped;
* a mechcna checkpoint folder or shipped model (``"mechcna/arith-small"``): its TransformerLens
  weights are written into an equivalent Hugging Face Llama model (biases kept, including an
  unembedding bias on ``lm_head``), which is wrapped;
* a TransformerLens or Hugging Face model name (needs the Hugging Face cache or the network).

:func:`bridge_from_hf_model` wraps an in-memory Hugging Face model (e.g. one dequantised from
a GGUF file) and :func:`hf_llama_from_tl` builds one from a TransformerLens Llama state dict.
Every bridge is put in compatibility mode (HookedTransformer hook names) with exactly the
requested weight processing, none by default. Each bridge wraps its own Hugging Face model:
wrapping one object twice silently stops some hooks of the first bridge firing.

Example:
    >>> model = load_bridge("mechcna/arith-small", device="cpu")[0]   # doctest: +SKIP
"""

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any, cast

import einops
import torch
from transformer_lens.model_bridge import TransformerBridge
from transformers import PreTrainedTokenizerBase
from transformers.models.llama.modeling_llama import LlamaMLP

from mechcna._types import Tensor
from mechcna.errors import ModelNotFoundError, UnsupportedArchitectureError
from mechcna.models.backend import Model
from mechcna.models.tokenizer import load_tokenizer, prepare_tokenizer

CHECKPOINT_FILE = "mechcna.json"
WEIGHTS_FILE = "model.safetensors"


def bridge_from_hf_model(
    hf_model: Any,
    name: str,
    *,
    tokenizer: PreTrainedTokenizerBase | None,
    device: str | torch.device,
    dtype: torch.dtype,
    processing: Any,
) -> Model:
    """Wrap ``hf_model`` (not shared with another bridge) in compatibility mode.

    Args:
        processing: a :class:`~mechcna.models.loading.WeightProcessing`; none applied by default.
    """
    placeholder = tokenizer is None
    if placeholder:  # without one, the bridge looks for tokenizer files and fails on their absence
        tokenizer = _placeholder_tokenizer(int(hf_model.config.vocab_size))
    bridge = TransformerBridge.boot_transformers(
        name, hf_model=hf_model.to(dtype), tokenizer=tokenizer, device=str(device), dtype=dtype
    )
    if placeholder:  # a model without a tokenizer, as on the hooked backend: token ids only
        bridge._tokenizer = None
        driver = getattr(bridge, "driver", None)
        if driver is not None and hasattr(driver, "tokenizer"):
            driver.tokenizer = None
        bridge.cfg.tokenizer_prepends_bos = False
        bridge.cfg.default_prepend_bos = False
    if processing.any:
        bridge.enable_compatibility_mode(disable_warnings=True, **asdict(processing))
    else:
        bridge.enable_compatibility_mode(disable_warnings=True, no_processing=True)
    return cast(Model, bridge)


def _placeholder_tokenizer(vocab_size: int) -> PreTrainedTokenizerBase:
    """A stand-in tokenizer (token ``i`` spelled ``<i>``) that lets a bridge boot for a
    checkpoint without tokenizer files; it is removed once the bridge is built."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"<{i}>": i for i in range(vocab_size)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<0>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<0>", pad_token="<0>")


def load_bridge(
    source: Any,
    *,
    device: str | torch.device,
    dtype: torch.dtype,
    processing: Any,
    tokenizer: PreTrainedTokenizerBase | None,
    shipped: dict[str, Path],
    gguf: Path | None = None,
) -> tuple[Model, Any, str]:
    """Load ``source`` as a bridge; returns it, the weight processing it carries and the
    source format (``"mechcna"``, ``"huggingface"``, ``"gguf"`` or ``"transformer_lens"``).

    Args:
        shipped: shipped-model names and their checkpoint folders.
        gguf: the GGUF file ``source`` resolved to, if any (dequantised to ``dtype`` by
            transformers, then wrapped).

    Raises:
        UnsupportedArchitectureError: a config (random init), or a mechcna checkpoint that is
            not Llama-like.
        ModelNotFoundError: nothing loadable at ``source``.
    """
    if not isinstance(source, str | Path):
        raise UnsupportedArchitectureError(
            "random initialisation from a config needs backend='hooked' (TransformerLens 3.x); "
            "a bridge wraps a Hugging Face checkpoint"
        )
    name = str(source)
    path = shipped.get(name, Path(name).expanduser())
    if path.is_dir() and (path / CHECKPOINT_FILE).is_file():
        return (*_from_mechcna_checkpoint(path, device, dtype, tokenizer, processing), "mechcna")
    if path.is_dir() and (path / "config.json").is_file():
        hf = _from_hf_directory(path, device, dtype, tokenizer, processing)
        return hf, processing, "huggingface"
    if gguf is not None:
        return _from_gguf(gguf, name, device, dtype, tokenizer, processing), processing, "gguf"
    if path.is_dir() or name.startswith((".", "/", "~")):
        raise ModelNotFoundError(f"no mechcna or Hugging Face checkpoint at {path}")
    try:
        bridge = TransformerBridge.boot_transformers(
            name, device=str(device), dtype=dtype, tokenizer=tokenizer
        )
    except (OSError, ValueError, KeyError) as err:
        raise ModelNotFoundError(
            f"could not load {name!r} as a TransformerBridge: not a local checkpoint, and its "
            f"weights are neither in the Hugging Face cache nor reachable ({err})"
        ) from err
    flags = asdict(processing) if processing.any else {"no_processing": True}
    bridge.enable_compatibility_mode(disable_warnings=True, **flags)
    return cast(Model, bridge), processing, "transformer_lens"


def _from_gguf(
    path: Path,
    name: str,
    device: str | torch.device,
    dtype: torch.dtype,
    tokenizer: PreTrainedTokenizerBase | None,
    processing: Any,
) -> Model:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, file = str(path.parent), path.name
    hf_model = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=file, dtype=dtype, local_files_only=True
    )
    own = tokenizer or AutoTokenizer.from_pretrained(folder, gguf_file=file, local_files_only=True)
    tokenizer = prepare_tokenizer(cast(PreTrainedTokenizerBase, own), name)
    return bridge_from_hf_model(
        hf_model, name, tokenizer=tokenizer, device=device, dtype=dtype, processing=processing
    )


def _from_hf_directory(
    path: Path,
    device: str | torch.device,
    dtype: torch.dtype,
    tokenizer: PreTrainedTokenizerBase | None,
    processing: Any,
) -> Model:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf_model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=dtype)
    if tokenizer is None and any(
        (path / n).is_file() for n in ("tokenizer.json", "tokenizer_config.json", "vocab.json")
    ):
        tokenizer = prepare_tokenizer(
            AutoTokenizer.from_pretrained(path, local_files_only=True), str(path)
        )
    return bridge_from_hf_model(
        hf_model, str(path), tokenizer=tokenizer, device=device, dtype=dtype, processing=processing
    )


def _from_mechcna_checkpoint(
    path: Path,
    device: str | torch.device,
    dtype: torch.dtype,
    tokenizer: PreTrainedTokenizerBase | None,
    processing: Any,
) -> tuple[Model, Any]:
    from safetensors.torch import load_file

    meta = json.loads((path / CHECKPOINT_FILE).read_text())
    stored = type(processing)(**meta.get("processing", {}))
    if stored.any or processing.any:
        raise UnsupportedArchitectureError(
            f"{path}: processed weights (stored {stored}, asked {processing}) are not converted "
            "to a bridge; load it with backend='hooked'"
        )
    if tokenizer is None and (path / "tokenizer.json").is_file():
        tokenizer = load_tokenizer(path, name=path.name)
    state = load_file(str(path / WEIGHTS_FILE))
    hf_model = hf_llama_from_tl(meta["cfg"], state, dtype)
    name = str(meta["cfg"].get("model_name") or path.name)
    bridge = bridge_from_hf_model(
        hf_model, name, tokenizer=tokenizer, device=device, dtype=dtype, processing=processing
    )
    bridge.cfg.default_prepend_bos = bool(meta["cfg"].get("default_prepend_bos", True))
    return bridge, stored


def hf_llama_from_tl(cfg: dict[str, Any], state: dict[str, Tensor], dtype: torch.dtype) -> Any:
    """A Hugging Face ``LlamaForCausalLM`` computing what a TransformerLens Llama-like model
    with config fields ``cfg`` and state dict ``state`` computes (biases included).

    Raises:
        UnsupportedArchitectureError: the config is not Llama-like (RMS norm, rotary over the
            whole head in GPT-NeoX pairing, gated SiLU MLP).
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    problems = [
        f"{k}={cfg.get(k)!r}"
        for k, ok in (
            ("normalization_type", cfg.get("normalization_type") == "RMS"),
            ("positional_embedding_type", cfg.get("positional_embedding_type") == "rotary"),
            ("gated_mlp", bool(cfg.get("gated_mlp"))),
            ("rotary_adjacent_pairs", not cfg.get("rotary_adjacent_pairs")),
            ("rotary_dim", cfg.get("rotary_dim") in (None, cfg["d_head"])),
            ("parallel_attn_mlp", not cfg.get("parallel_attn_mlp")),
            ("attn_only", not cfg.get("attn_only")),
        )
        if not ok
    ]
    if problems:
        raise UnsupportedArchitectureError(
            "only Llama-like mechcna checkpoints convert to a bridge; this one has "
            + ", ".join(problems)
        )
    n, h, m = cfg["n_heads"], cfg["d_head"], cfg["d_model"]
    n_kv = cfg.get("n_key_value_heads") or n
    rope: dict[str, Any] = {"rope_theta": float(cfg.get("rotary_base", 10000))}  # v4 and v5
    config = LlamaConfig(
        vocab_size=cfg["d_vocab"],
        hidden_size=m,
        intermediate_size=cfg["d_mlp"],
        num_hidden_layers=cfg["n_layers"],
        num_attention_heads=n,
        num_key_value_heads=n_kv,
        head_dim=h,
        hidden_act=cfg.get("act_fn", "silu"),
        max_position_embeddings=cfg["n_ctx"],
        rms_norm_eps=cfg.get("eps", 1e-5),
        **rope,
        attention_bias=True,
        mlp_bias=True,
        tie_word_embeddings=False,
    )
    hf: Any = LlamaForCausalLM(config)
    hf.lm_head = torch.nn.Linear(m, cfg["d_vocab"], bias=True)
    for i, layer in enumerate(hf.model.layers):
        b_in = state.get(f"blocks.{i}.mlp.b_in")
        if b_in is not None and bool(b_in.any()):
            layer.mlp = _PostBiasMLP(config, b_in)
    hf.load_state_dict(_llama_state(state, cfg["n_layers"], n_kv, h), strict=True)
    return hf.to(dtype).eval()


class _PostBiasMLP(LlamaMLP):
    """A Llama MLP with TransformerLens's gated-MLP bias: ``b_in`` is added after the gate
    product (``act(x W_gate) * (x W_in) + b_in``), which Hugging Face's per-projection biases
    cannot express. The bias is a parameter of the module, so ``hook_post`` (the input of
    ``down_proj``) sees it as on a HookedTransformer."""

    def __init__(self, config: Any, b_in: Tensor):
        super().__init__(config)
        self.b_in = torch.nn.Parameter(b_in.clone())

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x) + self.b_in)


def _llama_state(state: dict[str, Tensor], n_layers: int, n_kv: int, d_head: int) -> dict:
    def get(key: str, *shape: int) -> Tensor:
        t = state.get(key)
        return t if t is not None else torch.zeros(shape)

    d_model = state["embed.W_E"].shape[1]
    out = {
        "model.embed_tokens.weight": state["embed.W_E"],
        "model.norm.weight": state["ln_final.w"],
        "lm_head.weight": state["unembed.W_U"].T,
        "lm_head.bias": get("unembed.b_U", state["unembed.W_U"].shape[1]),
    }
    for i in range(n_layers):
        b, p = f"blocks.{i}.", f"model.layers.{i}."
        kv = "_" if f"{b}attn._W_K" in state else ""
        n_q = state[f"{b}attn.W_Q"].shape[0]
        out |= {
            f"{p}input_layernorm.weight": state[f"{b}ln1.w"],
            f"{p}post_attention_layernorm.weight": state[f"{b}ln2.w"],
            f"{p}self_attn.q_proj.weight": _heads_in(state[f"{b}attn.W_Q"]),
            f"{p}self_attn.k_proj.weight": _heads_in(state[f"{b}attn.{kv}W_K"]),
            f"{p}self_attn.v_proj.weight": _heads_in(state[f"{b}attn.{kv}W_V"]),
            f"{p}self_attn.q_proj.bias": get(f"{b}attn.b_Q", n_q * d_head).flatten(),
            f"{p}self_attn.k_proj.bias": get(f"{b}attn.{kv}b_K", n_kv * d_head).flatten(),
            f"{p}self_attn.v_proj.bias": get(f"{b}attn.{kv}b_V", n_kv * d_head).flatten(),
            f"{p}self_attn.o_proj.weight": einops.rearrange(
                state[f"{b}attn.W_O"], "head d_head d_model -> d_model (head d_head)"
            ),
            f"{p}self_attn.o_proj.bias": get(f"{b}attn.b_O", d_model),
            f"{p}mlp.gate_proj.weight": state[f"{b}mlp.W_gate"].T,
            f"{p}mlp.up_proj.weight": state[f"{b}mlp.W_in"].T,
            f"{p}mlp.down_proj.weight": state[f"{b}mlp.W_out"].T,
            f"{p}mlp.gate_proj.bias": torch.zeros(state[f"{b}mlp.W_gate"].shape[1]),
            f"{p}mlp.up_proj.bias": torch.zeros(state[f"{b}mlp.W_in"].shape[1]),
            f"{p}mlp.down_proj.bias": get(f"{b}mlp.b_out", d_model),
        }
        b_in = state.get(f"{b}mlp.b_in")
        if b_in is not None and bool(b_in.any()):  # see _PostBiasMLP
            out[f"{p}mlp.b_in"] = b_in
    return {k: v.contiguous() for k, v in out.items()}


def _heads_in(w: Tensor) -> Tensor:
    return einops.rearrange(w, "head d_model d_head -> (head d_head) d_model")
