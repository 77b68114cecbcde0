"""atrl eval scoring on a hand-made MathVista fixture, analyze on a tiny model, and the report plots."""

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from atrl.cli import main
from atrl.data.formats import load_samples, to_trl_dataset
from atrl.eval import score_responses

ROWS = [
    # pid, question_type, answer_type, answer, choices, precision, category, response, correct (by hand)
    ("1", "multi_choice", "text", "B", ["3", "5", "7"], None, "math-targeted-vqa",
     "<think>count</think><answer>(B)</answer>", True),
    ("2", "multi_choice", "text", "C", ["red", "blue", "green"], None, "general-vqa",
     "The answer is blue.", False),                      # blue is option B, not C
    ("3", "free_form", "integer", "12", None, None, "math-targeted-vqa",
     "so \\boxed{12}", True),
    ("4", "free_form", "float", "2.5", None, 1.0, "math-targeted-vqa",
     "<answer>2.54</answer>", True),                     # rounds to 2.5 at one decimal
    ("5", "free_form", "float", "0.33", None, 2.0, "general-vqa",
     "<answer>1/3</answer>", True),                      # 0.333.. rounds to 0.33
    ("6", "free_form", "text", "Cheetah", None, None, "general-vqa",
     "<answer>the cheetah</answer>", True),
    ("7", "free_form", "list", "[1, 2, 3]", None, None, "math-targeted-vqa",
     "<answer>1, 3, 2</answer>", False),                 # order matters
    ("8", "free_form", "integer", "40", None, None, "general-vqa",
     "I cannot tell.", False),
]


@pytest.fixture
def mathvista(tmp_path):
    Image.new("RGB", (30, 30), "white").save(tmp_path / "img.png")
    data = {pid: {"question": f"q{pid}", "image": "img.png", "choices": choices, "unit": None, "precision": prec,
                  "answer": answer, "question_type": qtype, "answer_type": atype,
                  "metadata": {"category": cat}, "query": f"q{pid}"}
            for pid, qtype, atype, answer, choices, prec, cat, _, _ in ROWS}
    path = tmp_path / "testmini.json"
    path.write_text(json.dumps(data))
    return path


def test_mathvista_fixture_is_scored_as_computed_by_hand(mathvista):
    samples, _ = load_samples(mathvista)
    rows = [dict(r, metadata=json.loads(r["metadata"])) for r in to_trl_dataset(samples)]
    result = score_responses(rows, [r[7] for r in ROWS], scoring="reward")  # the RL reward's rules, by hand
    assert [r["correct"] for r in result.rows] == [r[8] for r in ROWS]
    # by hand: 5 of 8 right; math-targeted-vqa 3 of 4 (pids 1, 3, 4 right, 7 wrong); general-vqa 2 of 4 (5, 6)
    assert result.accuracy == pytest.approx(5 / 8)
    assert result.by_category == {"math-targeted-vqa": {"n": 4, "accuracy": 0.75},
                                  "general-vqa": {"n": 4, "accuracy": 0.5}}
    md = result.to_markdown()
    assert "62.5%" in md and "| general-vqa | 4 | 50.0% |" in md


def test_eval_and_analyze_commands_on_a_tiny_checkpoint(tmp_path, tiny_models, mathvista, capsys):
    from atrl.models.zoo import save_model

    model, processor = tiny_models["qwen2_5_vl"]
    ckpt = tmp_path / "ckpt"
    save_model(model, processor, ckpt)
    assert main(["eval", "--model", str(ckpt), "--data", str(mathvista), "--out", str(tmp_path / "ev"),
                 "--max-new-tokens", "8"]) == 0
    report = json.loads((tmp_path / "ev" / "eval.json").read_text())
    # a data file is scored whole unless --n says otherwise (MathVista's testmini is 1,000 rows)
    assert report["n"] == len(ROWS) and set(report["by_category"]) == {"math-targeted-vqa", "general-vqa"}
    capsys.readouterr()
    assert main(["eval", "--model", str(ckpt), "--data", str(mathvista), "--n", "2", "--out", str(tmp_path / "ev1"),
                 "--max-new-tokens", "8"]) == 0
    assert f"--n 2: the first 2 of {len(ROWS)} rows" in capsys.readouterr().out
    assert json.loads((tmp_path / "ev1" / "eval.json").read_text())["n"] == 2
    assert main(["eval", "--model", str(ckpt), "--n", "6", "--out", str(tmp_path / "ev2"),
                 "--max-new-tokens", "8"]) == 0
    default_task = json.loads((tmp_path / "ev2" / "eval.json").read_text())
    assert [(c, v["n"]) for c, v in default_task["by_category"].items()] == [("quadrant", 6)]  # colour tiles
    assert main(["eval", "--model", str(ckpt), "--n", "4", "--families", "count", "bar_value", "--temperature",
                 "1.0", "--samples", "2", "--out", str(tmp_path / "ev3"), "--max-new-tokens", "8"]) == 0
    sampled = json.loads((tmp_path / "ev3" / "eval.json").read_text())
    assert sampled["n"] == 8 and {c: v["n"] for c, v in sampled["by_category"].items()} == {"count": 4, "bar_value": 4}
    assert main(["analyze", "--model", str(ckpt), "--n", "6", "--out", str(tmp_path / "an")]) == 0
    summary = json.loads((tmp_path / "an" / "analysis.json").read_text())
    assert summary["tokens"] == 6 * 13  # six reference traces of the default task, 13 tokens each
    assert 0 < summary["anchor_fraction"] < 1
    # random baseline: precision = base rate of perception tokens, recall = anchor fraction
    assert summary["random_recall"] == pytest.approx(summary["anchor_fraction"])
    assert 0 < summary["random_precision"] < 1
    assert main(["analyze", "--model", str(ckpt), "--n", "6", "--out", str(tmp_path / "an1"),
                 "--probe-layers", "0", "--region-grid", "2", "2"]) == 0
    other = json.loads((tmp_path / "an1" / "analysis.json").read_text())
    assert other["tokens"] == summary["tokens"] and other["anchor_fraction"] != summary["anchor_fraction"]
    capsys.readouterr()
    assert main(["analyze", "--model", str(ckpt), "--n", "2", "--out", str(tmp_path / "an2"),
                 "--probe-layers", "9"]) == 2
    assert "probe layers [9] out of range: the decoder has 4 layers" in capsys.readouterr().err
    for name in ("connectivity_histogram.png", "anchors.png", "token_heatmap.png"):
        img = Image.open(tmp_path / "an" / name)
        assert img.format == "PNG" and img.width > 300
    html = (tmp_path / "an" / "anchors.html").read_text()
    assert html.count("class='tok") == summary["tokens"] and "anchor" in html


def test_analyze_on_a_data_file_reads_the_models_own_responses(tmp_path, tiny_models, mathvista, capsys):
    """A data file has no reference traces: analyze probes the model's greedy responses, the very ones `atrl eval`
    scores; precision and recall are n/a (null in analysis.json), not made up."""
    from atrl.models.zoo import save_model

    model, processor = tiny_models["qwen2_5_vl"]
    ckpt = tmp_path / "ckpt"
    save_model(model, processor, ckpt)
    common = ["--model", str(ckpt), "--data", str(mathvista), "--max-new-tokens", "12"]
    assert main(["eval", *common, "--out", str(tmp_path / "ev")]) == 0
    scored = json.loads((tmp_path / "ev" / "eval.json").read_text())["rows"]
    capsys.readouterr()
    assert main(["analyze", *common, "--out", str(tmp_path / "an")]) == 0
    printed = capsys.readouterr().out
    assert f"the model's greedy responses to {len(ROWS)} prompts" in printed
    assert "anchor_precision, anchor_recall, random_precision, random_recall: n/a" in printed
    summary = json.loads((tmp_path / "an" / "analysis.json").read_text())
    assert summary["anchor_precision"] is None and summary["random_recall"] is None
    assert 0 < summary["anchor_fraction"] < 1 and summary["tokens"] > len(ROWS)
    html = (tmp_path / "an" / "anchors.html").read_text()
    assert "no perception spans" in html and (tmp_path / "an" / "token_heatmap.png").exists()
    analysed = [r["response"] for r in scored if r["response"]]  # an empty response has no tokens to analyse
    assert summary["skipped"] == len(ROWS) - len(analysed)
    assert all(html.count(f"&middot; {r['uid']}<") == 1 for r in scored if r["response"])
    assert main(["analyze", *common, "--responses", "reference", "--out", str(tmp_path / "an1")]) == 2
    assert "a data file has no reference traces" in capsys.readouterr().err


def test_analyze_reads_rows_as_it_reads_synthetic_examples(tiny_models):
    """The same task as a synthetic Example and as a data-set row (to_hf_dataset), with the same response: the
    same tokens, connectivity and anchors. A row without an image is analysed too, at zero connectivity."""
    from atrl.data.synthetic import generate, to_hf_dataset
    from atrl.eval.analyze import analyze

    model, processor = tiny_models["qwen2_5_vl"]
    examples = generate(3, seed=5)
    responses = [ex.reasoning for ex in examples]
    rows = [dict(r) for r in to_hf_dataset(examples)]
    a = analyze(model, processor, examples, responses=responses)
    b = analyze(model, processor, rows, responses=responses)
    for va, vb in zip(a.views, b.views, strict=True):
        assert va.tokens == vb.tokens and va.family == vb.family
        np.testing.assert_allclose(va.conn, vb.conn, rtol=0, atol=1e-7)
        assert (va.anchor == vb.anchor).all()
    assert np.isnan(a.precision) and np.isnan(b.recall)  # given responses: no perception spans to score against
    textonly = dict(rows[0], image=None, prompt=[{"role": m["role"], "content": [c for c in m["content"]
                                                                                if c["type"] == "text"]}
                                                  for m in rows[0]["prompt"]])
    c = analyze(model, processor, [textonly], responses=responses[:1])
    assert c.views[0].image is None and np.abs(c.views[0].conn).max() == 0
    with pytest.raises(ValueError, match="data-set row, which has no reference trace"):
        analyze(model, processor, rows)


def test_analyze_precision_recall_by_hand(tiny_models):
    from atrl.data.synthetic import generate
    from atrl.eval.analyze import analyze

    model, processor = tiny_models["qwen2_5_vl"]
    examples = generate(5, seed=3)
    result = analyze(model, processor, examples)
    anchors = np.concatenate([v.anchor for v in result.views])
    percep = np.concatenate([v.perception for v in result.views])
    assert result.precision == pytest.approx((anchors & percep).sum() / anchors.sum())
    assert result.recall == pytest.approx((anchors & percep).sum() / percep.sum())
    # perception flags follow the character spans: the tokens of each span's text are flagged
    v, ex = result.views[0], examples[0]
    flagged = "".join(t for t, p in zip(v.tokens, v.perception) if p)
    assert flagged == "".join(ex.perception_texts())
    # ROC AUC of connectivity for the perception tokens, counted pair by pair (Mann-Whitney: ties count a half)
    conn = result.connectivity
    pos, neg = conn[percep], conn[~percep]
    pairs = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    assert result.perception_auc == pytest.approx(pairs / (pos.size * neg.size))
    assert result.summary()["random_auc"] == 0.5
    assert model.config.text_config._attn_implementation == "sdpa"  # the probe was detached


def test_plots_have_labelled_axes(tmp_path, monkeypatch):
    from atrl.viz import plots

    figures = _figures_saved(monkeypatch)
    history = [{"step": i, "reward": 0.1 * i, "rewards/accuracy_reward/mean": 0.05 * i,
                "atrl/anchor_fraction": 0.15} for i in range(1, 6)]
    plots.training_curves(history, tmp_path / "curves.png")
    rng = np.random.default_rng(0)
    conn = np.concatenate([rng.normal(0.01, 0.003, 85), rng.normal(0.2, 0.02, 15)]).clip(0)
    plots.connectivity_histogram(conn, conn > 0.1, 0.8, tmp_path / "hist.png")
    assert len(figures) == 2 and all(ax["x"] and ax["y"] for fig in figures for ax in fig), figures
    for name in ("curves.png", "hist.png"):
        assert Image.open(tmp_path / name).format == "PNG"


def _figures_saved(monkeypatch):
    """Spy on atrl.viz.plots._save: the list of figures saved, inspected before they are closed."""
    from atrl.viz import plots

    figures = []
    real_save = plots._save

    def spy(fig, out):
        figures.append([{"title": ax.get_title(), "x": ax.get_xlabel(), "y": ax.get_ylabel(),
                         "lines": {ln.get_label(): ln.get_xydata().copy() for ln in ax.get_lines()
                                   if not ln.get_label().startswith("_")},  # unlabelled: faint raw, guides
                         "texts": [t.get_text() for t in ax.texts]} for ax in fig.axes])
        return real_save(fig, out)

    monkeypatch.setattr(plots, "_save", spy)
    return figures


def trailing3_of(values):
    """Trailing means over up to three points, by hand."""
    return [sum(values[max(0, k - 2):k + 1]) / len(values[max(0, k - 2):k + 1]) for k in range(len(values))]


def test_training_report_overlays_runs_and_says_what_was_not_logged(tmp_path, monkeypatch):
    from atrl.viz.plots import REPORT_PANELS, training_report

    figures = _figures_saved(monkeypatch)
    atrl = [{"step": i, "reward": 0.1 * i, "rewards/accuracy_reward/mean": 0.05 * i, "rewards/len_penalty/mean": -0.1,
             "atrl/anchor_fraction": 0.15, "atrl/anchor_credit_share": 0.4, "atrl/anchor_conn": 0.2,
             "atrl/other_conn": 0.01,
             "atrl/bimodality": 0.6 + 0.01 * i, "atrl/weight_max": 3.0, "atrl/weight_min": 0.5, "atrl/weight_std": 0.8,
             "completions/mean_length": 40 + i, "completions/clipped_ratio": 0.1 * i, "entropy": 0.5,
             "step_time": 2.0 + i,
             "atrl/time/credit_share": 0.01} for i in range(1, 7)]
    atrl += [{"step": 3, "eval_reward": 0.3, "eval_rewards/accuracy_reward/mean": 0.2},  # TRL's evaluation
             {"step": 6, "eval_reward": 0.5, "eval_rewards/accuracy_reward/mean": 0.4},
             {"step": 6, "train_runtime": 12.0}]  # the summary entry a finished run ends with
    uniform = [{"step": i, "reward": 0.08 * i, "rewards/accuracy_reward/mean": 0.04 * i, "step_time": 2.0,
                "entropy": float("nan") if i == 2 else 0.4} for i in range(1, 7)]
    out = training_report({"a (atrl)": atrl, "u (uniform)": uniform}, tmp_path / "report.png", smooth=3)
    assert Image.open(out).format == "PNG"
    (axes,) = figures
    axes, (twin,) = axes[:len(REPORT_PANELS)], axes[len(REPORT_PANELS):]
    assert [ax["title"] for ax in axes] == [p[0] for p in REPORT_PANELS]
    assert all(ax["x"] == "training step" and ax["y"] for ax in axes)
    # the length panel's second axis: the share of completions cut at the limit, for the run that logged it
    assert twin["y"] == "share of completions cut at the limit"
    assert list(twin["lines"]) == ["a (atrl): cut at max_completion_length"]
    assert np.allclose(twin["lines"]["a (atrl): cut at max_completion_length"][:, 1],
                       trailing3_of([0.1 * i for i in range(1, 7)]))
    by_title = {ax["title"]: ax for ax in axes}
    reward = by_title["Reward"]["lines"]
    # every reward function a run logged, labelled by run; smoothed: the trailing mean over 3 logged points
    assert {"a (atrl): total reward", "a (atrl): len penalty", "u (uniform): accuracy reward"} <= set(reward)
    assert "u (uniform): len penalty" not in reward
    trailing3 = trailing3_of

    assert np.allclose(reward["a (atrl): total reward"][:, 1], trailing3([0.1 * i for i in range(1, 7)]))
    held_out = by_title["Held-out reward (data.eval)"]["lines"]
    assert set(held_out) == {"a (atrl): total reward", "a (atrl): accuracy reward"}  # the uniform run had no eval
    assert held_out["a (atrl): total reward"][:, 0].tolist() == [3, 6]
    assert np.allclose(held_out["a (atrl): total reward"][:, 1], [0.3, 0.4])  # smoothed over what was logged
    anchors = by_title["Anchors' share"]["lines"]  # the tokens' and the credit's, for the run that logged them
    assert list(anchors) == ["a (atrl): anchor fraction of tokens", "a (atrl): anchors' credit share"]
    assert np.allclose(anchors["a (atrl): anchors' credit share"][:, 1], 0.4)
    assert not by_title["Anchors' share"]["texts"]
    entropy = by_title["Policy entropy"]["lines"]["u (uniform): entropy"]
    assert entropy[:, 0].tolist() == [1, 3, 4, 5, 6]  # the NaN step is left out, not drawn as zero
    # credit per optimizer step: the logged share times the step time, for the run that logged them
    credit = by_title["Time"]["lines"]["a (atrl): credit in the training loop"]
    assert np.allclose(credit[:, 1], trailing3([0.01 * (2.0 + i) for i in range(1, 7)]))
    training_report({"u (uniform)": uniform}, tmp_path / "uniform.png")
    single = {ax["title"]: ax for ax in figures[1]}
    assert single["Connectivity"]["texts"] == ["not logged by these runs"] and not single["Connectivity"]["lines"]
    assert single["Held-out reward (data.eval)"]["texts"] == ["no held-out data in these runs\n(recipe: data.eval)"]
    assert "total reward" in single["Reward"]["lines"]  # one run: series are named without the run
    with pytest.raises(ValueError, match="smooth=0"):
        training_report({"u": uniform}, tmp_path / "x.png", smooth=0)
    with pytest.raises(ValueError, match="no runs"):
        training_report({}, tmp_path / "x.png")


def test_run_history_reads_the_furthest_complete_state(tmp_path):
    from atrl.rl.checkpoints import mark_checkpoint_complete, run_history

    def state(folder, step, complete=True):
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "trainer_state.json").write_text(json.dumps(
            {"global_step": step, "log_history": [{"step": s, "reward": s / 10} for s in range(1, step + 1)]}))
        if complete and folder.name.startswith("checkpoint-"):
            mark_checkpoint_complete(folder, step)

    run = tmp_path / "run"
    state(run / "checkpoint-5", 5)
    state(run / "checkpoint-9", 9, complete=False)  # killed while writing: not read
    history, source = run_history(run)
    assert source == run / "checkpoint-5" / "trainer_state.json" and len(history) == 5
    state(run, 7)  # a finished run's own state
    assert run_history(run)[1] == run / "trainer_state.json"
    assert run_history(run / "checkpoint-5")[0][-1]["step"] == 5  # a checkpoint folder on its own
    (run / "checkpoint-5" / "trainer_state.json").write_text("{not json")
    with pytest.raises(ValueError, match="checkpoint-5/trainer_state.json: not a trainer state"):
        run_history(run)
    with pytest.raises(FileNotFoundError, match="no trainer_state.json"):
        run_history(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        run_history(tmp_path / "missing")


def test_sampled_evaluation_repeats_rows_and_matches_greedy_when_cold(tiny_models):
    """Sampling at a vanishing temperature gives the greedy responses; at temperature 1 the samples differ."""
    from atrl.data.synthetic import generate, to_hf_dataset
    from atrl.eval.score import evaluate, generate_responses

    model, processor = tiny_models["qwen2_5_vl"]
    rows = [dict(r) for r in to_hf_dataset(generate(3, seed=8))]
    greedy = generate_responses(model, processor, rows, max_new_tokens=12)
    cold = generate_responses(model, processor, rows, max_new_tokens=12, temperature=1e-4, samples=2)
    assert cold == [g for g in greedy for _ in range(2)]
    hot = generate_responses(model, processor, rows, max_new_tokens=12, temperature=1.0, samples=3, seed=1)
    assert hot == generate_responses(model, processor, rows, max_new_tokens=12, temperature=1.0, samples=3, seed=1)
    assert len(set(hot)) > len(rows)  # a random tiny model's samples differ from each other
    result = evaluate(model, processor, rows, max_new_tokens=12, temperature=1.0, samples=3, seed=1)
    assert result.n == 9 and [r["uid"] for r in result.rows] == [r["uid"] for r in rows for _ in range(3)]
    assert [r["response"] for r in result.rows] == hot
    assert set(result.pass_at_k) == {1, 2, 3} and result.pass_at_k[1] == pytest.approx(result.accuracy)
    assert "(3 questions, 3 sampled answers each; standard error " in result.to_markdown()
    with pytest.raises(ValueError, match="samples=2: several responses per row need a sampling temperature"):
        generate_responses(model, processor, rows, samples=2)
    with pytest.raises(ValueError, match="temperature=0"):
        generate_responses(model, processor, rows, temperature=0)


def test_eval_decodes_as_training_rollouts_whatever_the_checkpoints_generation_config(tiny_models):
    """No repetition penalty unless asked (Qwen2.5-VL-Instruct's generation_config sets 1.05; TRL's rollouts use
    1.0), and never an image token (TRL suppresses it: re-read with the image, it would mismatch the features)."""
    import copy

    from atrl.data.synthetic import generate, to_hf_dataset
    from atrl.eval.score import _images, generate_responses

    base, processor = tiny_models["qwen2_5_vl"]
    model = copy.deepcopy(base)
    rows = [dict(r) for r in to_hf_dataset(generate(2, seed=4))]
    tok = processor.tokenizer
    tok.padding_side = "left"
    batch = processor(text=[processor.apply_chat_template(r["prompt"], add_generation_prompt=True) for r in rows],
                      images=[_images(r) for r in rows], return_tensors="pt", padding=True)
    plain = model.generate(**batch, max_new_tokens=12, do_sample=False, repetition_penalty=1.0,
                           pad_token_id=tok.pad_token_id)[:, batch["input_ids"].shape[1]:]
    expected = tok.batch_decode(plain, skip_special_tokens=True)
    model.generation_config.repetition_penalty = 50.0
    assert generate_responses(model, processor, rows, max_new_tokens=12) == expected
    assert generate_responses(model, processor, rows, max_new_tokens=12, repetition_penalty=50.0) != expected
    image_id = model.config.image_token_id

    def favour_image_token(module, args, output):
        output.logits[..., image_id] += 1e4
        return output

    model.register_forward_hook(favour_image_token)
    batch = batch.to(next(model.parameters()).device)
    raw = model.generate(**batch, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
    assert (raw[:, batch["input_ids"].shape[1]:] == image_id).all()  # the hook works: unsuppressed, it wins
    made = []  # the token ids generate_responses gets (its text leaves special tokens such as the image's out)
    real_generate = model.generate
    model.generate = lambda **kw: made.append(real_generate(**kw)) or made[-1]
    generate_responses(model, processor, rows, max_new_tokens=4)
    assert made and not (made[0][:, batch["input_ids"].shape[1]:] == image_id).any()


def test_pass_at_k_against_every_draw():
    """The estimator against the fraction of all k-subsets of a question's samples that hold a right answer."""
    from itertools import combinations

    from atrl.eval.score import pass_at_k

    n = 5
    for correct in ([0], [5], [2], [1, 3, 0, 4]):
        for k in range(1, n + 1):
            draws = [sum(any(s < c for s in subset) for subset in combinations(range(n), k))
                     / len(list(combinations(range(n), k))) for c in correct]
            assert pass_at_k(n, correct, k) == pytest.approx(sum(draws) / len(draws))
    with pytest.raises(ValueError, match="pass@6 needs 1 <= k <= 5"):
        pass_at_k(5, [1], 6)


def test_responses_cut_at_the_token_limit_are_counted():
    """Against each response's full length, generated one by one with a limit it never reaches: a response is cut
    at 64 tokens exactly when it needs more (its end-of-turn token included). The default model's answers are
    about 70 tokens (its tokenizer is byte-level), so 64 cuts most of them."""
    from atrl.data.synthetic import DEFAULT_FAMILIES, DEFAULT_KNOBS, generate, knobs_from_mapping, to_hf_dataset
    from atrl.eval.score import _images, evaluate
    from atrl.models.default import default_base_model
    from atrl.models.zoo import load_model

    model, processor = load_model(default_base_model())
    rows = [dict(r) for r in to_hf_dataset(generate(6, seed=3, families=DEFAULT_FAMILIES,
                                                    knobs=knobs_from_mapping(DEFAULT_KNOBS)))]
    ends = {processor.tokenizer.eos_token_id, *[model.generation_config.eos_token_id]}
    lengths = []
    for row in rows:
        text = processor.apply_chat_template(row["prompt"], add_generation_prompt=True)
        batch = processor(text=[text], images=[_images(row)], return_tensors="pt")
        new = model.generate(**batch, max_new_tokens=256, do_sample=False)[0, batch["input_ids"].shape[1]:].tolist()
        assert any(t in ends for t in new)
        lengths.append(next(i for i, t in enumerate(new) if t in ends) + 1)
    result = evaluate(model, processor, rows, max_new_tokens=64, batch_size=1)
    assert [r["truncated"] for r in result.rows] == [n > 64 for n in lengths]
    assert result.truncated == sum(n > 64 for n in lengths) > 0
    assert "cut at the token limit" in result.to_markdown()
    assert evaluate(model, processor, rows, max_new_tokens=256, batch_size=1).truncated == 0


def _scored(pattern: list[bool], categories: list[str]):
    """An EvalResult whose i-th answer is right exactly where pattern[i] is (integer answers, '1' right)."""
    rows = [{"answer": "1", "answer_type": "integer", "family": cat, "uid": str(i)}
            for i, cat in enumerate(categories)]
    return score_responses(rows, [f"<answer>{1 if ok else 2}</answer>" for ok in pattern])


def test_standard_error_of_accuracy_is_over_questions_against_scipy():
    from scipy.stats import sem

    pattern = [True, False, False, True, True, True, False, True, False, False, True, True]
    greedy = _scored(pattern, ["a"] * 12)
    assert greedy.standard_error == pytest.approx(sem(np.array(pattern, dtype=float)))
    sampled = dataclasses.replace(greedy, samples=3)  # four questions, three answers each, one after another
    assert sampled.standard_error == pytest.approx(sem([1 / 3, 1, 1 / 3, 2 / 3]))
    assert dataclasses.replace(greedy, rows=greedy.rows[:1]).standard_error == 0.0


def test_compare_results_against_hand_counts_and_scipy():
    from scipy.stats import binomtest

    from atrl.eval.compare import compare_results, mcnemar_exact

    cats = ["a", "a", "a", "a", "b", "b", "b", "b"]
    base = [True, True, False, False, True, False, True, False]
    new = [True, False, True, True, True, True, True, False]
    comparison = compare_results({"base": _scored(base, cats), "new": _scored(new, cats)}, seed=3)
    d = comparison.differences["new"]
    # by hand: new alone right on questions 2, 3, 5; base alone on 1
    assert (d.only_model_right, d.only_baseline_right) == (3, 1)
    assert d.accuracy_difference == pytest.approx(6 / 8 - 4 / 8)
    assert d.mcnemar_p == pytest.approx(binomtest(1, 4, 0.5).pvalue)  # = 2 * 5/16
    for k, m in [(0, 1), (3, 10), (7, 20), (12, 25)]:
        assert mcnemar_exact(k, m - k) == pytest.approx(binomtest(k, m, 0.5).pvalue)
    assert d.ci_low < d.accuracy_difference < d.ci_high
    assert comparison.by_category == {"a": {"n": 4, "base": 0.5, "new": 0.75}, "b": {"n": 4, "base": 0.5, "new": 0.75}}
    same = compare_results({"x": _scored(base, cats), "y": _scored(base, cats)}).differences["y"]
    assert (same.accuracy_difference, same.ci_low, same.ci_high, same.mcnemar_p) == (0, 0, 0, 1)
    # two sampled answers per question: per-question accuracy, no McNemar
    two = compare_results({"base": _scored(base, [c for c in cats[::2] for _ in (0, 1)]),
                           "new": _scored(new, [c for c in cats[::2] for _ in (0, 1)])}, samples=2)
    assert two.n == 4 and two.differences["new"].mcnemar_p is None
    assert two.pass_at_k == {}  # results made without evaluate's samples know no pass@k
    assert two.accuracy == {"base": pytest.approx(0.5), "new": pytest.approx(0.75)}
    md = comparison.to_markdown()
    assert "| `new` | 75.0% | +25.0 points |" in md and "| 3 / 1 | 0.625 |" in md
    with pytest.raises(ValueError, match="scored on other questions"):
        compare_results({"x": _scored(base, cats), "y": _scored(base, cats[::-1])})


def test_default_output_is_a_folder_per_model_which_a_comparison_reuses(tmp_path, tiny_models, monkeypatch, capsys):
    """Without --out, one model's eval goes to atrl-eval/<model>/ (evaluating another model does not meet its
    responses) and a comparison to atrl-eval/, with the same folder per model: what was answered alone is reused."""
    from atrl.models.zoo import save_model

    model, processor = tiny_models["qwen2_5_vl"]
    for name in ("a", "b"):
        save_model(model, processor, tmp_path / name)
    monkeypatch.chdir(tmp_path)
    common = ["eval", "--n", "2", "--max-new-tokens", "4"]
    assert main([*common, "--model", "a"]) == 0 and main([*common, "--model", "b"]) == 0
    assert all((tmp_path / "atrl-eval" / name / "eval.json").is_file() for name in ("a", "b"))
    capsys.readouterr()
    assert main([*common, "--model", "a", "b"]) == 0
    out = capsys.readouterr().out
    assert out.count("2 questions answered by an earlier run") == 2  # neither model answered again
    assert (tmp_path / "atrl-eval" / "compare.json").is_file()


def test_comparison_plot_puts_a_runs_checkpoints_on_the_step_axis(tmp_path, monkeypatch):
    from atrl.eval.compare import compare_results
    from atrl.viz.plots import comparison_plot

    figures = _figures_saved(monkeypatch)
    cats = ["a", "a", "b", "b", "b", "a"]
    late = [True, True, True, False, True, True]
    early = [True, False, False, False, True, False]
    run = tmp_path / "runs" / "atrl"
    results = {str(run / "checkpoint-200"): _scored(late, cats), str(run / "checkpoint-100"): _scored(early, cats)}
    comparison = compare_results(results, seed=1)
    for label, (low, high) in comparison.accuracy_ci.items():
        assert low <= comparison.accuracy[label] <= high
    assert comparison_plot(comparison, tmp_path / "compare.png").exists()
    (ax,) = figures[0]
    assert ax["x"] == "training step (atrl)" and ax["y"] == "accuracy, %"
    overall = ax["lines"]["all questions"]
    assert overall[:, 0].tolist() == [100, 200]  # by step, whatever the order given
    assert np.allclose(overall[:, 1], [100 * 2 / 6, 100 * 5 / 6])
    assert np.allclose(ax["lines"]["b (n=3)"][:, 1], [100 / 3, 200 / 3])
    other = compare_results({"base": _scored(early, cats), "new": _scored(late, cats)})
    comparison_plot(other, tmp_path / "other.png")
    assert figures[1][0]["x"] == "model" and figures[1][0]["lines"]["all questions"][:, 0].tolist() == [0, 1]
    perfect = compare_results({"x": _scored([True] * 6, cats), "y": _scored([True] * 6, cats)})
    assert perfect.accuracy_ci == {"x": [1.0, 1.0], "y": [1.0, 1.0]}


def test_eval_compares_checkpoints_on_the_same_questions(tmp_path, tiny_models, capsys):
    from atrl.models.zoo import save_model

    model, processor = tiny_models["qwen2_5_vl"]
    for name in ("a", "b"):
        save_model(model, processor, tmp_path / name)
    common = ["eval", "--n", "6", "--max-new-tokens", "8", "--out", str(tmp_path / "ev")]
    assert main([*common, "--model", str(tmp_path / "a"), str(tmp_path / "b")]) == 0
    comparison = json.loads((tmp_path / "ev" / "compare.json").read_text())
    each = [json.loads(p.read_text()) for p in sorted((tmp_path / "ev").glob("*/eval.json"))]
    assert len(each) == 2 and each[0]["rows"] == each[1]["rows"]  # the same weights answer the same
    diff = comparison["differences"][str(tmp_path / "b")]
    assert comparison["n"] == 6 and diff["accuracy_difference"] == 0 and diff["mcnemar_p"] == 1
    sampled = ["eval", "--n", "3", "--max-new-tokens", "8", "--temperature", "1.0", "--samples", "2"]
    assert main([*sampled, "--out", str(tmp_path / "evs"), "--model", str(tmp_path / "a"), str(tmp_path / "b")]) == 0
    comparison = json.loads((tmp_path / "evs" / "compare.json").read_text())
    for label in (str(tmp_path / "a"), str(tmp_path / "b")):
        assert list(comparison["pass_at_k"][label]) == ["1", "2"]
        assert comparison["pass_at_k"][label]["1"] == pytest.approx(comparison["accuracy"][label])
    assert "| model | pass@1 | pass@2 |" in (tmp_path / "evs" / "compare.md").read_text()
    assert Image.open(tmp_path / "evs" / "compare.png").format == "PNG"
    run = tmp_path / "run"
    for step in (1000, 200):
        save_model(model, processor, run / f"checkpoint-{step}")
    capsys.readouterr()
    assert main(["eval", "--n", "2", "--max-new-tokens", "4", "--out", str(tmp_path / "evc"), "--model",
                 str(run / "checkpoint-1000"), str(run / "checkpoint-200")]) == 0  # as a shell's checkpoint-* sorts
    assert json.loads((tmp_path / "evc" / "compare.json").read_text())["labels"] == [
        str(run / "checkpoint-200"), str(run / "checkpoint-1000")]
    assert "by step; the baseline is the earliest" in capsys.readouterr().out
    capsys.readouterr()
    assert main([*common, "--model", str(tmp_path / "a"), str(tmp_path / "a")]) == 2
    assert "names a checkpoint twice" in capsys.readouterr().err
    assert main([*common, "--model", str(tmp_path / "a"), "--max-pixels", "100"]) == 2  # below the tiny minimum
    assert "--min-pixels=12544 is above --max-pixels=100 (the processor's own minimum" in capsys.readouterr().err


def test_run_eval_from_python_gives_what_the_command_writes(tmp_path, tiny_models, capsys):
    """`atrl.eval.run_eval` is the command without the CLI: the same results as the files `atrl eval` writes for
    the same models and rows, returned to the caller, with the comparison of the two."""
    from atrl.eval import run_eval
    from atrl.models.zoo import save_model

    model, processor = tiny_models["qwen2_5_vl"]
    for name in ("a", "b"):
        save_model(model, processor, tmp_path / name)
    models = [str(tmp_path / "a"), str(tmp_path / "b")]
    said: list[str] = []
    run = run_eval(models, n=4, max_new_tokens=6, out=tmp_path / "py", say=said.append)
    assert main(["eval", "--n", "4", "--max-new-tokens", "6", "--out", str(tmp_path / "cli"), "--model", *models]) == 0
    assert list(run.results) == models and run.out == tmp_path / "py"
    for path, folder in zip(models, sorted((tmp_path / "cli").glob("*/eval.json"))):
        written = json.loads(folder.read_text())
        assert run.results[path].accuracy == pytest.approx(written["accuracy"])
        assert [r["response"] for r in run.results[path].rows] == [r["response"] for r in written["rows"]]
    assert run.comparison.n == 4 and (tmp_path / "py" / "compare.json") in run.files
    assert any("Checkpoints compared" in line for line in said)


def test_analyze_probes_a_trained_checkpoint_as_its_run_did(tmp_path, tiny_models, capsys):
    """A run's final/ is analysed with the probe and credit settings of the run's recipe.yaml (layers, region grid,
    sink debiasing, anchor_ratio): the same numbers as `analyze` called with them; flags still override."""
    from atrl.credit import CreditOptions
    from atrl.data.synthetic import DEFAULT_FAMILIES, DEFAULT_KNOBS, generate, knobs_from_mapping
    from atrl.eval.analyze import analyze
    from atrl.models.zoo import save_model
    from atrl.rl.recipe import load_recipe, recipe_text

    model, processor = tiny_models["qwen2_5_vl"]
    run = tmp_path / "run"
    save_model(model, processor, run / "final")
    recipe = load_recipe(None, ["--anchor.probe_layers", "[1]", "--anchor.region_grid", "[2, 2]",
                                "--anchor.sink_debias", "none", "--anchor.credit.anchor_ratio", "0.4"])
    (run / "recipe.yaml").write_text(recipe_text(recipe))
    assert main(["analyze", "--model", str(run / "final"), "--n", "4", "--seed", "7", "--out", str(tmp_path / "a")]) == 0
    assert f"settings of the training run: {run / 'recipe.yaml'}" in capsys.readouterr().out
    got = json.loads((tmp_path / "a" / "analysis.json").read_text())
    tasks = generate(4, seed=7, families=list(DEFAULT_FAMILIES), knobs=knobs_from_mapping(DEFAULT_KNOBS))
    expected = analyze(model, processor, tasks, layers=[1], region_grid=(2, 2), sink_debias="none",
                       credit=CreditOptions(anchor_ratio=0.4))
    assert got["tokens"] == expected.summary()["tokens"]
    assert got["anchor_fraction"] == pytest.approx(expected.anchor_fraction)
    assert got["bimodality"] == pytest.approx(expected.bimodality)
    assert got["anchor_fraction"] >= 0.4  # the run's anchor_ratio, not the default 0.15
    assert main(["analyze", "--model", str(run / "final"), "--n", "4", "--seed", "7", "--probe-layers", "0",
                 "--out", str(tmp_path / "b")]) == 0
    assert json.loads((tmp_path / "b" / "analysis.json").read_text())["bimodality"] != got["bimodality"]
    (run / "recipe.yaml").write_text("anchor: {mode: nope}\n")
    assert main(["analyze", "--model", str(run / "final"), "--n", "2", "--out", str(tmp_path / "c")]) == 2
    assert "its anchor section cannot be read" in capsys.readouterr().err


def _eval_json(folder):
    return json.loads((folder / "eval.json").read_text())


def test_an_interrupted_eval_continues_and_answers_each_question_once(tmp_path, tiny_models, mathvista, monkeypatch,
                                                                     capsys):
    """`atrl eval` keeps each response as it comes (<out>/responses/): the same command again answers only what is
    missing (a kill's half-written line included) and scores the same as an uninterrupted eval; other weights or
    generation settings are refused, not mixed in."""
    from atrl.eval import score
    from atrl.models.zoo import save_model

    model, processor = tiny_models["qwen2_5_vl"]
    ckpt = tmp_path / "ckpt"
    save_model(model, processor, ckpt)
    answered = []
    generate = score.generate_responses
    monkeypatch.setattr(score, "generate_responses", lambda m, p, rows, **kw: answered.extend(
        r["uid"] for r in rows) or generate(m, p, rows, **kw))
    common = ["eval", "--model", str(ckpt), "--data", str(mathvista), "--max-new-tokens", "8", "--batch-size", "1"]
    assert main([*common, "--out", str(tmp_path / "whole")]) == 0
    whole = _eval_json(tmp_path / "whole")
    answered.clear()
    out = tmp_path / "ev"
    assert main([*common, "--n", "3", "--out", str(out)]) == 0
    assert answered == ["1", "2", "3"]
    part = out / "responses" / "part-0.jsonl"
    lines = part.read_text().splitlines(keepends=True)
    part.write_bytes(("".join(lines[:2]) + lines[2][:25]).encode() + "×".encode()[:1])  # killed writing line 3,
    # in the middle of a two-byte character
    answered.clear()
    capsys.readouterr()
    assert main([*common, "--out", str(out)]) == 0
    assert answered == ["3", "4", "5", "6", "7", "8"]
    assert "2 questions answered by an earlier run" in capsys.readouterr().out
    assert _eval_json(out) == whole
    assert all(json.loads(line) for line in part.read_text().splitlines())  # the cut line is gone
    answered.clear()
    assert main([*common, "--out", str(out)]) == 0  # finished: rescored without answering anything
    assert answered == [] and _eval_json(out) == whole
    capsys.readouterr()  # other questions in the same folder: none of them counted as answered before
    assert main([*common, "--out", str(out), "--data", "synthetic", "--n", "2"]) == 0
    assert len(answered) == 2 and "answered by an earlier run" not in capsys.readouterr().out
    answered.clear()

    assert main([*common, "--out", str(out), "--max-new-tokens", "9"]) == 2
    assert "holds responses generated with other settings (max_new_tokens 8 -> 9)" in capsys.readouterr().err
    with torch.no_grad():
        model.lm_head.weight[0, 0] += 1.0  # trained further, saved to the same folder
    save_model(model, processor, ckpt)
    with torch.no_grad():
        model.lm_head.weight[0, 0] -= 1.0
    assert main([*common, "--out", str(out)]) == 2
    assert "(weights " in capsys.readouterr().err and answered == []
    assert main([*common, "--out", str(out), "--fresh"]) == 0
    assert len(answered) == len(ROWS)
    lines = (out / "responses" / "part-0.jsonl").read_text().splitlines()
    lines.insert(1, "{not json")
    (out / "responses" / "part-0.jsonl").write_text("\n".join(lines) + "\n")
    assert main([*common, "--out", str(out)]) == 2
    assert "part-0.jsonl, line 2: not a response entry" in capsys.readouterr().err


def test_a_resumed_evals_progress_counts_the_earlier_answers(tmp_path, tiny_models):
    from atrl.data.synthetic import generate, to_hf_dataset
    from atrl.eval.responses import ResponseLog
    from atrl.eval.score import evaluate

    model, processor = tiny_models["qwen2_5_vl"]
    rows = to_hf_dataset(generate(5, seed=2))
    log = ResponseLog(tmp_path / "responses", {"max_new_tokens": 6})
    evaluate(model, processor, rows.select(range(2)), max_new_tokens=6, log=log)
    advanced: list[int] = []
    result = evaluate(model, processor, rows, max_new_tokens=6, batch_size=2, log=log, progress=advanced.append)
    assert advanced == [2, 2, 1] and result.n == 5  # the two earlier answers first, then batches of the rest


def test_a_batch_out_of_memory_is_answered_in_halves(tiny_models, monkeypatch):
    from atrl.data.synthetic import generate, to_hf_dataset
    from atrl.eval import score

    model, processor = tiny_models["qwen2_5_vl"]
    rows = to_hf_dataset(generate(5, seed=6))
    one_by_one = score.evaluate(model, processor, rows, max_new_tokens=6, batch_size=1)
    real, sizes = score.generate_responses, []

    def small_memory(m, p, batch, **kw):
        sizes.append(len(batch))
        if len(batch) > 1:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(m, p, batch, **kw)

    monkeypatch.setattr(score, "generate_responses", small_memory)
    halved = score.evaluate(model, processor, rows, max_new_tokens=6, batch_size=5)
    assert sizes == [5, 2, 1, 1, 3, 1, 2, 1, 1]  # each batch that did not fit, in halves, in order
    assert halved.rows == one_by_one.rows
    monkeypatch.setattr(score, "generate_responses", lambda *a, **k: (_ for _ in ()).throw(torch.OutOfMemoryError()))
    with pytest.raises(torch.OutOfMemoryError):  # one prompt that does not fit: raised, not looped on
        score.evaluate(model, processor, rows.select(range(1)), max_new_tokens=6)


def test_two_processes_share_an_eval_and_score_as_one(tmp_path, tiny_models, mathvista):
    """Under `accelerate launch`, each process answers every other remaining question (after those an earlier,
    interrupted run answered) and the first scores them all: the same report as one process (one prompt per batch,
    so no padding differs)."""
    import os
    import subprocess
    import sys

    from atrl.models.zoo import save_model

    root = Path(__file__).resolve().parents[1]
    model, processor = tiny_models["qwen2_5_vl"]
    ckpt = tmp_path / "ckpt"
    save_model(model, processor, ckpt)
    common = ["eval", "--model", str(ckpt), "--data", str(mathvista), "--max-new-tokens", "8", "--batch-size", "1"]
    assert main([*common, "--out", str(tmp_path / "one")]) == 0
    out = tmp_path / "two"
    assert main([*common, "--n", "2", "--out", str(out)]) == 0  # an earlier run stopped after two questions
    proc = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                           str(root / "configs" / "accelerate" / "multi_cpu.yaml"), "--main_process_port", "29543",
                           "-m", "atrl.cli", *common, "--out", str(out)],
                          capture_output=True, text=True, timeout=180, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 processes, each answering 1 in 2 of the questions" in proc.stdout
    assert proc.stdout.count("Overall accuracy") == 1  # the first process reports
    assert _eval_json(out) == _eval_json(tmp_path / "one")
    parts = {p.name: len(p.read_text().splitlines()) for p in (out / "responses").glob("part-*.jsonl")}
    assert parts == {"part-0.jsonl": 2 + 3, "part-1.jsonl": 3}  # six left: three each
