"""Two-process training for the multi-process test (launched with `accelerate launch`).

    accelerate launch --config_file configs/accelerate/multi_cpu.yaml tests/scripts/ddp_train.py OUT_DIR [--key value]

(or with configs/accelerate/zero2.yaml / zero3.yaml and --num_processes 2 --mixed_precision no: DeepSpeed on
the CPU, over gloo). Each rank trains the tiny default for 2 steps together (on the synthetic tasks; recipe overrides such as
`--data.train FILE` or `--lora {...}` after OUT_DIR), then
measures connectivity and credit on the same fixed batch with its (synchronised) model copy and writes
rank<k>.pt for the test to compare.
"""

import sys

import torch
import torch.distributed as dist

from atrl._dist import leave_together
from atrl.credit import assign_credit
from atrl.data.synthetic import build_prompt, generate
from atrl.rl.recipe import load_recipe
from atrl.rl.run import run_training


def diversity_reward(prompts, completions, **columns):
    return [len(set(c[-1]["content"])) / 10 for c in completions]


def split_reward(prompts, completions, answer, **columns):
    """All equal within the groups of prompts whose answer has an even length (dynamic sampling drops them)."""
    return [1.0 if len(a) % 2 == 0 else len(set(c[-1]["content"])) / 10 for a, c in zip(answer, completions)]


def _gathered(trainer, model) -> dict:
    """The model's parameters whole, by name: under DeepSpeed ZeRO-3 each process holds a shard, gathered here."""
    named = dict(model.named_parameters())
    if getattr(trainer, "is_deepspeed_enabled", False):
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(named.values())):
            return {n: p.detach().clone() for n, p in named.items()}
    return {n: p.detach() for n, p in named.items()}


def main():
    out = sys.argv[1]
    recipe = load_recipe(None, ["--trl.output_dir", out, "--trl.max_steps", "2", "--trl.save_strategy", "no",
                                "--trl.per_device_train_batch_size", "4", "--trl.num_generations", "4",
                                "--trl.max_completion_length", "40", "--trl.learning_rate", "1e-2",
                                "--trl.report_to", "[]", "--trl.disable_tqdm", "true", "--data.n", "16",
                                "--rewards.custom", "{ddp_train:diversity_reward: 1.0}", *sys.argv[2:]])
    trainer = run_training(recipe, progress=False)
    model = trainer.accelerator.unwrap_model(trainer.model)
    processor = trainer.processing_class
    examples = generate(3, seed=99)
    processor.tokenizer.padding_side = "left"
    texts = [processor.apply_chat_template(build_prompt(e.question), add_generation_prompt=True) + e.reasoning
             for e in examples]
    batch = processor(text=texts, images=[[e.image] for e in examples], return_tensors="pt", padding=True)
    T = 16
    with torch.no_grad(), trainer.probe.capture(batch["input_ids"], batch["image_grid_thw"], response_len=T) as cap:
        model(**batch, use_cache=False)
    mask = torch.ones(3, T, dtype=torch.bool)
    conn, prof = cap.connectivity(mask)
    weights = assign_credit(conn, prof, mask, trainer.credit_options).weights
    rank = dist.get_rank()
    whole = _gathered(trainer, model)
    params = torch.cat([p.flatten() for p in whole.values()])
    lora_b = [p.abs().max().item() for n, p in whole.items() if "lora_B" in n]
    plugin = trainer.accelerator.state.deepspeed_plugin if trainer.is_deepspeed_enabled else None
    sharded = [p for p in model.parameters() if hasattr(p, "ds_numel") and p.numel() < p.ds_numel]
    torch.save({"rank": rank, "world": dist.get_world_size(), "weights": weights, "conn": conn,
                "zero_stage": plugin.zero_stage if plugin else None, "sharded_params": len(sharded),
                "lora_b_max": max(lora_b) if lora_b else None,
                "params": params, "steps": trainer.state.global_step,
                "grad_norms": [h["grad_norm"] for h in trainer.state.log_history if "grad_norm" in h],
                "dynamic": [{k.removeprefix("atrl/dynamic/"): v for k, v in h.items() if k.startswith("atrl/dynamic/")}
                            | {"frac_reward_zero_std": h["frac_reward_zero_std"]}
                            for h in trainer.state.log_history if "atrl/dynamic/drawn_groups" in h]},
               f"{out}/rank{rank}.pt")
    leave_together()  # as `atrl train` does: a rank that left first could abort at exit (gloo)


if __name__ == "__main__":
    main()
