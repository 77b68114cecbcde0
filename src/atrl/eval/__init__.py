"""Benchmark scoring (rule-based, from atrl.rl.rewards) and checkpoint evaluation."""

from .compare import Comparison, compare_results
from .score import EvalResult, evaluate, generate_responses, score_responses

__all__ = ["Comparison", "EvalResult", "compare_results", "evaluate", "generate_responses", "score_responses"]
