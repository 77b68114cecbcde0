import json
import random
import re

import pytest
import torch
from PIL import Image

from atrl.data.synthetic import (IMAGE_FAMILIES, RESPONSE_INSTRUCTION, VIDEO_FAMILIES, build_prompt,
                                 generate, task_words)
from atrl.models.tokenizer import build_tokenizer
from atrl.models.zoo import FAMILIES, TinySize, build_tiny_vlm, load_model, save_model


def _random_text(rng: random.Random, n: int) -> str:
    """Arbitrary Unicode: ASCII, Latin, CJK, emoji, combining marks, controls (no lone surrogates)."""
    ranges = [(0, 0x7F), (0x80, 0x7FF), (0x4E00, 0x9FFF), (0x1F300, 0x1FAFF), (0x0300, 0x036F), (0xE000, 0xF8FF)]
    out = []
    for _ in range(n):
        lo, hi = rng.choice(ranges)
        out.append(chr(rng.randint(lo, hi)))
    return "".join(out)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_tokenizer_round_trips_arbitrary_utf8(tiny_models, family):
    tok = tiny_models[family][1].tokenizer
    rng = random.Random(0)
    for _ in range(200):
        text = _random_text(rng, rng.randint(0, 40))
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert len(ids) <= len(text.encode("utf-8"))  # words are one token, the rest one token per byte
        assert tok.decode(ids) == text


def test_tokenizer_keeps_special_tokens_whole():
    tok = build_tokenizer(["<pad>", "<x>"], pad_token="<pad>", eos_token="<x>")
    ids = tok("a<x>b", add_special_tokens=False)["input_ids"]
    assert ids == [ord("a"), 257, ord("b")]
    with pytest.raises(ValueError, match="eos_token"):
        build_tokenizer(["<pad>"], pad_token="<pad>", eos_token="<missing>")
    with pytest.raises(ValueError, match="runs of ASCII letters"):
        build_tokenizer(["<pad>"], pad_token="<pad>", eos_token="<pad>", words=["two words"])


def test_tokenizer_makes_its_words_one_token_and_keeps_markup_whole():
    tok = build_tokenizer(["<pad>"], pad_token="<pad>", eos_token="<pad>", words=["red", "green"], markup=["<think>"])
    pieces = tok.convert_ids_to_tokens(tok("<think>red reddish green.", add_special_tokens=False)["input_ids"])
    # "reddish" is not a word of the vocabulary: "red" and then bytes ("Ġ" is GPT-2's stand-in for a space)
    assert pieces == ["<think>", "red", "Ġred", "d", "i", "s", "h", "Ġgreen", "."]
    ids = tok("<think>red", add_special_tokens=False)["input_ids"]
    assert tok.decode(ids, skip_special_tokens=True) == "<think>red"  # markup is text, not a special token


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_word_of_the_synthetic_tasks_is_one_token(tiny_models, family):
    tok = tiny_models[family][1].tokenizer
    words = set(task_words())
    assert {"orange", "triangle", "quadrant", "colour"} <= words
    for name in IMAGE_FAMILIES:
        for ex in generate(10, seed=3, families=[name]):
            for text in (ex.question, RESPONSE_INSTRUCTION, ex.reasoning):
                enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
                pieces = [text[a:b] for a, b in enc["offset_mapping"]]
                for word in re.findall(r"[A-Za-z]+", re.sub(r"</?(think|answer)>", " ", text)):
                    assert word in words, (name, word)
                    assert word in pieces or " " + word in pieces, (name, text, word, pieces)
                for markup in ("<think>", "</think>", "<answer>", "</answer>"):
                    assert pieces.count(markup) == text.count(markup)
    # the video family's template words are left out of the vocabulary (task_words); what is read from the
    # video, each colour, is one token all the same
    for ex in generate(10, seed=3, families=list(VIDEO_FAMILIES)):
        enc = tok(ex.reasoning, add_special_tokens=False, return_offsets_mapping=True)
        pieces = [ex.reasoning[a:b] for a, b in enc["offset_mapping"]]
        for colour in ex.perception_texts():
            assert colour in pieces or " " + colour in pieces, (ex.reasoning, colour, pieces)


def _batch(processor, examples, padding_side="left"):
    processor.tokenizer.padding_side = padding_side
    texts = [processor.apply_chat_template(build_prompt(ex.question), add_generation_prompt=True) for ex in examples]
    return processor(text=texts, images=[[ex.image] for ex in examples], return_tensors="pt", padding=True)


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_processor_output_drives_forward_and_generation(tiny_models, family, padding_side):
    model, processor = tiny_models[family]
    examples = generate(3, seed=1)  # different questions -> different lengths -> real padding
    batch = _batch(processor, examples, padding_side)
    assert (batch["attention_mask"] == 0).any(), "the batch should contain padding"
    image_id = model.config.image_token_id if hasattr(model.config, "image_token_id") else \
        model.config.image_token_index
    n_image_tokens = (batch["input_ids"] == image_id).sum(dim=1)
    assert (n_image_tokens > 0).all()
    with torch.no_grad():
        out = model(**batch)
    assert out.logits.shape[:2] == batch["input_ids"].shape
    assert torch.isfinite(out.logits).all()
    if padding_side == "left":
        gen = model.generate(**batch, max_new_tokens=4, do_sample=False)
        assert gen.shape == (3, batch["input_ids"].shape[1] + 4)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_save_and_reload_gives_same_outputs(tiny_models, family, tmp_path):
    model, processor = tiny_models[family]
    save_model(model, processor, tmp_path / "ckpt")
    model2, processor2 = load_model(tmp_path / "ckpt")
    ex = generate(1, seed=2)
    b1, b2 = _batch(processor, ex), _batch(processor2, ex)
    assert all(torch.equal(b1[k], b2[k]) for k in b1)
    with torch.no_grad():
        assert torch.equal(model(**b1).logits, model2(**b2).logits)
    assert type(processor2) is type(processor)
    assert json.loads((tmp_path / "ckpt" / "config.json").read_text())["architectures"]


def test_same_seed_same_weights_different_seed_different():
    a, _ = build_tiny_vlm("qwen2_5_vl", seed=3)
    b, _ = build_tiny_vlm("qwen2_5_vl", seed=3)
    c, _ = build_tiny_vlm("qwen2_5_vl", seed=4)
    pa, pb, pc = (dict(m.named_parameters()) for m in (a, b, c))
    assert all(torch.equal(pa[k], pb[k]) for k in pa)
    assert any(not torch.equal(pa[k], pc[k]) for k in pa)


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen2_vl"])
def test_qwen_forward_really_uses_3d_mrope(tiny_models, family):
    """The decoder's rotary embedding receives 3D (t, h, w) positions that differ from the 1D fallback."""
    model, processor = tiny_models[family]
    batch = _batch(processor, generate(2, seed=5))
    seen = []
    rotary = model.model.language_model.rotary_emb
    handle = rotary.register_forward_hook(lambda mod, args, out: seen.append(args[1].clone()))
    try:
        with torch.no_grad():
            logits_3d = model(**batch).logits
            model.model.rope_deltas = None
            fallback = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
            logits_1d = model(**batch, position_ids=fallback[None].expand(3, -1, -1)).logits
    finally:
        handle.remove()
        model.model.rope_deltas = None
    pos3d = seen[0]
    assert pos3d.shape[0] == 3 and pos3d.shape[-1] == batch["input_ids"].shape[1]
    image = batch["input_ids"] == model.config.image_token_id
    # On image tokens the height and width rows follow the merged patch grid, so they differ from each other
    # and from the temporal row; a 1D position would be the same in all three rows.
    h, w = pos3d[1][image], pos3d[2][image]
    assert not torch.equal(h, w)
    assert not torch.equal(pos3d[0], fallback)
    # Independent check: the model's own rope index agrees with what the decoder saw.
    expected, _ = model.model.get_rope_index(batch["input_ids"], mm_token_type_ids=batch["mm_token_type_ids"],
                                             image_grid_thw=batch["image_grid_thw"],
                                             attention_mask=batch["attention_mask"])
    mask = batch["attention_mask"].bool()
    assert torch.equal(pos3d[:, mask], expected[:, mask])
    # And 1D positions (what Qwen2.5-VL silently falls back to without mm_token_type_ids) change the logits.
    assert not torch.allclose(logits_3d, logits_1d)


def _width_phase_gap(model, processor) -> float:
    """Largest change of the rotary cos between two image tokens of one row, half the image width apart."""
    batch = _batch(processor, generate(1, seed=6))
    pos, _ = model.model.get_rope_index(batch["input_ids"], mm_token_type_ids=batch["mm_token_type_ids"],
                                        image_grid_thw=batch["image_grid_thw"],
                                        attention_mask=batch["attention_mask"])
    image = (batch["input_ids"][0] == model.config.image_token_id).nonzero().flatten()
    h, w = pos[1, 0, image], pos[2, 0, image]
    cols = int(batch["image_grid_thw"][0, 2]) // 2  # merged tokens per row
    left = image[(h == h[0]) & (w == w.min())][0]
    right = image[(h == h[0]) & (w == w.min() + cols // 2)][0]
    two = pos[:, :, torch.stack([left, right])]
    cos, _ = model.model.language_model.rotary_emb(torch.zeros(1, dtype=torch.float32), two)
    return (cos[0, 0] - cos[0, 1]).abs().max().item()


def test_decoder_rotary_phases_tell_image_columns_apart():
    """Tokens a half-image apart along the width must differ in rotary phase, or left and right look alike.

    Qwen's M-RoPE gives the width axis the lowest frequencies of the head; the tiny models use a small
    rotary base so that those frequencies still turn by a visible angle across a 4-token-wide image.
    """
    model, processor = build_tiny_vlm("qwen2_5_vl", seed=0)
    assert _width_phase_gap(model, processor) > 0.05
    model, processor = build_tiny_vlm("qwen2_5_vl", size=TinySize(rope_theta=10_000.0), seed=0)
    assert _width_phase_gap(model, processor) < 1e-3


def test_unknown_family_names_the_family():
    with pytest.raises(ValueError, match="unknown model family 'gpt5'"):
        build_tiny_vlm("gpt5")


def test_bad_size_names_the_field():
    with pytest.raises(ValueError, match="image_size"):
        TinySize(image_size=100)
    with pytest.raises(ValueError, match="num_layers"):
        TinySize(num_layers=-1)


def test_unwritable_output_folder_is_named(tiny_models, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    model, processor = tiny_models["qwen2_5_vl"]
    with pytest.raises(ValueError, match="output folder.*a-file"):
        save_model(model, processor, blocker / "ckpt")


def test_missing_model_path_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="does-not-exist"):
        load_model(tmp_path / "does-not-exist")
    for local in ("runs/demo/final", "./final"):  # cannot be hub ids: named as missing folders
        with pytest.raises(FileNotFoundError, match="model path .* does not exist"):
            load_model(local)


def test_hub_ids_reach_transformers(capsys):
    """"Qwen/Qwen2.5-VL-3B-Instruct" (the shipped recipes' model) is a hub id, not a missing folder: it goes to
    transformers, which loads it from the hub or its cache. Offline and uncached (as in tests), transformers'
    own error is what the CLI prints."""
    from atrl.cli import main
    from atrl.models.zoo import load_processor

    with pytest.raises(OSError) as err:
        load_processor("Qwen/Qwen2.5-VL-3B-Instruct")
    assert "model path" not in str(err.value)
    assert main(["eval", "--model", "Qwen/Qwen2.5-VL-3B-Instruct", "--n", "1"]) == 2
    printed = capsys.readouterr().err
    assert printed.startswith("atrl eval: error:") and "model path" not in printed


def test_image_processor_is_pil_backed(tiny_models):
    for family, (_, processor) in tiny_models.items():
        assert "Pil" in type(processor.image_processor).__name__, family
        out = processor.image_processor(images=[Image.new("RGB", (90, 60), "blue")], return_tensors="pt")
        assert out["pixel_values"].dtype == torch.float32


def test_a_stock_internvl_processor_loads_as_the_one_that_gives_image_sizes(tmp_path):
    """A checkpoint saved with transformers' InternVLProcessor loads as InternVLImageSizesProcessor: the same
    tokens and tiles, and each image's size, which the probes need to arrange its tiles."""
    from atrl.models.processors import InternVLImageSizesProcessor
    from atrl.models.zoo import load_processor

    model, processor = build_tiny_vlm("internvl")
    save_model(model, processor, tmp_path / "ckpt")
    config = tmp_path / "ckpt" / "processor_config.json"
    saved = json.loads(config.read_text())
    assert saved["processor_class"] == "InternVLImageSizesProcessor" and saved["image_seq_length"] == 4
    config.write_text(json.dumps({**saved, "processor_class": "InternVLProcessor"}))
    loaded = load_processor(tmp_path / "ckpt")
    assert type(loaded) is InternVLImageSizesProcessor
    ex = generate(2, seed=4)
    wide = ex[1].image.resize((300, 100))
    b1 = processor(text=["<IMG_CONTEXT>", "<IMG_CONTEXT>"], images=[[ex[0].image], [wide]], return_tensors="pt",
                   padding=True)
    b2 = loaded(text=["<IMG_CONTEXT>", "<IMG_CONTEXT>"], images=[[ex[0].image], [wide]], return_tensors="pt",
                padding=True)
    assert b1.keys() == b2.keys() and all(torch.equal(b1[k], b2[k]) for k in b1)
    assert b2["image_sizes"].tolist() == [[224, 224], [100, 300]]
