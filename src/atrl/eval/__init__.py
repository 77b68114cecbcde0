"""Benchmark scoring (rule-based, from atrl.rl.rewards), checkpoint evaluation and comparison (`run_eval`: what
`atrl eval` does), and connectivity analysis (`analyze`)."""

from .compare import Comparison, compare_results
from .run import EvalRun, run_eval
from .score import EvalResult, evaluate, generate_responses, score_responses

__all__ = ["Comparison", "EvalResult", "EvalRun", "compare_results", "evaluate", "generate_responses", "run_eval",
           "score_responses"]
