import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_models():
    """One tiny model + processor per family, built once per test session (random weights, seed 0)."""
    from atrl.models.zoo import FAMILIES, build_tiny_vlm

    return {family: build_tiny_vlm(family, seed=0) for family in FAMILIES}
