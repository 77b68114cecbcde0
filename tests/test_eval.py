"""atrl eval scoring on a hand-made MathVista fixture, analyze on a tiny model, and the report plots."""

import json

import numpy as np
import pytest
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
    result = score_responses(rows, [r[7] for r in ROWS])
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
    assert report["n"] == len(ROWS) and set(report["by_category"]) == {"math-targeted-vqa", "general-vqa"}
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
    assert summary["tokens"] > 100 and 0 < summary["anchor_fraction"] < 1
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
    assert html.count("class='tok") > 100 and "anchor" in html


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
    assert model.config.text_config._attn_implementation == "sdpa"  # the probe was detached


def test_plots_have_labelled_axes(tmp_path, monkeypatch):
    from atrl.viz import plots

    labels = []
    real_save = plots._save

    def spy(fig, out):
        labels.append([(ax.get_xlabel(), ax.get_ylabel()) for ax in fig.axes if ax.axison])
        return real_save(fig, out)

    monkeypatch.setattr(plots, "_save", spy)
    history = [{"step": i, "reward": 0.1 * i, "rewards/accuracy_reward/mean": 0.05 * i,
                "atrl/anchor_fraction": 0.15} for i in range(1, 6)]
    plots.training_curves(history, tmp_path / "curves.png")
    rng = np.random.default_rng(0)
    conn = np.concatenate([rng.normal(0.01, 0.003, 85), rng.normal(0.2, 0.02, 15)]).clip(0)
    plots.connectivity_histogram(conn, conn > 0.1, 0.8, tmp_path / "hist.png")
    assert len(labels) == 2 and all(x and y for fig in labels for x, y in fig), labels
    for name in ("curves.png", "hist.png"):
        assert Image.open(tmp_path / name).format == "PNG"


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
    with pytest.raises(ValueError, match="samples=2: several responses per row need a sampling temperature"):
        generate_responses(model, processor, rows, samples=2)
    with pytest.raises(ValueError, match="temperature=0"):
        generate_responses(model, processor, rows, temperature=0)
