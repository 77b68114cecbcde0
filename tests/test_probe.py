"""atrl.probe against an independent computation: explicit softmax of eager attention."""

import contextlib
import math

import pytest
import torch

from atrl.data.synthetic import generate
from atrl.models.zoo import FAMILIES, build_tiny_vlm
from atrl.probe import ConnectivityProbe, ProbeError, connectivity_from_masses, default_probe_layers

RESPONSE = 12


def _batch(processor, n_images=(1, 1, 1), padding_side="left", seed=1):
    """Prompts with n_images[b] images each (0 allowed) followed by a reference response."""
    examples = generate(sum(max(1, k) for k in n_images) + 3, seed=seed)
    texts, images, k = [], [], 0
    for b, n in enumerate(n_images):
        content = [{"type": "image"}] * n + [{"type": "text", "text": examples[b].question}]
        prompt = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
        texts.append(prompt + examples[b].reasoning[: 10 + 7 * b])
        images.append([examples[k + i].image for i in range(n)])
        k += n
    processor.tokenizer.padding_side = padding_side
    flat = [im for group in images for im in group]
    kwargs = {"images": images} if flat else {}
    if flat and any(len(g) == 0 for g in images):
        try:  # Gemma 3's processor takes the nested lists, an empty one for a sample without an image
            return processor(text=texts, return_tensors="pt", padding=True, images=images)
        except ValueError:  # the Qwen processors take a flat list when some samples have no image
            kwargs = {"images": flat}
    return processor(text=texts, return_tensors="pt", padding=True, **kwargs)


def _eager_masses(model, batch, indicators, layers):
    """Reference: eager attention probabilities (B, H, S, S) @ indicators -> (B, S, H, R) per layer."""
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            out = model(**batch, output_attentions=True, use_cache=False)
    finally:
        model.set_attn_implementation("sdpa")
    # a hybrid decoder returns the attention maps of its self-attention layers only, in order
    softmax = [i for i, layer in enumerate(model.get_decoder().layers) if hasattr(layer, "self_attn")]
    at = {layer: softmax.index(layer) if len(out.attentions) == len(softmax) else layer for layer in layers}
    return {layer: torch.einsum("bhqk,bkr->bqhr", out.attentions[at[layer]].double(), indicators.double())
            for layer in layers}


def _softmax_layers(model, layers):
    """The given layers that run softmax self-attention (a hybrid decoder's linear-attention layers have none)."""
    decoder = model.get_decoder()
    kept = [i for i in layers if hasattr(decoder.layers[i], "self_attn")]
    assert kept, f"none of {layers} is a self-attention layer"
    return kept


def _fresh(family):
    model, processor = build_tiny_vlm(family, seed=0)
    return model.float(), processor


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("n_images", [(1, 1, 1), (2, 1, 0)], ids=["one-image", "multi-and-no-image"])
@pytest.mark.parametrize("route, pad_qk, grads", [("fused", False, False), ("fused", True, False),
                                                  ("auto", True, True), ("split", True, False)],
                         ids=["fused", "fused-padded", "auto-with-grads", "split-no-grad"])
def test_masses_match_explicit_softmax_of_eager_attention(family, padding_side, n_images, route, pad_qk, grads):
    model, processor = _fresh(family)
    batch = _batch(processor, n_images, padding_side)
    layers = _softmax_layers(model, [0, 2, 3])
    probe = ConnectivityProbe(model, layers=layers, pad_qk=pad_qk, route=route, processor=processor)
    try:
        with torch.set_grad_enabled(grads), probe.capture(batch["input_ids"], batch.get("image_grid_thw"),
                                                           image_sizes=batch.get("image_sizes")) as cap:
            logits = model(**batch, use_cache=False).logits
        assert logits.requires_grad == grads
        indicators = probe.layout.region_indicators(batch["input_ids"], batch.get("image_grid_thw"),
                                                    probe.region_grid, dtype=torch.float64,
                                                    image_sizes=batch.get("image_sizes"))
        # the indicators mark exactly the image tokens, each in one region; sample with no image: none
        is_image = batch["input_ids"] == probe.layout.image_token_id
        assert torch.equal(indicators.sum(-1), is_image.double())
        assert indicators.shape[-1] == 16 * max(n_images)
        ref = _eager_masses(model, batch, indicators, layers)
    finally:
        probe.detach()
    valid = batch["attention_mask"].bool()
    for layer in layers:
        got = cap.state.masses[layer].double()
        assert got.shape == ref[layer].shape
        err = (got - ref[layer])[valid].abs().max().item()
        assert err <= 1e-5, (layer, err)
        # and the masses are not trivially zero: image rows carry real mass
        assert ref[layer][valid].sum() > 1.0
    no_image = [b for b, n in enumerate(n_images) if n == 0]
    for b in no_image:
        assert cap.state.masses[layers[0]][b].abs().max() == 0


@pytest.mark.parametrize("sdpa_pick", ["flash", "cudnn"])
@pytest.mark.parametrize("n_images, padding_side", [((1,), "left"), ((2, 1, 0), "left"), ((2, 1, 0), "right")],
                         ids=["one-sample-no-mask", "padded-left", "padded-right"])
def test_split_route_computes_only_the_kept_rows_and_matches_eager(n_images, padding_side, sdpa_pick, monkeypatch):
    """With a response length, the split route's second call runs SDPA on the kept rows only: without a padding
    mask under a bottom-right causal bias, with one on the mask's last rows. Both against eager softmax. Without
    a mask, only where SDPA's pick for the full call is a kernel the bias reaches (flash here on the CPU; where it
    would pick cuDNN, as on an H200, the call keeps all rows and the plain call's kernel). Its values are the
    indicator channels alone (rounded up to 8) where SDPA picks one kernel for them and for values of the head
    size (every pick cuDNN: run here by the CPU's math kernel), else zero-padded to the head size (the CPU's
    flash takes only equal head sizes)."""
    import types

    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend
    from torch.nn.attention.bias import CausalBias

    from atrl.probe import attention

    if sdpa_pick == "cudnn":
        monkeypatch.setattr(torch, "_fused_sdp_choice", lambda *a, **k: SDPBackend.CUDNN_ATTENTION.value)
    calls = []

    def spy(q, k, v, attn_mask=None, **kwargs):  # the probe's own SDPA calls (the second calls) only
        kind = "bias" if isinstance(attn_mask, CausalBias) else "none" if attn_mask is None else "mask"
        calls.append((q.shape[2], kind, v.shape[-1]))
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(attention, "F", types.SimpleNamespace(scaled_dot_product_attention=spy, pad=F.pad))
    model, processor = _fresh("qwen2_5_vl")
    batch = _batch(processor, n_images, padding_side)
    layers = [0, 3]
    probe = ConnectivityProbe(model, layers=layers, region_grid=(2, 2))  # 4 regions per image, 16 head channels
    try:
        with probe.capture(batch["input_ids"], batch["image_grid_thw"], response_len=RESPONSE) as cap:
            model(**batch, use_cache=False).logits.float().pow(2).mean().backward()  # gradients: the split route
        indicators = probe.layout.region_indicators(batch["input_ids"], batch["image_grid_thw"], probe.region_grid,
                                                    dtype=torch.float64)
        ref = _eager_masses(model, batch, indicators, layers)
    finally:
        probe.detach()
    cfg = model.config.text_config
    S, D, R = batch["input_ids"].shape[1], cfg.hidden_size // cfg.num_attention_heads, indicators.shape[-1]
    width = 8 if sdpa_pick == "cudnn" else D  # R = 4 or 8 channels, rounded up to 8
    assert R in (4, 8) and D == 16
    if len(n_images) == 1:
        expected = (S, "none", width) if sdpa_pick == "cudnn" else (RESPONSE + 1, "bias", D)
    else:
        expected = (RESPONSE + 1, "mask", width)
    assert calls == [expected] * len(layers)
    valid = batch["attention_mask"].bool()[:, -RESPONSE - 1:]
    for layer in layers:
        got, want = cap.state.masses[layer].double(), ref[layer][:, -RESPONSE - 1:]
        assert got.shape == want.shape
        held = cap.state.masses[layer]  # its own memory, not a view of the call's whole output
        assert held.untyped_storage().nbytes() == held.numel() * held.element_size()
        assert (got - want)[valid].abs().max().item() <= 1e-5, layer
        assert want[valid].sum() > 1.0


def test_narrow_values_a_kernel_refuses_fall_back_to_padded_ones_once_and_are_logged(monkeypatch, caplog):
    """SDPA's choice may take a V narrower than Q and K that the kernel itself then refuses (its limits go past
    what the choice checks): the call is made again with values padded to the head size, exact as ever, the
    refusal is logged, and later forwards of that shape go straight to the padded call."""
    import types

    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend

    from atrl.probe import attention

    monkeypatch.setattr(torch, "_fused_sdp_choice", lambda *a, **k: SDPBackend.CUDNN_ATTENTION.value)
    monkeypatch.setattr(attention, "_NARROW_REFUSED", set())
    widths = []

    def refusing(q, k, v, **kwargs):
        widths.append(v.shape[-1])
        if v.shape[-1] < q.shape[-1]:
            raise RuntimeError("cuDNN Frontend error: no valid execution plan\nmore detail")
        return F.scaled_dot_product_attention(q, k, v, **kwargs)

    monkeypatch.setattr(attention, "F", types.SimpleNamespace(scaled_dot_product_attention=refusing, pad=F.pad))
    model, processor = _fresh("qwen2_5_vl")
    batch = _batch(processor, (2, 1, 0), "left")
    probe = ConnectivityProbe(model, layers=[0, 3], region_grid=(2, 2))
    try:
        for _ in range(2):
            with probe.capture(batch["input_ids"], batch["image_grid_thw"], response_len=RESPONSE) as cap:
                model(**batch, use_cache=False).logits.float().pow(2).mean().backward()
        indicators = probe.layout.region_indicators(batch["input_ids"], batch["image_grid_thw"], probe.region_grid,
                                                    dtype=torch.float64)
        ref = _eager_masses(model, batch, indicators, [0, 3])
    finally:
        probe.detach()
    assert widths == [8, 16, 16, 16, 16]  # narrow once, refused; padded from then on, in both forwards
    assert "SDPA refused the indicator channels alone" in caplog.text and "no valid execution plan" in caplog.text
    valid = batch["attention_mask"].bool()[:, -RESPONSE - 1:]
    for layer in (0, 3):
        got, want = cap.state.masses[layer].double(), ref[layer][:, -RESPONSE - 1:]
        assert (got - want)[valid].abs().max().item() <= 1e-5, layer


def test_narrow_values_only_where_sdpa_picks_the_same_kernel_for_them(monkeypatch):
    """The R indicator channels alone as values only where SDPA's pick for them is its pick for values of the
    head size: on this CPU its flash kernel takes only equal head sizes, so not here, with or without a mask."""
    from torch.nn.attention import SDPBackend

    from atrl.probe.attention import _narrow_keeps_kernel

    q, k, mask = torch.zeros(1, 4, 8, 32), torch.zeros(1, 2, 8, 32), torch.ones(1, 1, 8, 8, dtype=torch.bool)
    assert not _narrow_keeps_kernel(q, k, None, True, True, 16, 32, 0.2)
    assert not _narrow_keeps_kernel(q, torch.zeros(1, 4, 8, 32), mask, False, False, 16, 32, 0.2)
    picks = {}

    def pick(query, key, value, *args, **kwargs):
        picks[value.shape[-1]] = query.shape[-1], key.shape[-1]
        return SDPBackend.EFFICIENT_ATTENTION.value if value.shape[-1] == 16 else SDPBackend.CUDNN_ATTENTION.value

    monkeypatch.setattr(torch, "_fused_sdp_choice", pick)
    assert not _narrow_keeps_kernel(q, k, None, True, True, 16, 32, 0.2)
    assert picks == {16: (32, 32), 32: (32, 32)}  # Q and K keep their head size
    assert not _narrow_keeps_kernel(q, k, None, True, True, 16, 48, 0.2)
    assert picks[48] == (48, 48)  # more regions than head channels: the wide call pads Q and K
    monkeypatch.setattr(torch, "_fused_sdp_choice", lambda *a, **kw: SDPBackend.CUDNN_ATTENTION.value)
    assert _narrow_keeps_kernel(q, k, None, True, True, 16, 32, 0.2)


def test_kept_rows_only_where_the_bias_reaches_the_plain_calls_kernel(monkeypatch):
    """`causal_lower_right` dispatches to flash, or to memory-efficient attention without GQA; any other pick of
    SDPA's for the full call (cuDNN, math) keeps the second call on all rows."""
    from torch.nn.attention import SDPBackend

    from atrl.probe.attention import _bias_keeps_kernel

    q, k_gqa, k_mha = torch.zeros(1, 4, 8, 16), torch.zeros(1, 2, 8, 16), torch.zeros(1, 4, 8, 16)
    assert _bias_keeps_kernel(q, k_gqa, 16, 0.25)  # the real pick on this CPU: its flash kernel
    expected = {"FLASH_ATTENTION": (True, True), "EFFICIENT_ATTENTION": (False, True),
                "CUDNN_ATTENTION": (False, False), "MATH": (False, False)}
    for name, (with_gqa, without) in expected.items():
        monkeypatch.setattr(torch, "_fused_sdp_choice", lambda *a, b=SDPBackend.__members__[name], **kw: b.value)
        assert (_bias_keeps_kernel(q, k_gqa, 16, 0.25), _bias_keeps_kernel(q, k_mha, 16, 0.25)) == \
            (with_gqa, without), name


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("route", ["auto", "fused"])
def test_probe_changes_neither_logits_nor_gradients(family, route):
    model, processor = _fresh(family)
    model.train()
    batch = _batch(processor, (1, 1, 1), "left")
    ref_model, _ = _fresh(family)
    ref_model.train()

    def loss_and_grads(m, probe=None):
        m.zero_grad()
        if probe is None:
            logits = m(**batch, use_cache=False).logits
        else:
            with probe.capture(batch["input_ids"], batch.get("image_grid_thw"), response_len=RESPONSE,
                               image_sizes=batch.get("image_sizes")):
                logits = m(**batch, use_cache=False).logits
        logits.float().pow(2).mean().backward()
        return logits.detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}

    logits_off, grads_off = loss_and_grads(ref_model)
    probe = ConnectivityProbe(model, layers=_softmax_layers(model, [1, 3]), route=route, processor=processor)
    logits_on, grads_on = loss_and_grads(model, probe)
    assert grads_on.keys() == grads_off.keys()
    if route == "auto":  # with gradients on, the layer's output is the plain call's own: equal to the bit
        assert torch.equal(logits_on, logits_off)
        assert all(torch.equal(grads_on[name], grads_off[name]) for name in grads_off)
    assert (logits_on - logits_off).abs().max().item() <= 1e-6
    for name in grads_off:
        assert (grads_on[name] - grads_off[name]).abs().max().item() <= 1e-6, name


@pytest.mark.parametrize("reentrant", [True, False])
def test_probe_under_activation_checkpointing(reentrant):
    """Checkpointed layers re-run their forward inside the backward. The probes record on the first forward
    (without gradients when reentrant: the fused route; with them otherwise: the split route), the recompute is
    plain, and gradients and masses equal those of an unchecked model."""
    model, processor = _fresh("qwen2_5_vl")
    model.train()
    batch = _batch(processor, (1, 1, 1), "left")
    probe = ConnectivityProbe(model, layers=[1, 3])

    def run() -> tuple[dict, dict]:
        model.zero_grad()
        with probe.capture(batch["input_ids"], batch["image_grid_thw"], response_len=RESPONSE) as cap:
            logits = model(**batch, use_cache=False).logits
        logits.float().pow(2).mean().backward()
        return cap.state.masses, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    masses_ref, grads_ref = run()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    try:
        masses, grads = run()
    finally:
        model.gradient_checkpointing_disable()
    assert grads.keys() == grads_ref.keys() and len(grads) > 10
    for name in grads_ref:
        assert (grads[name] - grads_ref[name]).abs().max().item() <= 1e-6, name
    assert masses.keys() == masses_ref.keys() == {1, 3}
    for layer in masses_ref:
        assert (masses[layer] - masses_ref[layer]).abs().max().item() <= 1e-6


@pytest.mark.parametrize("grads", [False, True], ids=["fused-no-grad", "split-with-grads"])
def test_bf16_masses_close_to_fp32(grads):
    model, processor = build_tiny_vlm("qwen2_5_vl", seed=0)
    batch = _batch(processor, (1, 1), "left")
    probe = ConnectivityProbe(model.float(), layers=[3])
    with torch.no_grad(), probe.capture(batch["input_ids"], batch["image_grid_thw"], response_len=RESPONSE) as c32:
        model(**batch, use_cache=False)
    model.to(torch.bfloat16)
    b16 = {k: (v.to(torch.bfloat16) if v.is_floating_point() else v) for k, v in batch.items()}
    with torch.set_grad_enabled(grads), \
            probe.capture(batch["input_ids"], batch["image_grid_thw"], response_len=RESPONSE) as c16:
        assert model(**b16, use_cache=False).logits.requires_grad == grads
    m32, m16 = c32.masses(), c16.masses()
    assert m16.dtype == torch.float32 and m16.shape == m32.shape
    assert (m16 - m32).abs().max().item() <= 2e-2
    assert torch.isfinite(m16).all()


def test_capture_connectivity_shapes_and_response_rows():
    model, processor = _fresh("qwen2_5_vl")
    batch = _batch(processor, (1, 1, 1), "left")
    probe = ConnectivityProbe(model, layers=[2, 3])
    with torch.no_grad(), probe.capture(batch["input_ids"], batch["image_grid_thw"]) as full:
        model(**batch, use_cache=False)
    with torch.no_grad(), probe.capture(batch["input_ids"], batch["image_grid_thw"], response_len=RESPONSE) as cap:
        model(**batch, use_cache=False)
    mask = torch.ones(3, RESPONSE, dtype=torch.bool)
    mask[2, -3:] = False
    conn, prof = cap.connectivity(mask)
    assert conn.shape == (3, RESPONSE) and prof.shape == (3, RESPONSE, 16)
    assert (conn[~mask] == 0).all() and (prof[~mask] == 0).all()
    assert torch.allclose(prof[mask].sum(-1), torch.ones(int(mask.sum())))
    # shift=True reads the rows that predict each response token: positions S-T-1 .. S-2 of the full record
    S = batch["input_ids"].shape[1]
    assert torch.equal(cap.masses(shift=True), full.masses()[:, :, S - RESPONSE - 1:S - 1])
    assert torch.equal(cap.masses(shift=False), full.masses()[:, :, S - RESPONSE:])


def test_record_forwards_hands_each_call_on_right_after_its_last_probed_layer():
    model, processor = _fresh("qwen2_5_vl")
    batch = _batch(processor, (1, 1, 1), "left")
    probe = ConnectivityProbe(model, layers=[1])
    events, seen = [], []
    hooks = [layer.register_forward_pre_hook(lambda m, a, i=i: events.append(f"layer {i}"))
             for i, layer in enumerate(model.get_decoder().layers)]

    def on_record(capture):
        events.append("record")
        seen.append(capture.masses().clone())  # readable now, in the middle of the forward

    patches = torch.cat([torch.zeros(1, dtype=torch.long), batch["image_grid_thw"].prod(-1).cumsum(0)])
    with torch.no_grad(), probe.record_forwards(RESPONSE, on_record=on_record) as records:
        for a, b in ((0, 2), (2, 3)):  # two calls (one image per sample), as a trainer scoring in chunks makes
            model(input_ids=batch["input_ids"][a:b], attention_mask=batch["attention_mask"][a:b],
                  pixel_values=batch["pixel_values"][patches[a]:patches[b]],
                  image_grid_thw=batch["image_grid_thw"][a:b], use_cache=False)
    for h in hooks:
        h.remove()
    assert events == ["layer 0", "layer 1", "record", "layer 2", "layer 3"] * 2
    assert len(records) == 2 and [c.batch_size for c in records] == [2, 1]
    assert all(torch.equal(a, c.masses()) for a, c in zip(seen, records))


def _top_level_ops(fn) -> int:
    """aten ops called by `fn` that no other aten op called: on a GPU, each is a dispatch (most a kernel launch)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()

    def top(event) -> bool:
        parent = event.cpu_parent
        while parent is not None:
            if parent.name.startswith("aten::"):
                return False
            parent = parent.cpu_parent
        return True
    return sum(1 for e in prof.events() if e.name.startswith("aten::") and top(e))


def test_host_work_a_probed_training_forward_adds():
    """What the probes add to a forward with gradients, as the trainer makes it (capture + forward + the device
    half of the connectivity), in aten ops against the plain forward: per probed layer (the split route's second
    call, on the kept rows beside the padding mask) and per capture (indicator build, values, the 3-op reduction).
    A 3B step at batch 1 is close to host-bound, so these are its cost; the budget (6 per layer, 25 per capture,
    most of the latter host ops on small tensors) is raised only with a measurement that says why."""
    model, processor = _fresh("qwen2_5_vl")
    batch = _batch(processor, (1, 1, 1), "left")
    mask = batch["attention_mask"][:, -RESPONSE:].bool()

    def forward(layers):
        probe = ConnectivityProbe(model, layers=layers) if layers else None

        def run():
            if probe is None:
                return model(**batch, use_cache=False)
            with probe.capture(batch["input_ids"], batch["image_grid_thw"], response_len=RESPONSE) as cap:
                model(**batch, use_cache=False)
            cap.connectivity_parts(mask)
        run()  # warm: lazy imports and caches
        count = _top_level_ops(run)
        if probe is not None:
            probe.detach()
        return count

    plain, one, four = forward(None), forward([2]), forward([0, 1, 2, 3])
    per_layer = (four - one) / 3
    per_capture = one - plain - per_layer
    assert per_layer <= 6 and per_capture <= 25, (per_layer, per_capture)
    assert per_layer >= 2  # the count sees the second call: plain forwards are not all it measures


def test_connectivity_from_masses_by_hand():
    # L=1, B=1, T=4, H=2, R=2
    m = torch.tensor([[[[[0.1, 0.1], [0.5, 0.0]],
                        [[0.3, 0.1], [0.5, 0.0]],
                        [[0.0, 0.0], [0.5, 0.2]],
                        [[0.6, 0.2], [0.5, 0.0]]]]])
    mask = torch.ones(1, 4, dtype=torch.bool)
    conn, prof = connectivity_from_masses(m, mask, "none")
    assert torch.allclose(conn[0], torch.tensor([0.35, 0.45, 0.35, 0.65]))
    assert torch.allclose(prof[0, 0], torch.tensor([0.6, 0.1]) / 0.7)
    # head_baseline: head 0 visual masses [0.2, 0.4, 0.0, 0.8] median (lower) 0.2 -> [0, .2, 0, .6];
    # head 1 [0.5, 0.5, 0.7, 0.5] median 0.5 -> [0, 0, .2, 0]
    conn, _ = connectivity_from_masses(m, mask, "head_baseline")
    assert torch.allclose(conn[0], torch.tensor([0.0, 0.1, 0.1, 0.3]))
    # drop_sinks: per (head, region) minimum over tokens: head0 (0, 0), head1 (0.5, 0) -> head 1 keeps only 0.2
    conn, _ = connectivity_from_masses(m, mask, "drop_sinks")
    assert torch.allclose(conn[0], torch.tensor([0.1, 0.2, 0.1, 0.4]))


@pytest.mark.parametrize("fill", [9.0, float("nan")], ids=["large", "nan"])  # what padded rows may hold
@pytest.mark.parametrize("debias", ["none", "head_baseline", "drop_sinks"])
def test_connectivity_padding_invariance(debias, fill):
    torch.manual_seed(0)
    m = torch.rand(2, 1, 7, 3, 5)
    mask = torch.ones(1, 7, dtype=torch.bool)
    base, base_prof = connectivity_from_masses(m, mask, debias)
    padded = torch.cat([m, torch.full((2, 1, 4, 3, 5), fill)], dim=2)
    pmask = torch.cat([mask, torch.zeros(1, 4, dtype=torch.bool)], dim=1)
    conn, prof = connectivity_from_masses(padded, pmask, debias)
    assert torch.allclose(conn[:, :7], base) and (conn[:, 7:] == 0).all()
    assert torch.allclose(prof[:, :7], base_prof)


def test_batch_without_images_gives_documented_zero_connectivity():
    model, processor = _fresh("qwen2_5_vl")
    batch = _batch(processor, (0, 0), "left")
    probe = ConnectivityProbe(model, layers=[3])
    with torch.no_grad(), probe.capture(batch["input_ids"], None, response_len=RESPONSE) as cap:
        model(**batch, use_cache=False)
    conn, prof = cap.connectivity(torch.ones(2, RESPONSE, dtype=torch.bool))
    assert (conn == 0).all() and (prof == 0).all()


@pytest.mark.parametrize("region_grid", [(2, 3), (4, 4), (1, 1)])
def test_region_indicators_cut_each_image_grid_into_cells_in_raster_order(region_grid):
    """The indicators against a loop over tokens written out by hand: token (y, x) of a sample's i-th image
    (grid h x w, raster order) belongs to region i * rh * rw + (y * rh // h) * rw + x * rw // w. Qwen layout:
    several images in one sample, a sample with none, grids smaller than the region grid, text and padding
    between images; the generic layout: each run of image tokens is one image laid out as one row."""
    from atrl.probe import VisionLayout

    rh, rw = region_grid
    IMG = 7
    # per sample: the merged (h, w) grid of each image, in order; text tokens before, between and after
    samples = [[(2, 3), (5, 4)], [], [(1, 2)], [(6, 6)]]
    S = 2 + max(sum(h * w + 3 for h, w in imgs) for imgs in samples) + 2
    ids = torch.zeros(len(samples), S, dtype=torch.long)
    expected = torch.zeros(len(samples), S, rh * rw * 2)
    for b, imgs in enumerate(samples):
        pos = 2
        for i, (h, w) in enumerate(imgs):
            for y in range(h):
                for x in range(w):
                    ids[b, pos] = IMG
                    expected[b, pos, i * rh * rw + (y * rh // h) * rw + x * rw // w] = 1
                    pos += 1
            pos += 3  # text between the images
    thw = torch.tensor([[1, 2 * h, 2 * w] for imgs in samples for h, w in imgs])  # merge size 2
    qwen = VisionLayout("qwen2_5_vl", IMG, merge_size=2)
    assert torch.equal(qwen.region_indicators(ids, thw, region_grid), expected)
    generic = VisionLayout("other", IMG)  # no grids: each run of image tokens is one image of one row
    rows = torch.zeros_like(expected)
    for b, imgs in enumerate(samples):
        pos = 2
        for i, (h, w) in enumerate(imgs):
            for x in range(h * w):
                rows[b, pos + x, i * rh * rw + x * rw // (h * w)] = 1
            pos += h * w + 3
    assert torch.equal(generic.region_indicators(ids, None, region_grid), rows)


def _quilt(height: int, width: int, rh: int = 4, rw: int = 4):
    """An image of (rh x rw) rectangles, each its own colour, and those colours (region order)."""
    import numpy as np
    from PIL import Image

    colours = [(40 + 60 * (r // rw), 40 + 60 * (r % rw), 200 - 40 * ((r // rw + r % rw) % 2)) for r in range(rh * rw)]
    rows = np.minimum(np.arange(height) * rh // height, rh - 1)
    cols = np.minimum(np.arange(width) * rw // width, rw - 1)
    pixels = np.array(colours, dtype=np.uint8)[rows[:, None] * rw + cols[None, :]]
    return Image.fromarray(pixels), torch.tensor(colours, dtype=torch.float64)


def _rgb(view: torch.Tensor, image_processor) -> torch.Tensor:
    """A processed view (C, H, W) back in 0-255 RGB."""
    mean = torch.tensor(image_processor.image_mean, dtype=torch.float64)[:, None, None]
    std = torch.tensor(image_processor.image_std, dtype=torch.float64)[:, None, None]
    return (view.double() * std + mean) * 255


def _seen_regions(rgb: torch.Tensor, corners: list[tuple[int, int]], token_px: int, colours) -> list[int]:
    """For each token's top-left corner (pixels of `rgb`), the region whose colour the pixels just inside it show;
    a corner off the picture (padding) is moved onto the picture's nearest edge. The picture is where the pixels
    have a region's colour."""
    near = (rgb.permute(1, 2, 0)[:, :, None, :] - colours).norm(dim=-1).min(-1).values < 30
    ys, xs = near.any(1).nonzero().flatten(), near.any(0).nonzero().flatten()
    off = max(1, token_px // 5)
    seen = []
    for cy, cx in corners:
        y = min(max(cy, int(ys[0])), int(ys[-1]) - 2 * off)
        x = min(max(cx, int(xs[0])), int(xs[-1]) - 2 * off)
        patch = rgb[:, y + off: y + 2 * off, x + off: x + 2 * off].mean((1, 2))
        seen.append(int((colours - patch).norm(dim=1).argmin()))
    return seen


def _square(side: int, px: int) -> list[tuple[int, int]]:
    return [(y * px, x * px) for y in range(side) for x in range(side)]


@pytest.mark.parametrize("size", [(224, 224), (112, 336), (300, 100), (90, 250), (200, 130), (56, 56)])
def test_internvl_tiles_and_thumbnail_fall_in_the_regions_of_the_picture_they_show(size):
    """Independent of the layout's arithmetic: each image token's region is the colour its pixels show, read off
    the processor's own tiles (the canvas cut by the processor's rule, then the thumbnail) of an image whose
    4 x 4 regions each have a colour."""
    model, processor = _fresh("internvl")
    image, colours = _quilt(*size)
    prompt = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}]}],
                                           add_generation_prompt=True)
    batch = processor(text=[prompt], images=[[image]], return_tensors="pt")
    layout = ConnectivityProbe(model).layout
    ind = layout.region_indicators(batch["input_ids"], None, (4, 4), image_sizes=batch["image_sizes"])
    got = ind[0][batch["input_ids"][0] == layout.image_token_id].argmax(-1).tolist()
    side = math.isqrt(layout.tile_tokens)
    token_px = layout.tile_pixels // side
    tiles = batch["pixel_values"]
    assert len(got) == tiles.shape[0] * side * side  # a run of tokens per tile, tile after tile
    seen = [r for tile in tiles for r in _seen_regions(_rgb(tile, processor.image_processor), _square(side, token_px),
                                                       token_px, colours)]
    assert got == seen
    if tiles.shape[0] > 1:  # the canvas and the thumbnail: both kinds of token, each in its own region
        assert layout.image_layouts(batch["input_ids"], image_sizes=batch["image_sizes"])[0][0][0] == "tiles"
    with pytest.raises(ProbeError, match="given no image_sizes") if tiles.shape[0] > 1 else contextlib.nullcontext():
        layout.region_indicators(batch["input_ids"], None, (4, 4))


@pytest.mark.parametrize("size", [(224, 224), (112, 336), (300, 100), (90, 250), (200, 130), (40, 50)])
def test_idefics3_tiles_and_global_view_fall_in_the_regions_of_the_picture_they_show(size):
    """As for InternVL, read off the processor's own frames: the tiles it cut (the picture resized to whole
    tiles; an image smaller than that is scaled up), each tile's tokens after its <row_r_col_c>, then the global
    view; in a prompt with two images, each image's frames in turn; without splitting, the global view alone."""
    model, processor = _fresh("idefics3")
    image, colours = _quilt(*size)
    layout = ConnectivityProbe(model, processor=processor).layout
    side = math.isqrt(layout.tile_tokens)
    token_px = model.config.vision_config.image_size // side
    for n, split in ((1, True), (2, True), (1, False)):  # unsplit: the global view alone
        prompt = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}] * n}],
                                               add_generation_prompt=True)
        batch = processor(text=[prompt], images=[[image] * n], return_tensors="pt", do_image_splitting=split)
        ind = layout.region_indicators(batch["input_ids"], None, (4, 4))
        got = ind[0][batch["input_ids"][0] == layout.image_token_id].argmax(-1) % 16
        frames = batch["pixel_values"][0][batch["pixel_attention_mask"][0].flatten(1).any(1)]  # the real frames
        assert len(got) == frames.shape[0] * side * side  # a run of tokens per frame, frame after frame
        seen = [r for frame in frames for r in _seen_regions(_rgb(frame, processor.image_processor),
                                                             _square(side, token_px), token_px, colours)]
        assert got.tolist() == seen
        kinds = [image[0] for image in layout.image_layouts(batch["input_ids"])[0]]
        assert kinds == ["tiles" if split else "grid"] * n and (frames.shape[0] > n) == split


def test_idefics3_needs_its_processor_and_refuses_runs_it_cannot_place():
    model, processor = _fresh("idefics3")
    with pytest.raises(ProbeError, match="pass the model's processor"):
        ConnectivityProbe(model)
    layout = ConnectivityProbe(model, processor=processor).layout
    prompt = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}]}],
                                           add_generation_prompt=True)
    ids = processor(text=[prompt], images=[[_quilt(112, 112)[0]]], return_tensors="pt")["input_ids"]
    first = int((ids[0] == layout.image_token_id).nonzero()[0])
    moved = ids.clone()
    moved[0, first - 1] = processor.tokenizer.convert_tokens_to_ids("<row_2_col_2>")  # two tiles claim (2, 2)
    with pytest.raises(ProbeError, match="not a whole grid in raster order"):
        layout.image_layouts(moved)
    cut = torch.cat([ids[:, :first], ids[:, first + 1:]], dim=1)  # a tile one token short
    with pytest.raises(ProbeError, match="not one tile's"):
        layout.image_layouts(cut)


@pytest.mark.parametrize("size", [(224, 224), (112, 336), (300, 100), (90, 250), (200, 130)])
def test_llava_onevision_views_and_tiles_fall_in_the_regions_of_the_picture_they_show(size):
    """As for InternVL, read off the processor's own views: a lone image's base view, then its any-resolution
    tokens off the canvas of tiles (padded around the picture) at the places the model's own `unpad_image` keeps
    (an index grid unpadded the model's way), each row's newline in the region of its row's last token; in a
    prompt with two images, each image's base view of the picture padded to a square."""
    from transformers.models.llava_onevision.modeling_llava_onevision import get_anyres_image_grid_shape, unpad_image

    model, processor = _fresh("llava_onevision")
    ip = processor.image_processor
    image, colours = _quilt(*size)
    layout = ConnectivityProbe(model).layout
    geo = layout.anyres
    s, px = geo.side, geo.tile_pixels // geo.side
    for n in (1, 2):
        prompt = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}] * n}],
                                               add_generation_prompt=True)
        batch = processor(text=[prompt], images=[[image] * n], return_tensors="pt")
        ind = layout.region_indicators(batch["input_ids"], None, (4, 4), image_sizes=batch["image_sizes"])
        got = ind[0][batch["input_ids"][0] == layout.image_token_id].argmax(-1) % 16
        views = batch["pixel_values"]
        if n == 2:  # two base views (one view each), each with its newline
            seen = []
            for view in views[:, 0]:
                base = _seen_regions(_rgb(view, ip), _square(s, px), px, colours)
                seen += base + base[-1:]
            assert got.tolist() == seen
            continue
        seen = _seen_regions(_rgb(views[0, 0], ip), _square(s, px), px, colours)
        rows, cols = get_anyres_image_grid_shape(size, model.config.image_grid_pinpoints, geo.tile_pixels)
        canvas = torch.cat([torch.cat(list(views[0, 1 + r * cols: 1 + (r + 1) * cols]), dim=-1) for r in range(rows)],
                           dim=-2)
        kept = unpad_image(torch.arange(rows * s * cols * s).view(1, rows * s, cols * s), list(size))[0]
        for line in kept.tolist():
            places = [divmod(place, cols * s) for place in line]
            row = _seen_regions(_rgb(canvas, ip), [(fy * px, fx * px) for fy, fx in places], px, colours)
            seen += row + row[-1:]  # the newline
        assert got.tolist() == seen


def test_internvl_canvas_from_the_tile_count_is_the_processors_for_any_size():
    """The layout knows an image's tile count (from its tokens) and size; among the canvases of that many tiles
    it picks the one the processor picked among all canvases from 1 to max_patches tiles."""
    import random

    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import get_optimal_tiled_canvas

    model, processor = _fresh("internvl")
    layout = ConnectivityProbe(model).layout
    ip, side = processor.image_processor, math.isqrt(layout.tile_tokens)
    rng = random.Random(0)
    tiled = 0
    for _ in range(300):
        h, w = rng.randint(10, 900), rng.randint(10, 900)
        tiles = ip.get_number_of_image_patches(h, w, {})
        cols, rows = get_optimal_tiled_canvas((h, w), (layout.tile_pixels,) * 2, ip.min_patches, ip.max_patches)
        ids = torch.tensor([[0] + [layout.image_token_id] * tiles * layout.tile_tokens + [0]])
        (got,), = layout.image_layouts(ids, image_sizes=torch.tensor([[h, w]]))
        assert got == (("tiles", rows, cols, side) if tiles > 1 else ("grid", side, side)), (h, w)
        tiled += tiles > 1 and rows != cols
    assert tiled > 0


def test_llava_onevision_token_counts_agree_with_its_processor_for_any_size():
    """The layout's count of an image's tokens equals the processor's placeholder count, over image sizes from
    thin to wide and with a `vision_aspect_ratio` that makes the model scale the unpadded grid down."""
    import random
    from dataclasses import replace

    from atrl.probe.layout import _any_resolution_grid, _image_cells, _token_count

    model, processor = _fresh("llava_onevision")
    geo = ConnectivityProbe(model).layout.anyres
    rng = random.Random(0)
    sizes = [(rng.randint(10, 900), rng.randint(10, 900)) for _ in range(200)]
    scaled = 0
    for max_tiles in (4, 1):
        processor.vision_aspect_ratio = f"anyres_max_{max_tiles}"
        for h, w in sizes:
            want = processor._get_number_of_features(h, w, geo.tile_pixels, geo.tile_pixels)
            grid = _any_resolution_grid(replace(geo, max_tiles=max_tiles), (h, w))
            assert _token_count(grid) == want, (max_tiles, h, w)
            assert _image_cells(grid, 4, 4, 0).numel() == want
            scaled += max_tiles == 1 and grid[2] * grid[3] < 4 * geo.side ** 2
    assert scaled > 0  # the scaled-down branch ran


def test_layout_that_does_not_match_the_batch_fails_in_the_forward_with_the_reason():
    """The indicators are built at the first probed layer (no host sync when the capture starts), so a grid that
    does not describe the batch's image tokens raises there: a ProbeError that says which sample, not a crash
    in the attention code and not a silent zero."""
    model, processor = _fresh("qwen2_5_vl")
    batch = _batch(processor, (2, 1, 0), "left")
    probe = ConnectivityProbe(model, layers=[2])
    calls = []
    state = probe._new_state(batch["input_ids"], batch["image_grid_thw"], RESPONSE)
    assert not isinstance(state.indicators, torch.Tensor) and state.batch_shape == tuple(batch["input_ids"].shape)
    with pytest.raises(ProbeError, match="sample 1 has more image tokens than image_grid_thw describes"):
        with torch.no_grad(), probe.capture(batch["input_ids"], batch["image_grid_thw"][:2], RESPONSE):
            model.get_decoder().layers[0].register_forward_pre_hook(lambda *_: calls.append("layer 0"))
            model(**batch, use_cache=False)
    assert calls == ["layer 0"]  # the forward was under way: the error came from the probed layer


def test_bad_setups_give_clear_errors():
    model, processor = _fresh("qwen2_5_vl")
    with pytest.raises(ProbeError, match="out of range"):
        ConnectivityProbe(model, layers=[9])
    from transformers import LlamaConfig, LlamaForCausalLM

    text_only = LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64,
                                             num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1))
    with pytest.raises(ProbeError, match="'llama'.*names no image token"):
        ConnectivityProbe(text_only)
    text_only.config._name_or_path = "/models/my-llm"  # as from_pretrained records the folder
    with pytest.raises(ProbeError, match=r"model '/models/my-llm' \(type 'llama'\): its config names no image token"):
        ConnectivityProbe(text_only)
    model2, processor2 = _fresh("llava")
    model2.set_attn_implementation("eager")
    with pytest.raises(ProbeError, match="load it with attn_implementation='sdpa'"):
        ConnectivityProbe(model2)
    model2.set_attn_implementation("sdpa")
    probe = ConnectivityProbe(model2, layers=[3])
    batch = _batch(processor2, (1,), "left")
    with pytest.raises(ProbeError, match="response_len"):
        with probe.capture(batch["input_ids"], response_len=10_000):
            pass
    # cached generation is not what probes measure: a clear error, not a crash in the kernel
    with pytest.raises(RuntimeError, match="use_cache=False"):
        with torch.no_grad(), probe.capture(batch["input_ids"]):
            model2.generate(**batch, max_new_tokens=2)
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from atrl.probe.attention import probed_attention
    with pytest.raises(ValueError, match="rows='some': choose from 'all', 'kept', 'auto'"):
        probed_attention(sdpa_attention_forward, rows="some")
    with pytest.raises(ValueError, match="values='thin': choose from 'auto', 'narrow', 'wide'"):
        probed_attention(sdpa_attention_forward, values="thin")


def test_vision_tower_keeps_its_attention_and_default_layers():
    model, _ = _fresh("qwen2_5_vl")
    probe = ConnectivityProbe(model)
    assert probe.layers == [2]
    assert model.config.vision_config._attn_implementation == "sdpa"
    assert model.config.text_config._attn_implementation == "atrl_probe"
    probe.detach()
    assert model.config.text_config._attn_implementation == "sdpa"
    assert default_probe_layers(28) == [14, 17, 21, 24]
    assert default_probe_layers(36) == [18, 22, 27, 31]
    assert default_probe_layers(4) == [2] and default_probe_layers(3) == [1]  # never the last of 3 or more
    assert default_probe_layers(2) == [1] and default_probe_layers(1) == [0]


FLASH_STANDIN = "flash_standin_cpu"


def _flash_standin(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """A CPU stand-in with transformers' FlashAttention wrapper semantics: V is cut or padded to Q's head size
    (the kernel takes one size), the mask is the 2D padding mask or None, padded query rows come back zero."""
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))  # (B, S, H, D) as flash kernels take them
    D, D_v = q.shape[-1], v.shape[-1]
    v = torch.nn.functional.pad(v, (0, D - D_v))
    B, S_q, H, _ = q.shape
    k = k.repeat_interleave(H // k.shape[2], dim=2)
    v = v.repeat_interleave(H // v.shape[2], dim=2)
    keep = torch.ones(B, k.shape[1], dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    causal = torch.ones(S_q, k.shape[1], dtype=torch.bool).tril(k.shape[1] - S_q)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * scaling
    scores = scores.masked_fill(~(causal[None, None] & keep[:, None, None, :]), float("-inf"))
    out = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1).nan_to_num(), v)
    out = out * keep[:, -S_q:, None, None]
    return out[..., :D_v], None


def test_flash_route_wraps_the_kernel_and_matches_eager():
    """A FlashAttention-flavoured decoder keeps its implementation name (transformers' flash plumbing keys on
    it); the probe wraps that entry, pads Q/K to V's widened size, and the masses equal eager softmax."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    AttentionInterface.register(FLASH_STANDIN, _flash_standin)
    AttentionMaskInterface.register(FLASH_STANDIN, flash_attention_mask)
    model, processor = _fresh("qwen2_5_vl")
    batch = _batch(processor, (2, 1, 0), "left")
    with torch.no_grad():
        ref_logits = model(**batch, use_cache=False).logits
    model.config.text_config._attn_implementation = FLASH_STANDIN  # stands for "flash_attention_2"
    with torch.no_grad():
        plain_logits = model(**batch, use_cache=False).logits
    valid = batch["attention_mask"].bool()
    assert (plain_logits - ref_logits)[valid].abs().max() <= 1e-5  # the stand-in is a faithful kernel
    probe = ConnectivityProbe(model, layers=[1, 3], pad_qk=False)  # flash needs the padding: forced
    assert model.config.text_config._attn_implementation == FLASH_STANDIN
    assert ALL_ATTENTION_FUNCTIONS[FLASH_STANDIN].atrl_base is _flash_standin
    ConnectivityProbe(model, layers=[1])  # a second probe does not wrap the wrapper
    assert ALL_ATTENTION_FUNCTIONS[FLASH_STANDIN].atrl_base is _flash_standin
    with torch.no_grad(), probe.capture(batch["input_ids"], batch["image_grid_thw"]) as cap:
        logits = model(**batch, use_cache=False).logits
    assert (logits - plain_logits)[valid].abs().max() <= 1e-6  # the probe changes nothing else
    grads = []
    for capture in (False, True):  # parameter gradients through the wrapped kernel, probe off and on
        model.zero_grad()
        with probe.capture(batch["input_ids"], batch["image_grid_thw"]) if capture else contextlib.nullcontext():
            model(**batch, use_cache=False).logits[valid].float().pow(2).mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    for name in grads[0]:
        assert (grads[0][name] - grads[1][name]).abs().max().item() <= 1e-6, name
    indicators = probe.layout.region_indicators(batch["input_ids"], batch["image_grid_thw"], probe.region_grid,
                                                dtype=torch.float64)
    too_many = ConnectivityProbe(model, layers=[1], region_grid=(8, 16))  # 32-wide heads + 2 x 128 regions
    with pytest.raises(ProbeError, match="exceeds FlashAttention's 256; use a smaller anchor.region_grid"):
        with torch.no_grad(), too_many.capture(batch["input_ids"], batch["image_grid_thw"]):
            model(**batch, use_cache=False)
    model.config.text_config._attn_implementation = "sdpa"
    ref = _eager_masses(model, batch, indicators, [1, 3])
    for layer in (1, 3):
        err = (cap.state.masses[layer].double() - ref[layer])[valid].abs().max().item()
        assert err <= 1e-5, (layer, err)
        assert ref[layer][valid].sum() > 1.0
