"""Analyses: the two papers' methods, each a function returning a result with a figure.

Owns log-probability-increase attribution of layers, heads, FFN and attention neurons
(:mod:`~mechcna.analyses.attribution`), the eight scoring methods compared
(:mod:`~mechcna.analyses.methods`), query neurons (:mod:`~mechcna.analyses.query`), the
head sweep and its results (:mod:`~mechcna.analyses.heads`,
:mod:`~mechcna.analyses.head_results`), Comparative Neuron Analysis
(:mod:`~mechcna.analyses.comparative`), feature transfer through attention
(:mod:`~mechcna.analyses.transfer`), the zero-shot shallow-neuron search
(:mod:`~mechcna.analyses.shallow`), accuracy under interventions
(:mod:`~mechcna.analyses.evaluation`), the result base classes
(:mod:`~mechcna.analyses.results`) and the plotly figures of every result
(:mod:`~mechcna.analyses.plotting`). The README maps each paper section to its function.

May import: :mod:`mechcna.tasks`, :mod:`mechcna.engine`, :mod:`mechcna.interventions`,
:mod:`mechcna.models` and the bottom layer.
"""
