import json

from PIL import Image

from atrl.cli import main


def test_demo_runs_end_to_end_and_writes_its_report(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--n-eval", "10", "--steps", "2"]) == 0
    printed = capsys.readouterr().out
    assert "held-out accuracy" in printed and "after 2 steps (atrl): greedy" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2 and 0 <= summary["accuracy_before"] <= 1 and 0 <= summary["accuracy_after"] <= 1
    assert 0 <= summary["sampled_accuracy_before"] <= 1 and 0 <= summary["sampled_accuracy_after"] <= 1
    assert summary["sampling"] == {"temperature": 0.7, "samples_per_task": 4}
    # The held-out tasks are the training mix: the embedded default's colour tiles.
    assert list(summary["by_family_before"]) == ["quadrant"] and summary["by_family_before"]["quadrant"]["n"] == 10
    assert 0 < summary["analysis"]["anchor_fraction"] < 1
    for name in ("tasks.png", "training_curves.png", "connectivity_histogram.png", "anchors.png", "token_heatmap.png"):
        assert Image.open(out / name).format == "PNG", name
    assert "<span class='tok" in (out / "anchors.html").read_text()
    assert (out / "run" / "final" / "model.safetensors").is_file()
    assert summary["files"]["training_report"] == str(out / "run" / "training_report.png")
    assert Image.open(out / "run" / "training_report.png").format == "PNG"
    assert (out / "run" / "anchors" / "step-000000.html").is_file()
    assert "credited tokens marked" in " ".join(printed.split())  # rich may wrap the line
    # the closing timing line: the demo's parts, and where a training step went
    assert set(summary["phases_s"]) == {"evaluation before", "training", "evaluation after", "analysis and figures"}
    assert all(v >= 0 for v in summary["phases_s"].values())
    joined = " ".join(printed.split())
    assert "time: evaluation before" in joined and "a step took" in joined and "generation" in joined


def test_demo_in_uniform_mode_still_analyses_anchors(tmp_path):
    """Plain GRPO picks no anchors; the report shows where AT-RL's partition puts them in the trained model."""
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--n-eval", "4", "--steps", "1", "--mode", "uniform"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["mode"] == "uniform"
    assert 0 < summary["analysis"]["anchor_fraction"] < 1 and 0 <= summary["analysis"]["anchor_precision"] <= 1


def test_demo_trains_and_evaluates_the_base_it_is_given(tmp_path, capsys):
    from atrl.models.zoo import build_tiny_vlm, save_model

    base = save_model(*build_tiny_vlm("idefics3", seed=0), tmp_path / "base")
    out = tmp_path / "demo"
    assert main(["demo", "--model", str(base), "--out", str(out), "--n-eval", "4", "--steps", "1",
                 "--trl.max_completion_length", "8"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["base_model"] == str(base)
    assert json.loads((out / "run" / "final" / "config.json").read_text())["model_type"] == "idefics3"
    assert main(["demo", "--model", str(tmp_path / "none"), "--out", str(tmp_path / "x")]) == 2
    assert str(tmp_path / "none") in capsys.readouterr().err


def test_the_video_demo_warm_starts_a_video_base_once_and_trains_on_video(tmp_path, monkeypatch, capsys):
    """`atrl demo --video`: the default base supervised on video traces (a short recipe here), cached under
    $ATRL_CACHE and reused; held-out video tasks before and after, the analysis on video prompts."""
    import atrl.models.default as default

    monkeypatch.setenv("ATRL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(default.VIDEO_BASE_RECIPE, "train_examples", 32)
    monkeypatch.setitem(default.VIDEO_BASE_RECIPE, "epochs", 1)
    out = tmp_path / "demo"
    assert main(["demo", "--video", "--out", str(out), "--n-eval", "6", "--steps", "1"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["base_model"] == str(tmp_path / "cache" / "video-base")
    assert list(summary["by_family_before"]) == ["colour_change"]
    assert 0 < summary["analysis"]["anchor_fraction"] < 1
    assert Image.open(out / "token_heatmap.png").format == "PNG"
    assert "looked most at frames" in (out / "anchors.html").read_text()
    recipe = (out / "run" / "recipe.yaml").read_text()
    assert "colour_change" in recipe and "time_bins: 3" in recipe
    built = (tmp_path / "cache" / "video-base" / "model.safetensors").stat().st_mtime
    assert main(["demo", "--video", "--out", str(tmp_path / "again"), "--n-eval", "2", "--steps", "1"]) == 0
    assert (tmp_path / "cache" / "video-base" / "model.safetensors").stat().st_mtime == built  # reused
