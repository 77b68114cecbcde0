"""The reward functions plug into TRL's GRPOTrainer unchanged (tiny Qwen2.5-VL, CPU)."""

import pytest

from atrl.data.synthetic import generate, to_hf_dataset
from atrl.models.zoo import build_tiny_vlm
from atrl.rl.rewards import accuracy_reward, format_reward, make_overlong_penalty


def test_rewards_run_inside_grpo_trainer(tmp_path):
    from trl import GRPOConfig, GRPOTrainer

    seen = []

    def spy_accuracy(prompts, completions, **columns):
        out = accuracy_reward(prompts, completions, **columns)
        seen.append((completions, columns, out))
        return out

    spy_accuracy.__name__ = "accuracy_reward"
    model, processor = build_tiny_vlm("qwen2_5_vl", seed=0)
    ds = to_hf_dataset(generate(8, seed=0))
    args = GRPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=4,
                      max_completion_length=12, max_steps=2, use_cpu=True, report_to=[], logging_steps=1,
                      bf16=False, save_strategy="no")
    trainer = GRPOTrainer(model=model, processing_class=processor, args=args, train_dataset=ds,
                          reward_funcs=[spy_accuracy, format_reward, make_overlong_penalty(12, 4)])
    trainer.train()
    assert len(seen) == 2
    completions, columns, out = seen[0]
    assert len(completions) == 4 and len(out) == 4
    assert isinstance(completions[0], list) and completions[0][0]["role"] == "assistant"
    # the data set's columns reach the reward function
    assert set(columns["answer"]) <= set(ds["answer"]) and columns["answer_type"][0] in ("integer", "choice", "text")
    logs = [h for h in trainer.state.log_history if "rewards/accuracy_reward/mean" in h]
    assert len(logs) == 2
    assert logs[0]["rewards/accuracy_reward/mean"] == pytest.approx(sum(out) / len(out))
    # 12-token completions with max 12 and cache 4 are all in the penalty zone: -1.0
    assert logs[0]["rewards/overlong_reward/mean"] <= 0.0
