"""mechcna: neuron-level attribution and Comparative Neuron Analysis on TransformerLens.

Implements, on TransformerLens's :class:`~transformer_lens.HookedTransformer`, the methods of
Yu & Ananiadou (EMNLP 2024): log-probability-increase attribution of FFN and attention
neurons, query neurons, arithmetic heads, and Comparative Neuron Analysis.
"""

from mechcna.architecture import Architecture
from mechcna.check import CheckReport, check_model
from mechcna.errors import (
    MechcnaError,
    ModelCheckError,
    ModelNotFoundError,
    TokenizationError,
    UnsupportedArchitectureError,
)
from mechcna.evaluation import AccuracyResult, evaluate_accuracy
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
from mechcna.tasks.arithmetic import ArithmeticCase, ArithmeticDataset, arithmetic_dataset
from mechcna.tokenizer import load_tokenizer, word_level_tokenizer

__version__ = "0.1.0"

__all__ = [
    "NO_PROCESSING",
    "AccuracyResult",
    "Architecture",
    "ArithmeticCase",
    "ArithmeticDataset",
    "CheckReport",
    "HeadAblation",
    "KeepNeurons",
    "MechcnaError",
    "ModelCheckError",
    "ModelNotFoundError",
    "NeuronEdit",
    "Patch",
    "TokenizationError",
    "UnsupportedArchitectureError",
    "WeightProcessing",
    "apply_to_weights",
    "arithmetic_dataset",
    "check_model",
    "evaluate_accuracy",
    "get_processing",
    "hook_name",
    "intervene",
    "load_model",
    "load_tokenizer",
    "save_checkpoint",
    "word_level_tokenizer",
]
