"""Applications: the arithmetic paper's section 5 uses of CNA, and training the shipped model.

Owns LoRA fine-tuning on a HookedTransformer's own attention weights
(:mod:`~mechcna.applications.lora`) and CNA between a model and its LoRA fine-tune
(:mod:`~mechcna.applications.lora_analysis`), CNA-guided pruning
(:mod:`~mechcna.applications.pruning`), gender-bias neuron editing
(:mod:`~mechcna.applications.bias`), and the training script of the shipped
``mechcna/arith-small`` (:mod:`~mechcna.applications.training`).

May import: :mod:`mechcna.analyses`, :mod:`mechcna.tasks`, :mod:`mechcna.engine`,
:mod:`mechcna.interventions`, :mod:`mechcna.models` and the bottom layer.
"""
