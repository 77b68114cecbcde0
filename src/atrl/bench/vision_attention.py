"""The Qwen2.5-VL vision tower's forward + backward with transformers' SDPA loop (one attention call per window
or image) against `atrl.models.vision_attention` (a call per segment length), interleaved on the same module (not a
test).

    python -m atrl.bench.vision_attention --shape 3b --images 4 --grid 64     # on the GPU machine: the recipes'
                                                                             # ~1,000 merged tokens per image
    python -m atrl.bench.vision_attention --shape narrow --images 4 --grid 64 --device cpu   # a host-bound proxy

`3b`: the 3B/7B vision tower (32 layers, width 1280, 16 heads, full attention in 4 layers, windows elsewhere), in
bf16 on a GPU. `narrow`: the same windows and layer pattern at width 64 (8 layers): little arithmetic per call,
so what it times is mostly each call's host cost. Prints the two routes' outputs' largest difference, the
attention calls per forward, the step times with their paired ratio, and (on a GPU) each route's peak memory.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

SHAPES = {"3b": (32, 1280, 3420, 16), "narrow": (8, 64, 128, 4)}  # depth, width, MLP width, heads


def build_tower(shape: str, device: torch.device, dtype: torch.dtype):
    from transformers import Qwen2_5_VLConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

    depth, width, inter, heads = SHAPES[shape]
    config = Qwen2_5_VLConfig(vision_config=dict(
        depth=depth, hidden_size=width, intermediate_size=inter, num_heads=heads, out_hidden_size=2048,
        fullatt_block_indexes=[depth // 4 - 1, depth // 2 - 1, 3 * depth // 4 - 1, depth - 1])).vision_config
    config._attn_implementation = "sdpa"
    with torch.device(device):
        tower = Qwen2_5_VisionTransformerPretrainedModel(config).to(dtype)
    tower.train()
    return tower


def main(argv: list[str] | None = None) -> None:
    from atrl.models.vision_attention import register_packed_vision_attention

    from .probe_overhead import rounds_in_budget, summary, timers

    ap = argparse.ArgumentParser(prog="atrl bench vision", description=__doc__.split(chr(10))[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="3b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--images", type=int, default=4, help="images per step (a micro-batch's prompts)")
    ap.add_argument("--grid", type=int, default=64, help="patch grid side per image (merged tokens: (grid/2)^2)")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--seconds", type=float, default=0.0, help="time budget for the timed rounds (0: --reps)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    packed = register_packed_vision_attention()
    tower = build_tower(args.shape, device, dtype)
    g = torch.Generator().manual_seed(0)
    grid_thw = torch.tensor([[1, args.grid, args.grid]] * args.images, device=device)
    pixels = torch.randn(args.images * args.grid ** 2, 3 * 2 * 14 * 14, generator=g).to(device, dtype)
    routes = {"sdpa, a call per window": "sdpa", "packed, a call per segment length": packed}
    calls = {name: 0 for name in routes}
    counting = [None]
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def counted(*a, **kw):
        if counting[0] is not None:
            calls[counting[0]] += 1
        return sdpa(*a, **kw)

    peaks = {name: float("nan") for name in routes}  # GiB allocated at most during the first (counted) step

    def step(name: str, count: bool = False) -> tuple[float, torch.Tensor]:
        tower.config._attn_implementation = routes[name]
        tower.zero_grad(set_to_none=True)
        counting[0] = name if count else None
        if cuda and count:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start, stop = timers(device)
        start()
        out = tower(pixels, grid_thw=grid_thw).pooler_output
        out.float().square().mean().backward()
        ms = stop()
        if cuda and count:
            peaks[name] = torch.cuda.max_memory_allocated() / 2**30
        counting[0] = None
        return ms, out.detach()

    torch.nn.functional.scaled_dot_product_attention = counted
    try:
        outs = {name: step(name, count=True)[1] for name in routes}
        for _ in range(args.warmup):
            for name in routes:
                step(name)
        t0 = time.perf_counter()
        for name in routes:
            step(name)
        reps = rounds_in_budget(args.seconds, time.perf_counter() - t0, args.reps) if args.seconds > 0 else args.reps
        times = {name: [] for name in routes}
        for _ in range(reps):
            for name in routes:
                times[name].append(step(name)[0])
    finally:
        torch.nn.functional.scaled_dot_product_attention = sdpa
    a, b = outs.values()
    diff = (a.float() - b.float()).abs().max().item()
    dev = torch.cuda.get_device_name() if cuda else "cpu"
    base = next(iter(routes))
    rows = summary(times, base)
    print(f"# Qwen2.5-VL vision tower ({args.shape}: {SHAPES[args.shape][0]} layers, width {SHAPES[args.shape][1]}), "
          f"{args.images} images of {args.grid}x{args.grid} patches, forward + backward, {dtype}, {reps} interleaved "
          f"reps, device {dev}")
    print("| attention | calls per forward | median ms | IQR ms | time ratio | paired ratio (IQR) | peak GiB |")
    print("|---|---|---|---|---|---|---|")
    for name, row in rows.items():
        print(f"| {name} | {calls[name]} | {row['median_ms']:.2f} | {row['q1']:.2f}-{row['q3']:.2f} | "
              f"{row['ratio']:.4f} | {row['paired_ratio']:.4f} ({row['paired_q1']:.4f}-{row['paired_q3']:.4f}) | "
              f"{peaks[name]:.3f} |")
    print(f"largest difference between the two routes' outputs: {diff:.2e} ({dtype})")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"device": dev, "shape": args.shape, "images": args.images, "grid": args.grid,
                       "calls_per_forward": calls, "rows": rows, "raw_ms": times, "max_abs_diff": diff,
                       "peak_gib": peaks}, fh, indent=1)


if __name__ == "__main__":
    main()
