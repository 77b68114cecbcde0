from PIL import Image

from atrl.cli import main


def test_demo_runs_and_writes_its_report(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "demo"), "--n-eval", "2"]) == 0
    out = capsys.readouterr().out
    assert "accuracy" in out
    assert Image.open(tmp_path / "demo" / "tasks.png").format == "PNG"
    assert (tmp_path / "demo" / "base-model" / "config.json").is_file()
