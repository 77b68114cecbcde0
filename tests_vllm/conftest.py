"""The vLLM rollout tests: they run in an environment with vLLM (.ci/run makes .venv-vllm for them) and fail,
never skip, without it."""

import importlib.util
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(2)

if importlib.util.find_spec("vllm") is None:
    raise pytest.UsageError("tests_vllm/ needs vLLM: run them with .venv-vllm/bin/python -m pytest tests_vllm "
                            "(.ci/run makes that environment; the README's vLLM section says how)")
