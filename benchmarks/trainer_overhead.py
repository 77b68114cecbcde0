"""Step time of `atrl` against `uniform` on the same trainer, model shape, data and seed (not a test).

Both modes run in one process, alternating in blocks (uniform, atrl, uniform, atrl, ...) so that drift
affects both; each block is a fresh ATRLTrainer on the same random-weight model snapshot, the same synthetic
data and seed, with every completion forced to the same length (min_new_tokens = max_completion_length),
so that generation costs the same in both modes. Step time is TRL's `step_time` (generation + scoring +
forward/backward + optimizer); the first step of each block is dropped as warm-up. The ratio of medians is
printed with the spread of the two uniform blocks (the noise floor). Target (issue 6): ratio <= 1.005.

    python benchmarks/trainer_overhead.py --shape 3b --steps 8 --blocks 3        # on the GPU machine
    python benchmarks/trainer_overhead.py --shape tiny --steps 3 --blocks 2       # smoke run on a CPU
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="3b", choices=["3b", "7b", "tiny"])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--blocks", type=int, default=3)
    ap.add_argument("--completion", type=int, default=256)
    ap.add_argument("--image-size", type=int, default=448)
    ap.add_argument("--workers", type=int, default=8, help="credit n_workers (the recipes' value)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    from transformers import TrainerCallback
    from trl import GRPOConfig

    from atrl.data.synthetic import BarKnobs, CountKnobs, generate, to_hf_dataset
    from atrl.models.zoo import TinySize, build_tiny_vlm
    from atrl.rl.config import AnchorConfig
    from atrl.rl.rewards import accuracy_reward, format_reward
    from atrl.rl.trainer import ATRLTrainer
    from probe_overhead import build

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    tiny, processor = build_tiny_vlm("qwen2_5_vl", size=TinySize(image_size=args.image_size))
    if args.shape == "tiny":
        base = tiny
    else:
        base = build(args.shape, device, torch.bfloat16)
        # the byte-level processor's special tokens are ids < 300, inside the big vocabulary: point the config at them
        base.config.image_token_id = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
        base.config.video_token_id = processor.tokenizer.convert_tokens_to_ids("<|video_pad|>")
        base.config.vision_start_token_id = processor.tokenizer.convert_tokens_to_ids("<|vision_start|>")
        base.config.vision_end_token_id = processor.tokenizer.convert_tokens_to_ids("<|vision_end|>")
    size = args.image_size
    data = to_hf_dataset(generate(64, seed=0, families=["count", "bar_value"],
                                  knobs={"count": CountKnobs(image_size=size, cell=size // 5),
                                         "bar_value": BarKnobs(image_size=size)}))
    snapshot = copy.deepcopy(base.state_dict())

    class Times(TrainerCallback):
        def __init__(self):
            self.times, self.credit = [], []

        def on_log(self, a, state, control, logs=None, **kw):
            if logs and "step_time" in logs:
                self.times.append(logs["step_time"])
                self.credit.append(logs.get("atrl/time/credit_share", float("nan")))

    results: dict[str, list[float]] = {"uniform": [], "atrl": []}
    credit_share: list[float] = []  # atrl: time in credit assignment (copy to CPU, partition, weights) / step
    blocks: list[tuple[str, float]] = []
    for block in range(args.blocks):
        for mode in ("uniform", "atrl"):
            base.load_state_dict(snapshot)
            cb = Times()
            cfg = GRPOConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=8, num_generations=8,
                             max_completion_length=args.completion, max_steps=args.steps, logging_steps=1,
                             report_to=[], save_strategy="no", bf16=cuda, use_cpu=not cuda, seed=0,
                             learning_rate=1e-7, disable_tqdm=True, gradient_checkpointing=True,
                             generation_kwargs={"min_new_tokens": args.completion})
            trainer = ATRLTrainer(model=base, processing_class=processor, args=cfg, train_dataset=data,
                                  reward_funcs=[accuracy_reward, format_reward], callbacks=[cb],
                                  anchor_config=AnchorConfig(mode=mode, credit={"n_workers": args.workers}))
            trainer.train()
            if trainer.probe is not None:
                trainer.probe.detach()
            kept = cb.times[1:]
            results[mode].extend(kept)
            if mode == "atrl":
                credit_share.extend(cb.credit[1:])
            blocks.append((mode, statistics.median(kept)))
            print(f"block {block} {mode}: median step {statistics.median(kept):.3f} s over {len(kept)} steps",
                  flush=True)
    med_u, med_a = statistics.median(results["uniform"]), statistics.median(results["atrl"])
    uniform_blocks = [t for m, t in blocks if m == "uniform"]
    noise = (max(uniform_blocks) - min(uniform_blocks)) / med_u if len(uniform_blocks) > 1 else float("nan")
    dev = torch.cuda.get_device_name() if cuda else "cpu"
    print(f"# trainer step time, Qwen2.5-VL-{args.shape} shape, {args.completion}-token completions, device {dev}")
    print("| mode | median step s | steps | ratio to uniform |")
    print("|---|---|---|---|")
    print(f"| uniform | {med_u:.3f} | {len(results['uniform'])} | 1.0000 |")
    print(f"| atrl | {med_a:.3f} | {len(results['atrl'])} | {med_a / med_u:.4f} |")
    print(f"spread of the uniform blocks (noise floor): {100 * noise:.2f}%")
    print(f"atrl: credit assignment (n_workers={args.workers}) took a median "
          f"{100 * statistics.median(credit_share):.2f}% of the step (logged atrl/time/credit_share)")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"device": dev, "shape": args.shape, "results": results, "blocks": blocks,
                       "credit_share": credit_share, "workers": args.workers}, fh, indent=1)


if __name__ == "__main__":
    main()
