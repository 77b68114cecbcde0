"""`atrl sft`: the supervised warm start of the default base."""

import json

import torch

from atrl.cli import main
from atrl.data.synthetic import generate, to_hf_dataset
from atrl.models.zoo import build_tiny_vlm, load_model
from atrl.rl.sft import SFTCollator, run_sft


def test_collator_labels_exactly_the_response_and_end_of_turn():
    _, processor = build_tiny_vlm("qwen2_5_vl", seed=0)
    rows = [dict(r) for r in to_hf_dataset(generate(3, seed=4))]
    batch = SFTCollator(processor)(rows)
    tok = processor.tokenizer
    for i, row in enumerate(rows):
        labelled = batch["labels"][i][batch["labels"][i] != -100]
        assert tok.decode(labelled) == row["reasoning"] + tok.eos_token
        # The labelled ids are the last real tokens of the row (right padding): prompt and padding are masked.
        real = batch["input_ids"][i][batch["attention_mask"][i].bool()]
        assert torch.equal(real[-len(labelled):], labelled)


def test_run_sft_trains_and_saves_a_left_padding_checkpoint(tmp_path):
    model, processor = build_tiny_vlm("qwen2_5_vl", seed=0)
    before = {k: v.clone() for k, v in model.named_parameters()}
    rows = to_hf_dataset(generate(8, seed=1, families=["quadrant"]))
    out = run_sft(model, processor, rows, tmp_path / "sft", epochs=1, batch_size=4, progress=False)
    assert processor.tokenizer.padding_side == "left"  # the collator's right padding does not leak out
    reloaded, reprocessor = load_model(out)
    assert reprocessor.tokenizer.padding_side == "left"
    changed = [k for k, v in reloaded.named_parameters() if not torch.equal(v, before[k])]
    assert any("visual" in k for k in changed) and any("language_model" in k for k in changed)


def test_cli_sft_takes_families_and_knobs(tmp_path, capsys):
    out = tmp_path / "base"
    assert main(["sft", "--out", str(out), "--n", "4", "--epochs", "1", "--batch-size", "4",
                 "--families", "quadrant", "--knob", "quadrant.jitter=0.1"]) == 0
    assert "supervised on 4 synthetic traces" in capsys.readouterr().out
    assert json.loads((out / "config.json").read_text())["model_type"] == "qwen2_5_vl"
    assert main(["sft", "--out", str(tmp_path / "x"), "--knob", "quadrant.jitter=0.4"]) == 2
    assert "--knob.quadrant: QuadrantKnobs.jitter=0.4" in capsys.readouterr().err


def test_vision_only_supervision_leaves_the_language_model_as_it_was(tmp_path):
    from atrl.rl.sft import select_trainable

    model, processor = build_tiny_vlm("idefics3", seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _, n = select_trainable(model, "vision")
    assert n == sum(p.numel() for name, p in model.named_parameters() if "text_model" not in name
                    and "lm_head" not in name)
    rows = to_hf_dataset(generate(8, seed=1, families=["quadrant"]))
    out = run_sft(model, processor, rows, tmp_path / "sft", epochs=1, batch_size=4, progress=False, train="vision")
    after, _ = load_model(out)
    changed = {k for k, v in after.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all("vision_model" in k or "connector" in k for k in changed)
    assert any("connector" in k for k in changed)


def test_lora_adapters_are_merged_into_a_plain_checkpoint(tmp_path):
    model, processor = build_tiny_vlm("idefics3", seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rows = to_hf_dataset(generate(8, seed=1, families=["quadrant"]))
    out = run_sft(model, processor, rows, tmp_path / "sft", epochs=1, batch_size=4, progress=False, train="vision",
                  lora_r=4, learning_rate=1e-2)
    after, _ = load_model(out)
    assert set(after.state_dict()) == set(before)  # no adapter weights left: the merged model's own names
    changed = {k for k, v in after.state_dict().items() if not torch.equal(v, before[k])}
    assert any("text_model.layers.0.self_attn.q_proj" in k for k in changed)  # the merged adapter
    assert not any("text_model" in k and ("embed_tokens" in k or "norm" in k) for k in changed)  # frozen


def test_sft_refuses_an_unknown_choice_of_weights():
    import pytest

    from atrl.rl.sft import select_trainable

    model, _ = build_tiny_vlm("idefics3", seed=0)
    with pytest.raises(ValueError, match=r"train='text': choose one of \('all', 'vision'\)"):
        select_trainable(model, "text")
    with pytest.raises(ValueError, match=r"lora_r=-1: must be 0"):
        select_trainable(model, "vision", -1)


def test_the_vision_side_takes_its_own_learning_rate(tmp_path):
    model, processor = build_tiny_vlm("idefics3", seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rows = to_hf_dataset(generate(8, seed=1, families=["quadrant"]))
    out = run_sft(model, processor, rows, tmp_path / "sft", epochs=1, batch_size=4, progress=False,
                  learning_rate=0.0, vision_learning_rate=1e-2)  # the decoder's rate 0: only the vision side moves
    after, _ = load_model(out)
    changed = {k for k, v in after.state_dict().items() if not torch.equal(v, before[k])}
    assert any("connector" in k for k in changed) and any("vision_model" in k for k in changed)
    assert not any("text_model" in k or "lm_head" in k for k in changed)
