"""The Qwen-VL vision towers' attention in a call per segment length and layer: the same outputs and gradients
as transformers' per-window loop, far fewer calls, none masked, and clear refusals."""

import copy

import pytest
import torch

from atrl.models.vision_attention import NAME, packed_sdpa_attention, use_packed_vision_attention
from atrl.models.zoo import TinySize, build_tiny_vlm

# an image whose sides are not whole windows (the tiny Qwen2.5-VL's windows are 4 x 4 patches): its border
# windows are shorter, so the packed call pads and masks them; a second image of another size
GRIDS = torch.tensor([[1, 12, 10], [1, 4, 8]])


def _sdpa_calls(monkeypatch) -> list[tuple]:
    """(query shape, whether a mask was passed) of every SDPA call from now on."""
    calls = []
    real = torch.nn.functional.scaled_dot_product_attention

    def counted(q, *args, **kwargs):
        calls.append((tuple(q.shape), kwargs.get("attn_mask") is not None or len(args) > 2))
        return real(q, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counted)
    return calls


def _tower_step(model, pixels):
    """The vision tower's merged output and the gradients of a loss on it (input and parameters)."""
    model.zero_grad(set_to_none=True)
    pixels = pixels.clone().requires_grad_()
    out = model.model.visual(pixels, grid_thw=GRIDS).pooler_output
    out.square().sum().backward()
    grads = {k: p.grad.clone() for k, p in model.model.visual.named_parameters() if p.grad is not None}
    return out.detach(), pixels.grad, grads


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen2_vl"])
def test_packed_vision_attention_equals_the_per_window_loop(family, monkeypatch):
    model, _ = build_tiny_vlm(family, size=TinySize(vision_layers=4), seed=0)
    packed = copy.deepcopy(model)
    assert use_packed_vision_attention(packed)
    assert packed.config.vision_config._attn_implementation == NAME
    assert packed.config.get_text_config()._attn_implementation == "sdpa"  # the decoder is not touched
    pixels = torch.randn(int(GRIDS.prod(-1).sum()), model.model.visual.patch_embed.proj.weight[0].numel(),
                         generator=torch.Generator().manual_seed(0))
    calls = _sdpa_calls(monkeypatch)
    out_loop, grad_loop, params_loop = _tower_step(model, pixels)
    loop_calls, calls[:] = len(calls), []
    out, grad, params = _tower_step(packed, pixels)
    torch.testing.assert_close(out, out_loop, rtol=0, atol=1e-6)
    torch.testing.assert_close(grad, grad_loop, rtol=0, atol=1e-6)
    assert params.keys() == params_loop.keys()
    for name in params:
        torch.testing.assert_close(params[name], params_loop[name], rtol=0, atol=1e-6)
    layers = len(model.model.visual.blocks)
    # a call per distinct segment length and layer, never masked. Whole images: 12 x 10 = 120 and 4 x 8 = 32
    # patches. Qwen2.5-VL's windows (2 x 2 merged tokens, 16 patches): the first image's 6 x 5 merged grid ends in
    # a column of half windows (8 patches), the second's 2 x 4 has none
    assert not any(masked for _, masked in calls)
    assert len(calls) == 2 * layers
    if family == "qwen2_vl":  # the loop: a call per image and layer
        assert loop_calls == len(GRIDS) * layers and {shape[2] for shape, _ in calls} == {32, 120}
    else:  # the loop: a call per image in the full-attention layer, per window in the others
        assert loop_calls > 3 * len(calls) and {shape[2] for shape, _ in calls} == {8, 16, 32, 120}
        assert max(shape[0] for shape, _ in calls) > len(GRIDS)  # windows batched


def test_a_whole_model_forward_is_unchanged(monkeypatch):
    model, processor = build_tiny_vlm("qwen2_5_vl", seed=0)
    packed = copy.deepcopy(model)
    use_packed_vision_attention(packed)
    from PIL import Image

    images = [Image.new("RGB", (84, 56), (200, 30, 30)), Image.new("RGB", (56, 112), (30, 30, 200))]
    texts = [processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text",
                                                                                             "text": "what?"}]}],
                                           add_generation_prompt=True) for _ in images]
    batch = processor(text=texts, images=[[im] for im in images], return_tensors="pt", padding=True)
    with torch.no_grad():
        torch.testing.assert_close(packed(**batch).logits, model(**batch).logits, rtol=0, atol=1e-5)


def test_other_models_and_implementations_are_left_alone():
    llava, _ = build_tiny_vlm("llava", seed=0)
    assert not use_packed_vision_attention(llava)
    eager, _ = build_tiny_vlm("qwen2_5_vl", seed=0)
    eager.set_attn_implementation({"vision_config": "eager"})
    assert not use_packed_vision_attention(eager)
    assert eager.config.vision_config._attn_implementation == "eager"


def test_packed_attention_refuses_what_it_is_not_for():
    module = torch.nn.Module()
    q = torch.randn(1, 2, 10, 8)
    cu = torch.tensor([0, 4, 10], dtype=torch.int32)
    with pytest.raises(ValueError, match="segment boundaries"):
        packed_sdpa_attention(module, q, q, q, None)
    with pytest.raises(ValueError, match="batch 1"):
        packed_sdpa_attention(module, q.expand(2, -1, -1, -1), q, q, None, cu_seq_lens_q=cu)
    with pytest.raises(ValueError, match="only mask"):
        packed_sdpa_attention(module, q, q, q, torch.ones(1, 1, 10, 10, dtype=torch.bool), cu_seq_lens_q=cu)
    with pytest.raises(ValueError, match="cover 12 positions, the sequence has 10"):
        packed_sdpa_attention(module, q, q, q, None, cu_seq_lens_q=torch.tensor([0, 4, 12], dtype=torch.int32))
    with pytest.raises(ValueError, match="must rise strictly"):
        packed_sdpa_attention(module, q, q, q, None, cu_seq_lens_q=torch.tensor([0, 4, 4, 10], dtype=torch.int32))
    with pytest.raises(ValueError, match="share their segments"):
        packed_sdpa_attention(module, q, q, q, None, cu_seq_lens_q=cu,
                              cu_seq_lens_k=torch.tensor([0, 5, 10], dtype=torch.int32))
    # against an explicit block-diagonal softmax: segments [0, 4) and [4, 10) attend only within themselves (two
    # lengths: two calls, joined back in sequence order)
    module.training = False
    out, _ = packed_sdpa_attention(module, q, q, q, None, scaling=0.5, cu_seq_lens_q=cu)
    expected = torch.cat([torch.softmax(q[0, :, a:b] @ q[0, :, a:b].transpose(-1, -2) * 0.5, -1) @ q[0, :, a:b]
                          for a, b in ((0, 4), (4, 10))], dim=1)  # (H, S, D)
    torch.testing.assert_close(out[0].transpose(0, 1), expected, rtol=0, atol=1e-6)


def test_the_probe_rides_along_and_measures_the_same_connectivity():
    """A probe attached to a model with the packed vision tower leaves the tower packed (and its detach too), and
    the connectivity it records equals the per-window tower's: the decoder sees the same image features."""
    from atrl.data.synthetic import build_prompt, generate
    from atrl.probe import ConnectivityProbe

    model, processor = build_tiny_vlm("qwen2_5_vl", seed=0)
    packed = copy.deepcopy(model)
    use_packed_vision_attention(packed)
    tasks = generate(2, seed=4)
    texts = [processor.apply_chat_template(build_prompt(t.question), add_generation_prompt=True) for t in tasks]
    batch = processor(text=texts, images=[[t.image] for t in tasks], return_tensors="pt", padding=True)
    mask = torch.ones(2, 6, dtype=torch.bool)
    found = []
    for m in (model, packed):
        probe = ConnectivityProbe(m)
        with torch.no_grad(), probe.capture(batch["input_ids"], batch["image_grid_thw"], response_len=6) as cap:
            m(**batch)
        found.append(cap.connectivity(mask))
        probe.detach()
    assert packed.config.vision_config._attn_implementation == NAME
    (conn, profile), (conn_packed, profile_packed) = found
    assert conn.max() > 0  # the last 6 positions (text after the image) read it (debiased: some to 0)
    torch.testing.assert_close(conn_packed, conn, rtol=0, atol=1e-6)
    torch.testing.assert_close(profile_packed, profile, rtol=0, atol=1e-6)
