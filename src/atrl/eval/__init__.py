"""Benchmark scoring (rule-based, from atrl.rl.rewards) and checkpoint evaluation."""

from .score import EvalResult, evaluate, generate_responses, score_responses

__all__ = ["EvalResult", "evaluate", "generate_responses", "score_responses"]
