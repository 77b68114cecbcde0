"""The GPU benchmark scripts run end to end (tiny shapes, CPU), so a lent GPU's minutes go to measuring.

These check that the scripts work and record what they claim to; the timings of a CPU smoke run mean nothing.
"""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(script: str, *args: str) -> str:
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], capture_output=True,
                          text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_probe_overhead_smoke(tmp_path):
    out = tmp_path / "probe.json"
    stdout = _run("probe_overhead.py", "--shape", "tiny", "--device", "cpu", "--reps", "2", "--decoder-reps", "3",
                  "--layer-reps", "4", "--warmup", "1", "--grid", "8", "--response", "16", "--out", str(out))
    errors = re.findall(r"probe vs eager softmax .*layer (\d+), (\w+) route(, last \d+ rows(?:, padding mask)?)?\): "
                        r"max abs error (\S+)", stdout)
    # the first and the middle decoder layer, both routes at each, the split one on the last rows at the first,
    # with and without a padding mask
    assert [(int(layer), route, rows) for layer, route, rows, _ in errors] == [
        (0, "fused", ""), (0, "split", ", last 37 rows"), (0, "split", ", last 37 rows, padding mask"),
        (2, "fused", ""), (2, "split", "")]
    assert all(float(err) <= 1e-5 for *_, err in errors)  # fp32 on the CPU: eager attention's region masses
    result = json.loads(out.read_text())
    for scope, reps in (("model", 2), ("decoder", 3)):
        rows, raw = result["scopes"][scope]["rows"], result["scopes"][scope]["raw_ms"]
        assert set(rows) == {"off", "off (again)", "installed, no capture", "capture, no probed layer", "1 layer",
                             "4 layers", "4 layers, one widened call (fused)"}
        assert all(len(ts) == reps and min(ts) > 0 for ts in raw.values())
        assert rows["off"]["ratio"] == 1.0 and rows["off"]["paired_ratio"] == 1.0
        for name, ts in raw.items():  # the paired ratio: the median over rounds of time / that round's `off`
            ratios = sorted(t / o for t, o in zip(ts, raw["off"]))
            assert rows[name]["paired_ratio"] == pytest.approx(ratios[len(ratios) // 2] if reps % 2 else
                                                               (ratios[reps // 2 - 1] + ratios[reps // 2]) / 2)
            assert rows[name]["paired_q1"] <= rows[name]["paired_ratio"] <= rows[name]["paired_q3"]
    # the decoder scope is the model's step without the vision tower (its output passed in): the tower never runs
    assert result["scopes"]["model"]["vision_calls"] > 0 and result["scopes"]["decoder"]["vision_calls"] == 0
    layer = result["layer"]
    assert set(layer) == {"plain", "plain (again)", "probed, split (the default with grads)",
                          "probed, split, values padded to the head size", "probed, split, second call on all rows",
                          "probed, split, second call on the kept rows", "probed, one widened call (fused)",
                          "probed, split, a forward's first probed layer"}
    assert all(row["median_ms"] > 0 for row in layer.values())
    assert {name: len(ts) for name, ts in result["layer_raw_ms"].items()} == dict.fromkeys(layer, 4)
    assert {name: len(ts) for name, ts in result["fixed_raw_ms"].items()} == dict.fromkeys(result["fixed"], 50)
    assert "| 4 layers |" in stdout and "| probed, split (the default with grads) |" in stdout
    assert set(result["fixed"]) == {"capture setup (indicators deferred)", "setup + indicator build, back to back",
                                    "connectivity of 4 layers, in one piece on the device",
                                    "connectivity parts of 4 layers (the forward's share)",
                                    "their finish on the host (the helper thread's share)"}
    assert all(row["median_ms"] > 0 for row in result["fixed"].values())
    backend_row = r"^\| Q/K padded \(Q/K 32, V 32\)( \| (\S+ ms|refused)){5} \|$"  # 4 backends + SDPA's own pick
    assert re.search(backend_row, stdout, re.MULTILINE)
    assert re.search(backend_row.replace("Q/K padded", "indicators only").replace("Q/K 32, V 32", "Q/K 16, V 16"),
                     stdout, re.MULTILINE)  # 16 regions: V the indicator channels alone


def test_probe_overhead_on_a_video_prompt(tmp_path):
    """`--frames`: the prompt holds a video (frames / 2 temporal patches of the grid) instead of the image; the
    eager check covers its video tokens, and both scopes time it (the decoder scope with the video's features
    passed in)."""
    out = tmp_path / "probe.json"
    stdout = _run("probe_overhead.py", "--shape", "tiny", "--device", "cpu", "--reps", "2", "--decoder-reps", "2",
                  "--layer-reps", "2", "--warmup", "1", "--grid", "8", "--response", "16", "--frames", "4",
                  "--profile-steps", "0", "--out", str(out))
    errors = [float(e) for e in re.findall(r"probe vs eager softmax .*: max abs error (\S+)", stdout)]
    assert len(errors) == 5 and max(errors) <= 1e-5
    assert "a video of 4 frames, 32 video + 16 response tokens" in stdout
    result = json.loads(out.read_text())
    assert result["scopes"]["decoder"]["vision_calls"] == 0 and result["scopes"]["model"]["vision_calls"] > 0


def test_probe_overhead_decoder_scope_alone(tmp_path):
    out = tmp_path / "probe.json"
    stdout = _run("probe_overhead.py", "--shape", "tiny", "--device", "cpu", "--reps", "0", "--decoder-reps", "9",
                  "--seconds", "0.001", "--layer-reps", "2", "--warmup", "1", "--grid", "8", "--response", "16",
                  "--batch", "2", "--out", str(out))
    result = json.loads(out.read_text())
    assert set(result["scopes"]) == {"decoder"}  # --reps 0 skips the whole-model scope
    assert result["batch"] == 2 and "response tokens, batch 2," in stdout  # two sequences per step
    # a budget far below one round: the fewest rounds paired ratios are read from, not the 9 asked for
    assert "decoder scope: 5 rounds fit in 0.001 s" in stdout
    assert all(len(ts) == 5 for ts in result["scopes"]["decoder"]["raw_ms"].values())
    assert "(decoder: decoder only" in stdout and "(model: whole model" not in stdout
    assert "| probed, split (the default with grads) |" in stdout
    kernels = result["kernels"]  # the profiled decoder step, off and probed
    assert set(kernels) == {"off", "4 layers"} and all(k["busy_ms"] > 0 for k in kernels.values())
    assert re.search(r"^\| 4 layers \| [\d.]+ \| [\d.]+ \| -?[\d.]+ \| \d+ \|$", stdout, re.MULTILINE)
    # the probed step runs one more attention forward per probed layer (the split route's second call)
    sdpa = [k for k in kernels["off"]["counts"] if "scaled_dot_product" in k and "backward" not in k]
    assert sum(kernels["4 layers"]["counts"].get(k, 0) - kernels["off"]["counts"][k] for k in sdpa) >= 1


def test_trainer_overhead_smoke(tmp_path):
    out = tmp_path / "trainer.json"
    stdout = _run("trainer_overhead.py", "--shape", "tiny", "--steps", "4", "--blocks", "1", "--completion", "8",
                  "--image-size", "112", "--workers", "2", "--batch", "4", "--steps-per-generation", "2",
                  "--modes", "uniform", "atrl", "atrl-overlap-off", "--generation-ab", "2", "--ab-tokens", "4",
                  "--region-grid", "2", "3", "--sync-debug", "--out", str(out))
    assert "sync debug: needs CUDA" in stdout  # the sync meter runs on a GPU only
    result = json.loads(out.read_text())
    assert result["region_grid"] == [2, 3]
    ab = result["generation_ab"]  # generate with and without the probe's attention installed, interleaved
    assert set(ab) == {"plain sdpa", "probe installed"} and all(len(ts) == 2 and min(ts) > 0 for ts in ab.values())
    assert "| probe installed |" in stdout
    modes = ["uniform", "atrl", "atrl-overlap-off"]
    assert {m: len(ts) for m, ts in result["results"].items()} == dict.fromkeys(modes, 1)  # warm-up cycle dropped
    assert [mode for mode, _ in result["blocks"]] == modes
    for mode in modes[1:]:
        assert len(result["credit_share"][mode]) == 1 and 0 < result["credit_share"][mode][0] < 1
        assert result["credit_cpu"][mode][0] > 0
    assert result["credit_share"]["uniform"] == [] and result["credit_cpu"]["uniform"] == []
    for mode in modes:  # the collector's pauses per recorded cycle: a training step allocates far more than the
        # 700 objects that trigger a young-generation collection, so the meter must have seen some
        assert len(result["gc_seconds"][mode]) == len(result["gc_full"][mode]) == 1
        assert result["gc_seconds"][mode][0] > 0 and result["gc_full"][mode][0] >= 0
    assert re.search(r"^garbage-collector pauses per step.*atrl-overlap-off [\d.]+ \([\d.]+\) s, [\d.]+; one full "
                     r"collection [\d.]+ ms with the heap as it is, [\d.]+ ms frozen", stdout, re.MULTILINE)
    full = result["full_collection_ms"]  # a full collection walks every tracked object, unless they are frozen
    assert full["already frozen"] == 0 and full["as it is"] > 10 * full["frozen"]
    for mode in modes:  # one generation per recorded cycle, a part of that cycle's step time
        assert len(result["generation"][mode]) == 1 and 0 < result["generation"][mode][0] < result["results"][mode][0]
    assert re.search(r"\| atrl-overlap-off \| [\d.]+ \| [\d.]+ \| [\d.]+-[\d.]+ \| [\d.]+ \| "
                     r"[\d.]+ \([\d.]+-[\d.]+\) \| -?[\d.]+ \(-?[\d.]+\) \|", stdout)
    assert re.search(r"\| atrl \| [\d.]+ \| 1 \| [\d.]+ \| [\d.]+ \([\d.]+%\) \| [\d.]+ \| [\d.]+ \|", stdout)
    for mode in modes[1:]:  # the loop's credit time, and the part of it blocked on the partitions
        assert 0 <= result["credit_wait"][mode][0] <= result["credit_loop"][mode][0]


def test_trainer_overhead_replays_one_generation(tmp_path):
    """--replay-generation: one real `_generate` call in the whole run, every later one served from it."""
    out = tmp_path / "trainer.json"
    stdout = _run("trainer_overhead.py", "--shape", "tiny", "--steps", "3", "--blocks", "3", "--seconds", "0.001",
                  "--completion", "8", "--image-size", "112", "--workers", "2", "--batch", "8", "--modes", "uniform",
                  "atrl", "--replay-generation", "--profile", "--phases", "--out", str(out))
    result = json.loads(out.read_text())
    assert "2 rounds of blocks fit in 0.001 s" in stdout  # a budget below one round: the 2 rounds pairing needs
    # a warm-up block of 2 cycles, 2 blocks per mode of 3 cycles (the first of each dropped), 3 cycles per mode
    # with the phases timed, 2 profiled per mode
    assert result["generate_calls_served"] == 2 + 4 * 3 + 2 * 3 + 2 * 2
    phases = result["phases"]
    assert set(phases) == {"uniform", "atrl"}
    for p in phases.values():  # the parts add up to the synchronised training step; TRL's step_time is close
        parts = ("generation", "scoring, generation aside", "forward + loss (probes, wait for the weights)",
                 "backward", "rest of the training step")
        assert min(p[k] for k in parts[:4]) > 0
        assert sum(p[k] for k in parts) == pytest.approx(p["training step (synchronised)"], rel=0.05)
        assert p["TRL's step_time"] == pytest.approx(p["training step (synchronised)"], rel=0.3)
    assert re.search(r"^\| backward \| [\d.]+ \| [\d.]+ \| [+-][\d.]+ \|$", stdout, re.MULTILINE)
    assert set(result["profiled"]) == {"uniform", "atrl"}
    assert all(p["wall_ms"] > 0 and p["busy_ms"] > 0 for p in result["profiled"].values())
    assert "| kernel (atrl against uniform) | added ms per step | calls per step |" in stdout
    assert result["replayed_generation_s"] > 0
    assert {m: len(ts) for m, ts in result["results"].items()} == {"uniform": 4, "atrl": 4}
    assert [mode for mode, _ in result["blocks"]] == ["uniform", "atrl", "atrl", "uniform"]
    assert "generation replayed, the one real call took" in stdout
    # the paired rest ratio: per round, atrl's block-median rest over uniform's in the same round
    rest = {(block, mode): r for block, mode, r in result["block_rest"]}
    assert sorted(rest) == [(0, "atrl"), (0, "uniform"), (1, "atrl"), (1, "uniform")]
    assert result["paired_rest_ratios"]["uniform"] == [1.0, 1.0]
    assert result["paired_rest_ratios"]["atrl"] == pytest.approx([rest[b, "atrl"] / rest[b, "uniform"] for b in (0, 1)])
    for (mode, step), (_, rest_mode, r) in zip(result["blocks"], result["block_rest"], strict=True):
        assert rest_mode == mode and 0 < r < step  # generation is taken out of each block's step


def test_vision_attention_bench(tmp_path):
    out = tmp_path / "vision.json"
    stdout = _run("vision_attention.py", "--shape", "narrow", "--device", "cpu", "--images", "2", "--grid", "20",
                  "--reps", "3", "--warmup", "1", "--out", str(out))
    result = json.loads(out.read_text())
    calls = result["calls_per_forward"]
    # 8 layers: the loop makes a call per window (20 x 20 patches: 9 windows of up to 8 x 8) in the 4 window layers
    # and one per image in the 4 full-attention layers, for each of the 2 images
    # packed: per window layer a call for each window size (8 x 8, 8 x 4 or 4 x 8, 4 x 4 patches: 64, 32, 16), per
    # full-attention layer one (both images 400 patches)
    assert calls == {"sdpa, a call per window": 4 * 2 * 9 + 4 * 2, "packed, a call per segment length": 4 * 3 + 4}
    assert result["max_abs_diff"] <= 1e-5  # fp32: the same numbers
    assert all(len(ts) == 3 for ts in result["raw_ms"].values())
    assert re.search(r"^\| packed, a call per segment length \| 16 \| .* \| nan \|$", stdout, re.MULTILINE)
    assert set(result["peak_gib"]) == set(calls)  # peak memory: measured on a GPU only


def test_rounds_in_budget():
    from atrl.bench.probe_overhead import MIN_ROUNDS, rounds_in_budget

    assert rounds_in_budget(60, 1.4, 200) == 42  # floor(60 / 1.4)
    assert rounds_in_budget(60, 1.4, 30) == 30  # never more than asked
    assert rounds_in_budget(1, 1.4, 30) == MIN_ROUNDS  # never fewer than pairing needs
    assert rounds_in_budget(60, 0.0, 30) == 30


def test_allocator_activity_is_the_difference_of_two_stats_and_says_what_torch_does_not_count():
    """The benchmarks' allocator meter (printed on a GPU only): counts in the timed steps, not since the process
    started; a count this torch does not keep is None, not 0."""
    from atrl.bench.probe_overhead import ALLOCATOR_COUNTS, allocator_activity

    before = {"num_alloc_retries": 2, "num_device_alloc": 40, "num_device_free": 10, "allocated_bytes.all.peak": 9}
    after = {"num_alloc_retries": 2, "num_device_alloc": 43, "num_device_free": 12, "allocated_bytes.all.peak": 99}
    got = allocator_activity(before, after)
    assert list(got) == list(ALLOCATOR_COUNTS)
    assert got == {"num_alloc_retries": 0, "num_device_alloc": 3, "num_device_free": 2, "num_sync_all_streams": None}


def test_atrl_bench_lists_and_runs_the_benchmarks(capsys):
    """`atrl bench` (an installed package has no benchmarks/ folder): the list, a benchmark's own options, a run."""
    from atrl.cli import main

    assert main(["bench"]) == 0
    listing = capsys.readouterr().out
    assert all(f"    {name}  " in listing for name in ("probe", "trainer", "credit"))
    with pytest.raises(SystemExit) as exit_:
        main(["bench", "probe", "--help"])
    assert exit_.value.code == 0 and "--decoder-reps" in capsys.readouterr().out
    assert main(["bench", "credit", "--tokens", "64", "--responses", "4", "--repeats", "1"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "---" not in line]
    assert [r.split(" | ")[0] for r in rows[1:]] == [
        "| metis k-way, max 64 parts (default)", "| metis k-way, max 32 parts", "| metis recursive, max 64 parts",
        "| kmeans", "| threshold (quantile bins)"]


def test_sync_sites_name_the_call_and_the_atrl_line_that_led_to_it():
    """--sync-debug's attribution (its counts come from torch's CUDA sync debug mode, on a GPU only)."""
    import traceback

    from atrl.bench.trainer_overhead import sync_net_table, sync_site, sync_table

    def frame(path, line, name):
        return traceback.FrameSummary(path, line, name)

    trl_sync = [frame("/x/atrl/bench/trainer_overhead.py", 5, "train_block"), frame("/x/atrl/rl/trainer.py", 10,
                "_compute_loss"), frame("/v/trl/trainer/grpo_trainer.py", 20, "_compute_loss"),
                frame("/v/torch/_tensor.py", 30, "item")]
    assert sync_site(trl_sync) == ("trl/trainer/grpo_trainer.py:20 (_compute_loss)",
                                   "atrl/rl/trainer.py:10 (_compute_loss)")
    ours = [frame("/x/atrl/rl/handoff.py", 7, "submit_parts_now"), frame("/v/torch/_tensor.py", 30, "cpu")]
    assert sync_site(ours) == ("atrl/rl/handoff.py:7 (submit_parts_now)",) * 2
    assert sync_site([frame("/v/torch/a.py", 1, "f")]) == ("-", "-")
    a, b = ("trl/x.py:1 (f)", "-"), ("atrl/rl/trainer.py:2 (g)", "atrl/rl/trainer.py:2 (g)")
    rows = sync_table({"uniform": {a: 6}, "atrl": {a: 6, b: 3}}, cycles=3, base="uniform")
    # the site that differs first
    assert rows[2] == "| atrl/rl/trainer.py:2 (g) | atrl/rl/trainer.py:2 (g) | 0.0 | 1.0 | +1.0 |"
    assert rows[3] == "| trl/x.py:1 (f) | - | 2.0 | 2.0 | +0.0 |" and rows[-1] == "| all | | 2.0 | 3.0 | +1.0 |"
    # the same TRL call reached through another atrl line in one mode: two rows that cancel in sync_table, none
    # in the net table, which keeps the call that differs
    via = ("trl/x.py:1 (f)", "atrl/rl/trainer.py:9 (h)")
    counts = {"uniform": {a: 6}, "atrl": {via: 6, b: 3}}
    assert [r.split(" | ")[-1] for r in sync_table(counts, cycles=3, base="uniform")[2:4]] == ["-2.0 |", "+2.0 |"]
    assert sync_net_table(counts, cycles=3, base="uniform")[2:] == ["| atrl/rl/trainer.py:2 (g) | 0.0 | 1.0 | +1.0 |"]
    assert sync_net_table({"uniform": {a: 6}, "atrl": {via: 6}}, 3, "uniform") == [
        "no call synchronises more or less often in atrl than in uniform"]


def test_sync_sites_count_torch_sync_warnings_and_pass_others_on(monkeypatch):
    """The capture itself, with torch's switch stubbed (it needs CUDA): a sync warning is counted at its caller,
    any other warning is shown as before, and the warning machinery is restored on exit."""
    import warnings

    import torch

    from atrl.bench.trainer_overhead import SyncSites

    modes, shown = [], []
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", modes.append)
    monkeypatch.setattr(warnings, "showwarning", lambda message, *args, **kwargs: shown.append(str(message)))
    before = warnings.showwarning
    with SyncSites() as sites:
        for _ in range(2):
            warnings.warn("called a synchronizing CUDA operation", UserWarning)  # as torch words it
        warnings.warn("unrelated", UserWarning)
    assert modes == ["warn", "default"] and warnings.showwarning is before and shown == ["unrelated"]
    (site, count), = sites.counts.items()
    assert count == 2 and site[0].startswith("test_benchmarks.py:") and site[1] == "-"


def test_bench_credit_times_several_lengths_and_shows_the_growth(capsys):
    from atrl.cli import main

    assert main(["bench", "credit", "--tokens", "64", "128", "--responses", "2", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "2 responses x 64 tokens" in out and "2 responses x 128 tokens" in out
    growth = out[out.index("ms per 1,024 tokens"):].splitlines()
    assert growth[1] == "| partition | 64 tokens | 128 tokens |"
    rows = [r for r in growth[3:] if r.startswith("| ")]
    assert len(rows) == 5 and all(float(c) > 0 for r in rows for c in r.strip("| ").split(" | ")[1:])


def test_smolvlm_summary_pairs_the_committed_runs_by_seed():
    """benchmarks/smolvlm_summary.py on the SmolLM2 miniature's committed runs: each mode's mean gain and its gain
    against `uniform` (AT-RL's also against `random`), paired by seed, as computed here from the summary files."""
    import statistics

    root = Path(__file__).resolve().parents[1]
    runs = root / "docs" / "results" / "2026-12-03-cpu" / "smolvlm"
    printed = subprocess.run([sys.executable, str(root / "benchmarks" / "smolvlm_summary.py"), str(runs)],
                             capture_output=True, text=True, check=True).stdout
    greedy = {}
    for f in runs.glob("rl-*-s*/summary.json"):
        mode, seed = re.fullmatch(r"rl-(.+)-s(\d+)", f.parent.name).groups()
        s = json.loads(f.read_text())
        greedy.setdefault(mode, {})[int(seed)] = 100 * (s["accuracy_after"] - s["accuracy_before"])
    assert set(greedy) == {"atrl", "uniform", "low_only", "anchors_only", "random"}

    def stat(xs):
        return f"{statistics.mean(xs):+.1f} ± {statistics.stdev(xs) / len(xs) ** 0.5:.1f}"

    lines = {line.split(":")[0]: line for line in printed.splitlines() if ": seeds " in line}
    for mode, by_seed in greedy.items():
        assert f"mean gain greedy {stat(list(by_seed.values()))}," in lines[mode]
    pairs = [("atrl", "uniform"), ("atrl", "random"), ("low_only", "uniform"), ("random", "uniform")]
    for mode, other in pairs:
        diff = [greedy[mode][k] - greedy[other][k] for k in sorted(greedy[mode])]
        assert f"against {other}, paired over seeds [3, 4, 5]: greedy {stat(diff)}," in lines[mode]
    assert "against" not in lines["uniform"]
    assert len([line for line in printed.splitlines() if line.startswith("rl-")]) == 15
