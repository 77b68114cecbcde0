"""The vLLM rollout tests: they run in an environment with vLLM (.ci/run makes .venv-vllm for them) and fail,
never skip, without it."""

import importlib.util
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# vLLM's CPU backend sizes its KV cache from trl.vllm_gpu_memory_utilization x the node's memory (about 5 GiB
# here) unless told: 1 GiB each holds the tiny models' rollouts, and several engines fit CI's 24 GiB
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
torch.set_num_threads(2)

if importlib.util.find_spec("vllm") is None:
    raise pytest.UsageError("tests_vllm/ needs vLLM: run them with .venv-vllm/bin/python -m pytest tests_vllm "
                            "(.ci/run makes that environment; the README's vLLM section says how)")


def pytest_configure(config):
    # TRL 1.16 names vLLM up to 0.31 and warns at import; atrl checks its own range (VLLM_VERSIONS)
    config.addinivalue_line("filterwarnings", "ignore:TRL currently supports vLLM versions:UserWarning")
