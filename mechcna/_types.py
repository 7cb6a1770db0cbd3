"""Named tensor types shared across mechcna.

Axis names follow TransformerLens (``batch pos d_model d_mlp d_vocab head_index d_head
query_pos key_pos``) plus mechcna's own (``prompt layer neuron``).
"""

from jaxtyping import Bool, Float, Int
from torch import Tensor

Tokens = Int[Tensor, "batch pos"]
Logits = Float[Tensor, "batch pos d_vocab"]
ResidVector = Float[Tensor, " d_model"]
ResidBatch = Float[Tensor, "... d_model"]
VocabBatch = Float[Tensor, "... d_vocab"]

__all__ = [
    "Bool",
    "Float",
    "Int",
    "Logits",
    "ResidBatch",
    "ResidVector",
    "Tensor",
    "Tokens",
    "VocabBatch",
]
