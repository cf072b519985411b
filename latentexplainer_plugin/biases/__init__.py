"""Inductive biases: a formula, a symbol-to-word map and a layout, turned into a prompt."""

from .base import InductiveBias, build_prompt
from .builtin import BUILTIN_BIASES, COMBINATION, CONDITIONAL, DISENTANGLEMENT
from .examples import build_example_prompt, example_grid
from .from_llm import prompt_from_llm

__all__ = ["BUILTIN_BIASES", "COMBINATION", "CONDITIONAL", "DISENTANGLEMENT", "InductiveBias", "build_example_prompt",
           "build_prompt", "example_grid", "prompt_from_llm"]
