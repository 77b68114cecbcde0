"""YAML recipes and `atrl train` command-line overrides."""

import importlib.util
import json
import signal
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from atrl.cli import main
from atrl.rl.build import grpo_config
from atrl.rl.recipe import apply_overrides, load_recipe, recipe_from_dict

ROOT = Path(__file__).resolve().parents[1]


def test_every_shipped_recipe_parses():
    paths = sorted((ROOT / "configs").glob("*.yaml"))
    assert {p.name for p in paths} >= {"demo.yaml", "qwen2.5-vl-3b.yaml", "qwen2.5-vl-7b.yaml"}
    for path in paths:
        recipe = load_recipe(path)
        assert recipe.anchor.mode == "atrl"
        assert recipe.trl["output_dir"].startswith("runs/")
        grpo_config(recipe)  # TRL's checks on one process (batch against num_generations: one GPU must do)
    for path in sorted((ROOT / "configs" / "accelerate").glob("*.yaml")):
        cfg = yaml.safe_load(path.read_text())
        assert cfg["num_processes"] >= 2 and cfg["distributed_type"] in ("MULTI_GPU", "DEEPSPEED", "FSDP")


def test_demo_recipe_is_the_default():
    demo, default = load_recipe(ROOT / "configs" / "demo.yaml"), load_recipe(None)
    assert demo.anchor.credit_options() == default.anchor.credit_options()
    for section in ("model", "data", "rewards"):
        assert getattr(demo, section) == getattr(default, section)
    assert demo.anchor.mode == default.anchor.mode and demo.resume == default.resume
    assert {**demo.trl, "output_dir": None} == {**default.trl, "output_dir": None}


def test_a_recipe_file_does_not_inherit_the_demo_training_values(tmp_path):
    """A file recipe's trl section sits on GRPOConfig's defaults: the shipped 3B recipe trains its one epoch (not
    the demo's max_steps 150) and a field it leaves out is TRL's, not the demo's."""
    from trl import GRPOConfig

    from atrl.rl.recipe import BASE_TRL, DEFAULT_TRL

    trl_default = GRPOConfig(output_dir=str(tmp_path), use_cpu=True)
    for name in ("qwen2.5-vl-3b.yaml", "qwen2.5-vl-7b.yaml", "qwen2.5-vl-3b-lora.yaml"):
        args = grpo_config(load_recipe(ROOT / "configs" / name))
        assert args.max_steps == -1 and args.num_train_epochs == 1, name
        assert args.temperature == 1.0 and args.save_steps == 50 and args.activation_checkpointing, name
    path = tmp_path / "mine.yaml"
    path.write_text("anchor: {mode: uniform}\ntrl: {num_train_epochs: 2}\n")
    args = grpo_config(load_recipe(path))
    assert args.max_steps == -1 and args.num_train_epochs == 2
    assert args.per_device_train_batch_size == trl_default.per_device_train_batch_size != DEFAULT_TRL[
        "per_device_train_batch_size"]
    assert args.temperature == trl_default.temperature != DEFAULT_TRL["temperature"]
    assert args.logging_steps == BASE_TRL["logging_steps"] != trl_default.logging_steps
    assert args.beta == 0.0 and args.loss_type == "dapo"
    assert args.output_dir == "runs/uniform"  # unset: named after the credit mode, so two modes never share it
    # without a file, the embedded default's values; overrides apply on top of either
    assert load_recipe(None, ["--trl.seed", "3"]).trl == {**DEFAULT_TRL, "seed": 3, "output_dir": "runs/atrl"}
    assert load_recipe(path, ["--trl.seed", "3"]).trl == {**BASE_TRL, "num_train_epochs": 2, "seed": 3,
                                                          "output_dir": "runs/uniform"}
    assert load_recipe(None, ["--anchor.mode", "random"]).trl["output_dir"] == "runs/random"
    three_b = load_recipe(ROOT / "configs" / "qwen2.5-vl-3b.yaml", ["--anchor.mode", "uniform"])
    assert three_b.trl["output_dir"] == "runs/qwen2.5-vl-3b-uniform"  # the recipe's "{mode}"


def test_resume_refuses_to_continue_a_run_of_another_recipe(tmp_path, capsys, caplog):
    """`atrl train` then `atrl train --anchor.mode uniform` into the same folder: resume: auto would have continued
    the atrl run's checkpoint as the uniform run. Now the changed fields are named and nothing is written; what a
    resumed run may change (its length, logging, scheduling) passes; an explicitly named checkpoint only warns."""
    from atrl.rl.checkpoints import mark_checkpoint_complete
    from atrl.rl.recipe import recipe_text
    from atrl.rl.run import check_resume_recipe

    out = tmp_path / "run"
    first = load_recipe(None, ["--trl.output_dir", str(out)])
    (out / "checkpoint-10").mkdir(parents=True)
    (out / "checkpoint-10" / "trainer_state.json").write_text('{"global_step": 10, "log_history": []}')
    mark_checkpoint_complete(out / "checkpoint-10", 10)
    (out / "recipe.yaml").write_text(recipe_text(first))
    before = (out / "recipe.yaml").read_text()
    common = ["train", "--trl.output_dir", str(out)]
    assert main([*common, "--anchor.mode", "uniform", "--trl.learning_rate", "1e-4"]) == 2
    err = capsys.readouterr().err
    assert "anchor.mode: 'atrl' -> 'uniform'" in err and "trl.learning_rate: 5e-05 -> 0.0001" in err
    assert "Give this run its own trl.output_dir" in err and str(out / "checkpoint-10") in err
    assert (out / "recipe.yaml").read_text() == before and not (out / "final").exists()
    ckpt = str(out / "checkpoint-10")
    longer = load_recipe(None, ["--trl.output_dir", str(out), "--trl.max_steps", "300", "--trl.save_steps", "50",
                                "--anchor.credit.n_workers", "4", "--trl.report_to", "[]"])
    check_resume_recipe(longer, out, ckpt)  # train longer, save and report differently: the same run
    with pytest.raises(ValueError, match=r"lora: None -> \{'r': 4\}"):  # full fine-tuning resumed as LoRA
        check_resume_recipe(load_recipe(None, ["--trl.output_dir", str(out), "--lora", "{r: 4}"]), out, ckpt)
    # the checkpoint's own recipe wins over the folder's: a second run with resume: false rewrote recipe.yaml
    (out / "checkpoint-10" / "recipe.yaml").write_text(before)
    second = load_recipe(None, ["--trl.output_dir", str(out), "--anchor.mode", "random"])
    (out / "recipe.yaml").write_text(recipe_text(second))
    with pytest.raises(ValueError, match="anchor.mode: 'atrl' -> 'random'"):
        check_resume_recipe(second, out, ckpt)
    other = load_recipe(None, ["--trl.output_dir", str(out), "--anchor.mode", "uniform", "--resume", ckpt])
    with caplog.at_level("WARNING", logger="atrl"):
        check_resume_recipe(other, out, ckpt)
    assert "anchor.mode: 'atrl' -> 'uniform'" in caplog.text


def test_overrides_are_typed_and_nested():
    raw = apply_overrides({}, ["--anchor.mode", "uniform", "--trl.learning_rate", "1e-5",
                               "--anchor.credit.anchor_ratio", "0.2", "trl.max_steps=7",
                               "--anchor.region_grid", "[2, 3]", "--model.path", "null"])
    recipe = recipe_from_dict(raw)
    assert recipe.anchor.mode == "uniform" and recipe.anchor.region_grid == (2, 3)
    assert recipe.trl["learning_rate"] == 1e-5 and recipe.trl["max_steps"] == 7
    assert recipe.anchor.credit_options().anchor_ratio == 0.2
    args = grpo_config(recipe)
    assert args.learning_rate == 1e-5 and args.max_steps == 7 and args.reward_weights == [1.0, 0.2]


@pytest.mark.parametrize("override,match", [
    (["--anchor.mode", "bogus"], "anchor.mode='bogus'"),
    (["--anchor.credit.w_other", "0"], "w_other"),
    (["--anchor.credit.nope", "1"], r"anchor.credit has unknown keys \['nope'\]"),
    (["--model.typo", "1"], r"section 'model' has unknown keys \['typo'\]"),
    (["--foo.bar", "1"], "unknown section 'foo'"),
    (["--anchor.mode"], "has no value"),
    (["--anchor.overlap", "maybe"], "anchor.overlap=.maybe.: use true or false"),
    (["--model.dtype", "float8"], "model.dtype"),
    (["--model.vision_attention", "fused"], "model.vision_attention='fused': use packed or per_window"),
    (["--data.knobs", "{quadrant: {size: 1}}"], r"knobs.quadrant has unknown keys \['size'\]"),
    (["--data.knobs", "{colour: {size: 1}}"], "knobs: unknown task family 'colour'"),
    (["--data.knobs", "{quadrant: {jitter: 0.3}}"], "knobs.quadrant: QuadrantKnobs.jitter=0.3"),
    (["--data.eval", "synthetic", "--data.eval_seed", "0"], "data.eval_seed=0 is the training seed"),
    (["--data.train", "a.jsonl", "--data.eval", "a.jsonl"], "data.eval='a.jsonl' is the training file"),
    (["--data.eval", "synthetic", "--data.eval_n", "0"], "data.eval_n=0"),
])
def test_bad_recipes_name_the_key(override, match):
    with pytest.raises(ValueError, match=match):
        load_recipe(None, override)


def test_held_out_data_is_other_tasks_of_the_same_mix_and_turns_evaluation_on():
    from atrl.rl.build import build_dataset

    recipe = load_recipe(None, ["--data.n", "16", "--data.eval", "synthetic", "--data.eval_n", "8",
                                "--data.families", "[count, compare]"])
    train, held_out = build_dataset(recipe, None)[0], build_dataset(recipe, None, "eval")[0]
    assert len(held_out) == 8 and {r["family"] for r in held_out} == {"count", "compare"}
    assert not {r["scene"] for r in held_out} & {r["scene"] for r in train}  # drawn with another seed
    args = grpo_config(recipe)
    assert args.eval_strategy == "steps" and args.eval_steps == recipe.trl["save_steps"]
    assert build_dataset(load_recipe(None, []), None, "eval") == (None, None)  # none unless asked for
    with pytest.raises(ValueError, match="no held-out data: set data.eval"):
        grpo_config(load_recipe(None, ["--trl.eval_strategy", "steps"]))


def test_dry_run_checks_config_rewards_data_and_capture_site_without_training(tmp_path, capsys):
    out = tmp_path / "never-written"
    common = ["train", "--dry-run", "--trl.output_dir", str(out)]
    assert main([*common, "--data.eval", "synthetic", "--data.eval_n", "4", "--trl.num_iterations", "2"]) == 0
    printed = capsys.readouterr().out
    assert "rewards: accuracy_reward x 1, format_reward x 0.2" in printed
    assert "data.train: synthetic, 512 rows" in printed and "data.eval: synthetic, 4 rows" in printed
    assert "connectivity measured on old_logps" in printed  # num_iterations 2: TRL's old-log-prob pass
    assert printed.rstrip().endswith("recipe checked: nothing trained") and not out.exists()
    assert "probe layers [2]" in printed and "4 decoder layers" in printed  # the embedded default's layer 2 of 4
    assert main([*common, "--anchor.capture", "old_logps"]) == 2  # TRL makes no such pass with these settings
    assert "anchor.capture='old_logps' but TRL makes no old-log-prob pass" in capsys.readouterr().err
    assert main([*common, "--anchor.probe_layers", "[1, 9]"]) == 2  # read from the model's config, no weights
    assert "probe layers [9] out of range: the decoder has 4 layers" in capsys.readouterr().err
    if importlib.util.find_spec("flash_attn") is None:  # as on CI: a FlashAttention recipe fails before the weights
        assert main([*common, "--model.attn_implementation", "flash_attention_2"]) == 2
        assert "needs the flash_attn package, which is not installed" in capsys.readouterr().err
    assert "lora: none (full fine-tuning)" in printed
    # LoRA: fields and target modules checked on a weightless copy of the model; the counts are the tiny
    # default's 4 decoder layers x 7 projections, and the MLP projections of its vision blocks (same names)
    from atrl.models.zoo import build_tiny_vlm

    modules = [n for n, _ in build_tiny_vlm("qwen2_5_vl")[0].named_modules()]
    vision_mlp = sum(n.endswith(("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")) and "visual" in n for n in modules)
    lora = ["--lora.r", "8", "--lora.target_modules", "[q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj]"]
    assert main([*common, *lora]) == 0
    assert (f"lora: r 8, alpha 8, target_modules {28 + vision_mlp} modules (28 in the language model, {vision_mlp} "
            "in the vision tower)") in capsys.readouterr().out and vision_mlp > 0
    regex = r"'.*language_model.*\.(q|k|v|o|gate|up|down)_proj'"  # the LoRA recipe's advice: vision tower frozen
    assert main([*common, "--lora.target_modules", regex]) == 0
    assert "target_modules 28 modules (28 in the language model, 0 in the vision tower)" in capsys.readouterr().out
    assert main([*common, "--lora.target_modules", "[q_proj, qproj]"]) == 2
    assert "lora.target_modules ['qproj'] name no module of the model" in capsys.readouterr().err
    assert main([*common, "--lora.rank", "8"]) == 2
    assert "recipe section 'lora': " in capsys.readouterr().err
    if importlib.util.find_spec("vllm") is None:  # as on CI: vLLM rollouts asked for but not installed
        assert main([*common, "--trl.use_vllm", "true"]) == 2
        assert "trl.use_vllm=true needs vLLM, which is not installed" in capsys.readouterr().err
    assert main([*common, "--trl.per_device_train_batch_size", "6"]) == 2  # TRL's check: 6 is not a multiple of 4
    assert "recipe section 'trl': generation_batch_size (6) must be divisible" in capsys.readouterr().err
    # a data file whose second row's prompt, image tokens included, is over the limit: named, or skipped and counted
    assert main(["data", "export", "--n", "6", "--seed", "3", "--out", str(tmp_path / "d")]) == 0
    data = ["--data.train", str(tmp_path / "d" / "data.jsonl"), "--data.max_prompt_length", "150"]
    assert main([*common, *data]) == 2
    assert "data.jsonl:3: prompt is 154 tokens" in capsys.readouterr().err
    assert main([*common, *data, "--data.on_error", "skip"]) == 0
    printed = capsys.readouterr().out
    assert "rows, skipped 1 (prompt too long: 1)" in printed and "data.train checked" in printed


def test_vision_attention_reaches_the_model():
    from atrl.models.vision_attention import NAME
    from atrl.rl.build import build_model

    packed, _ = build_model(load_recipe(None))  # the default
    assert packed.config.vision_config._attn_implementation == NAME
    loop, _ = build_model(load_recipe(None, ["--model.vision_attention", "per_window"]))
    assert loop.config.vision_config._attn_implementation == "sdpa"


def test_pixel_range_reaches_the_processor_the_check_and_the_saved_model(tmp_path, capsys):
    """model.min_pixels / max_pixels resize images for training, for the prompt-length check and in the saved
    processor. By hand: a 224 x 224 image (50,176 pixels) into [3,136, 6,272] shrinks by sqrt(50176 / 6272) to
    79 pixels a side, floored to the 28-pixel grid: 56 x 56, i.e. 4 x 4 patches of 14 merged 2 x 2 = 4 tokens."""
    from atrl.data.synthetic import build_prompt, generate
    from atrl.models.zoo import load_processor
    from atrl.rl.build import build_model

    pixels = ["--model.min_pixels", "3136", "--model.max_pixels", "6272"]
    _, processor = build_model(load_recipe(None, pixels))
    example = generate(1, seed=2)[0]
    assert example.image.size == (224, 224)
    text = processor.apply_chat_template(build_prompt(example.question), add_generation_prompt=True)
    batch = processor(text=[text], images=[[example.image]], return_tensors="pt")
    assert batch["image_grid_thw"].tolist() == [[1, 4, 4]]
    assert (batch["input_ids"] == processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")).sum() == 4
    processor.save_pretrained(tmp_path / "saved")
    assert load_processor(tmp_path / "saved").image_processor.size["longest_edge"] == 6272
    common = ["train", "--dry-run", "--trl.output_dir", str(tmp_path / "never")]
    assert main([*common, *pixels]) == 0
    assert "images: resized into 3,136 to 6,272 pixels (at most about 8 image tokens each" in capsys.readouterr().out
    assert main([*common, "--model.max_pixels", "3136"]) == 2  # the tiny default's own minimum is 12,544
    assert "model.min_pixels=12544 is above model.max_pixels=3136" in capsys.readouterr().err
    assert main([*common, "--model.max_pixels", "0"]) == 2
    assert "model.max_pixels=0: a positive number of pixels" in capsys.readouterr().err


def test_bad_data_fails_before_the_model_is_loaded(tmp_path, capsys):
    """A bad row is reported before any weights load (minutes for a 7B model): here the model path does not even
    exist, and the error is the data's."""
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "What colour?", "answer": "red", "image": "missing.png"}\n')
    common = ["train", "--trl.output_dir", str(tmp_path / "run"), "--model.path", str(tmp_path / "no-model")]
    assert main([*common, "--data.train", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "bad.jsonl:1" in err and "missing.png" in err and "no-model" not in err
    # the prompt-length check needs the processor (no weights): a missing model folder is named as such
    assert main([*common, "--data.train", str(bad), "--data.max_prompt_length", "100"]) == 2
    assert "model path" in capsys.readouterr().err
    # ... but a missing data file first: the processor of a hub model may take minutes to fail offline
    assert main([*common, "--data.train", str(tmp_path / "nope.jsonl"), "--data.max_prompt_length", "100"]) == 2
    err = capsys.readouterr().err
    assert "data.train: " in err and "nope.jsonl' does not exist" in err and "model path" not in err


def test_synthetic_knobs_reach_the_training_data():
    from atrl.rl.build import build_dataset

    recipe = load_recipe(None, ["--data.n", "8", "--data.families", "[quadrant, count]",
                                "--data.knobs", "{quadrant: {shapes: [square], jitter: 0}, count: {max_objects: 3}}"])
    rows = build_dataset(recipe, processor=None)[0]
    scenes = [json.loads(r["scene"]) for r in rows]
    families = [r["family"] for r in rows]
    assert families == ["quadrant", "count"] * 4
    quadrant = [o for s, f in zip(scenes, families) if f == "quadrant" for o in s["objects"]]
    assert quadrant and {o["shape"] for o in quadrant} == {"square"}
    assert all(len(s["objects"]) <= 3 for s, f in zip(scenes, families) if f == "count")


def test_bad_trl_field_and_cli_errors(tmp_path, capsys):
    with pytest.raises(ValueError, match="recipe section 'trl'"):
        grpo_config(load_recipe(None, ["--trl.not_a_field", "1"]))
    with pytest.raises(ValueError, match=r"trl.report_to=\['no_such_logger'\]: \['no_such_logger'\] not installed"):
        grpo_config(load_recipe(None, ["--trl.report_to", "[no_such_logger]"]))
    assert grpo_config(load_recipe(None, ["--trl.report_to", "[]"])).report_to == []
    assert main(["train", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml" in capsys.readouterr().err
    assert main(["train", "--anchor.mode", "bogus"]) == 2
    assert "anchor.mode='bogus'" in capsys.readouterr().err


def test_cli_train_runs_and_writes_final_model(tmp_path, capsys, monkeypatch, caplog):
    import types

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from atrl.rl import trainer as trainer_module

    caplog.set_level("INFO", logger="atrl")
    updates = []  # a live W&B run (faked, beside the real TensorBoard writer) receives the recipe as its config
    wandb = types.SimpleNamespace(config=types.SimpleNamespace(update=lambda d, **kw: updates.append(d)),
                                  Image=lambda path: path, Html=lambda text: text, log=lambda entry: None)
    real = trainer_module.run_loggers
    monkeypatch.setattr(trainer_module, "run_loggers", lambda trainer: [*real(trainer), wandb])
    out = tmp_path / "run"
    code = main(["train", "--trl.output_dir", str(out), "--trl.max_steps", "1", "--data.n", "8",
                 "--data.eval", "synthetic", "--data.eval_n", "4", "--trl.eval_steps", "1",
                 "--trl.per_device_train_batch_size", "4", "--trl.num_generations", "4",
                 "--trl.max_completion_length", "8", "--trl.report_to", "[tensorboard]", "--trl.disable_tqdm", "true"])
    assert code == 0
    assert (out / "final" / "model.safetensors").is_file() and (out / "recipe.yaml").is_file()
    assert list(out.glob("runs/*/events.out.tfevents.*")), "TensorBoard logs are written by default"
    summary = [r.getMessage() for r in caplog.records if r.getMessage().startswith("run: ")]
    assert summary[0].startswith("run: trl: 4 completions per device") and "weights loaded" in summary[-1]
    assert yaml.safe_load((out / "recipe.yaml").read_text())["anchor"]["mode"] == "atrl"
    assert (out / "checkpoint-1" / "recipe.yaml").read_text() == (out / "recipe.yaml").read_text()
    # the resolved recipe where the run logs: TensorBoard text, W&B config
    events = EventAccumulator(str(next(out.glob("runs/*")))).Reload()
    logged = events.Tensors("atrl/recipe/text_summary")[0].tensor_proto.string_val[0].decode()
    assert logged == "```yaml\n" + (out / "recipe.yaml").read_text() + "```"
    assert updates == [{"atrl": yaml.safe_load((out / "recipe.yaml").read_text())}]
    # the run's whole log history and a figure of it; `atrl plot` draws it again, or beside other runs
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 1
    held_out = [h for h in state["log_history"] if "eval_reward" in h]  # TRL's evaluation on data.eval
    assert len(held_out) == 1 and "eval_atrl/anchor_fraction" in held_out[0]
    assert Image.open(out / "training_report.png").format == "PNG"
    capsys.readouterr()
    assert main(["plot", str(out), str(out / "checkpoint-1"), "--out", str(tmp_path / "both.png")]) == 0
    printed = capsys.readouterr().out
    assert "run (atrl): 3 log entries up to step 1" in printed and "checkpoint-1 (atrl)" in printed
    assert Image.open(tmp_path / "both.png").format == "PNG"
    assert main(["plot", str(tmp_path)]) == 2
    assert "no trainer_state.json" in capsys.readouterr().err


def test_plot_labels_tell_runs_of_the_same_folder_name_apart(tmp_path):
    """Runs that are all `.../<name>/run` (a demo's, benchmarks/smolvlm.sh's) are labelled by as many trailing
    parts of their paths as tell them apart, with the credit mode where a recipe names it."""
    from atrl.rl.run import run_labels

    for name, mode in (("rl-atrl-s3", "atrl"), ("rl-random-s3", "random")):
        (tmp_path / "a" / name / "run").mkdir(parents=True)
        (tmp_path / "a" / name / "run" / "recipe.yaml").write_text(f"anchor: {{mode: {mode}}}\n")
    (tmp_path / "b" / "rl-atrl-s3" / "run").mkdir(parents=True)
    runs = [tmp_path / "a" / "rl-atrl-s3" / "run", tmp_path / "a" / "rl-random-s3" / "run"]
    assert run_labels(runs) == ["rl-atrl-s3/run (atrl)", "rl-random-s3/run (random)"]
    assert run_labels(runs[:1]) == ["run (atrl)"]  # one run: its folder's name
    # the same trailing two parts in two places: the third tells them apart
    assert run_labels([runs[0], tmp_path / "b" / "rl-atrl-s3" / "run"]) == ["a/rl-atrl-s3/run (atrl)",
                                                                            "b/rl-atrl-s3/run"]
    assert run_labels([runs[0], runs[0]]) == ["run (atrl)", "run (atrl)"]  # the same folder twice


def test_an_error_inside_training_names_the_step_and_the_checkpoint(tmp_path, monkeypatch):
    """A reward function's bug at its third call (step 3): not a one-line "error:" as for bad input, but the
    cause's traceback, the step it stopped at and the checkpoint `resume: auto` continues from."""
    from atrl.rl.run import TrainingStopped

    (tmp_path / "flaky_reward.py").write_text(
        "calls = []\n"
        "def flaky(prompts, completions, **columns):\n"
        "    calls.append(1)\n"
        "    return [float('not a number' if len(calls) == 3 else 0.5) for _ in completions]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "run"
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)}
    with pytest.raises(TrainingStopped) as stopped:
        main(["train", "--trl.output_dir", str(out), "--trl.max_steps", "4", "--trl.save_steps", "1", "--data.n", "8",
              "--trl.per_device_train_batch_size", "4", "--trl.num_generations", "4", "--trl.max_completion_length",
              "4", "--trl.report_to", "[]", "--trl.disable_tqdm", "true", "--rewards.custom", "{flaky_reward:flaky: 1}"])
    message = str(stopped.value)
    assert message.startswith("training stopped at step 2 by ValueError: could not convert string to float")
    assert f"`resume: auto` continues from {out / 'checkpoint-2'}" in message
    assert isinstance(stopped.value.__cause__, ValueError)
    # the stop-on-signal handlers are gone with the run (Ctrl-C interrupts at once again, e.g. in a notebook)
    assert {s: signal.getsignal(s) for s in handlers} == handlers


def test_lora_recipe_trains_adapters_and_the_adapter_evaluates(tmp_path, capsys, monkeypatch):
    """`lora:` trains peft adapters on the decoder (probes and credit as usual); `final/` holds the adapter, which
    `atrl eval` loads onto its base model and `atrl model merge` merges into it."""
    monkeypatch.syspath_prepend(str(ROOT / "tests" / "scripts"))  # a reward that varies: the adapters get gradients
    out = tmp_path / "lora"
    assert main(["train", "--trl.output_dir", str(out), "--trl.max_steps", "1", "--data.n", "8",
                 "--rewards.custom", "{ddp_train:diversity_reward: 1.0}",
                 "--trl.per_device_train_batch_size", "4", "--trl.num_generations", "4",
                 "--trl.max_completion_length", "16", "--trl.temperature", "2.0", "--trl.report_to", "[]",
                 "--trl.disable_tqdm", "true", "--trl.learning_rate", "1e-2",
                 "--lora", "{r: 4, lora_alpha: 8, target_modules: [q_proj, v_proj]}"]) == 0
    adapter = json.loads((out / "final" / "adapter_config.json").read_text())
    assert adapter["r"] == 4 and sorted(adapter["target_modules"]) == ["q_proj", "v_proj"]
    assert not (out / "final" / "model.safetensors").exists()  # the adapter only, not a copy of the base
    state = json.loads((out / "trainer_state.json").read_text())
    assert any("atrl/anchor_fraction" in h for h in state["log_history"])  # the probes ran under peft
    assert all(h["grad_norm"] > 0 for h in state["log_history"] if "grad_norm" in h)  # the adapters moved
    capsys.readouterr()
    assert main(["eval", "--model", str(out / "final"), "--n", "2", "--max-new-tokens", "8",
                 "--out", str(tmp_path / "ev")]) == 0
    assert json.loads((tmp_path / "ev" / "eval.json").read_text())["n"] == 2
    from atrl.models.zoo import load_model

    model, processor = load_model(out / "final")  # what `atrl eval` loads: the base with the trained adapter on it
    assert any("lora_A" in name for name, _ in model.named_parameters())
    # merged into the base for tools without peft (vLLM): a plain checkpoint whose logits are the adapter model's
    assert main(["model", "merge", "--adapter", str(out / "final"), "--out", str(tmp_path / "merged")]) == 0
    merged, _ = load_model(tmp_path / "merged")
    assert not any("lora" in name for name, _ in merged.named_parameters())
    from atrl.data.synthetic import build_prompt, generate

    example = generate(1, seed=4)[0]
    text = processor.apply_chat_template(build_prompt(example.question), add_generation_prompt=True)
    batch = processor(text=[text + example.reasoning], images=[[example.image]], return_tensors="pt")
    base, _ = load_model(adapter["base_model_name_or_path"])
    with torch.no_grad():
        expected, got, before = model(**batch).logits, merged(**batch).logits, base(**batch).logits
    assert (expected - before).abs().max() > 1e-3  # the adapter moved the model: merging is not a no-op
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)  # W + BA summed once: float32 rounding
    assert main(["model", "merge", "--adapter", str(tmp_path / "merged"), "--out", str(tmp_path / "m2")]) == 2
    assert "no adapter_config.json there" in capsys.readouterr().err
