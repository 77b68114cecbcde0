"""Bad input a new user meets: each is one line naming the file and line (or the recipe key), and what to do."""

import json

import pytest

from atrl.cli import build_parser, main
from atrl.data.formats import DataError, load_samples


def _error(capsys, argv: list[str]) -> str:
    """The command's stderr, checked to be atrl's one-line error (exit status 2, no traceback)."""
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.startswith(f"atrl {argv[0]}: error: ")
    return err.strip()


def test_a_byte_that_is_not_utf8_is_named_with_its_file_line_and_column(tmp_path, capsys):
    data = tmp_path / "x.jsonl"
    data.write_bytes(b'{"question": "q", "answer": "1", "image": "a.png"}\n{"question": "caf\xe9", "answer": "2"}\n')
    with pytest.raises(DataError, match=r"x.jsonl:2:18: byte 0xe9 is not UTF-8 text"):
        load_samples(data)
    assert "x.jsonl:2:18: byte 0xe9" in _error(capsys, ["train", "--dry-run", "--data.train", str(data)])
    assert "x.jsonl:2:18" in _error(capsys, ["eval", "--model", str(tmp_path), "--data", str(data)])
    recipe = tmp_path / "r.yaml"
    recipe.write_bytes(b"model:\n  dtype: float32 # caf\xe9\n")
    assert "--config " + str(recipe) + ":2:23: byte 0xe9" in _error(capsys, ["train", "--config", str(recipe)])


@pytest.mark.parametrize("text, expected", [
    ("model:\n  dtype: [float32\ntrl: {}\n", r"r.yaml:3:4: expected ',' or ']'"),
    ("model:\n  path: a\n  path: b\n", r"r.yaml:3:3: the key 'path' is given twice \(first on line 2\)"),
    ("trl:\n  max_steps: 3\nmodel: {}\ntrl:\n  max_steps: 4\n", r"r.yaml:4:1: the key 'trl' is given twice"),
    ("model: !!python/object/apply:os.system [ls]\n", r"r.yaml:1:8: .*python/object/apply:os.system.*plain YAML"),
    ("", r"r.yaml: the file is empty; a recipe is a YAML mapping of sections"),
    ("- a\n- b\n", r"r.yaml: a recipe is a YAML mapping of sections, not a list"),
])
def test_a_recipe_that_is_not_plain_yaml_is_one_line_with_its_line(tmp_path, capsys, text, expected):
    import re

    recipe = tmp_path / "r.yaml"
    recipe.write_text(text)
    assert re.search(expected, _error(capsys, ["train", "--config", str(recipe), "--dry-run"]))


def test_a_corrupt_recipe_in_a_checkpoint_names_it_and_what_to_do(tmp_path, capsys):
    from atrl.rl.checkpoints import mark_checkpoint_complete

    out = tmp_path / "run"
    ckpt = out / "checkpoint-2"
    ckpt.mkdir(parents=True)
    (ckpt / "recipe.yaml").write_text("anchor:\n  mode: [atrl\n")
    (ckpt / "trainer_state.json").write_text(json.dumps({"global_step": 2, "log_history": []}))
    mark_checkpoint_complete(ckpt, step=2)
    err = _error(capsys, ["train", "--trl.output_dir", str(out), "--trl.max_steps", "3"])
    assert f"the checkpoint's recipe {ckpt / 'recipe.yaml'}:3:1" in err and "set resume: false" in err


@pytest.mark.parametrize("override, expected", [
    (["--trl.learning_rate", "lots"], "trl.learning_rate='lots': use a number"),
    (["--trl.max_steps", "ten"], "trl.max_steps='ten': use a whole number"),
    (["--anchor.probe_layers", "2"], "anchor.probe_layers=2: use a list of whole numbers or null"),
    (["--trl.bf16", "maybe"], "trl.bf16='maybe': use true or false or null"),
    (["--trl.learning_rate", "-1"], "trl.learning_rate=-1: must be >= 0"),
    (["--trl.temperature", "-3"], "trl.temperature=-3: must be > 0"),
    (["--trl.num_generations", "1"], "recipe section 'trl': GRPO requires at least 2 generations per prompt"),
    (["--model.attn_implementation", "eager"], "model.attn_implementation='eager' with anchor.mode='atrl': the "
                                               "probes run inside SDPA or FlashAttention"),
])
def test_the_dry_run_refuses_what_the_run_would_fail_on(capsys, override, expected):
    assert expected in _error(capsys, ["train", "--dry-run", *override])


def test_numbers_written_as_text_in_a_recipe_file_are_read_as_numbers(tmp_path):
    from atrl.rl.build import grpo_config
    from atrl.rl.recipe import load_recipe

    recipe = tmp_path / "r.yaml"
    recipe.write_text("trl:\n  learning_rate: 5e-5\n  max_steps: 7\n")  # YAML 1.1 reads 5e-5 as a string
    args = grpo_config(load_recipe(recipe))
    assert args.learning_rate == 5e-5 and args.max_steps == 7
    assert grpo_config(load_recipe(None, ["--model.attn_implementation", "eager", "--anchor.mode", "uniform"]))


def test_every_option_has_help_and_train_help_lists_the_recipe_keys(capsys):
    import argparse

    parser = build_parser()
    missing = []

    def walk(p: argparse.ArgumentParser, path: str) -> None:
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    walk(sub, f"{path} {name}")
            elif action.option_strings and action.help in (None, "") and action.dest != "help":
                missing.append(f"{path} {action.option_strings[0]}")

    walk(parser, "atrl")
    assert missing == []
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    assert "recipe keys" in text and "anchor: mode, probe_layers" in text and "any TRL GRPOConfig field" in text
    with pytest.raises(SystemExit):
        main(["sft", "--help"])
    assert "(default: 3000)" in capsys.readouterr().out  # defaults shown


def test_a_custom_reward_in_the_current_folder_imports_and_a_missing_one_says_where_to_put_it(tmp_path, capsys,
                                                                                              monkeypatch):
    import sys

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    (tmp_path / "myreward_for_test.py").write_text("def score(prompts, completions, **kw):\n"
                                                   "    return [0.0] * len(completions)\n")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(json.dumps({"rewards": {"custom": {"myreward_for_test:score": 1.0}}}))
    capsys.readouterr()
    assert main(["train", "--config", str(recipe), "--dry-run"]) == 0
    assert "score x 1" in capsys.readouterr().out
    recipe.write_text(json.dumps({"rewards": {"custom": {"not_here_reward:score": 1.0}}}))
    err = _error(capsys, ["train", "--config", str(recipe), "--dry-run"])
    assert "No module named 'not_here_reward'" in err
    assert "a file not_here_reward.py in the folder atrl runs from" in err


def test_a_truncated_weights_file_or_a_folder_without_config_is_named(tmp_path, capsys, tiny_models):
    from atrl.models.zoo import save_model

    model, processor = tiny_models["qwen2_5_vl"]
    ckpt = save_model(model, processor, tmp_path / "ckpt")
    weights = ckpt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    err = _error(capsys, ["eval", "--model", str(ckpt), "--n", "2", "--out", str(tmp_path / "ev")])
    assert f"model folder {str(ckpt)!r}: its weights cannot be read (SafetensorError" in err
    assert "model.safetensors" in err and "truncated" in err
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("x")
    err = _error(capsys, ["eval", "--model", str(tmp_path / "empty"), "--n", "2"])
    assert "has no config.json: not a checkpoint folder" in err and "notes.txt" in err


def test_a_processor_of_another_model_in_the_folder_is_refused_naming_what_differs(tmp_path, capsys, tiny_models):
    from atrl.models.zoo import save_model

    model, _ = tiny_models["qwen2_5_vl"]
    for other, says in (("llava", "the processor marks images with '<image>'"),
                        ("gemma3", "its tokenizer has")):
        ckpt = save_model(model, tiny_models[other][1], tmp_path / other)
        err = _error(capsys, ["eval", "--model", str(ckpt), "--n", "2", "--out", str(tmp_path / "ev")])
        assert f"model folder {str(ckpt)!r}: {says}" in err and "belongs to another model" in err
        dry_run = _error(capsys, ["train", "--dry-run", "--model.path", str(ckpt)])
        assert dry_run == err.replace("atrl eval", "atrl train")
        config = model.config
        if other == "llava":  # the ids named are the processor's and the config's own
            image = tiny_models["llava"][1].tokenizer.convert_tokens_to_ids("<image>")
            assert f"(id {image})" in err and f"image features at id {config.image_token_id}" in err
        else:
            assert f"the model embeds {config.get_text_config().vocab_size}" in err


def _checkpoint(folder, step, state: str | None):
    from atrl.rl.checkpoints import mark_checkpoint_complete

    folder.mkdir(parents=True)
    if state is not None:
        (folder / "trainer_state.json").write_text(state)
    (folder / "model.safetensors").write_bytes(b"0" * 1000)
    mark_checkpoint_complete(folder, step=step)


def test_a_broken_complete_checkpoint_falls_back_to_the_previous_one(tmp_path, caplog):
    from atrl.rl.recipe import load_recipe
    from atrl.rl.run import resolve_resume

    out = tmp_path / "run"
    _checkpoint(out / "checkpoint-2", 2, json.dumps({"global_step": 2, "log_history": []}))
    _checkpoint(out / "checkpoint-4", 4, '{"global_step": 4, "log_hist')  # cut short
    recipe = load_recipe(None, ["--trl.output_dir", str(out)])
    with caplog.at_level("WARNING", logger="atrl"):
        assert resolve_resume(recipe, str(out)) == str(out / "checkpoint-2")
    assert f"{out / 'checkpoint-4'} is marked complete but its trainer_state.json cannot be read" in caplog.text
    assert f"resuming from {out / 'checkpoint-2'} instead" in caplog.text
    (out / "checkpoint-2" / "trainer_state.json").unlink()
    with pytest.raises(ValueError, match=r"no checkpoint can be resumed from: .*checkpoint-4: its trainer_state.json "
                                         r"cannot be read.*checkpoint-2: it has no trainer_state.json.*resume: false"):
        resolve_resume(recipe, str(out))


def test_a_checkpoint_is_not_started_without_room_and_a_failed_save_leaves_no_half_folder(tmp_path, monkeypatch):
    """Free space is checked against the last checkpoint's size before the next is written (shutil.disk_usage
    reports a small disk); a save that fails midway (the disk filling up) removes its folder and says what a
    checkpoint takes."""
    import shutil
    from collections import namedtuple

    from test_trainer import _trainer
    from trl import GRPOTrainer

    from atrl.rl.checkpoints import CheckpointSaveError, check_checkpoint_space, checkpoints

    out = tmp_path / "run"
    _checkpoint(out / "checkpoint-2", 2, json.dumps({"global_step": 2, "log_history": []}))
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 500, 500))
    with pytest.raises(CheckpointSaveError, match=r"not enough space for the next checkpoint: 0 MiB free .*a "
                                                  r"checkpoint takes about 0 MiB \(the last one's size\)"):
        check_checkpoint_space(out)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**12, 0, 10**12))
    assert check_checkpoint_space(out) == sum(f.stat().st_size for f in (out / "checkpoint-2").iterdir())

    def fill_the_disk(self, model, trial):
        folder = out / f"checkpoint-{self.state.global_step}"
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")

    monkeypatch.setattr(GRPOTrainer, "_save_checkpoint", fill_the_disk)
    trainer = _trainer(out, max_steps=4, save_strategy="steps", save_steps=4)
    with pytest.raises(CheckpointSaveError, match=r"saving .*checkpoint-4 failed \(RuntimeError: \[enforce fail.*the "
                                                  r"half-written folder is removed\..*MiB free"):
        trainer.train()
    assert not (out / "checkpoint-4").exists()
    assert [p.name for p in checkpoints(out)[0]] == ["checkpoint-2"]  # what was there is kept


def test_answer_extraction_is_linear_in_the_length_of_adversarial_output():
    """Thousands of unclosed or nested \\boxed{: the last balanced one is found in one pass. The bound asserted is
    loose on purpose (a quadratic scan of this input takes minutes); the property is checked exactly below."""
    import time

    from atrl.rl.rewards import _last_boxed, extract_answer

    for text in ("\\boxed{" * 20000 + "x", ("\\boxed{{" * 5000 + "}") * 4, "\\boxed{a}" + "\\boxed{" * 20000):
        t0 = time.perf_counter()
        extract_answer(text)
        assert time.perf_counter() - t0 < 5.0
    # the same answers as the definition: the last \boxed whose braces close, an unbalanced later one passed over
    assert _last_boxed("a \\boxed{1} b \\boxed{2") == "1"
    assert _last_boxed("\\boxed{\\frac{1}{2}} and \\boxed{3}") == "3"
    assert _last_boxed("\\boxed{a}\\boxed{") == "a" and _last_boxed("no box") is None
    assert _last_boxed("x \\boxed 5 {7}") == "7"  # the first brace after \boxed, as before


@pytest.mark.parametrize("pred, gold, kind, precision, right", [
    ("There are 12 apples", "12", "integer", None, True),       # a number among words
    ("So the total is 12", "12", "integer", None, True),        # the end of an untagged sentence
    ("3 or 4", "4", "integer", None, False),                    # two numbers: not an answer
    ("2\\sqrt{3}", "3.46", "float", 2.0, True),                 # an exact expression at the gold's precision
    ("3\\pi/2", "4.71", "float", 2.0, True),
    ("2\\sqrt{3}", "3.47", "float", 2.0, False),
    ("\\sqrt{4}", "2", "integer", None, True),                  # as before
])
def test_numeric_answers_among_words_and_as_exact_expressions(pred, gold, kind, precision, right):
    from atrl.rl.rewards import is_equivalent

    assert is_equivalent(pred, gold, kind, precision=precision) is right


def test_the_reward_reads_mathvistas_own_columns_and_math_verify_warnings_go_to_the_log(caplog):
    import logging

    from atrl.rl.rewards import accuracy_reward

    right = accuracy_reward([None, None], ["<answer>(B)</answer>", "<answer>5</answer>"], answer=["5", "5"],
                            answer_type=["text", "text"], choices=[["3", "5", "7"]] * 2,
                            question_type=["multi_choice", "multi_choice"])
    assert right == [1.0, 1.0]
    with caplog.at_level("WARNING", logger="atrl"):
        logging.getLogger("math_verify.grader").warning("Timeout during comparison")
    assert "math-verify: Timeout during comparison (that answer is judged wrong)" in caplog.text


def _jsonl(tmp_path, rows, name="d.jsonl"):
    from PIL import Image

    Image.new("RGB", (300, 300), "white").save(tmp_path / "a.png")
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_a_huge_image_is_a_bad_row_named_before_it_is_decoded(tmp_path):
    path = _jsonl(tmp_path, [{"question": "q", "answer": "1", "image": "a.png"}])
    with pytest.raises(DataError, match=r"d.jsonl:1: image .*a.png is 300 x 300 = 90,000 pixels, over "
                                        r"data.max_image_pixels=50,000"):
        load_samples(path, max_image_pixels=50_000)
    samples, report = load_samples(path, max_image_pixels=50_000, on_error="skip")
    assert samples == [] and report.skipped == {"max_image_pixels": 1}
    assert load_samples(path)[1].kept == 1  # the default bound (50 megapixels) keeps it


def test_duplicates_and_skipped_rows_are_said_where_they_are(tmp_path, caplog):
    row = {"question": "q", "answer": "1", "image": "a.png"}
    path = _jsonl(tmp_path, [row, {"question": "q2", "answer": "", "image": "a.png"}, row,
                             {"question": "q3", "image": "a.png"}])
    with caplog.at_level("WARNING", logger="atrl"):
        samples, report = load_samples(path, on_error="skip")
    assert len(samples) == 2 and report.duplicates == [(f"{path}:3", f"{path}:1")]
    text = str(report)
    assert "skipped 2 (no answer: 2); skipped rows: no answer at " + f"{path}:2, {path}:4" in text
    assert f"1 kept rows repeat an earlier one (question, answer and images), e.g. {path}:3 repeats {path}:1" in text
    assert "1 rows repeat an earlier one" in caplog.text and "they are kept" in caplog.text


def test_a_prompt_past_the_models_positions_is_refused_when_max_prompt_length_is_unset(tmp_path, capsys,
                                                                                     tiny_models):
    from atrl.models.zoo import save_model

    model, processor = tiny_models["qwen2_5_vl"]
    ckpt = save_model(model, processor, tmp_path / "short")
    config = json.loads((ckpt / "config.json").read_text())
    config.setdefault("text_config", {})["max_position_embeddings"] = 64
    (ckpt / "config.json").write_text(json.dumps(config))
    path = _jsonl(tmp_path, [{"question": "what colour? " * 40, "answer": "red", "image": "a.png"}])
    err = _error(capsys, ["train", "--dry-run", "--model.path", str(ckpt), "--data.train", str(path)])
    assert f"{path}:1: prompt is " in err and "over the model's 64 positions (max_position_embeddings" in err


def test_the_dry_run_says_what_a_checkpoint_takes_and_refuses_a_disk_without_room(tmp_path, capsys, monkeypatch):
    import shutil
    from collections import namedtuple

    from atrl.rl.build import checkpoint_bytes
    from atrl.rl.recipe import load_recipe

    out = tmp_path / "run"
    capsys.readouterr()
    assert main(["train", "--dry-run", "--trl.output_dir", str(out)]) == 0
    assert "checkpoints: about 0.01 GiB each (weights and optimizer states" in capsys.readouterr().out
    from atrl.rl.build import _model_config

    from atrl.models.default import default_base_model
    from atrl.models.zoo import load_model

    config = _model_config(load_recipe(None))  # the embedded default base
    params = sum(p.numel() for p in load_model(default_base_model())[0].parameters())
    assert checkpoint_bytes(config, "float32") == params * 4 * 3  # weights + AdamW's two states
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))
    err = _error(capsys, ["train", "--dry-run", "--trl.output_dir", str(out)])
    assert f"trl.output_dir {out}: 0.00 GiB free, a checkpoint takes about 0.01 GiB" in err


def test_a_finished_run_says_where_a_step_went(tmp_path, capsys):
    """`atrl train` ends with the step's median time split into generation, credit and the rest, from the meters
    the run logged (time/generation_s, atrl/time/credit_share, TRL's step_time)."""
    from atrl.rl.health import step_time_summary

    history = [{"reward": 0.5, "step_time": 2.0, "time/generation_s": 1.5, "atrl/time/credit_share": 0.05},
               {"reward": 0.6, "step_time": 4.0, "time/generation_s": 3.0, "atrl/time/credit_share": 0.05},
               {"reward": 0.7, "step_time": 3.0, "time/generation_s": 2.0, "atrl/time/credit_share": 0.10}]
    line = step_time_summary(history)
    assert line == ("a step took 3.000 s (median of 3 logged steps): generation 2.000 s (67%), credit 0.150 s (5%), "
                    "scoring, forward/backward, optimizer 0.850 s (28%)")
    assert step_time_summary([{"loss": 1.0}]) is None
    out = tmp_path / "run"
    assert main(["train", "--trl.output_dir", str(out), "--trl.max_steps", "2", "--data.n", "8",
                 "--trl.per_device_train_batch_size", "4", "--trl.num_generations", "4",
                 "--trl.max_completion_length", "8", "--trl.report_to", "[]", "--trl.disable_tqdm", "true",
                 "--trl.save_strategy", "no"]) == 0
    printed = capsys.readouterr().out
    assert "a step took" in printed and "generation" in printed and "median of 2 logged steps" in printed
