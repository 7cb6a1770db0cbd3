"""Where a model's weights came from and how its prompts are tokenised: :class:`ModelProvenance`,
recorded by :func:`~mechcna.models.loading.load_model` and read back by :func:`get_provenance`
(which also describes models built without the loader).
"""

from dataclasses import dataclass, replace
from typing import Literal

from mechcna.models.backend import (
    Model,
)

SourceFormat = Literal["config", "transformer_lens", "huggingface", "gguf", "mechcna", "user-built"]
BosPolicy = Literal[
    "argument",
    "tokenizer",
    "checkpoint",
    "no tokenizer",
    "architecture",
    "changed after loading",
    "model config",
]


@dataclass(frozen=True)
class ModelProvenance:
    """Where a model's weights came from and how its string prompts are tokenised.

    Attributes:
        source: what :func:`load_model` was given (a name or path; ``"config"``).
        format: ``"config"`` (random init), ``"transformer_lens"`` (a pretrained name),
            ``"huggingface"`` (a local checkpoint), ``"gguf"``, ``"mechcna"`` (a checkpoint) or
            ``"user-built"`` (not loaded by :func:`load_model`; ``source`` is its model name).
        prepend_bos: whether string prompts get a BOS token.
        bos_policy: why: ``"tokenizer"`` (what the Hugging Face tokenizer does), ``"argument"``
            (``prepend_bos=``), ``"checkpoint"`` (what a mechcna model was trained with),
            ``"no tokenizer"``, ``"architecture"`` (tokenizer unavailable: none for GPT-2 and
            GPT-NeoX, BOS otherwise), ``"changed after loading"`` or ``"model config"`` (a
            user-built model's ``cfg.default_prepend_bos``).
        quantization: the GGUF quantisation the weights were dequantised from (``"Q4_1"``);
            ``None`` when they were never quantised.
        tensor_types: ``(type, count)`` of the GGUF file's tensors.
        gguf_architecture: the GGUF file's ``general.architecture``.
        sha256: the first 32 hex digits of the GGUF file's SHA-256.
        licence: the weights' licence, for a real model known by name (``"Apache-2.0"``;
            Gemma's terms for ``"gemma-3-270m"``).
        upstream: the release the weights come from, for a real model known by name.
    """

    source: str
    format: SourceFormat
    prepend_bos: bool
    bos_policy: BosPolicy
    quantization: str | None = None
    tensor_types: tuple[tuple[str, int], ...] = ()
    gguf_architecture: str | None = None
    sha256: str | None = None
    licence: str | None = None
    upstream: str | None = None

    @property
    def dequantized(self) -> bool:
        """Whether the weights are a dequantisation of quantised ones (numbers then describe
        the quantised model, not the original release)."""
        return self.quantization is not None

    def describe(self) -> str:
        """One line for reports, e.g. ``smollm2-135m (gguf, dequantised from Q4_1; no BOS:
        tokenizer)``."""
        kind = self.format + (f", dequantised from {self.quantization}" if self.dequantized else "")
        bos = "BOS" if self.prepend_bos else "no BOS"
        return f"{self.source} ({kind}; {bos}: {self.bos_policy})"


_PROVENANCE_ATTR = "_mechcna_provenance"


def get_provenance(model: Model) -> ModelProvenance:
    """The :class:`ModelProvenance` recorded by :func:`load_model`.

    A model built without :func:`load_model` (e.g. ``HookedTransformer(cfg)`` or
    ``HookedTransformer.from_pretrained(...)``) is described as ``format="user-built"`` with
    its ``cfg.model_name`` and the BOS setting of its config (``bos_policy="model config"``).
    ``prepend_bos`` is read from the model now, so a later change of
    ``model.cfg.default_prepend_bos`` shows as ``bos_policy="changed after loading"``.
    """
    record = getattr(model, _PROVENANCE_ATTR, None)
    if record is None:
        bos = bool(model.cfg.default_prepend_bos)
        return ModelProvenance(str(model.cfg.model_name), "user-built", bos, "model config")
    now = bool(model.cfg.default_prepend_bos)
    if now != record.prepend_bos:
        return replace(record, prepend_bos=now, bos_policy="changed after loading")
    return record
