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
    NonFiniteError,
    TokenizationError,
    UnsupportedArchitectureError,
    WeightProcessingError,
)
from mechcna.evaluation import AccuracyResult, evaluate_accuracy
from mechcna.head_results import HeadEffects, HeadSweep
from mechcna.heads import head_sweep, single_prompt_head_effects
from mechcna.hooks import hook_name
from mechcna.interventions import (
    AttentionNeuronEdit,
    HeadAblation,
    KeepNeurons,
    NeuronEdit,
    Patch,
    apply_to_weights,
    intervene,
)
from mechcna.models import (
    NO_PROCESSING,
    ModelProvenance,
    WeightProcessing,
    get_processing,
    get_provenance,
    load_model,
    save_checkpoint,
)
from mechcna.projection import TopTokens, project_to_vocab, top_tokens
from mechcna.query import (
    QueryLayers,
    QueryNeurons,
    QueryValueOverlap,
    attention_neuron_queries,
    attention_query_layers,
    ffn_query_layers,
    query_neuron_tokens,
    query_neurons,
    query_value_overlap,
)
from mechcna.shallow import (
    MaskExperiment,
    ZeroShotSearch,
    concept_tokens,
    hidden_interpretable_neurons,
    mask_experiment,
)
from mechcna.static import BlockCache
from mechcna.tasks.arithmetic import ArithmeticCase, ArithmeticDataset, arithmetic_dataset
from mechcna.tasks.knowledge import KnowledgeDataset, filter_knowledge, knowledge_prompts
from mechcna.tokenizer import load_tokenizer, word_level_tokenizer
from mechcna.transfer import (
    AttentionTransform,
    FFNKeys,
    KeyScores,
    TokenComparison,
    component_scores,
    ffn_keys,
    head_scores,
    neuron_scores,
    source_position_scores,
    transform_through_attention,
    vo_transform,
)

__version__ = "0.1.0"

__all__ = [
    "NO_PROCESSING",
    "AccuracyResult",
    "Architecture",
    "ArithmeticCase",
    "ArithmeticDataset",
    "AttentionNeuronEdit",
    "AttentionNeuronImportance",
    "AttentionTransform",
    "BlockCache",
    "CheckReport",
    "FFNKeys",
    "HeadAblation",
    "HeadEffects",
    "HeadImportance",
    "HeadSweep",
    "KeepNeurons",
    "KeyScores",
    "KnowledgeDataset",
    "LayerImportance",
    "MaskExperiment",
    "MechcnaError",
    "ModelCheckError",
    "ModelNotFoundError",
    "ModelProvenance",
    "NeuronEdit",
    "NeuronImportance",
    "NonFiniteError",
    "Patch",
    "QueryLayers",
    "QueryNeurons",
    "QueryValueOverlap",
    "TokenComparison",
    "TokenizationError",
    "TopTokens",
    "UnsupportedArchitectureError",
    "WeightProcessing",
    "WeightProcessingError",
    "ZeroShotSearch",
    "apply_to_weights",
    "arithmetic_dataset",
    "attention_neuron_importance",
    "attention_neuron_queries",
    "attention_query_layers",
    "check_model",
    "component_scores",
    "concept_tokens",
    "evaluate_accuracy",
    "ffn_keys",
    "ffn_query_layers",
    "filter_knowledge",
    "get_processing",
    "get_provenance",
    "head_importance",
    "head_scores",
    "head_sweep",
    "hidden_interpretable_neurons",
    "hook_name",
    "intervene",
    "knowledge_prompts",
    "layer_importance",
    "load_model",
    "load_tokenizer",
    "mask_experiment",
    "neuron_importance",
    "neuron_scores",
    "project_to_vocab",
    "query_neuron_tokens",
    "query_neurons",
    "query_value_overlap",
    "save_checkpoint",
    "single_prompt_head_effects",
    "source_position_scores",
    "top_tokens",
    "transform_through_attention",
    "vo_transform",
    "word_level_tokenizer",
]
