"""mechcna: neuron-level attribution and Comparative Neuron Analysis on TransformerLens.

Implements, on TransformerLens's :class:`~transformer_lens.HookedTransformer`, the methods of
Yu & Ananiadou (EMNLP 2024): log-probability-increase attribution of FFN and attention
neurons, query neurons, arithmetic heads, and Comparative Neuron Analysis.
"""

from mechcna.architecture import Architecture
from mechcna.attribution import (
    AttentionNeuronImportance,
    HeadImportance,
    LayerImportance,
    NeuronImportance,
    attention_neuron_importance,
    head_importance,
    layer_importance,
    neuron_importance,
)
from mechcna.check import CheckReport, check_model
from mechcna.errors import (
    MechcnaError,
    ModelCheckError,
    ModelNotFoundError,
    TokenizationError,
    UnsupportedArchitectureError,
)
from mechcna.heads import HeadEffects, HeadSweep, head_sweep, single_prompt_head_effects
from mechcna.hooks import hook_name
from mechcna.interventions import (
    HeadAblation,
    KeepNeurons,
    NeuronEdit,
    Patch,
    apply_to_weights,
    intervene,
)
from mechcna.models import (
    NO_PROCESSING,
    WeightProcessing,
    get_processing,
    load_model,
    save_checkpoint,
)
from mechcna.projection import TopTokens, project_to_vocab, top_tokens
from mechcna.static import BlockCache
from mechcna.tokenizer import load_tokenizer, word_level_tokenizer

__version__ = "0.1.0"

__all__ = [
    "NO_PROCESSING",
    "Architecture",
    "AttentionNeuronImportance",
    "BlockCache",
    "CheckReport",
    "HeadAblation",
    "HeadEffects",
    "HeadImportance",
    "HeadSweep",
    "KeepNeurons",
    "LayerImportance",
    "MechcnaError",
    "ModelCheckError",
    "ModelNotFoundError",
    "NeuronEdit",
    "NeuronImportance",
    "Patch",
    "TokenizationError",
    "TopTokens",
    "UnsupportedArchitectureError",
    "WeightProcessing",
    "apply_to_weights",
    "attention_neuron_importance",
    "check_model",
    "get_processing",
    "head_importance",
    "head_sweep",
    "hook_name",
    "intervene",
    "layer_importance",
    "load_model",
    "load_tokenizer",
    "neuron_importance",
    "project_to_vocab",
    "save_checkpoint",
    "single_prompt_head_effects",
    "top_tokens",
    "word_level_tokenizer",
]
