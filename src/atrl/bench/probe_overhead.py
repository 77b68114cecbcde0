"""Step-time and peak-memory overhead of connectivity probes (not a test; run on the GPU machine).

Qwen2.5-VL-3B / -7B shapes with random bf16 weights built directly on the GPU; one sample with about
1,000 image tokens (a 64 x 64 patch grid, merged 2 x 2 -> 1,024 tokens) and 1,000 response tokens.
One step = forward (logits for the response only) + backward of a token-level loss.

Configurations, timed interleaved (round-robin) so drift hits all alike: probes off, off again (the noise
floor: the same configuration timed twice), the probe's attention installed with no capture (the decoder runs
"atrl_probe", every call plain), a capture with no probed layer (what a capture costs a forward by itself), 1
probed layer, 4 probed layers (the default route: with gradients on, the plain call plus a no-grad call with the
region indicators as values), and 4 layers forced onto the fused route (one call, V widened, Q/K zero-padded,
whose backward also carries the region channels). The steps from "installed" to "4
layers" split a probed step's extra time into the attention switch, the capture and the layers.
First it prints which SDPA backends take each head-size combination the fused route can use. Each repetition is
timed with CUDA events; the table gives medians, the inter-quartile range, the ratio of medians against `off`,
and the paired ratio: the median over rounds of each round's time over that round's `off` (with its quartiles).
Slow stretches of the device that span a round (a card can run in slow and fast stretches) cancel in the paired
ratio and not in the ratio of medians. Peak memory is `max_memory_allocated` of one step after a
reset.

Two scopes are timed. `model`: the whole model, vision tower included. `decoder`: the vision tower's output
is computed once and passed in (`mm_encoder_outputs`), so the step is the decoder's forward + backward alone.
Probes touch only the decoder, so the decoder ratio is the stricter one (same extra time, smaller step), and
it is less noisy: transformers' SDPA route through Qwen2.5-VL's vision tower loops over its attention windows
in Python with a host sync per layer, so the whole-model step is launch-bound (on an H200 the 3B and 7B steps
took the same ~455 ms, with an inter-quartile range of +-8%).

Then the probed attention call alone (`layer`: forward + backward of one decoder layer's attention at the real
shape, plain against probed, many interleaved repetitions) says what each probed layer adds, free of the
step's noise; 4 x that, over the step's median, is the time the kernels add. Last, the costs a capture pays
once per forward whatever the number of layers (`fixed`: setting up the capture and building the region
indicators; the reduction to connectivity), each timed alone (an upper bound: in a step, the indicator build
overlaps the layers before the first probed one, and the reduction's kernels queue behind the forward's).

The check against eager attention runs in the model's dtype at the first decoder layer (the same input on both
routes, so the difference is the probe's own rounding) and at a middle layer (there bf16 rounding differences
between the eager and SDPA routes have accumulated through the layers before it), and on CUDA once more with
the model upcast to float32 at the middle layer, where the probe must match to ~1e-5.

    python benchmarks/probe_overhead.py --shape 3b --reps 30 [--attn flash_attention_2] [--out results.json]
    python benchmarks/probe_overhead.py --shape 7b --reps 0 --decoder-reps 120 --seconds 75   # fits the device
    python benchmarks/probe_overhead.py --shape tiny --device cpu --reps 3      # smoke run on a CPU
    python benchmarks/probe_overhead.py --shape 7b --frames 16 --grid 32 --reps 0 --decoder-reps 120   # a video
    python benchmarks/probe_overhead.py --shape demo --device cpu --grid 8 --response 96 --reps 20
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
from dataclasses import dataclass, field

import torch

SHAPES = {
    # text: hidden, layers, heads, kv heads, intermediate; vision: depth, hidden, intermediate, heads
    "3b": dict(text=(2048, 36, 16, 2, 11008), vision=(32, 1280, 3420, 16), vocab=151936),
    "7b": dict(text=(3584, 28, 28, 4, 18944), vision=(32, 1280, 3420, 16), vocab=152064),
    "tiny": dict(text=(64, 4, 4, 2, 128), vision=(2, 32, 64, 2), vocab=300),
    "demo": dict(text=(128, 4, 4, 2, 256), vision=(2, 64, 128, 2), vocab=300),  # the embedded default's widths
}


def build(shape: str, device: torch.device, dtype: torch.dtype, attn: str = "sdpa"):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    hidden, layers, heads, kv, inter = SHAPES[shape]["text"]
    vdepth, vhidden, vinter, vheads = SHAPES[shape]["vision"]
    vocab = SHAPES[shape]["vocab"]
    head_dim = hidden // heads
    half = head_dim // 2
    t = half // 4
    h = (half - t) // 2
    config = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=vocab, bos_token_id=vocab - 6, eos_token_id=vocab - 6, hidden_size=hidden,
                         intermediate_size=inter, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=32768,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                                          "mrope_section": [t, h, half - t - h]}),
        vision_config=dict(depth=vdepth, hidden_size=vhidden, intermediate_size=vinter, num_heads=vheads,
                           out_hidden_size=hidden, fullatt_block_indexes=[vdepth // 4 - 1, vdepth // 2 - 1,
                                                                          3 * vdepth // 4 - 1, vdepth - 1]),
        image_token_id=vocab - 3, video_token_id=vocab - 2, vision_start_token_id=vocab - 4,
        vision_end_token_id=vocab - 5,
    )
    config._attn_implementation = attn  # "flash_attention_2" needs flash-attn installed
    with torch.device(device):
        model = Qwen2_5_VLForConditionalGeneration(config).to(dtype)
    model.train()
    return model


def make_inputs(model, grid: int, response: int, prompt_text: int, device, dtype, seed: int = 0, batch: int = 1,
                frames: int = 0):
    """One sequence (text, a `grid` x `grid` patch image, `response` tokens), `batch` copies of it. With `frames`,
    a video of that many frames of `grid` x `grid` patches instead of the image (frames / 2 temporal patches of
    (grid / 2)^2 tokens each)."""
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    t = max(1, frames // 2)
    n_image = t * (grid // 2) ** 2
    vocab = cfg.text_config.vocab_size
    token = cfg.video_token_id if frames else cfg.image_token_id
    ids = torch.randint(0, vocab - 10, (1, prompt_text + n_image + 2 + response), generator=g)
    ids[0, prompt_text] = cfg.vision_start_token_id
    ids[0, prompt_text + 1: prompt_text + 1 + n_image] = token
    ids[0, prompt_text + 1 + n_image] = cfg.vision_end_token_id
    ids = ids.expand(batch, -1).clone()
    mm = (ids == token).int() * (2 if frames else 1)
    patch_dim = 3 * 2 * 14 * 14
    pixel_values = torch.randn(t * grid * grid, patch_dim, generator=g).to(dtype).repeat(batch, 1)
    out = {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device),
           "mm_token_type_ids": mm.to(device)}
    if not frames:
        return {**out, "pixel_values": pixel_values.to(device),
                "image_grid_thw": torch.tensor([[1, grid, grid]] * batch).to(device)}
    return {**out, "pixel_values_videos": pixel_values.to(device),
            "video_grid_thw": torch.tensor([[t, grid, grid]] * batch).to(device),
            "second_per_grid_ts": torch.ones(batch).to(device)}



def step(model, batch, response: int, probe=None):
    """Forward (logits for the response rows only) + backward of a mean token log-prob loss. With a probe, the
    forward runs inside its capture and the connectivity is made as the trainer makes it: the per-token sums on
    the device, copied to the host behind the forward, finished there once the backward is queued."""
    labels = batch["input_ids"][:, -response:]
    parts = None
    if probe is None:
        out = model(**batch, use_cache=False, logits_to_keep=response + 1)
    else:
        with probe.capture(batch["input_ids"], batch.get("image_grid_thw"), response_len=response,
                           video_grid_thw=batch.get("video_grid_thw")) as cap:
            out = model(**batch, use_cache=False, logits_to_keep=response + 1)
        if probe.layers:  # a capture with no probed layer records nothing to reduce
            mask = torch.ones(labels.shape, dtype=torch.bool)
            parts = cap.connectivity_parts(mask).to("cpu", non_blocking=True)
            copied = torch.cuda.Event() if labels.is_cuda else None
            if copied is not None:
                copied.record()
    logp = torch.log_softmax(out.logits[:, :-1].float(), dim=-1).gather(-1, labels[..., None])
    (-logp.mean()).backward()
    if parts is not None:
        if copied is not None:
            copied.synchronize()
        parts.finish(mask)


def check_against_eager(model, batch, layer: int, route: str = "auto", response_len: int | None = None) -> float:
    """Max abs difference between the probe's region masses on `layer` and eager attention's probabilities
    summed over each region's image tokens (the independent computation), in the model's dtype. The forward
    runs without gradients: route "auto" is the fused route there. With `response_len` the capture keeps only
    the last response_len + 1 rows (the split route then computes only those) and the check covers them."""
    from atrl.probe import ConnectivityProbe

    impl = model.config.text_config._attn_implementation
    probe = ConnectivityProbe(model, layers=[layer], route=route)
    try:
        with torch.no_grad(), probe.capture(batch["input_ids"], batch.get("image_grid_thw"), response_len,
                                            video_grid_thw=batch.get("video_grid_thw")) as cap:
            model(**batch, use_cache=False, logits_to_keep=1)
    finally:
        probe.detach()
    ind = probe.layout.region_indicators(batch["input_ids"], batch.get("image_grid_thw"), probe.region_grid,
                                         dtype=torch.float32, video_grid_thw=batch.get("video_grid_thw"),
                                         time_bins=probe.time_bins)
    model.set_attn_implementation({"text_config": "eager"})
    try:
        with torch.no_grad():
            attn = model(**batch, use_cache=False, output_attentions=True, logits_to_keep=1).attentions[layer]
    finally:
        model.config.text_config._attn_implementation = impl
    ref = torch.einsum("bhqk,bkr->bqhr", attn.float(), ind)
    if response_len is not None:
        ref = ref[:, -response_len - 1:]
    return (cap.state.masses[layer] - ref).abs().max().item()


def eager_checks(model, batch) -> list[str]:
    """The probe against eager attention at the first and the middle decoder layer, in the model's dtype, and on
    CUDA at the middle layer in float32 (the model upcast for the check, then cast back)."""
    mid = model.config.text_config.num_hidden_layers // 2
    dtype = model.dtype
    rows = batch["input_ids"].shape[1] // 4  # the split route on the last rows only, as in a trainer's capture
    # the first 4 positions (prompt text) as left padding: the model then runs beside a padding mask, as in a
    # trainer's batches, and the split route's second call takes the mask's path
    padded = dict(batch, attention_mask=batch["attention_mask"].clone())
    padded["attention_mask"][:, :4] = 0
    lines = [f"probe vs eager softmax on a short sequence ({dtype}, layer {layer}, {route} route{note}): max abs "
             f"error {check_against_eager(model, inputs, layer, route, response):.2e}"
             for layer, route, response, note, inputs in (
                 (0, "fused", None, "", batch), (0, "split", rows, f", last {rows + 1} rows", batch),
                 (0, "split", rows, f", last {rows + 1} rows, padding mask", padded),
                 (mid, "fused", None, "", batch), (mid, "split", None, "", batch))]
    if dtype != torch.float32 and next(model.parameters()).is_cuda:
        model.float()
        try:
            fp32 = {k: v.float() if v.is_floating_point() else v for k, v in batch.items()}
            lines.append(f"probe vs eager softmax on a short sequence (torch.float32, layer {mid}): max abs error "
                         f"{check_against_eager(model, fp32, mid):.2e}")
        finally:
            model.to(dtype)
    return lines


def layer_costs(model, batch, response: int, reps: int) -> dict[str, list[float]]:
    """Forward + backward of one decoder layer's attention call at the real shape (B=1, causal, GQA), through
    the function the model uses (transformers' SDPA attention), plain and probed, in ms per call; interleaved.
    Probed: the split route (what a call with gradients takes: the plain call plus a no-grad call with the
    indicators as values; by default on the response rows a capture keeps where that keeps the plain call's
    kernel, with the indicator channels alone as values where SDPA picks the same kernel for them; for the
    comparison with values padded to the head size, on all rows through transformers' SDPA function, and forced
    onto the kept rows) and the fused route forced (one call with V widened).

    Each probed variant keeps one capture state across its calls, as a forward's later probed layers find it
    (the indicator values and SDPA's kernel choice made once per forward); "..., a forward's first probed layer"
    builds a fresh state for every call, so its difference from the default is that per-forward work."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from atrl.probe import ConnectivityProbe
    from atrl.probe.attention import ProbeState, activate, deactivate, probed_attention

    probe = ConnectivityProbe(model)
    ind = probe.layout.region_indicators(batch["input_ids"], batch.get("image_grid_thw"), probe.region_grid,
                                         dtype=torch.float32, video_grid_thw=batch.get("video_grid_thw"),
                                         time_bins=probe.time_bins)
    probe.detach()
    device, dtype, (B, n_tokens) = ind.device, model.dtype, ind.shape[:2]
    cfg = model.config.text_config
    H, H_kv = cfg.num_attention_heads, cfg.num_key_value_heads
    D = cfg.hidden_size // H
    module = torch.nn.Module()
    module.is_causal, module.training, module.num_key_value_groups = True, True, H // H_kv
    g = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(B, H, n_tokens, D, device=device, dtype=dtype, generator=g).requires_grad_()
    k = torch.randn(B, H_kv, n_tokens, D, device=device, dtype=dtype, generator=g).requires_grad_()
    v = torch.randn(B, H_kv, n_tokens, D, device=device, dtype=dtype, generator=g).requires_grad_()
    grad = torch.randn(B, n_tokens, H, D, device=device, dtype=dtype, generator=g)
    probed = probed_attention(sdpa_attention_forward, rows="auto")  # as registered for the decoder
    # name -> (attention function, probe route); route None: no capture
    variants = {"plain": (sdpa_attention_forward, None), "plain (again)": (sdpa_attention_forward, None),
                "probed, split (the default with grads)": (probed, "split"),
                "probed, split, values padded to the head size": (
                    probed_attention(sdpa_attention_forward, rows="auto", values="wide"), "split"),
                "probed, split, second call on all rows": (probed_attention(sdpa_attention_forward), "split"),
                "probed, split, second call on the kept rows": (probed_attention(sdpa_attention_forward, rows="kept"),
                                                                "split"),
                "probed, one widened call (fused)": (probed, "fused"),
                "probed, split, a forward's first probed layer": (probed, "split")}
    fresh = "probed, split, a forward's first probed layer"
    states: dict[str, ProbeState] = {}

    def state_for(name: str, route: str) -> ProbeState:
        if name == fresh or name not in states:
            states[name] = ProbeState(indicators=ind, layer_of_module={id(module): 0}, keep_last=response + 1,
                                      pad_qk=True, route=route)
        return states[name]

    def call(name: str) -> float:
        function, route = variants[name]
        token = None
        if route is not None:
            token = activate(state_for(name, route))
        start, end = timers(device)
        start()
        out, _ = function(module, q, k, v, None, scaling=D ** -0.5)
        out.backward(grad)
        ms = end()
        if token is not None:
            deactivate(token)
        q.grad = k.grad = v.grad = None
        return ms

    times = {name: [] for name in variants}
    for _ in range(3):
        for name in variants:
            call(name)
    for _ in range(reps):
        for name in variants:
            times[name].append(call(name))
    return times


def fixed_costs(model, batch, response: int, reps: int) -> dict[str, list[float]]:
    """The per-forward costs of a capture that do not depend on the number of probed layers, in ms, each timed
    alone (`timers`) on an idle device: setting up the capture (the indicators' inputs start copying to the
    host), the setup followed at once by the indicator build (in a forward the build runs at the first probed
    layer, while the device computes the layers before it), reducing the recorded masses of 4 layers to
    connectivity and profiles on the device in one piece (`connectivity_from_masses`, as `Capture.connectivity`
    does), and in the trainer's two halves: the per-token sums on the device (what the forward launches) and
    their finish on the host (the trainer's helper thread, off the forward's path)."""
    from atrl.probe import ConnectivityProbe, connectivity_from_masses, connectivity_parts

    probe = ConnectivityProbe(model)  # the default layers: 4 of them
    probe.detach()
    R = probe.layout.region_indicators(batch["input_ids"], batch.get("image_grid_thw"), probe.region_grid,
                                       video_grid_thw=batch.get("video_grid_thw"), time_bins=probe.time_bins).shape[-1]
    device, B = batch["input_ids"].device, batch["input_ids"].shape[0]
    masses = torch.rand(len(probe.layers), B, response, model.config.text_config.num_attention_heads, R,
                        device=device)
    mask = torch.ones(B, response, dtype=torch.bool, device=device)
    def new_state():
        return probe._new_state(batch["input_ids"], batch.get("image_grid_thw"), response,
                                video_grid_thw=batch.get("video_grid_thw"))

    host_parts = connectivity_parts(masses, mask).to("cpu")
    host_mask = mask.cpu()
    jobs = {"capture setup (indicators deferred)": new_state,
            "setup + indicator build, back to back": lambda: new_state().region_indicators(),
            "connectivity of 4 layers, in one piece on the device": lambda: connectivity_from_masses(masses, mask),
            "connectivity parts of 4 layers (the forward's share)": lambda: connectivity_parts(masses, mask),
            "their finish on the host (the helper thread's share)": lambda: host_parts.finish(host_mask)}
    times = {name: [] for name in jobs}
    for rep in range(reps + 2):
        for name, job in jobs.items():
            start, stop = timers(device)
            start()
            job()
            ms = stop()
            if rep >= 2:
                times[name].append(ms)
    return times


def profiler_activities(device) -> list:
    from torch.profiler import ProfilerActivity

    return [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])


def profiled_step(prof, steps: int, wall_ms: float, cuda: bool) -> dict:
    """Per step, from a profiler that recorded `steps` steps: the wall time given, the device's busy time (the sum
    of its kernels and copies; on a CPU, of every op's own time), each kernel's time and calls, and the host's own
    time per op (CUDA runtime calls such as synchronisations included)."""
    kind = torch.autograd.DeviceType.CUDA if cuda else torch.autograd.DeviceType.CPU
    events = prof.key_averages()
    own = {e.key: (e.self_device_time_total if cuda else e.self_cpu_time_total) / 1000 / steps
           for e in events if e.device_type == kind}
    counts = {e.key: e.count / steps for e in events if e.device_type == kind}
    host = {e.key: e.self_cpu_time_total / 1000 / steps for e in events
            if e.device_type == torch.autograd.DeviceType.CPU} if cuda else {}  # on a CPU: the kernels above
    return {"wall_ms": wall_ms, "busy_ms": sum(own.values()), "kernels_ms": own, "counts": counts, "host_ms": host}


def kernel_times(model, inputs, response: int, layers: list[int], steps: int = 3) -> dict[str, dict]:
    """Where a probed step's time goes, by the profiler (`profiled_step`), for "off" and "4 layers": the median
    wall time of `steps` profiled steps (`timers`) after one unprofiled one, and per-step averages."""
    from torch.profiler import profile

    from atrl.probe import ConnectivityProbe

    device = next(model.parameters()).device
    out = {}
    for name, probed in (("off", None), ("4 layers", layers)):
        probe = ConnectivityProbe(model, layers=probed) if probed else None
        model.zero_grad(set_to_none=True)
        step(model, inputs, response, probe)
        walls = []
        with profile(activities=profiler_activities(device)) as prof:
            for _ in range(steps):
                model.zero_grad(set_to_none=True)
                start, stop = timers(device)
                start()
                step(model, inputs, response, probe)
                walls.append(stop())
        if probe is not None:
            probe.detach()
        out[name] = profiled_step(prof, steps, statistics.median(walls), device.type == "cuda")
    return out


def kernel_table(times: dict[str, dict], top: int = 12) -> list[str]:
    """Markdown: wall, busy and idle ms per step for each configuration (`profiled_step` results), then the
    kernels and the host-side ops whose time changed most from the first configuration to the second."""
    (base, ref), (other, new) = list(times.items())[:2]
    lines = ["| configuration | step wall ms | device busy ms | device idle ms | device ops per step |",
             "|---|---|---|---|---|"]
    for name, t in times.items():
        lines.append(f"| {name} | {t['wall_ms']:.2f} | {t['busy_ms']:.2f} | {t['wall_ms'] - t['busy_ms']:.2f} | "
                     f"{sum(t['counts'].values()):.0f} |")
    for what, key in (("kernel", "kernels_ms"), ("host-side op", "host_ms")):
        if not ref[key] and not new[key]:
            continue
        added = {k: new[key].get(k, 0.0) - ref[key].get(k, 0.0) for k in set(new[key]) | set(ref[key])}
        lines += ["", f"| {what} ({other} against {base}) | added ms per step | calls per step |", "|---|---|---|"]
        for k in sorted(added, key=lambda k: -abs(added[k]))[:top]:
            label = k if len(k) <= 90 else k[:87] + "..."
            calls = f"{ref['counts'].get(k, 0):.0f} -> {new['counts'].get(k, 0):.0f}" if key == "kernels_ms" else "-"
            lines.append(f"| `{label}` | {added[k]:+.3f} | {calls} |")
    return lines


ALLOCATOR_COUNTS = ("num_alloc_retries", "num_device_alloc", "num_device_free", "num_sync_all_streams")


def allocator_activity(before: dict, after: dict) -> dict[str, int | None]:
    """What the caching allocator did between two `torch.cuda.memory_stats()`: retries (an allocation that failed,
    freed the cache and synchronised the device to try again), cudaMalloc and cudaFree calls, device-wide
    synchronisations. None where this torch does not count it. In steady training all should be 0: if a mode's
    timed steps show any, the allocator is part of its step time."""
    return {key: after[key] - before[key] if key in after and key in before else None for key in ALLOCATOR_COUNTS}


MIN_ROUNDS = 5  # paired ratios need a few rounds whatever the budget


def rounds_in_budget(seconds: float, round_seconds: float, most: int, least: int = MIN_ROUNDS) -> int:
    """How many timed rounds fit in `seconds`, one taking `round_seconds`: at least `least`, at most `most`."""
    return min(most, max(least, int(seconds / max(round_seconds, 1e-9))))


def timers(device):
    """(start, stop) closures; stop returns the elapsed ms (CUDA events on a GPU, the host clock on a CPU)."""
    if device.type == "cuda":
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

        def stop():
            b.record()
            torch.cuda.synchronize()
            return a.elapsed_time(b)
        return a.record, stop
    t0 = []

    def stop_cpu():
        return 1000 * (time.perf_counter() - t0[0])
    return (lambda: t0.append(time.perf_counter())), stop_cpu


def sdpa_backends(model, n_tokens: int, regions: int, device, dtype, reps: int = 10) -> list[str]:
    """Which SDPA backends take the probed layer's shapes, and how fast: plain (Q, K, V of head size D),
    V widened to D + R (Q/K as they are), all three padded to D + R, and V the R indicator channels alone (rounded
    up to 8: the split route's second call where SDPA picks one kernel for it). Markdown rows; the last column is
    what SDPA picks by itself (compare it with the others to see which backend that is)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    cfg = model.config.text_config
    H, H_kv = cfg.num_attention_heads, cfg.num_key_value_heads
    D = cfg.hidden_size // H
    R = regions
    shapes = {"plain": (D, D), "V widened": (D, D + R), "Q/K padded": (D + R, D + R),
              "indicators only": (D, -(-R // 8) * 8)}
    rows = []
    for name, (d_qk, d_v) in shapes.items():
        q = torch.randn(1, H, n_tokens, d_qk, device=device, dtype=dtype)
        k = torch.randn(1, H_kv, n_tokens, d_qk, device=device, dtype=dtype)
        v = torch.randn(1, H_kv, n_tokens, d_v, device=device, dtype=dtype)
        cells = []
        for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION,
                        SDPBackend.MATH, None):
            def call(q=q, k=k, v=v):
                return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True,
                                                                        scale=D ** -0.5)
            try:
                with sdpa_kernel(backend) if backend is not None else contextlib.nullcontext():
                    call()
                    t0 = time.perf_counter()
                    for _ in range(reps):
                        call()
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                cells.append(f"{1000 * (time.perf_counter() - t0) / reps:.3f} ms")
            except RuntimeError:
                cells.append("refused")
        rows.append(f"| {name} (Q/K {d_qk}, V {d_v}) | " + " | ".join(cells) + " |")
    return rows


def summary(times: dict[str, list[float]], base: str) -> dict[str, dict[str, float]]:
    """Per configuration: median, quartiles, ratio of medians against `base`, and the paired ratio (times taken
    round-robin, so entry i of every list is round i): the median and quartiles over rounds of time / `base`'s
    time in the same round."""
    ref = statistics.median(times[base])
    rows = {}
    for name, ts in times.items():
        q = statistics.quantiles(ts, n=4)
        med = statistics.median(ts)
        paired = [t / b for t, b in zip(ts, times[base])]
        pq = statistics.quantiles(paired, n=4)
        rows[name] = {"median_ms": med, "q1": q[0], "q3": q[2], "ratio": med / ref,
                      "paired_ratio": statistics.median(paired), "paired_q1": pq[0], "paired_q3": pq[2]}
    return rows


# name -> None (probes off) or (which of the default 4 layers: "none", "middle" or "all", route, in a capture)
CONFIGURATIONS: dict[str, tuple[str, str, bool] | None] = {
    "off": None, "off (again)": None, "installed, no capture": ("none", "auto", False),
    "capture, no probed layer": ("none", "auto", True), "1 layer": ("middle", "auto", True),
    "4 layers": ("all", "auto", True), "4 layers, one widened call (fused)": ("all", "fused", True)}


@dataclass
class ProbeResults:
    """One run of the bench. `scopes`: per scope ("model", "decoder") the summary rows of every configuration
    (with `peak_gib`), the raw ms (round-robin), the vision tower's calls and the allocator's activity;
    `layer` / `fixed`: the attention call's and the capture's fixed costs (summaries and raw ms); `kernels`:
    the profiled decoder step per configuration."""

    device: str
    shape: str
    attn: str
    batch: int
    scopes: dict[str, dict] = field(default_factory=dict)
    layer: dict[str, dict] = field(default_factory=dict)
    layer_raw_ms: dict[str, list[float]] = field(default_factory=dict)
    fixed: dict[str, dict] = field(default_factory=dict)
    fixed_raw_ms: dict[str, list[float]] = field(default_factory=dict)
    kernels: dict[str, dict] | None = None

    def to_json(self) -> dict:
        out = {"device": self.device, "shape": self.shape, "attn": self.attn, "batch": self.batch,
               "scopes": self.scopes, "layer": self.layer, "layer_raw_ms": self.layer_raw_ms, "fixed": self.fixed,
               "fixed_raw_ms": self.fixed_raw_ms}
        return out | ({"kernels": self.kernels} if self.kernels is not None else {})


class ProbeBench:
    """The model at a shape, its inputs (the whole model's and the decoder's, with the vision output cached) and
    one timed step per configuration (`step_ms`)."""

    def __init__(self, shape: str, device: str, attn: str = "sdpa", grid: int = 64, response: int = 1000,
                 batch: int = 1, frames: int = 0):
        from atrl.probe import default_probe_layers

        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.dtype = torch.bfloat16 if self.cuda else torch.float32
        self.shape, self.attn, self.grid, self.response, self.batch_size = shape, attn, grid, response, batch
        self.model = build(shape, self.device, self.dtype, attn)
        self.small = make_inputs(self.model, 16, 64, 16, self.device, self.dtype, seed=1, frames=min(frames, 4))
        self.batch = make_inputs(self.model, grid, response, 64, self.device, self.dtype, batch=batch, frames=frames)
        kind, pixels = ("video", "pixel_values_videos") if frames else ("image", "pixel_values")
        with torch.no_grad():  # the vision tower's output, for the decoder-only scope
            encode = self.model.model.get_video_features if frames else self.model.model.get_image_features
            vision = encode(self.batch[pixels], self.batch[f"{kind}_grid_thw"], return_dict=True)
        self.decoder_batch = ({k: v for k, v in self.batch.items() if k != pixels}
                              | {"mm_encoder_outputs": {kind: vision}})
        self.layers4 = default_probe_layers(self.model.config.text_config.num_hidden_layers, 4)
        self.vision_calls = 0  # calls of the vision tower since the last reset: none in the decoder scope
        self.model.model.visual.register_forward_pre_hook(lambda *_: setattr(self, "vision_calls",
                                                                             self.vision_calls + 1))

    @property
    def tokens(self) -> int:
        return self.batch["input_ids"].shape[1]

    def layers(self, which: str) -> list[int]:
        mid = len(self.layers4) // 2
        return {"none": [], "middle": self.layers4[mid:mid + 1], "all": self.layers4}[which]

    def step_ms(self, name: str, inputs: dict, allocator: dict | None = None) -> float:
        """One timed step of configuration `name`; `allocator`: add what the caching allocator did in it there
        (its counters are read outside the timed window, on a synchronised device)."""
        from atrl.probe import ConnectivityProbe

        spec = CONFIGURATIONS[name]
        probe = ConnectivityProbe(self.model, layers=self.layers(spec[0]), route=spec[1]) if spec else None
        self.model.zero_grad(set_to_none=True)
        before = torch.cuda.memory_stats() if self.cuda and allocator is not None else None
        start, stop = timers(self.device)
        start()
        step(self.model, inputs, self.response, probe if spec is not None and spec[2] else None)
        ms = stop()
        if before is not None:
            for key, n in allocator_activity(before, torch.cuda.memory_stats()).items():
                allocator[key] = None if n is None or allocator.get(key, 0) is None else allocator.get(key, 0) + n
        if probe is not None:
            probe.detach()
        return ms


def measure_scope(bench: ProbeBench, scope: str, reps: int, warmup: int = 3, seconds: float = 0.0,
                  say=print) -> dict:
    """Every configuration's step in `scope` ("model" or "decoder"), interleaved: `warmup` untimed rounds, one
    round measuring peak memory, then `reps` timed rounds (or as many as fit in `seconds`)."""
    inputs = bench.batch if scope == "model" else bench.decoder_batch
    bench.vision_calls = 0
    for name in CONFIGURATIONS:
        for _ in range(warmup):
            bench.step_ms(name, inputs)
    peaks = {}
    t0 = time.perf_counter()
    for name in CONFIGURATIONS:
        if bench.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        bench.step_ms(name, inputs)
        peaks[name] = torch.cuda.max_memory_allocated() / 2**30 if bench.cuda else float("nan")
    if seconds > 0:  # a round is one step of every configuration, as the one just made
        reps = rounds_in_budget(seconds, time.perf_counter() - t0, reps)
        say(f"{scope} scope: {reps} rounds fit in {seconds:g} s")
    times: dict[str, list[float]] = {name: [] for name in CONFIGURATIONS}
    allocator: dict[str, dict] = {name: {} for name in CONFIGURATIONS}  # summed over the timed steps (on a GPU)
    for _ in range(reps):
        for name in CONFIGURATIONS:
            times[name].append(bench.step_ms(name, inputs, allocator[name]))
    rows = summary(times, "off")
    for name, row in rows.items():
        row["peak_gib"] = peaks[name]
    return {"rows": rows, "raw_ms": times, "vision_calls": bench.vision_calls, "allocator": allocator}


def scope_table(r: ProbeResults, scope: str, grid: int, response: int, cuda: bool, frames: int = 0) -> list[str]:
    """The scope's table and its allocator line, as printed."""
    data = r.scopes[scope]
    rows, reps = data["rows"], len(data["raw_ms"]["off"])
    what = "whole model, vision tower included" if scope == "model" else "decoder only, vision output cached"
    lines = [f"# probe overhead ({scope}: {what}), Qwen2.5-VL-{r.shape} shape, {r.attn}, bf16={cuda}, "
             + (f"a video of {frames} frames, {max(1, frames // 2) * (grid // 2) ** 2} video" if frames else
                f"{(grid // 2) ** 2} image")
             + f" + {response} response tokens, batch {r.batch}, {reps} interleaved reps, "
             f"device {r.device}",
             "| configuration | median ms | IQR ms | time ratio | paired ratio (IQR) | peak GiB | memory ratio |",
             "|---|---|---|---|---|---|---|"]
    off = rows["off"]["peak_gib"]
    for name, row in rows.items():
        lines.append(f"| {name} | {row['median_ms']:.2f} | {row['q1']:.2f}-{row['q3']:.2f} | {row['ratio']:.4f} | "
                     f"{row['paired_ratio']:.4f} ({row['paired_q1']:.4f}-{row['paired_q3']:.4f}) | "
                     f"{row['peak_gib']:.3f} | {row['peak_gib'] / off:.4f} |")
    if cuda:  # in steady steps all 0; a configuration with more pays for the allocator in its time
        lines.append(f"allocator in the {reps} timed steps ({'/'.join(ALLOCATOR_COUNTS)}): " + ", ".join(
            f"{name} {'/'.join('-' if a.get(k) is None else str(a[k]) for k in ALLOCATOR_COUNTS)}"
            for name, a in data["allocator"].items()))
    return lines


def _share(r: ProbeResults, ms: float, scope: str) -> str:
    """`ms` as a share of the scope's `off` step median ("-" where the scope was not timed)."""
    if scope not in r.scopes:
        return "-"
    return f"{100 * ms / r.scopes[scope]['rows']['off']['median_ms']:+.3f}%"


def layer_table(r: ProbeResults, n_layers: int, tokens: int, reps: int) -> list[str]:
    """One probed attention call's cost, and `n_layers` times it against the step medians; fills
    `added_ms_probed_layers` in `r.layer`."""
    lines = [f"# one probed layer's attention call, forward + backward, {tokens} tokens, {reps} interleaved reps; "
             f"added time x {n_layers} layers against the `off` step medians",
             f"| attention call | median ms | IQR ms | added ms | x {n_layers} layers / model step | "
             f"x {n_layers} layers / decoder step |", "|---|---|---|---|---|---|"]
    plain = r.layer["plain"]["median_ms"]
    for name, row in r.layer.items():
        added = n_layers * (row["median_ms"] - plain)
        row["added_ms_probed_layers"] = added
        lines.append(f"| {name} | {row['median_ms']:.3f} | {row['q1']:.3f}-{row['q3']:.3f} | "
                     f"{row['median_ms'] - plain:+.3f} | {_share(r, added, 'model')} | "
                     f"{_share(r, added, 'decoder')} |")
    return lines


def fixed_table(r: ProbeResults, reps: int) -> list[str]:
    lines = [f"# fixed costs per probed forward, whatever the number of layers (each timed alone, {reps} reps)",
             "| part | median ms | IQR ms | share of the decoder step |", "|---|---|---|---|"]
    for name, row in r.fixed.items():
        lines.append(f"| {name} | {row['median_ms']:.3f} | {row['q1']:.3f}-{row['q3']:.3f} | "
                     f"{_share(r, row['median_ms'], 'decoder')} |")
    return lines


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="atrl bench probe", description=__doc__.split(chr(10))[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="3b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--grid", type=int, default=64, help="patch grid side (tokens = (grid/2)^2)")
    ap.add_argument("--frames", type=int, default=0,
                    help="a video of this many frames of --grid patches instead of the image (frames/2 temporal "
                         "patches; 16 frames at --grid 32 is Qwen2.5-VL-7B's 8 x 256 tokens)")
    ap.add_argument("--response", type=int, default=1000, help="response tokens per sequence")
    ap.add_argument("--batch", type=int, default=1,
                    help="copies of the sequence per step (a trainer's micro-batch; the recipes' is 4): at batch 1 "
                         "the 3B step is near host-bound, and host jitter hides a fraction of a percent")
    ap.add_argument("--reps", type=int, default=30, help="whole-model steps per configuration (0: skip that scope)")
    ap.add_argument("--decoder-reps", type=int, default=60, help="decoder-only steps per configuration")
    ap.add_argument("--seconds", type=float, default=0.0,
                    help="time budget per scope for the timed rounds: as many rounds as fit (at least "
                         f"{MIN_ROUNDS}, at most --reps / --decoder-reps), from the time of the untimed round that "
                         "measures peak memory; 0: the counts as given")
    ap.add_argument("--layer-reps", type=int, default=200, help="attention calls per variant")
    ap.add_argument("--warmup", type=int, default=3, help="untimed rounds per scope")
    ap.add_argument("--profile-steps", type=int, default=3, help="decoder steps profiled per configuration (0: none)")
    ap.add_argument("--out", default=None, help="JSON file for the raw numbers")
    ap.add_argument("--attn", default="sdpa", help="sdpa | flash_attention_2 (the decoder's attention kernel)")
    args = ap.parse_args(argv)

    def say(*lines: str) -> None:
        print("\n".join(lines), flush=True)

    bench = ProbeBench(args.shape, args.device, args.attn, args.grid, args.response, args.batch, args.frames)
    say(*eager_checks(bench.model, bench.small))
    say(f"# SDPA backends at one probed layer's shapes ({bench.tokens} tokens, causal, GQA, forward only; "
        "`refused`: the backend does not take these shapes)",
        "| Q, K, V head sizes | flash | efficient | cudnn | math | SDPA's own pick |", "|---|---|---|---|---|---|",
        *sdpa_backends(bench.model, bench.tokens, 16, bench.device, bench.dtype))
    result = ProbeResults(device=torch.cuda.get_device_name() if bench.cuda else "cpu", shape=args.shape,
                          attn=args.attn, batch=args.batch)
    for scope, reps in (("model", args.reps), ("decoder", args.decoder_reps)):
        if reps:
            result.scopes[scope] = measure_scope(bench, scope, reps, args.warmup, args.seconds, say)
            say(*scope_table(result, scope, args.grid, args.response, bench.cuda, args.frames))
    result.layer_raw_ms = layer_costs(bench.model, bench.batch, args.response, args.layer_reps)
    result.layer = summary(result.layer_raw_ms, "plain")
    say(*layer_table(result, len(bench.layers4), bench.tokens, args.layer_reps))
    result.fixed_raw_ms = fixed_costs(bench.model, bench.batch, args.response, 50)
    result.fixed = summary(result.fixed_raw_ms, "capture setup (indicators deferred)")
    say(*fixed_table(result, 50))

    def save() -> None:
        if args.out:
            with open(args.out, "w") as fh:
                json.dump(result.to_json(), fh, indent=1)

    save()  # before the profiler, which runs last: whatever happens there, the tables above are kept
    if args.profile_steps:
        result.kernels = kernel_times(bench.model, bench.decoder_batch, args.response, bench.layers4,
                                      args.profile_steps)
        say(f"# the decoder step under the profiler ({args.profile_steps} steps each): device busy and idle time, "
            "and the kernels the probes add", *kernel_table(result.kernels))
        save()


if __name__ == "__main__":
    main()
