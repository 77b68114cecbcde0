"""Videos: decoding within bounds (PyAV), the families' video processors, and the probes over time and space
against the model's own M-RoPE positions and an explicit softmax of eager attention."""

import itertools

import numpy as np
import pytest
import torch
from PIL import Image

from atrl.data.video import VideoBounds, VideoError, VideoRef, fit_pixels, sample_indices, write_video
from atrl.models.zoo import build_tiny_vlm
from atrl.probe import ConnectivityProbe, ProbeError

VIDEO_FAMILIES = ["qwen2_5_vl", "qwen3_vl"]


def _frames(n: int, h: int = 48, w: int = 64) -> np.ndarray:
    """n frames, frame i a flat grey of level 20 * (i % 13) (so a decoded frame says which one it is)."""
    return np.stack([np.full((h, w, 3), 20 * (i % 13), np.uint8) for i in range(n)])


def _level(frame: np.ndarray) -> int:
    return round(float(frame.mean()) / 20)


# ---------------------------------------------------------------------------------------------- decoding


def test_a_video_file_is_sampled_at_the_bounds_fps(tmp_path):
    path = write_video(tmp_path / "v.mp4", _frames(12), fps=4)
    ref = VideoRef(path=str(path))
    info = ref.info()
    assert (info.frames, info.fps, info.height, info.width) == (12, 4.0, 48, 64)
    video = ref.load(VideoBounds(fps=2))
    # 3 s at 2 fps: 6 frames, each the middle one of its stretch of 2
    assert video.metadata["frames_indices"] == [1, 3, 5, 7, 9, 11]
    assert [_level(f) for f in video.frames] == [1, 3, 5, 7, 9, 11]
    assert video.frames.shape == (6, 48, 64, 3) and video.metadata["fps"] == 4.0


def test_max_frames_spreads_the_frames_and_max_pixels_shrinks_them(tmp_path):
    path = write_video(tmp_path / "v.mp4", _frames(12), fps=4)
    video = VideoRef(path=str(path)).load(VideoBounds(fps=4, max_frames=3, max_pixels=24 * 32))
    assert [_level(f) for f in video.frames] == [2, 6, 10]
    assert video.frames.shape == (3, 24, 32, 3)
    assert fit_pixels(48, 64, 48 * 64) == (48, 64)


def test_sampling_keeps_min_frames_of_a_short_video():
    from atrl.data.video import VideoInfo

    # 0.5 s at 2 fps is 1 frame; min_frames asks for 2 where the video has them
    assert sample_indices(VideoInfo(5, 10.0, 8, 8), VideoBounds(fps=2, min_frames=2)) == [1, 3]
    assert sample_indices(VideoInfo(1, 10.0, 8, 8), VideoBounds(fps=2, min_frames=2)) == [0]


def test_a_folder_and_a_list_of_frames_are_videos(tmp_path):
    folder = tmp_path / "frames"
    folder.mkdir()
    for i, frame in enumerate(_frames(5)):
        Image.fromarray(frame).save(folder / f"{i:03d}.png")
    (folder / "notes.txt").write_text("not a frame")
    video = VideoRef(path=str(folder)).load(VideoBounds(fps=1, max_frames=8))
    assert [_level(f) for f in video.frames] == [0, 1, 2, 3, 4]
    assert video.metadata["fps"] == 1 and video.metadata["frames_indices"] == [0, 1, 2, 3, 4]
    files = tuple(str(folder / f"{i:03d}.png") for i in (4, 0))
    assert [_level(f) for f in VideoRef(frames=files).load(VideoBounds()).frames] == [4, 0]


def test_bad_videos_are_named(tmp_path):
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"not a video" * 50)
    with pytest.raises(VideoError, match="bad.mp4.*cannot be read"):
        VideoRef(path=str(bad)).info()
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(VideoError, match="empty.*has no frames"):
        VideoRef(path=str(empty)).load(VideoBounds())
    long = write_video(tmp_path / "long.mp4", _frames(20, 16, 16), fps=2)
    with pytest.raises(VideoError, match=r"long.mp4.*10.0 s long, over data.video.max_seconds=5"):
        VideoRef(path=str(long)).load(VideoBounds(max_seconds=5))
    # an audio-only file: a container without a video stream
    import av

    with av.open(str(tmp_path / "sound.wav"), "w") as out:
        stream = out.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
        frame.sample_rate = 8000
        for packet in stream.encode(frame):
            out.mux(packet)
    with pytest.raises(VideoError, match="sound.wav.*no video stream"):
        VideoRef(path=str(tmp_path / "sound.wav")).info()
    # frames of different sizes cannot stack into one video
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    Image.new("RGB", (8, 8)).save(mixed / "0.png")
    Image.new("RGB", (8, 6)).save(mixed / "1.png")
    with pytest.raises(VideoError, match="frames differ in size"):
        VideoRef(path=str(mixed)).load(VideoBounds())
    with pytest.raises(ValueError, match="min_frames=4 is over max_frames=2"):
        VideoBounds(min_frames=4, max_frames=2)


def test_a_damaged_file_is_an_error_not_fewer_frames(tmp_path):
    """A file whose header promises more frames than its data holds: the frames that cannot be decoded are an
    error naming the file, never a shorter video."""
    path = write_video(tmp_path / "v.mp4", _frames(40, 32, 32), fps=8, codec="mpeg4")
    data = path.read_bytes()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: len(data) * 2 // 3])
    ref = VideoRef(path=str(cut))
    assert ref.info().frames == 40  # the index at the front still says 40
    with pytest.raises(VideoError, match=r"cut.mp4.*(cannot be decoded after \d+ of its 40|cut short or damaged)"):
        ref.load(VideoBounds(fps=8, max_frames=64))


# ---------------------------------------------------------------------------------------------- probes


def _video_batch(processor, n_frames=6, side=56, seed=1):
    """Two prompts, left-padded: a video (frames of distinct colours) and an image, each with a response."""
    from atrl.data.synthetic import generate

    examples = generate(n_frames, seed=seed)
    frames = np.stack([np.asarray(e.image.convert("RGB").resize((side, side))) for e in examples])

    def prompt(kind, answer):
        return processor.apply_chat_template([{"role": "user", "content": [{"type": kind}, {
            "type": "text", "text": "What colour is the square at the end?"}]}], add_generation_prompt=True) + answer

    processor.tokenizer.padding_side = "left"
    meta = {"total_num_frames": n_frames, "fps": 2.0, "frames_indices": list(range(n_frames))}
    return processor(text=[prompt("video", "It is red, then blue"), prompt("image", "It is green")],
                     images=[examples[0].image], videos=[frames], video_metadata=[meta], do_sample_frames=False,
                     padding=True, return_tensors="pt")


def _rope_cells(model, batch, video_token, rh, rw, time_bins):
    """Each video token's region from the model's own M-RoPE positions: the tokens of one temporal patch share a
    temporal position, and their height / width positions count rows and columns from the patch's first."""
    inner = model.model
    args = dict(input_ids=batch["input_ids"], mm_token_type_ids=batch["mm_token_type_ids"],
                image_grid_thw=batch.get("image_grid_thw"), video_grid_thw=batch.get("video_grid_thw"),
                attention_mask=batch["attention_mask"])
    if "second_per_grid_ts" in batch:
        args["second_per_grid_ts"] = batch["second_per_grid_ts"]
    pos = inner.get_rope_index(**args)[0]  # (3, B, S)
    out = {}
    for b in range(batch["input_ids"].shape[0]):
        where = (batch["input_ids"][b] == video_token).nonzero().flatten().tolist()
        if not where:
            continue
        t_pos = pos[0, b, where]
        times = sorted(set(t_pos.tolist()))
        if len(times) == 1:  # Qwen3-VL: a timestamp between temporal patches; each patch's positions restart
            starts = [where[0]] + [q for p, q in itertools.pairwise(where) if q != p + 1]
            groups = [sum(1 for s in starts if s <= q) - 1 for q in where]
        else:
            groups = [times.index(t) for t in t_pos.tolist()]
        t = max(groups) + 1
        ys = {g: min(pos[1, b, q] for q, gg in zip(where, groups) if gg == g) for g in range(t)}
        xs = {g: min(pos[2, b, q] for q, gg in zip(where, groups) if gg == g) for g in range(t)}
        h = 1 + max(int(pos[1, b, q] - ys[g]) for q, g in zip(where, groups))
        w = 1 + max(int(pos[2, b, q] - xs[g]) for q, g in zip(where, groups))
        for q, g in zip(where, groups):
            y, x = int(pos[1, b, q] - ys[g]), int(pos[2, b, q] - xs[g])
            out[(b, q)] = (g * time_bins // t) * rh * rw + (y * rh // h) * rw + x * rw // w
    return out


@pytest.mark.parametrize("family", VIDEO_FAMILIES)
def test_video_regions_follow_the_models_own_positions(family):
    model, processor = build_tiny_vlm(family, seed=0)
    batch = _video_batch(processor, n_frames=8, side=112)
    layout = ConnectivityProbe(model, layers=[2]).layout
    ind = layout.region_indicators(batch["input_ids"], batch["image_grid_thw"], (2, 2),
                                   video_grid_thw=batch["video_grid_thw"], time_bins=2)
    video_token = model.config.video_token_id
    cells = _rope_cells(model, batch, video_token, 2, 2, 2)
    assert len(cells) == int((batch["input_ids"] == video_token).sum()) > 8
    for (b, q), region in cells.items():
        assert ind[b, q].nonzero().flatten().tolist() == [region], (b, q)
    # every region of the video (2 times x 2 x 2) is seen; the image's block comes after none (sample 1 alone)
    assert ind.shape[-1] == 8
    assert set(cells.values()) == set(range(8))
    is_image = batch["input_ids"][1] == model.config.image_token_id
    assert torch.equal(ind[1].sum(-1), is_image.float()) and ind[1, :, 4:].sum() == 0


@pytest.mark.parametrize("family", VIDEO_FAMILIES)
def test_masses_over_video_tokens_match_explicit_softmax_of_eager_attention(family):
    model, processor = build_tiny_vlm(family, seed=0)
    model = model.float()
    batch = _video_batch(processor)
    probe = ConnectivityProbe(model, layers=[2, 3], time_bins=3)
    try:
        with torch.no_grad(), probe.capture(batch["input_ids"], batch["image_grid_thw"],
                                            video_grid_thw=batch["video_grid_thw"]) as cap:
            model(**batch, use_cache=False)
        ind = probe.layout.region_indicators(batch["input_ids"], batch["image_grid_thw"], probe.region_grid,
                                             dtype=torch.float64, video_grid_thw=batch["video_grid_thw"], time_bins=3)
    finally:
        probe.detach()
    visual = (batch["input_ids"] == model.config.image_token_id) | (batch["input_ids"] == model.config.video_token_id)
    assert torch.equal(ind.sum(-1), visual.double())  # every image and video token in exactly one region
    assert ind.shape[-1] == 3 * 16
    model.set_attn_implementation("eager")
    with torch.no_grad():
        out = model(**batch, output_attentions=True, use_cache=False)
    valid = batch["attention_mask"].bool()
    for layer in (2, 3):
        ref = torch.einsum("bhqk,bkr->bqhr", out.attentions[layer].double(), ind)
        err = (cap.state.masses[layer].double() - ref)[valid].abs().max().item()
        assert err <= 1e-5, (layer, err)
        assert ref[0][valid[0]].sum() > 1.0  # the video's rows carry real mass


def test_video_tokens_are_text_without_their_grid_and_a_wrong_grid_is_refused():
    """A forward given no videos embeds a video token as text (a policy may generate one): the probes do too;
    a grid that does not match the tokens is an error."""
    model, processor = build_tiny_vlm("qwen2_5_vl", seed=0)
    batch = _video_batch(processor)
    layout = ConnectivityProbe(model, layers=[2]).layout
    ind = layout.region_indicators(batch["input_ids"], batch["image_grid_thw"])
    assert torch.equal(ind.sum(-1), (batch["input_ids"] == model.config.image_token_id).float())
    with pytest.raises(ProbeError, match="image tokens present but image_grid_thw was not given"):
        layout.region_indicators(batch["input_ids"], None, video_grid_thw=batch["video_grid_thw"])
    with pytest.raises(ProbeError, match="video tokens do not match video_grid_thw"):
        layout.region_indicators(batch["input_ids"], batch["image_grid_thw"],
                                 video_grid_thw=batch["video_grid_thw"] * torch.tensor([2, 1, 1]))
    with pytest.raises(ProbeError, match="time_bins=0"):
        ConnectivityProbe(model, layers=[2], time_bins=0)


# ---------------------------------------------------------------------------------------------- training


def _reward(prompts, completions, **columns):
    """Varies between completions of an untrained model, so that advantages are not all zero."""
    return [len(set(c[-1]["content"])) / 10 for c in completions]


def _grpo_args(tmp_path, **kw):
    from trl import GRPOConfig

    base = dict(output_dir=str(tmp_path), per_device_train_batch_size=8, num_generations=4, max_completion_length=10,
                max_steps=2, use_cpu=True, report_to=[], logging_steps=1, bf16=False, save_strategy="no",
                learning_rate=1e-2, disable_tqdm=True, seed=0, temperature=1.5)
    base.update(kw)
    return GRPOConfig(**base)


@pytest.mark.parametrize("family", VIDEO_FAMILIES)
@pytest.mark.parametrize("capture", ["train_forward", "old_logps"])
def test_a_batch_mixing_video_and_image_rows_trains_with_probes_on_both(tmp_path, family, capture):
    """Each step holds a video row (colour_change) and an image row (quadrant). The video inputs reach
    generation and every scoring forward (the probes' indicators see the video tokens: its completions read the
    video), and the step changes the vision tower (gradients flow through the video's patches)."""
    from atrl.data.synthetic import generate, to_hf_dataset
    from atrl.rl.config import AnchorConfig
    from atrl.rl.trainer import ATRLTrainer

    torch.manual_seed(0)
    model, processor = build_tiny_vlm(family, seed=0)
    data = to_hf_dataset(generate(2, seed=0, families=["colour_change", "quadrant"]))
    assert data[0]["videos"] and data[1]["videos"] == [] and data[1]["image"] is not None
    before = {k: v.detach().clone() for k, v in model.named_parameters() if "visual" in k}
    scoring, tower = [], []  # (video tokens in the ids, video tokens the grid describes) per forward with a video

    def forward_inputs(module, args, kwargs):
        ids, grid = kwargs.get("input_ids"), kwargs.get("video_grid_thw")
        if ids is not None and ids.shape[1] > 1 and "pixel_values_videos" in kwargs:
            scoring.append((int((ids == model.config.video_token_id).sum()), int(grid.prod(-1).sum()) // 4))

    def tower_inputs(module, args, kwargs):
        tower.append(int((args[0] if args else kwargs["hidden_states"]).shape[0]))

    model.register_forward_pre_hook(forward_inputs, with_kwargs=True)
    model.model.visual.register_forward_pre_hook(tower_inputs, with_kwargs=True)
    kw = {"num_iterations": 2} if capture == "old_logps" else {}
    trainer = ATRLTrainer(model=model, processing_class=processor, reward_funcs=[_reward],
                          args=_grpo_args(tmp_path, **kw), train_dataset=data,
                          anchor_config=AnchorConfig(overlap=False))
    assert trainer.capture_site == capture
    trainer.train()
    assert trainer.state.global_step == 2
    # every scoring forward gets the video patches of its rows (4 generations of the video row), whose tokens
    # its ids hold; generation (which encodes the vision inputs before its first step) and each scoring forward
    # run the tower on them
    assert len(scoring) >= 2 and all(n == patches > 0 for n, patches in scoring), scoring
    video_patches = scoring[0][1] * 4  # 2 x 2 patches merge into a token
    assert tower.count(video_patches) == 4, (tower, video_patches)
    conn, mask = trainer.last_credit["conn"], trainer.last_credit["mask"]
    assert (conn * mask).abs().amax(1).gt(0).all()  # every completion read its video or its image
    after = dict(trainer.model.named_parameters())
    assert any((after[k].detach() - v).abs().max() > 0 for k, v in before.items())


def test_a_processor_without_a_video_slot_refuses_video_rows(tmp_path):
    from atrl.data.synthetic import generate, to_hf_dataset
    from atrl.rl.config import AnchorConfig
    from atrl.rl.trainer import ATRLTrainer

    model, processor = build_tiny_vlm("glm4v", seed=0)
    with pytest.raises(ValueError, match="takes none: use a checkpoint whose processor has a video processor"):
        ATRLTrainer(model=model, processing_class=processor, reward_funcs=[_reward], args=_grpo_args(tmp_path),
                    train_dataset=to_hf_dataset(generate(2, families=["colour_change"])),
                    anchor_config=AnchorConfig())


# ---------------------------------------------------------------------------------------------- data files


def _video_rows(tmp_path):
    """A JSONL file with a video file, a folder of frames, a list of frames and an image, Video-R1 style."""
    import json

    from atrl.data.synthetic import generate

    frames = [np.asarray(e.image.convert("RGB").resize((64, 48))) for e in generate(6, seed=2)]
    write_video(tmp_path / "clip.mp4", np.stack(frames), fps=2)
    (tmp_path / "frames").mkdir()
    for i, frame in enumerate(frames[:4]):
        Image.fromarray(frame).save(tmp_path / "frames" / f"{i}.png")
    Image.fromarray(frames[0]).save(tmp_path / "still.png")
    rows = [{"problem": "<video>\nWhat colour is the square at the end?", "answer": "red", "videos": ["clip.mp4"]},
            {"problem": "What is shown?", "answer": "blue", "video": "frames"},
            {"problem": "What is shown?", "answer": "green",
             "videos": [[f"frames/{i}.png" for i in (0, 2)]]},
            {"problem": "<image>What colour?", "answer": "red", "images": ["still.png"]}]
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_a_data_file_with_videos_loads_and_counts_video_tokens_from_headers(tmp_path):
    """The dry run's count (blank frames of the header's size and number) equals the processor's count on the
    decoded frames, for every kind of video item."""
    from atrl.data.formats import build_prompt_messages, check_prompt_lengths, load_samples, to_trl_dataset

    samples, report = load_samples(_video_rows(tmp_path))
    assert report.kept == 4 and [len(s.videos) for s in samples] == [1, 1, 1, 0]
    assert samples[0].question == "What colour is the square at the end?"  # the placeholder is the video's slot
    assert samples[2].videos[0].frames[1].endswith("frames/2.png")
    _, processor = build_tiny_vlm("qwen2_5_vl", seed=0)
    bounds = VideoBounds(fps=2, max_frames=8)
    for s in samples[:3]:
        text = processor.apply_chat_template(build_prompt_messages(s), add_generation_prompt=True)
        videos = s.load_videos(bounds)
        decoded = processor(text=[text], videos=[v.frames for v in videos],
                            video_metadata=[v.metadata for v in videos], do_sample_frames=False,
                            return_tensors="pt")["input_ids"].shape[1]
        assert check_prompt_lengths([s], processor, decoded, video=bounds) == [s]
        with pytest.raises(Exception, match=rf"{s.source}: prompt is {decoded} tokens with its video tokens"):
            check_prompt_lengths([s], processor, decoded - 1, video=bounds)
    data = to_trl_dataset(samples)
    assert data[0]["videos"][0]["path"].endswith("clip.mp4") and data[3]["videos"] == []
    content = data[0]["prompt"][0]["content"]
    assert [part["type"] for part in content] == ["video", "text"]


def test_bad_video_rows_are_named_or_skipped_and_counted(tmp_path):
    import json

    from atrl.data.formats import DataError, load_samples

    path = _video_rows(tmp_path)
    (tmp_path / "broken.mp4").write_bytes(b"\x00" * 400)
    long = write_video(tmp_path / "long.mp4", _frames(30, 16, 16), fps=1)
    rows = [{"problem": "q", "answer": "a", "videos": ["missing.mp4"]},
            {"problem": "q", "answer": "a", "videos": ["broken.mp4"]},
            {"problem": "q", "answer": "a", "videos": [long.name]},
            {"problem": "<video><video> q", "answer": "a", "videos": ["clip.mp4"]}]
    with path.open("a") as fh:
        fh.write("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError, match=r"train.jsonl:5: video file .*missing.mp4' does not exist"):
        load_samples(path)
    _, report = load_samples(path, on_error="skip", video=VideoBounds(max_seconds=20))
    assert report.kept == 4
    assert report.skipped == {"does not exist": 1, "cannot be read": 1, "max_seconds": 1, "placeholders": 1}
    assert "train.jsonl:7" in report.first_rows["max_seconds"][0]


def test_the_video_recipe_passes_the_dry_run_on_the_tiny_build(tmp_path, capsys):
    from atrl.cli import main

    ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]
    base = tmp_path / "base"
    assert main(["model", "build", "--family", "qwen2_5_vl", "--out", str(base)]) == 0
    data = _video_rows(tmp_path)
    capsys.readouterr()
    assert main(["train", "--config", str(ROOT / "configs" / "qwen2.5-vl-7b-video.yaml"), "--model.path", str(base),
                 "--data.train", str(data), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "recipe checked: nothing trained" in out and "kept 4 rows" in out
    # a family whose processor takes no video: the dry run names the row
    glm = tmp_path / "glm"
    assert main(["model", "build", "--family", "glm4v", "--out", str(glm)]) == 0
    assert main(["train", "--config", str(ROOT / "configs" / "qwen2.5-vl-7b-video.yaml"), "--model.path", str(glm),
                 "--data.train", str(data), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "train.jsonl:1" in err and "takes no videos" in err


def test_analyze_a_video_task_says_when_and_where_each_token_looked(tmp_path):
    """`atrl analyze` on the video family: each response token's profile covers the video's time bins x cells
    (its mass on all of them is its visual mass), the heatmap is a frame strip, and the anchors page says which
    frames and cell a token read most."""
    from atrl.data.synthetic import generate
    from atrl.eval.analyze import analyze
    from atrl.viz.plots import write_analysis_report

    model, processor = build_tiny_vlm("qwen2_5_vl", seed=0)
    result = analyze(model, processor, generate(3, seed=4, families=["colour_change"]))
    assert len(result.views) == 3 and not result.skipped
    view = result.views[0]
    assert view.frames.shape[0] == 6 and view.time_bins == 4 and view.profile.shape[1] == 4 * 16
    # 6 frames are 3 temporal patches: bins 0, 1 and 2 of 4 hold them, bin 3 none
    assert view.profile[:, :48].sum() > 0 and view.profile[:, 48:].sum() == 0
    assert np.isfinite(result.perception_auc)
    written = write_analysis_report(result, tmp_path)
    assert written["heatmap"].is_file()
    page = written["responses_html"].read_text()
    assert "looked most at frames" in page


def test_rollouts_never_sample_a_video_token(tmp_path):
    """TRL suppresses the image token in its rollouts; a sampled video token would break every forward given the
    video at some later step: it is suppressed as well."""
    from atrl.data.synthetic import generate, to_hf_dataset
    from atrl.rl.config import AnchorConfig
    from atrl.rl.trainer import ATRLTrainer

    model, processor = build_tiny_vlm("qwen2_5_vl", seed=0)
    trainer = ATRLTrainer(model=model, processing_class=processor, reward_funcs=[_reward], args=_grpo_args(tmp_path),
                          train_dataset=to_hf_dataset(generate(2, families=["colour_change"])),
                          anchor_config=AnchorConfig())
    suppressed = set(trainer.generation_config.suppress_tokens)
    assert {model.config.image_token_id, model.config.video_token_id} <= suppressed
    assert set(trainer.generation_kwargs["suppress_tokens"]) == suppressed
    # and generation obeys it: a video token made the likeliest by its bias is never drawn
    head = model.get_output_embeddings()
    with torch.no_grad():
        if head.bias is None:
            model.lm_head = torch.nn.Linear(head.in_features, head.out_features, bias=True)
            model.lm_head.weight.copy_(head.weight)
            model.lm_head.bias.zero_()
        model.lm_head.bias[model.config.video_token_id] = 50.0
    batch = processor(text=["<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"], return_tensors="pt")
    out = model.generate(**batch, generation_config=trainer.generation_config, max_new_tokens=6)
    assert model.config.video_token_id not in out[0, batch["input_ids"].shape[1]:].tolist()


def test_video_forward_gives_the_token_types_the_processor_gives():
    """The M-RoPE token types VideoForward makes from the ids (1 image, 2 video) are the processor's own, and the
    model's positions from them are its get_rope_index's."""
    from atrl.rl.videos import VideoForward, split_video_rows

    model, processor = build_tiny_vlm("qwen2_5_vl", seed=0)
    batch = _video_batch(processor)
    seen = {}

    def record(**kwargs):
        seen.update(kwargs)

    rows = split_video_rows(batch, [1, 0])
    forward = VideoForward(record, rows, model.config.image_token_id, model.config.video_token_id)
    forward(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], mm_token_type_ids=None)
    assert torch.equal(seen["mm_token_type_ids"], batch["mm_token_type_ids"])
    assert torch.equal(seen["pixel_values_videos"], batch["pixel_values_videos"])
    assert torch.equal(seen["video_grid_thw"], batch["video_grid_thw"])
    with pytest.raises(RuntimeError, match="a forward of 2 rows at row 2"):
        forward(input_ids=batch["input_ids"])


def test_a_multi_image_prompt_trains(tmp_path):
    """A row with two images (and one with one) trains: each image's tokens in their own regions."""
    import io

    from atrl.data.formats import ImageRef, Sample, to_trl_dataset
    from atrl.data.synthetic import generate
    from atrl.rl.config import AnchorConfig
    from atrl.rl.trainer import ATRLTrainer

    def png(image):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return ImageRef(data=buffer.getvalue())

    tiles = generate(3, seed=0)
    samples = [Sample("two", "Which colour is in both images?", "red", "text", [png(tiles[0].image),
                                                                             png(tiles[1].image)]),
               Sample("one", tiles[2].question, tiles[2].answer, "text", [png(tiles[2].image)])]
    torch.manual_seed(0)
    model, processor = build_tiny_vlm("qwen2_5_vl", seed=0)
    trainer = ATRLTrainer(model=model, processing_class=processor, reward_funcs=[_reward],
                          args=_grpo_args(tmp_path), train_dataset=to_trl_dataset(samples),
                          anchor_config=AnchorConfig(overlap=False))
    trainer.train()
    assert trainer.state.global_step == 2
    profile, mask = trainer.last_credit["profile"], trainer.last_credit["mask"]
    assert profile.shape[-1] == 2 * 16  # two images' blocks of regions
    two = [b for b in range(mask.shape[0]) if profile[b, :, 16:].sum() > 0]
    assert len(two) == 4  # the 4 generations of the two-image prompt read their second image


def test_a_synthetic_video_data_set_round_trips_through_its_exports(tmp_path):
    """`atrl data export` of the video family, as JSONL + mp4 and as a datasets folder (frames embedded): both
    load back as video rows whose decoded frames show the colours of the scene."""
    from atrl.cli import main
    from atrl.data.formats import load_samples
    from atrl.data.synthetic import COLOURS, generate

    names = {name: np.array(rgb) for name, rgb in COLOURS.items()}
    exs = generate(3, seed=6, families=["colour_change"])
    for fmt in ("jsonl", "hf"):
        out = tmp_path / fmt
        assert main(["data", "export", "--families", "colour_change", "--n", "3", "--seed", "6", "--out", str(out),
                     "--format", fmt]) == 0
        samples, report = load_samples(out / "data.jsonl" if fmt == "jsonl" else out)
        assert report.kept == 3
        for ex, s in zip(exs, samples):
            (video,) = s.load_videos(VideoBounds())
            assert video.frames.shape[0] == 6 and video.metadata["fps"] == 2.0
            centre = video.frames[:, 56, 56].astype(int)
            seen = [min(names, key=lambda n: np.abs(names[n] - c).sum()) for c in centre]
            assert seen[0] == ex.scene["before"] and seen[-1] == ex.scene["after"], (fmt, seen)


def test_a_rows_repeats_share_one_decoding(tmp_path, monkeypatch):
    """TRL fetches each of a row's num_generations repeats from the data set anew; the trainer decodes the row's
    videos once for all of them."""
    import atrl.rl.trainer as trainer_module
    from atrl.data.synthetic import generate, to_hf_dataset
    from atrl.rl.config import AnchorConfig

    decoded = []
    original = trainer_module.decode_row_videos
    monkeypatch.setattr(trainer_module, "decode_row_videos",
                        lambda row, bounds: decoded.append(row["uid"]) or original(row, bounds))
    model, processor = build_tiny_vlm("qwen2_5_vl", seed=0)
    trainer = trainer_module.ATRLTrainer(
        model=model, processing_class=processor, reward_funcs=[_reward], args=_grpo_args(tmp_path, max_steps=1),
        train_dataset=to_hf_dataset(generate(2, families=["colour_change"])), anchor_config=AnchorConfig())
    trainer.train()
    assert sorted(decoded) == ["colour_change-0-0", "colour_change-0-1"]  # 2 rows x 4 generations: 2 decodings
