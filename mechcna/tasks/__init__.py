"""Task datasets: arithmetic prompts (ARITH section 3) and gendered occupation prompts."""

from mechcna.tasks.arithmetic import (
    ArithmeticCase,
    ArithmeticDataset,
    ArithmeticProblem,
    arithmetic_dataset,
    arithmetic_problems,
)

__all__ = [
    "ArithmeticCase",
    "ArithmeticDataset",
    "ArithmeticProblem",
    "arithmetic_dataset",
    "arithmetic_problems",
]
