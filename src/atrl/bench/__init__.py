"""Benchmarks of what AT-RL costs, side by side with plain GRPO in one process (`atrl bench NAME`; not tests).

    probe    the probes' step time and peak memory at the Qwen2.5-VL-3B / 7B shapes (random weights, built on the
             device), paired against the same step without them; the probe checked against eager attention
    trainer  ATRLTrainer's step with `atrl` credit against `uniform`, same trainer, model, data and seed
    credit   partition time per response and planted-anchor recovery of each partition method, on this CPU
    vision   the Qwen2.5-VL vision tower's step with transformers' per-window SDPA loop against a call per
             segment length

Each prints tables with medians, spreads and the device; probe and trainer write their raw numbers as JSON
(`--out`). The same
scripts run as `python benchmarks/<module>.py` and in `benchmarks/gpu.sh` on a GPU machine; the current
figures, with their commands and machines, are in docs/benchmarks.md.
"""

BENCHMARKS = {"probe": "probe_overhead", "trainer": "trainer_overhead", "credit": "credit_partition",
              "vision": "vision_attention"}
