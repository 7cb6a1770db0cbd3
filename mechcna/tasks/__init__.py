"""Task datasets: arithmetic prompts (ARITH section 3), knowledge prompts (ATTR section 4.1)
and gendered occupation prompts."""

from mechcna.tasks.arithmetic import (
    ArithmeticCase,
    ArithmeticDataset,
    ArithmeticProblem,
    arithmetic_dataset,
    arithmetic_problems,
)
from mechcna.tasks.knowledge import KnowledgeDataset, filter_knowledge, knowledge_prompts

__all__ = [
    "ArithmeticCase",
    "ArithmeticDataset",
    "ArithmeticProblem",
    "KnowledgeDataset",
    "arithmetic_dataset",
    "arithmetic_problems",
    "filter_knowledge",
    "knowledge_prompts",
]
