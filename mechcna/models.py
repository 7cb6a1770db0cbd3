"""Loading models, with explicit and recorded weight processing.

:func:`load_model` accepts

* a TransformerLens pretrained name (``"gpt2"``, ``"meta-llama/Llama-2-7b-hf"``): the normal
  path when the Hugging Face cache or the network has the weights;
* a local Hugging Face checkpoint directory (GPT-2 and Llama families), converted offline;
* a :class:`~transformer_lens.HookedTransformerConfig` (random initialisation, seeded);
* a mechcna checkpoint directory written by :func:`save_checkpoint`, or the name of a model
  that ships with the package (``"mechcna/arith-small"``).

Weight processing (folding LayerNorm, centring, folding value biases) changes raw inner
products and some scores, so the default is **no processing**: scores then follow the papers'
definitions (METHODS.md sections 3 and 10). Whatever was applied is recorded on the model and
read back with :func:`get_processing`.

Example:
    >>> from transformer_lens import HookedTransformerConfig
    >>> cfg = HookedTransformerConfig(n_layers=1, d_model=16, n_heads=2, d_head=8, d_mlp=32,
    ...                               n_ctx=8, d_vocab=20, act_fn="gelu_new",
    ...                               normalization_type="LN")
    >>> model = load_model(cfg, seed=0)
    >>> get_processing(model).any
    False
"""

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from mechcna.backend import (
    Backend,
    HookedTransformer,
    HookedTransformerConfig,
    Model,
    architecture_name,
    check_backend,
)
from mechcna.bridge import load_bridge
from mechcna.errors import ModelNotFoundError, UnsupportedArchitectureError
from mechcna.tokenizer import load_tokenizer, prepare_tokenizer

logger = logging.getLogger(__name__)

CHECKPOINT_FILE = "mechcna.json"
WEIGHTS_FILE = "model.safetensors"
CHECKPOINT_DIR = Path(__file__).parent / "checkpoints"
#: Models that ship inside the package, by the name :func:`load_model` accepts.
SHIPPED_MODELS: dict[str, str] = {"mechcna/arith-small": "arith-small"}

# HookedTransformerConfig fields that define the architecture (saved in mechcna checkpoints).
_CFG_FIELDS = (
    "n_layers d_model n_ctx d_head n_heads d_mlp d_vocab act_fn eps normalization_type "
    "positional_embedding_type rotary_dim rotary_base rotary_adjacent_pairs gated_mlp "
    "n_key_value_heads final_rms attn_only original_architecture use_attn_scale "
    "default_prepend_bos tokenizer_prepends_bos model_name parallel_attn_mlp"
).split()


@dataclass(frozen=True)
class WeightProcessing:
    """Which of TransformerLens's weight-processing steps were applied to a model."""

    fold_ln: bool = False
    center_writing_weights: bool = False
    center_unembed: bool = False
    fold_value_biases: bool = False

    @property
    def any(self) -> bool:
        return any(asdict(self).values())


NO_PROCESSING = WeightProcessing()
_PROCESSING_ATTR = "_mechcna_processing"


def get_processing(model: Model) -> WeightProcessing | None:
    """The weight processing recorded by :func:`load_model` (``None`` if unknown)."""
    return getattr(model, _PROCESSING_ATTR, None)


def _record(model: Model, processing: WeightProcessing) -> Model:
    object.__setattr__(model, _PROCESSING_ATTR, processing)
    return model


def default_device() -> str:
    """``"cuda"`` when available, else ``"cpu"``."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_model(
    source: str | Path | HookedTransformerConfig,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    processing: WeightProcessing = NO_PROCESSING,
    tokenizer: PreTrainedTokenizerBase | None = None,
    prepend_bos: bool | None = None,
    seed: int | None = None,
    backend: Backend | None = None,
) -> Model:
    """Load a model as a :class:`HookedTransformer` or a ``TransformerBridge``, with weight
    processing made explicit.

    Args:
        source: a TransformerLens model name, a local Hugging Face checkpoint directory, a
            mechcna checkpoint directory or shipped-model name, or a config (random init).
        device: where to put the model; defaults to CUDA when available.
        dtype: parameter dtype (fp32 by default, as in the papers' code).
        processing: weight processing to apply; default none (the papers' definitions).
        tokenizer: overrides the tokenizer found with the checkpoint.
        prepend_bos: default BOS policy; ``None`` follows the papers (no BOS for GPT-2,
            BOS otherwise).
        seed: seed for random initialisation from a config.
        backend: ``"hooked"`` (a HookedTransformer) or ``"bridge"`` (a TransformerBridge in
            compatibility mode, :mod:`mechcna.bridge`); default ``"hooked"`` where the
            installed TransformerLens has it (3.x), ``"bridge"`` otherwise (4.x).

    Raises:
        ModelNotFoundError: the name or directory does not resolve to a model.
        UnsupportedArchitectureError: a local checkpoint of an unsupported family.
    """
    device = device or default_device()
    if check_backend(backend) == "bridge":
        shipped = {k: CHECKPOINT_DIR / v for k, v in SHIPPED_MODELS.items()}
        model, done = load_bridge(
            source, device=device, dtype=dtype, processing=processing, tokenizer=tokenizer,
            shipped=shipped,
        )  # fmt: skip
        return _finish(model, done, prepend_bos)
    if isinstance(source, HookedTransformerConfig):
        model = _from_config(source, device, dtype, tokenizer, seed)
        if processing.any:
            raise UnsupportedArchitectureError(
                "weight processing needs trained weights; process after loading a checkpoint"
            )
        return _finish(model, NO_PROCESSING, prepend_bos)
    name = str(source)
    if name in SHIPPED_MODELS:
        path = CHECKPOINT_DIR / SHIPPED_MODELS[name]
        if not (path / CHECKPOINT_FILE).is_file():
            raise ModelNotFoundError(
                f"shipped model {name!r} is missing from {path}; reinstall mechcna or run "
                "`mechcna train-arithmetic` to rebuild it"
            )
        source = path
    path = Path(source)
    if path.is_dir():
        if (path / CHECKPOINT_FILE).is_file():
            model, stored = _from_mechcna_checkpoint(path, device, dtype, tokenizer, processing)
            return _finish(model, stored, prepend_bos)
        if (path / "config.json").is_file():
            model = _from_hf_directory(path, device, dtype, tokenizer, processing)
            return _finish(model, processing, prepend_bos)
        raise ModelNotFoundError(
            f"{path} is a directory but holds neither {CHECKPOINT_FILE} (mechcna checkpoint) "
            "nor config.json (Hugging Face checkpoint)"
        )
    if name.startswith((".", "/", "~")) or path.exists():
        raise ModelNotFoundError(f"no model directory at {path}")
    model = _from_pretrained_name(name, device, dtype, tokenizer, processing)
    return _finish(model, processing, prepend_bos)


def _finish(model: Model, processing: WeightProcessing, prepend_bos: bool | None) -> Model:
    if prepend_bos is None:
        arch = architecture_name(model)
        prepend_bos = not arch.startswith("GPT2")
    model.cfg.default_prepend_bos = prepend_bos
    model.eval()
    return _record(model, processing)


def _from_config(
    cfg: HookedTransformerConfig,
    device: str | torch.device,
    dtype: torch.dtype,
    tokenizer: PreTrainedTokenizerBase | None,
    seed: int | None,
) -> Model:
    cfg = HookedTransformerConfig.from_dict(
        {**cfg.to_dict(), "device": str(device), "dtype": dtype}
    )
    if seed is not None:
        cfg.seed = seed
    if tokenizer is not None:
        prepare_tokenizer(tokenizer, tokenizer.name_or_path or "mechcna-tokenizer")
    return HookedTransformer(cfg, tokenizer=tokenizer, move_to_device=True)


def _from_pretrained_name(
    name: str,
    device: str | torch.device,
    dtype: torch.dtype,
    tokenizer: PreTrainedTokenizerBase | None,
    processing: WeightProcessing,
) -> Model:
    try:
        return HookedTransformer.from_pretrained(
            name,
            device=str(device),
            dtype=dtype,  # type: ignore[arg-type]
            tokenizer=tokenizer,
            **asdict(processing),
        )
    except (OSError, ValueError, KeyError) as err:
        raise ModelNotFoundError(
            f"could not load {name!r}: it is neither a TransformerLens model name whose weights "
            f"are in the Hugging Face cache or reachable online, nor a local directory ({err})"
        ) from err


def hf_config_to_tl(hf_config: Any) -> HookedTransformerConfig:
    """Build a :class:`HookedTransformerConfig` from a Hugging Face GPT-2 or Llama config.

    Raises:
        UnsupportedArchitectureError: for other model families.
    """
    kind = getattr(hf_config, "model_type", None)
    if kind == "gpt2":
        fields: dict[str, Any] = {
            "d_model": hf_config.n_embd,
            "d_head": hf_config.n_embd // hf_config.n_head,
            "n_heads": hf_config.n_head,
            "d_mlp": hf_config.n_inner or 4 * hf_config.n_embd,
            "n_layers": hf_config.n_layer,
            "n_ctx": hf_config.n_positions,
            "eps": hf_config.layer_norm_epsilon,
            "d_vocab": hf_config.vocab_size,
            "act_fn": hf_config.activation_function,
            "use_attn_scale": getattr(hf_config, "scale_attn_weights", True),
            "scale_attn_by_inverse_layer_idx": hf_config.scale_attn_by_inverse_layer_idx,
            "normalization_type": "LN",
            "original_architecture": "GPT2LMHeadModel",
        }
    elif kind == "llama":
        n_heads = hf_config.num_attention_heads
        d_head = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // n_heads
        n_kv = getattr(hf_config, "num_key_value_heads", None) or n_heads
        rope = getattr(hf_config, "rope_theta", None)
        if rope is None:
            params = getattr(hf_config, "rope_parameters", None) or {}
            rope = params.get("rope_theta", 10000.0)
        fields = {
            "d_model": hf_config.hidden_size,
            "d_head": d_head,
            "n_heads": n_heads,
            "d_mlp": hf_config.intermediate_size,
            "n_layers": hf_config.num_hidden_layers,
            "n_ctx": min(hf_config.max_position_embeddings, 4096),
            "eps": hf_config.rms_norm_eps,
            "d_vocab": hf_config.vocab_size,
            "act_fn": hf_config.hidden_act,
            "n_key_value_heads": n_kv if n_kv != n_heads else None,
            "normalization_type": "RMS",
            "positional_embedding_type": "rotary",
            "rotary_adjacent_pairs": False,
            "rotary_dim": d_head,
            "rotary_base": float(rope),
            "final_rms": True,
            "gated_mlp": True,
            "original_architecture": "LlamaForCausalLM",
        }
    else:
        raise UnsupportedArchitectureError(
            f"local checkpoints of model_type {kind!r} are not supported; mechcna converts "
            "GPT-2 ('gpt2') and Llama ('llama') checkpoints"
        )
    return HookedTransformerConfig(**fields)


def _from_hf_directory(
    path: Path,
    device: str | torch.device,
    dtype: torch.dtype,
    tokenizer: PreTrainedTokenizerBase | None,
    processing: WeightProcessing,
) -> Model:
    from transformer_lens.pretrained.weight_conversions import (
        convert_gpt2_weights,
        convert_llama_weights,
    )
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    hf_config = AutoConfig.from_pretrained(path, local_files_only=True)
    tl_cfg = hf_config_to_tl(hf_config)
    hf_model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=dtype)
    convert = convert_gpt2_weights if hf_config.model_type == "gpt2" else convert_llama_weights
    tokenizer = tokenizer or _maybe_tokenizer(path, AutoTokenizer)
    return from_hf_model(hf_model, tl_cfg, device, dtype, tokenizer, processing, convert)


def _maybe_tokenizer(path: Path, auto_tokenizer: Any) -> PreTrainedTokenizerBase | None:
    names = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")
    if not any((path / n).is_file() for n in names):
        return None
    tok = auto_tokenizer.from_pretrained(path, local_files_only=True)
    return prepare_tokenizer(tok, str(path))


def from_hf_model(
    hf_model: Any,
    tl_cfg: HookedTransformerConfig,
    device: str | torch.device,
    dtype: torch.dtype,
    tokenizer: PreTrainedTokenizerBase | None,
    processing: WeightProcessing,
    convert: Any,
) -> Model:
    """Convert an in-memory Hugging Face model with TransformerLens's weight converters."""
    tl_cfg = HookedTransformerConfig.from_dict(
        {**tl_cfg.to_dict(), "device": str(device), "dtype": dtype}
    )
    state_dict = convert(hf_model, tl_cfg)
    model = HookedTransformer(tl_cfg, tokenizer=tokenizer, move_to_device=False)
    model.load_and_process_state_dict(
        {k: v.to(dtype) for k, v in state_dict.items()}, **asdict(processing)
    )
    return model.to(device)


def save_checkpoint(model: Model, path: str | Path, card: dict[str, Any] | None = None) -> Path:
    """Save weights (safetensors), config, tokenizer and a card into ``path``.

    Returns:
        The directory written.
    """
    from safetensors.torch import save_file

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    cfg = {k: getattr(model.cfg, k) for k in _CFG_FIELDS}
    processing = get_processing(model) or NO_PROCESSING
    meta = {"format": "mechcna-checkpoint/1", "cfg": cfg, "processing": asdict(processing)}
    (out / CHECKPOINT_FILE).write_text(json.dumps(meta, indent=2))
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    state = {
        k: v
        for k, v in state.items()
        if not k.endswith(("IGNORE", "mask", "rotary_sin", "rotary_cos"))
    }
    save_file(state, str(out / WEIGHTS_FILE))
    if model.tokenizer is not None and hasattr(model.tokenizer, "backend_tokenizer"):
        model.tokenizer.backend_tokenizer.save(str(out / "tokenizer.json"))  # type: ignore[union-attr]
    if card is not None:
        (out / "card.json").write_text(json.dumps(card, indent=2))
    return out


def _from_mechcna_checkpoint(
    path: Path,
    device: str | torch.device,
    dtype: torch.dtype,
    tokenizer: PreTrainedTokenizerBase | None,
    processing: WeightProcessing,
) -> tuple[Model, WeightProcessing]:
    from safetensors.torch import load_file

    meta = json.loads((path / CHECKPOINT_FILE).read_text())
    stored = WeightProcessing(**meta.get("processing", {}))
    if processing.any and processing != stored:
        raise UnsupportedArchitectureError(
            f"{path} stores weights with processing {stored}; re-processing is not supported"
        )
    cfg = HookedTransformerConfig(**meta["cfg"], device=str(device), dtype=dtype)
    if tokenizer is None and (path / "tokenizer.json").is_file():
        tokenizer = load_tokenizer(path, name=path.name)
    model = HookedTransformer(cfg, tokenizer=tokenizer, move_to_device=False)
    state = {k: v.to(dtype) for k, v in load_file(str(path / WEIGHTS_FILE)).items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    bad_missing = [
        k for k in missing if not k.endswith(("IGNORE", "mask", "rotary_sin", "rotary_cos"))
    ]
    if bad_missing or unexpected:
        raise ModelNotFoundError(
            f"checkpoint {path} does not match its config: missing {bad_missing}, "
            f"unexpected {list(unexpected)}"
        )
    return model.to(device), stored
