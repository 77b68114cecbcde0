"""Each model family end to end on the CPU: built offline, trained two steps with AT-RL credit and with an
ablation, evaluated and analysed from its checkpoint folder."""

import json
import math
from pathlib import Path

import pytest

from atrl.cli import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen3_vl", "qwen3_vl_moe", "gemma3", "qwen3_5", "glm4v",
                                    "internvl", "llava_onevision", "llava", "idefics3"])
def test_a_family_trains_evaluates_and_analyses_from_its_checkpoint(tmp_path, capsys, family):
    base = tmp_path / "base"
    assert main(["model", "build", "--family", family, "--out", str(base)]) == 0
    config = json.loads((base / "config.json").read_text())
    assert config["model_type"] == family
    small = ["--trl.max_steps", "2", "--data.n", "8", "--trl.per_device_train_batch_size", "4",
             "--trl.num_generations", "4", "--trl.max_completion_length", "8", "--trl.report_to", "[]",
             "--trl.disable_tqdm", "true", "--trl.save_strategy", "no", "--anchor.report_steps", "0"]
    for mode in ("atrl", "low_only"):
        out = tmp_path / mode
        assert main(["train", "--model.path", str(base), "--anchor.mode", mode, "--trl.output_dir", str(out),
                     *small]) == 0
        state = json.loads((out / "trainer_state.json").read_text())
        logs = [h for h in state["log_history"] if "loss" in h]
        assert len(logs) == 2 and all(math.isfinite(h["loss"]) for h in logs)
        assert all(h["atrl/mean_conn"] > 0 for h in logs)  # the probes measured the image's share of attention
    final = tmp_path / "atrl" / "final"
    capsys.readouterr()
    assert main(["eval", "--model", str(final), "--n", "4", "--max-new-tokens", "6",
                 "--out", str(tmp_path / "ev")]) == 0
    assert json.loads((tmp_path / "ev" / "eval.json").read_text())["n"] == 4
    assert main(["analyze", "--model", str(final), "--n", "3", "--out", str(tmp_path / "an")]) == 0
    summary = json.loads((tmp_path / "an" / "analysis.json").read_text())
    assert summary["tokens"] > 0 and 0 < summary["anchor_fraction"] < 1


@pytest.mark.parametrize("recipe, family, model_class", [
    ("qwen3-vl-8b.yaml", "qwen3_vl", "Qwen3VLForConditionalGeneration"),
    ("qwen3.5-9b.yaml", "qwen3_5", "Qwen3_5ForConditionalGeneration")])
def test_the_recipes_of_a_family_pass_the_dry_run_on_its_tiny_build(tmp_path, capsys, recipe, family, model_class):
    from PIL import Image

    base = tmp_path / "base"
    assert main(["model", "build", "--family", family, "--out", str(base)]) == 0
    Image.new("RGB", (64, 64), "white").save(tmp_path / "a.png")
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps({"problem": "What is 2 + 3?", "answer": "5", "images": ["a.png"]}) + "\n")
    capsys.readouterr()
    assert main(["train", "--config", str(ROOT / "configs" / recipe), "--model.path", str(base),
                 "--data.train", str(data), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert model_class in out and "recipe checked: nothing trained" in out


@pytest.mark.parametrize("family", ["qwen3_vl", "internvl", "llava_onevision"])
def test_a_run_resumes_from_its_checkpoint(tmp_path, caplog, family):
    """The checkpoint's weights load back through from_pretrained (ATRLTrainer._load_from_checkpoint refuses a
    checkpoint whose keys do not match the model, which is how transformers' raw-state-dict path fails)."""
    base = tmp_path / "base"
    assert main(["model", "build", "--family", family, "--out", str(base)]) == 0
    out = tmp_path / "run"
    common = ["train", "--model.path", str(base), "--trl.output_dir", str(out), "--data.n", "8",
              "--trl.per_device_train_batch_size", "4", "--trl.num_generations", "4", "--trl.max_completion_length",
              "8", "--trl.report_to", "[]", "--trl.disable_tqdm", "true", "--trl.save_steps", "1",
              "--anchor.report_steps", "0"]
    assert main([*common, "--trl.max_steps", "1"]) == 0
    with caplog.at_level("WARNING", logger="atrl"):
        assert main([*common, "--trl.max_steps", "2"]) == 0
    assert f"resuming from {out / 'checkpoint-1'}" in caplog.text
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 2


def test_probe_layers_default_to_full_attention_layers_where_some_slide():
    """Gemma 3 alternates sliding-window and full-attention layers: a response token further than the window from
    the image gives it no mass on a sliding layer, so the default probe layers are among the full ones."""
    from atrl.models.zoo import build_tiny_vlm
    from atrl.probe import ConnectivityProbe, full_attention_layers, probe_layers_for

    model, _ = build_tiny_vlm("gemma3")
    text = model.config.get_text_config()
    assert full_attention_layers(text) == [1, 2] and text.layer_types[0] == "sliding_attention"
    probe = ConnectivityProbe(model)
    assert probe.layers == [2]  # default_probe_layers over the two full layers: the second, not the last layer
    probe.detach()
    assert probe_layers_for(28, None, list(range(5, 28, 6))) == [17]  # full layers 5, 11, 17, 23: as 4 -> 2
    assert probe_layers_for(4, [0, 3], [1, 2]) == [0, 3]  # layers given are taken as given
    assert full_attention_layers(build_tiny_vlm("qwen3_vl")[0].config.get_text_config()) is None


def test_a_family_that_reads_the_image_by_cross_attention_is_refused_saying_why():
    from types import SimpleNamespace

    from transformers import MllamaConfig

    from atrl.probe.layout import ProbeError, VisionLayout

    with pytest.raises(ProbeError, match=r"'mllama': its text tokens read the image through cross-attention layers "
                                         r"\[3, 8, 13, 18\]\.\.\., not through self-attention"):
        VisionLayout.from_model(SimpleNamespace(config=MllamaConfig()))
    with pytest.raises(ValueError,
                       match=r"unknown model family 'idefics9'; choose one of \['gemma3', 'glm4v', 'idefics3', "
                             r"'internvl', 'llava', 'llava_onevision', "):
        from atrl.models.zoo import build_tiny_vlm

        build_tiny_vlm("idefics9")


def test_qwen3_5_probes_only_its_full_attention_layers():
    """Qwen3.5's linear-attention layers compute no softmax over the image tokens: the default probe layers are
    among its full-attention layers, and one asked for by hand is a clear error listing them."""
    from atrl.models.zoo import build_tiny_vlm
    from atrl.probe import ConnectivityProbe, ProbeError

    model, _ = build_tiny_vlm("qwen3_5")
    assert model.config.get_text_config().layer_types == ["linear_attention", "full_attention", "full_attention",
                                                          "linear_attention"]
    probe = ConnectivityProbe(model)
    assert probe.layers == [2]
    probe.detach()
    with pytest.raises(ProbeError, match=r"probe layers \[0, 3\] are linear-attention layers, which compute no "
                                         r"softmax over the image tokens to measure; probe full-attention layers: "
                                         r"\[1, 2\]"):
        ConnectivityProbe(model, layers=[0, 2, 3])
