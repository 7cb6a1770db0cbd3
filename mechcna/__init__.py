"""mechcna: neuron-level attribution and Comparative Neuron Analysis on TransformerLens.

Implements, on TransformerLens's :class:`~transformer_lens.HookedTransformer`, the methods of
Yu & Ananiadou (EMNLP 2024): log-probability-increase attribution of FFN and attention
neurons, query neurons, arithmetic heads, and Comparative Neuron Analysis.

The names below are imported on first use (PEP 562), so ``import mechcna`` and
``mechcna --help`` do not load torch and TransformerLens until something needs them.
"""

import importlib
from typing import TYPE_CHECKING, Any

from mechcna._version import __version__ as __version__

if TYPE_CHECKING:
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
    from mechcna.analyses.case_ablation import mask_keep_table
    from mechcna.analyses.comparative import (
        NeuronComparison,
        cna_table,
        compare_inputs,
        compare_neurons,
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

#: Public name -> the module that defines it.
_WHERE: dict[str, str] = {
    "AccuracyResult": "mechcna.analyses.evaluation",
    "Architecture": "mechcna.models.architecture",
    "ArithmeticCase": "mechcna.tasks.arithmetic",
    "ArithmeticDataset": "mechcna.tasks.arithmetic",
    "AttentionNeuronEdit": "mechcna.interventions.edits",
    "AttentionNeuronImportance": "mechcna.analyses.attribution",
    "AttentionTransform": "mechcna.analyses.transfer",
    "BlockCache": "mechcna.engine.blocks",
    "CheckReport": "mechcna.models.check",
    "FFNKeys": "mechcna.analyses.transfer",
    "HeadAblation": "mechcna.interventions.edits",
    "HeadEffects": "mechcna.analyses.head_results",
    "HeadImportance": "mechcna.analyses.attribution",
    "HeadSweep": "mechcna.analyses.head_results",
    "KeepNeurons": "mechcna.interventions.edits",
    "KeyScores": "mechcna.analyses.key_scores",
    "KnowledgeDataset": "mechcna.tasks.knowledge",
    "LayerImportance": "mechcna.analyses.attribution",
    "MaskExperiment": "mechcna.analyses.shallow",
    "MechcnaError": "mechcna.errors",
    "ModelCheckError": "mechcna.errors",
    "ModelNotFoundError": "mechcna.errors",
    "ModelProvenance": "mechcna.models.provenance",
    "NO_PROCESSING": "mechcna.models.processing",
    "NeuronComparison": "mechcna.analyses.comparative",
    "NeuronEdit": "mechcna.interventions.edits",
    "NeuronImportance": "mechcna.analyses.attribution",
    "NonFiniteError": "mechcna.errors",
    "Patch": "mechcna.interventions.edits",
    "QueryLayers": "mechcna.analyses.query",
    "QueryNeurons": "mechcna.analyses.query",
    "QueryValueOverlap": "mechcna.analyses.query_overlap",
    "TokenComparison": "mechcna.analyses.transfer",
    "TokenizationError": "mechcna.errors",
    "TopTokens": "mechcna.engine.projection",
    "UnsupportedArchitectureError": "mechcna.errors",
    "WeightProcessing": "mechcna.models.processing",
    "WeightProcessingError": "mechcna.errors",
    "ZeroShotSearch": "mechcna.analyses.shallow",
    "apply_to_weights": "mechcna.interventions.edits",
    "arithmetic_dataset": "mechcna.tasks.arithmetic",
    "attention_neuron_importance": "mechcna.analyses.attribution",
    "attention_neuron_queries": "mechcna.analyses.query",
    "attention_query_layers": "mechcna.analyses.query",
    "check_model": "mechcna.models.check",
    "cna_table": "mechcna.analyses.comparative",
    "compare_inputs": "mechcna.analyses.comparative",
    "compare_neurons": "mechcna.analyses.comparative",
    "component_scores": "mechcna.analyses.key_scores",
    "concept_tokens": "mechcna.analyses.shallow",
    "evaluate_accuracy": "mechcna.analyses.evaluation",
    "ffn_keys": "mechcna.analyses.transfer",
    "ffn_query_layers": "mechcna.analyses.query",
    "filter_knowledge": "mechcna.tasks.knowledge",
    "get_processing": "mechcna.models.processing",
    "get_provenance": "mechcna.models.provenance",
    "head_importance": "mechcna.analyses.attribution",
    "head_scores": "mechcna.analyses.key_scores",
    "head_sweep": "mechcna.analyses.heads",
    "hidden_interpretable_neurons": "mechcna.analyses.shallow",
    "hook_name": "mechcna.models.hooks",
    "intervene": "mechcna.interventions.edits",
    "knowledge_prompts": "mechcna.tasks.knowledge",
    "layer_importance": "mechcna.analyses.attribution",
    "load_model": "mechcna.models.loading",
    "load_tokenizer": "mechcna.models.tokenizer",
    "mask_experiment": "mechcna.analyses.shallow",
    "mask_keep_table": "mechcna.analyses.case_ablation",
    "neuron_importance": "mechcna.analyses.attribution",
    "neuron_scores": "mechcna.analyses.key_scores",
    "neuron_tokens": "mechcna.analyses.tokens",
    "project_to_vocab": "mechcna.engine.projection",
    "query_neuron_tokens": "mechcna.analyses.query_overlap",
    "query_neurons": "mechcna.analyses.query",
    "query_value_overlap": "mechcna.analyses.query_overlap",
    "save_checkpoint": "mechcna.models.loading",
    "single_prompt_head_effects": "mechcna.analyses.heads",
    "source_position_scores": "mechcna.analyses.key_scores",
    "top_tokens": "mechcna.engine.projection",
    "transform_through_attention": "mechcna.analyses.transfer",
    "vo_transform": "mechcna.analyses.transfer",
    "word_level_tokenizer": "mechcna.models.tokenizer",
}


def __getattr__(name: str) -> Any:
    """Import a public name (or a subpackage such as ``mechcna.errors``) on first use."""
    if name in _WHERE:
        value = getattr(importlib.import_module(_WHERE[name]), name)
        globals()[name] = value
        return value
    try:
        return importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError as err:
        if err.name != f"{__name__}.{name}":
            raise
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None


def __dir__() -> list[str]:
    return sorted([*globals(), *_WHERE])


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
