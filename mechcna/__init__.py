"""mechcna: neuron-level attribution and Comparative Neuron Analysis on TransformerLens.

Implements, on TransformerLens's :class:`~transformer_lens.HookedTransformer`, the methods of
Yu & Ananiadou (EMNLP 2024): log-probability-increase attribution of FFN and attention
neurons, query neurons, arithmetic heads, and Comparative Neuron Analysis.
"""

from mechcna._version import __version__ as __version__
from mechcna.analyses.attribution import (
    AttentionNeuronImportance,
    HeadImportance,
    LayerImportance,
    NeuronImportance,
    attention_neuron_importance,
    head_importance,
    layer_importance,
    neuron_importance,
)
from mechcna.analyses.comparative import (
    NeuronComparison,
    cna_table,
    compare_inputs,
    compare_neurons,
    mask_keep_table,
)
from mechcna.analyses.evaluation import AccuracyResult, evaluate_accuracy
from mechcna.analyses.head_results import HeadEffects, HeadSweep
from mechcna.analyses.heads import head_sweep, single_prompt_head_effects
from mechcna.analyses.key_scores import (
    KeyScores,
    component_scores,
    head_scores,
    neuron_scores,
    source_position_scores,
)
from mechcna.analyses.query import (
    QueryLayers,
    QueryNeurons,
    attention_neuron_queries,
    attention_query_layers,
    ffn_query_layers,
    query_neurons,
)
from mechcna.analyses.query_overlap import (
    QueryValueOverlap,
    query_neuron_tokens,
    query_value_overlap,
)
from mechcna.analyses.shallow import (
    MaskExperiment,
    ZeroShotSearch,
    concept_tokens,
    hidden_interpretable_neurons,
    mask_experiment,
)
from mechcna.analyses.tokens import neuron_tokens
from mechcna.analyses.transfer import (
    AttentionTransform,
    FFNKeys,
    TokenComparison,
    ffn_keys,
    transform_through_attention,
    vo_transform,
)
from mechcna.engine.blocks import BlockCache
from mechcna.engine.projection import TopTokens, project_to_vocab, top_tokens
from mechcna.errors import (
    MechcnaError,
    ModelCheckError,
    ModelNotFoundError,
    NonFiniteError,
    TokenizationError,
    UnsupportedArchitectureError,
    WeightProcessingError,
)
from mechcna.interventions.edits import (
    AttentionNeuronEdit,
    HeadAblation,
    KeepNeurons,
    NeuronEdit,
    Patch,
    apply_to_weights,
    intervene,
)
from mechcna.models.architecture import Architecture
from mechcna.models.check import CheckReport, check_model
from mechcna.models.hooks import hook_name
from mechcna.models.loading import load_model, save_checkpoint
from mechcna.models.processing import NO_PROCESSING, WeightProcessing, get_processing
from mechcna.models.provenance import ModelProvenance, get_provenance
from mechcna.models.tokenizer import load_tokenizer, word_level_tokenizer
from mechcna.tasks.arithmetic import ArithmeticCase, ArithmeticDataset, arithmetic_dataset
from mechcna.tasks.knowledge import KnowledgeDataset, filter_knowledge, knowledge_prompts

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
    "NeuronComparison",
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
    "cna_table",
    "compare_inputs",
    "compare_neurons",
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
    "mask_keep_table",
    "neuron_importance",
    "neuron_scores",
    "neuron_tokens",
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
