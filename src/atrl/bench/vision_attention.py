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
from dataclasses import dataclass, field

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


@dataclass
class VisionResults:
    """One run of the bench: per route, the attention calls per forward, the step times (ms per forward +
    backward, round-robin: entry i of every list is round i), their summary against the first route, and the
    peak memory of the first (counted) step (GiB; NaN off a GPU); the two routes' largest output difference."""

    device: str
    shape: str
    images: int
    grid: int
    dtype: str
    calls_per_forward: dict[str, int]
    raw_ms: dict[str, list[float]]
    peak_gib: dict[str, float]
    max_abs_diff: float
    rows: dict[str, dict[str, float]] = field(default_factory=dict)

    @property
    def reps(self) -> int:
        return len(next(iter(self.raw_ms.values())))

    def to_json(self) -> dict:
        return {"device": self.device, "shape": self.shape, "images": self.images, "grid": self.grid,
                "calls_per_forward": self.calls_per_forward, "rows": self.rows, "raw_ms": self.raw_ms,
                "max_abs_diff": self.max_abs_diff, "peak_gib": self.peak_gib}


ROUTES = ("sdpa, a call per window", "packed, a call per segment length")


def measure(shape: str = "3b", device: str = "cuda", images: int = 4, grid: int = 64, reps: int = 30,
            seconds: float = 0.0, warmup: int = 2) -> VisionResults:
    """Time the tower's forward + backward on both routes, interleaved, on the same module and inputs; as many
    rounds as fit in `seconds` (from one round's time) when it is set, else `reps`."""
    from atrl.models.vision_attention import register_packed_vision_attention

    from .probe_overhead import rounds_in_budget, summary, timers

    dev = torch.device(device)
    cuda = dev.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    routes = dict(zip(ROUTES, ("sdpa", register_packed_vision_attention())))
    tower = build_tower(shape, dev, dtype)
    g = torch.Generator().manual_seed(0)
    grid_thw = torch.tensor([[1, grid, grid]] * images, device=dev)
    pixels = torch.randn(images * grid ** 2, 3 * 2 * 14 * 14, generator=g).to(dev, dtype)
    calls = {name: 0 for name in routes}
    counting: list[str | None] = [None]
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def counted(*a, **kw):
        if counting[0] is not None:
            calls[counting[0]] += 1
        return sdpa(*a, **kw)

    peaks = {name: float("nan") for name in routes}

    def step(name: str, count: bool = False) -> tuple[float, torch.Tensor]:
        tower.config._attn_implementation = routes[name]
        tower.zero_grad(set_to_none=True)
        counting[0] = name if count else None
        if cuda and count:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start, stop = timers(dev)
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
        for _ in range(warmup):
            for name in routes:
                step(name)
        t0 = time.perf_counter()
        for name in routes:
            step(name)
        rounds = rounds_in_budget(seconds, time.perf_counter() - t0, reps) if seconds > 0 else reps
        times: dict[str, list[float]] = {name: [] for name in routes}
        for _ in range(rounds):
            for name in routes:
                times[name].append(step(name)[0])
    finally:
        torch.nn.functional.scaled_dot_product_attention = sdpa
    a, b = outs.values()
    result = VisionResults(device=torch.cuda.get_device_name() if cuda else "cpu", shape=shape, images=images,
                           grid=grid, dtype=str(dtype), calls_per_forward=calls, raw_ms=times, peak_gib=peaks,
                           max_abs_diff=(a.float() - b.float()).abs().max().item())
    result.rows = summary(times, ROUTES[0])
    return result


def report(r: VisionResults) -> list[str]:
    """The bench's table, as printed."""
    depth, width = SHAPES[r.shape][:2]
    lines = [f"# Qwen2.5-VL vision tower ({r.shape}: {depth} layers, width {width}), {r.images} images of "
             f"{r.grid}x{r.grid} patches, forward + backward, {r.dtype}, {r.reps} interleaved reps, device {r.device}",
             "| attention | calls per forward | median ms | IQR ms | time ratio | paired ratio (IQR) | peak GiB |",
             "|---|---|---|---|---|---|---|"]
    for name, row in r.rows.items():
        lines.append(f"| {name} | {r.calls_per_forward[name]} | {row['median_ms']:.2f} | {row['q1']:.2f}-"
                     f"{row['q3']:.2f} | {row['ratio']:.4f} | {row['paired_ratio']:.4f} ({row['paired_q1']:.4f}-"
                     f"{row['paired_q3']:.4f}) | {r.peak_gib[name]:.3f} |")
    lines.append(f"largest difference between the two routes' outputs: {r.max_abs_diff:.2e} ({r.dtype})")
    return lines


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="atrl bench vision", description=__doc__.split(chr(10))[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="3b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--images", type=int, default=4, help="images per step (a micro-batch's prompts)")
    ap.add_argument("--grid", type=int, default=64, help="patch grid side per image (merged tokens: (grid/2)^2)")
    ap.add_argument("--reps", type=int, default=30, help="timed rounds (both routes each)")
    ap.add_argument("--seconds", type=float, default=0.0, help="time budget for the timed rounds (0: --reps)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    ap.add_argument("--out", default=None, help="JSON file for the raw numbers")
    args = ap.parse_args(argv)
    result = measure(args.shape, args.device, args.images, args.grid, args.reps, args.seconds, args.warmup)
    print("\n".join(report(result)))
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(result.to_json(), fh, indent=1)


if __name__ == "__main__":
    main()
