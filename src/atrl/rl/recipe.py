"""YAML recipes for `atrl train`: parsed into dataclasses, overridable from the command line, run top to bottom.

A recipe has these sections (all optional; `configs/demo.yaml` is the embedded default written out):

    model:    path (a local checkpoint folder or hub id; null = the embedded tiny default), dtype, attn_implementation
    lora:     peft LoraConfig fields (r, lora_alpha, target_modules, ...), or null for full fine-tuning
    data:     train ("synthetic" or a data file), format, n / seed / families / knobs (synthetic), on_error,
              max_prompt_length, eval (held-out data scored during training: null, "synthetic" or a file)
    rewards:  accuracy / format weights, overlong ({max_length, cache}) or null
    anchor:   AnchorConfig (atrl.rl.config)
    trl:      any GRPOConfig field (output_dir, learning_rate, num_generations, loss_type, use_vllm, ...).
              Fields a recipe file leaves out take GRPOConfig's defaults, except BASE_TRL's (logging every
              step, TensorBoard, KL-free DAPO); without a file, the embedded default's (DEFAULT_TRL).
              output_dir defaults to runs/<anchor.mode>; "{mode}" in it stands for anchor.mode.
    resume:   "auto" (latest complete checkpoint in trl.output_dir, if any), false, or a checkpoint folder

Overrides: `--section.key value` (the value is read as YAML: numbers, lists, null), e.g.
`atrl train --config configs/qwen2.5-vl-3b.yaml --anchor.mode uniform --trl.max_steps 100`.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .._checks import check_keys
from ..data.synthetic import DEFAULT_FAMILIES, DEFAULT_KNOBS, knobs_from_mapping
from .config import AnchorConfig

logger = logging.getLogger("atrl")

# What every recipe gets in its trl section unless it says otherwise; other GRPOConfig fields keep TRL's defaults.
# output_dir, when a recipe does not set it, is runs/<anchor.mode>, and "{mode}" in a recipe's output_dir is
# replaced by anchor.mode: runs of two credit modes do not share a folder.
BASE_TRL: dict[str, Any] = {
    "logging_steps": 1,
    "report_to": ["tensorboard"],
    "beta": 0.0,  # KL-free
    "loss_type": "dapo",
}

# The embedded default (`atrl train` with no --config; configs/demo.yaml writes it out): small enough for two CPU
# cores, large enough to see rewards move. 16 prompts x 4 generations per step: with 4 prompts x 8 the colour
# prior of the tiny default drifts with the few images of each step (docs/benchmarks.md). A recipe file does not
# inherit these: its run would otherwise stop at the demo's 150 steps whatever its num_train_epochs said, and
# take the demo's batch, temperature and checkpoint interval for fields it left out.
DEFAULT_TRL: dict[str, Any] = {
    **BASE_TRL,
    "per_device_train_batch_size": 64,
    "num_generations": 4,
    "max_completion_length": 96,
    "learning_rate": 5e-5,
    "max_steps": 150,
    "save_steps": 10,
    "save_total_limit": 3,
    "temperature": 0.7,
    "activation_checkpointing": False,
    "bf16": False,
    "seed": 0,
}


@dataclass
class ModelSection:
    """path: checkpoint folder or hub id (null: the embedded tiny default). dtype: float32 | bfloat16 | float16.
    attn_implementation: sdpa, or flash_attention_2 / _3 where installed (the probes run inside
    either); eager only for debugging with mode uniform.
    min_pixels, max_pixels: the pixel range images are resized into (Qwen-VL processors; null: the checkpoint's
    own, for Qwen2.5-VL 3,136 to 12,845,056 pixels, i.e. up to 16,384 image tokens per image). An image costs
    about pixels / 784 tokens: max_pixels 1,003,520 (1,280 tokens) is a common choice for RL. The trained
    model's processor is saved with it, so `atrl eval` sees images as training did.
    vision_attention: packed (a Qwen-VL vision tower on SDPA attends a layer's windows or images of one size in
    one call, `atrl.models.vision_attention`; the same numbers) or per_window (transformers' own loop: a call per
    window). Other towers and implementations are left as they are."""

    path: str | None = None
    dtype: str = "float32"
    attn_implementation: str = "sdpa"
    vision_attention: str = "packed"
    min_pixels: int | None = None
    max_pixels: int | None = None

    def __post_init__(self) -> None:
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"model.dtype={self.dtype!r}: use float32, bfloat16 or float16")
        if self.vision_attention not in ("packed", "per_window"):
            raise ValueError(f"model.vision_attention={self.vision_attention!r}: use packed or per_window")
        for name in ("min_pixels", "max_pixels"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"model.{name}={value!r}: a positive number of pixels, or null")


@dataclass
class DataSection:
    """train: "synthetic", a data file (.parquet / .json / .jsonl) or a folder saved by `datasets` (one split).
    format: auto | mathvista | geometry3k | jsonl.
    n, seed, families, knobs: synthetic data size, seed, task families (null: all five) and per-family difficulty
    knobs ({family: {knob: value}}, see atrl.data.synthetic); the defaults are the embedded default's colour-tile
    task. on_error: raise | skip (bad rows).
    max_prompt_length: rows whose prompt with image tokens is longer are an error (or skipped).
    eval: held-out data scored during training (TRL's evaluation: rewards of sampled completions, logged as
    `eval_reward`, `eval_rewards/<func>/mean`): null (none), "synthetic" (eval_n tasks of the training mix drawn
    with eval_seed, default seed + 10,000, which training never uses) or a data file read like `train`. With an
    eval set, evaluation runs every `trl.eval_steps` steps (default: every `trl.save_steps`) unless
    `trl.eval_strategy` says otherwise."""

    train: str = "synthetic"
    format: str = "auto"
    n: int = 512
    seed: int = 0
    families: list[str] | None = field(default_factory=lambda: list(DEFAULT_FAMILIES))
    knobs: dict[str, dict[str, Any]] | None = field(default_factory=lambda: copy.deepcopy(DEFAULT_KNOBS))
    image_root: str | None = None
    on_error: str = "raise"
    max_prompt_length: int | None = None
    eval: str | None = None
    eval_n: int = 64
    eval_seed: int | None = None

    def __post_init__(self) -> None:
        knobs_from_mapping(self.knobs, where="knobs")  # fail at load time, naming the family and knob
        if self.eval is not None and self.eval == self.train and self.eval != "synthetic":
            raise ValueError(f"data.eval={self.eval!r} is the training file: held-out data must be other rows")
        if self.eval == "synthetic" and self.train == "synthetic" and self.held_out_seed() == self.seed:
            raise ValueError(f"data.eval_seed={self.eval_seed} is the training seed: held-out tasks need another")
        if self.eval_n < 1:
            raise ValueError(f"data.eval_n={self.eval_n} must be at least 1")

    def held_out_seed(self) -> int:
        return self.seed + 10_000 if self.eval_seed is None else self.eval_seed

    def synthetic_knobs(self) -> dict[str, Any]:
        return knobs_from_mapping(self.knobs, where="data.knobs")


@dataclass
class RewardSection:
    """accuracy, format: weights of the two rewards (0 drops one). overlong: {max_length, cache} for DAPO's soft
    overlong penalty (weight 1), or null. custom: {"package.module:function": weight} for your own TRL reward
    functions `f(prompts, completions, **columns) -> list[float]`."""

    accuracy: float = 1.0
    format: float = 0.2
    overlong: dict[str, int] | None = None
    custom: dict[str, float] = field(default_factory=dict)


@dataclass
class Recipe:
    model: ModelSection = field(default_factory=ModelSection)
    lora: dict[str, Any] | None = None
    data: DataSection = field(default_factory=DataSection)
    rewards: RewardSection = field(default_factory=RewardSection)
    anchor: AnchorConfig = field(default_factory=AnchorConfig)
    trl: dict[str, Any] = field(default_factory=lambda: {**DEFAULT_TRL, "output_dir": "runs/atrl"})
    resume: str | bool = "auto"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


_SECTIONS = {"model": ModelSection, "data": DataSection, "rewards": RewardSection, "anchor": AnchorConfig}


def _parse_value(raw: str) -> Any:
    """A command-line value read as YAML; "1e-2" (a string to YAML 1.1) is read as the number it means."""
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `--section.key value` / `section.key=value` pairs to a recipe dict (returns a new dict)."""
    out = copy.deepcopy(raw)
    items: list[tuple[str, str]] = []
    i = 0
    while i < len(overrides):
        token = overrides[i]
        key = token[2:] if token.startswith("--") else token
        if "=" in key:
            key, value = key.split("=", 1)
            i += 1
        else:
            if i + 1 >= len(overrides):
                raise ValueError(f"override {token!r} has no value")
            value = overrides[i + 1]
            i += 2
        items.append((key, value))
    for key, value in items:
        parts = key.split(".")
        if parts[0] not in (*_SECTIONS, "trl", "lora", "resume"):
            raise ValueError(f"override {key!r}: unknown section {parts[0]!r}; use model., data., rewards., "
                             "anchor., trl., lora. or resume")
        node = out
        for part in parts[:-1]:
            if node.get(part) is None:
                node[part] = {}
            node = node[part]
        node[parts[-1]] = _parse_value(value)
    return out


def recipe_from_dict(raw: dict[str, Any], trl_defaults: dict[str, Any] = DEFAULT_TRL) -> Recipe:
    """Build a Recipe, naming the section and key of anything unknown or invalid. `trl_defaults` fill the trl
    fields `raw` leaves out: the embedded default's (DEFAULT_TRL) for `atrl train` without a recipe file,
    BASE_TRL for a recipe file."""
    unknown = set(raw) - {*_SECTIONS, "trl", "lora", "resume"}
    if unknown:
        raise ValueError(f"recipe has unknown sections {sorted(unknown)}")
    kwargs: dict[str, Any] = {}
    for name, cls in _SECTIONS.items():
        section = raw.get(name) or {}
        check_keys(section, cls, f"recipe section {name!r}")
        try:
            kwargs[name] = cls(**section)
        except (TypeError, ValueError) as err:
            raise ValueError(f"recipe section {name!r}: {err}") from err
    trl = dict(trl_defaults)
    trl.update(raw.get("trl") or {})
    mode = kwargs["anchor"].mode
    trl["output_dir"] = str(trl.get("output_dir") or "runs/{mode}").replace("{mode}", mode)
    return Recipe(trl=trl, lora=raw.get("lora"), resume=raw.get("resume", "auto"), **kwargs)


def load_recipe(path: str | os.PathLike | None, overrides: list[str] | None = None) -> Recipe:
    """The recipe file at `path` (None: the embedded default) with `overrides` applied. A file's trl section sits
    on BASE_TRL and GRPOConfig's own defaults, not on the embedded default's training values."""
    raw: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"--config {str(p)!r} does not exist")
        raw = yaml.safe_load(p.read_text()) or {}
        if not isinstance(raw, dict):
            raise ValueError(f"--config {str(p)!r}: a recipe is a YAML mapping of sections")
    return recipe_from_dict(apply_overrides(raw, overrides or []), DEFAULT_TRL if path is None else BASE_TRL)


# ---------------------------------------------------------------------------------------------------- building


def grpo_config(recipe: Recipe):
    from trl import GRPOConfig

    trl = dict(recipe.trl)
    for key, value in trl.items():  # YAML 1.1 reads a bare `no` as false
        if key.endswith("_strategy") and value is False:
            trl[key] = "no"
    report_to = trl.get("report_to", ["tensorboard"])
    if isinstance(report_to, str):
        report_to = [report_to]
    if report_to == ["tensorboard"] and _wandb_ready():
        report_to = ["tensorboard", "wandb"]
    _check_loggers(report_to)
    trl["report_to"] = report_to
    weights = [recipe.rewards.accuracy, recipe.rewards.format] + ([1.0] if recipe.rewards.overlong else [])
    weights += [float(w) for w in recipe.rewards.custom.values()]
    trl.setdefault("reward_weights", weights)
    trl.setdefault("use_cpu", not _cuda())
    if recipe.data.eval is not None:
        trl.setdefault("eval_strategy", "steps")
        if trl["eval_strategy"] == "steps":
            trl.setdefault("eval_steps", trl.get("save_steps"))
    elif trl.get("eval_strategy", "no") != "no":
        raise ValueError(f"trl.eval_strategy={trl['eval_strategy']!r} but the recipe has no held-out data: set "
                         "data.eval (\"synthetic\" or a data file)")
    try:
        return GRPOConfig(**trl)
    except (TypeError, ValueError) as err:  # an unknown field, or one of TRL's own checks
        raise ValueError(f"recipe section 'trl': {err}") from err


def _check_loggers(report_to: list[str]) -> None:
    """A logger named in trl.report_to but not installed fails now, naming it, rather than after the model loads."""
    from transformers.integrations import get_available_reporting_integrations

    installed = get_available_reporting_integrations()
    missing = [name for name in report_to if name not in ("all", "none") and name not in installed]
    if missing:
        raise ValueError(f"trl.report_to={report_to}: {missing} not installed (installed: {installed}); install it "
                         "(e.g. pip install wandb) or leave it out")


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _wandb_ready() -> bool:
    """W&B joins TensorBoard when it is installed and configured (an API key or an explicit WANDB_MODE)."""
    import importlib.util

    return importlib.util.find_spec("wandb") is not None and bool(
        os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_MODE"))


def _model_path(recipe: Recipe) -> str | Path | None:
    """model.path, or for null the embedded default base (None when there is none: a fresh tiny model)."""
    if recipe.model.path is not None:
        return recipe.model.path
    from ..models.default import default_base_model

    return default_base_model()


def build_model(recipe: Recipe):
    import torch

    from ..models.vision_attention import use_packed_vision_attention
    from ..models.zoo import build_tiny_vlm, load_model, set_pixel_range

    dtype = getattr(torch, recipe.model.dtype)
    path = _model_path(recipe)
    if path is None:
        model, processor = build_tiny_vlm("qwen2_5_vl", seed=recipe.trl.get("seed", 0))
        model = model.to(dtype)
    else:
        model, processor = load_model(path, dtype=dtype, attn_implementation=recipe.model.attn_implementation)
    if recipe.model.vision_attention == "packed":
        use_packed_vision_attention(model)
    set_pixel_range(processor, recipe.model.min_pixels, recipe.model.max_pixels)
    return model, processor


def _data_files(recipe: Recipe) -> list[str]:
    """The data sections that name files rather than synthetic data ("data.train", "data.eval")."""
    return [f"data.{split}" for split in ("train", "eval") if getattr(recipe.data, split) not in (None, "synthetic")]


def _data_processor(recipe: Recipe):
    """The model's processor where the data need it (data files with data.max_prompt_length: the prompt-length
    check counts image tokens), else None. Loads no weights."""
    if recipe.data.max_prompt_length is None or not _data_files(recipe):
        return None
    return _processor(recipe)


def _processor(recipe: Recipe):
    """The model's processor with the recipe's pixel range (as the run will see images); no weights."""
    from ..models.zoo import build_tiny_vlm, load_processor, set_pixel_range

    path = _model_path(recipe)
    processor = load_processor(path) if path is not None else build_tiny_vlm("qwen2_5_vl")[1]
    set_pixel_range(processor, recipe.model.min_pixels, recipe.model.max_pixels)
    return processor


def _image_line(processor) -> str:
    from ..models.zoo import pixel_range

    image_processor = getattr(processor, "image_processor", None)
    pixels = pixel_range(processor)
    if pixels is None:
        return f"images: resized to {dict(getattr(image_processor, 'size', None) or {}) or 'the processor size'}"
    patch = getattr(image_processor, "patch_size", 14) * getattr(image_processor, "merge_size", 2)
    return (f"images: resized into {pixels[0]:,} to {pixels[1]:,} pixels (at most about "
            f"{pixels[1] // patch ** 2:,} image tokens each; model.min_pixels / max_pixels)")


def _run_inputs(recipe: Recipe) -> tuple[Any, list, dict[str, tuple[Any, Any]], Any]:
    """What a run needs besides the model, built and checked before any weights load (a bad row, a missing
    package or reward function fails in seconds, not after minutes of loading a large model): the GRPOConfig,
    the reward functions, per split ("train", "eval") the data set and its load report (None where absent), and
    the peft LoraConfig (None: full fine-tuning)."""
    args = grpo_config(recipe)
    _check_packages(recipe, args)
    peft_config = lora_config(recipe)
    rewards = build_rewards(recipe)
    from ..data.formats import expand_data_path

    for name in _data_files(recipe):  # before the processor, which may come from the hub (minutes offline)
        try:
            expand_data_path(getattr(recipe.data, name.split(".", 1)[1]))
        except FileNotFoundError as err:
            raise FileNotFoundError(f"{name}: {err}") from err
    processor = _data_processor(recipe)
    data = {split: build_dataset(recipe, processor, split) for split in ("train", "eval")}
    return args, rewards, data, peft_config


def lora_config(recipe: Recipe):
    """The recipe's lora section as a peft LoraConfig (task CAUSAL_LM unless given), or None; a field peft does
    not know, or a value it refuses, is named with the section."""
    if not recipe.lora:
        return None
    if not isinstance(recipe.lora, dict):
        raise ValueError(f"recipe section 'lora': a mapping of peft LoraConfig fields or null, not {recipe.lora!r}")
    from peft import LoraConfig

    try:
        return LoraConfig(**{"task_type": "CAUSAL_LM", **recipe.lora})
    except (TypeError, ValueError) as err:
        raise ValueError(f"recipe section 'lora': {err}") from err


def _lora_targets(peft_config, config, model=None) -> str:
    """How many of the model's modules the adapters' target_modules name, found on `model` or, before it is
    loaded (the dry run), on a weightless (meta device) copy built from its config; a listed name that matches no
    module is an error, as it would be when peft wraps the loaded model. (At a run's start the loaded model is
    used: building a copy there would, under DeepSpeed ZeRO-3, start a collective on the first process alone.)"""
    if model is not None:
        skeleton = model
    else:
        import torch
        from transformers import AutoModelForImageTextToText

        with torch.device("meta"):
            skeleton = AutoModelForImageTextToText.from_config(config)
    names = [name for name, _ in skeleton.named_modules() if name]
    targets = peft_config.target_modules
    if not targets:  # peft picks defaults per architecture
        return "peft's default modules for this architecture"
    if isinstance(targets, str):  # a regular expression, matched by peft on whole names
        import re

        found = [n for n in names if re.fullmatch(targets, n)]
    else:
        found = [n for n in names if any(n == t or n.endswith("." + t) for t in targets)]
        missing = sorted(t for t in targets if not any(n == t or n.endswith("." + t) for n in names))
        if missing:
            leaves = sorted({n.rsplit(".", 1)[-1] for n, m in skeleton.named_modules()
                             if n and not list(m.children()) and not n.rsplit(".", 1)[-1].isdigit()})
            raise ValueError(f"lora.target_modules {missing} name no module of the model; its layers are named "
                             f"{leaves}")
    if not found:
        raise ValueError(f"lora.target_modules={targets!r} matches no module of the model")
    vision = sum(any(part in n for part in ("visual", "vision")) for n in found)
    return f"{len(found)} modules ({len(found) - vision} in the language model, {vision} in the vision tower)"


def check_recipe(recipe: Recipe) -> list[str]:
    """`atrl train --dry-run`: what the run would fail on before its first step, found without the model's weights
    (minutes on a GPU node for a 7B model). Builds the GRPOConfig (TRL's own checks, e.g. batch sizes against
    num_generations), imports the reward functions, loads both data splits (bad rows raise or are counted, as
    data.on_error says), checks prompt lengths with the model's processor when data.max_prompt_length is set,
    and resolves where connectivity is measured and which decoder layers are probed (from the model's config).
    Raises what `atrl train` would raise; returns a summary."""
    args, rewards, data, peft_config = _run_inputs(recipe)
    return _summary(recipe, args, rewards, data, peft_config, _model_config(recipe), _processor(recipe),
                    weights="not loaded")


def _summary(recipe: Recipe, args, rewards: list, data: dict, peft_config, config, processor,
             weights: str, model=None) -> list[str]:
    """What a run will do, line by line: printed by the dry run, logged at the start of a run (with its model)."""
    from ..probe import probe_layers_for

    length = (f"max_steps {args.max_steps}" if args.max_steps > 0
              else f"{args.num_train_epochs:g} epoch(s) of data.train (max_steps not set)")
    rollouts = f"vLLM ({args.vllm_mode} mode)" if args.use_vllm else "the training model"
    lines = [(f"trl: {args.per_device_train_batch_size} completions per device x {args.gradient_accumulation_steps} "
              f"accumulation steps, {args.num_generations} per prompt, loss {args.loss_type}, learning rate "
              f"{args.learning_rate:g}, {length}, rollouts by {rollouts}, output {args.output_dir}")]
    lines.append("rewards: " + ", ".join(f"{getattr(f, '__name__', f)} x {w:g}"
                                          for f, w in zip(rewards, args.reward_weights)))
    files = _data_files(recipe)
    for split, (dataset, report) in data.items():
        if dataset is None:
            lines.append(f"data.{split}: none")
            continue
        source = getattr(recipe.data, split)
        lines.append(f"data.{split}: {source}, {len(dataset)} rows" + (f"; {report}" if report else ""))
    if recipe.data.max_prompt_length is None:
        lines.append("prompt lengths: not checked (data.max_prompt_length is not set)")
    elif not files:
        lines.append("prompt lengths: not checked (data.max_prompt_length applies to data files; these are synthetic)")
    else:
        lines.append(f"prompt lengths: {' and '.join(files)} checked, kept rows fit {recipe.data.max_prompt_length} "
                     "tokens with their image tokens")
    num_layers = config.get_text_config().num_hidden_layers
    architecture = (config.architectures or [type(config).__name__])[0]
    lines.append(_image_line(processor))
    if peft_config is None:
        lines.append("lora: none (full fine-tuning)")
    else:
        lines.append(f"lora: r {peft_config.r}, alpha {peft_config.lora_alpha}, target_modules "
                     f"{_lora_targets(peft_config, config, model)}")
    a = recipe.anchor
    site = a.capture_site(args) if a.needs_probe or a.mode == "entropy" else "none (no probes)"
    layers = probe_layers_for(num_layers, a.probe_layers) if a.needs_probe else "none"
    lines.append(f"anchor: mode {a.mode}, connectivity measured on {site}, probe layers {layers}, region grid "
                 f"{a.region_grid[0]}x{a.region_grid[1]}")
    lines.append(f"model: {recipe.model.path or 'the embedded default'} ({architecture}, {num_layers} decoder "
                 f"layers, {recipe.model.dtype}, {recipe.model.attn_implementation}; weights {weights})")
    return lines


def _model_config(recipe: Recipe):
    """The model's config alone (no weights)."""
    from transformers import AutoConfig

    from ..models.zoo import check_model_path

    path = _model_path(recipe)
    if path is None:  # no default base on this machine: the run would build a fresh tiny model
        from ..models.zoo import build_tiny_vlm

        return build_tiny_vlm("qwen2_5_vl")[0].config
    check_model_path(path)
    return AutoConfig.from_pretrained(path)


def _check_packages(recipe: Recipe, args) -> None:
    """A FlashAttention backend or vLLM that the recipe asks for but is not installed fails when the recipe is
    checked, not once the weights have loaded."""
    import importlib.util

    from trl.import_utils import is_vllm_available

    package = {"flash_attention_2": "flash_attn", "flash_attention_3": "flash_attn_interface"}.get(
        recipe.model.attn_implementation)
    if package is not None and importlib.util.find_spec(package) is None:
        raise ValueError(f"model.attn_implementation={recipe.model.attn_implementation!r} needs the {package} "
                         "package, which is not installed: install it, or use sdpa (the probes run inside either)")
    if args.use_vllm and not is_vllm_available():
        raise ValueError("trl.use_vllm=true needs vLLM, which is not installed (pip install 'trl[vllm]'), or set "
                         "trl.use_vllm: false to generate with the training model")


def build_dataset(recipe: Recipe, processor, split: str = "train"):
    """The training data set (split "train") or the held-out one ("eval": `data.eval`, None when unset), and
    the load report of a data file (None for synthetic data)."""
    from ..data.formats import check_prompt_lengths, load_samples, to_trl_dataset
    from ..data.synthetic import generate, to_hf_dataset

    d = recipe.data
    source, n, seed = (d.train, d.n, d.seed) if split == "train" else (d.eval, d.eval_n, d.held_out_seed())
    if source is None:
        return None, None
    if source == "synthetic":
        return to_hf_dataset(generate(n, seed=seed, families=d.families, knobs=d.synthetic_knobs())), None
    samples, report = load_samples(source, d.format, image_root=d.image_root, on_error=d.on_error)
    if d.max_prompt_length is not None:
        samples = check_prompt_lengths(samples, processor, d.max_prompt_length, on_error=d.on_error, report=report)
    if not samples:
        raise ValueError(f"data.{split}={source!r}: no usable rows ({report})")
    return to_trl_dataset(samples), report


def build_rewards(recipe: Recipe) -> list:
    from .rewards import accuracy_reward, format_reward, make_overlong_penalty

    funcs = [accuracy_reward, format_reward]
    if recipe.rewards.overlong:
        o = recipe.rewards.overlong
        funcs.append(make_overlong_penalty(int(o["max_length"]), int(o["cache"])))
    for ref in recipe.rewards.custom:
        funcs.append(_import_function(ref))
    return funcs


def _import_function(ref: str):
    import importlib

    module_name, sep, name = ref.partition(":")
    if not sep:
        raise ValueError(f"rewards.custom key {ref!r}: write it as 'package.module:function'")
    try:
        func = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"rewards.custom {ref!r} cannot be imported: {err}") from err
    if not callable(func):
        raise ValueError(f"rewards.custom {ref!r} is not callable")
    return func


def build_trainer(recipe: Recipe, callbacks: list | None = None):
    from .trainer import ATRLTrainer

    args, rewards, data, peft_config = _run_inputs(recipe)
    if args.use_cpu:  # DeepSpeed (when installed) would warn, at its first use in training, that it found no GPU
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    model, processor = build_model(recipe)
    if args.process_index == 0:  # the dry run's summary, at the top of the run's log (once, not per rank)
        for line in _summary(recipe, args, rewards, data, peft_config, model.config, processor, weights="loaded",
                             model=model):
            logger.info("run: %s", line)
    return ATRLTrainer(model=model, processing_class=processor, reward_funcs=rewards, args=args,
                       train_dataset=data["train"][0], eval_dataset=data["eval"][0], peft_config=peft_config,
                       anchor_config=recipe.anchor, callbacks=callbacks)


def resolve_resume(recipe: Recipe, output_dir: str) -> str | None:
    from .checkpoints import checkpoint_step, checkpoints

    if recipe.resume in (False, None, "false", "no"):
        return None
    if recipe.resume == "auto":
        complete, incomplete = checkpoints(output_dir)
        latest_complete = complete[-1] if complete else None
        for folder in incomplete:
            if latest_complete is None or checkpoint_step(folder) > checkpoint_step(latest_complete):
                logger.warning("ignoring %s: it was not finished (no completion marker); resuming from %s",
                               folder, latest_complete or "the start")
        return str(latest_complete) if latest_complete else None
    path = Path(str(recipe.resume))
    if not path.is_dir():
        raise FileNotFoundError(f"resume={str(path)!r} is not a checkpoint folder")
    return str(path)


# Fields a resumed run may change: how long it trains, how often it saves, logs and evaluates, where it reports,
# and how the credit work is scheduled (same numbers either way). Any other change mixes two runs in one folder.
RESUME_MAY_CHANGE = ("resume", "trl.output_dir", "trl.max_steps", "trl.num_train_epochs", "trl.save_steps",
                     "trl.save_total_limit", "trl.logging_steps", "trl.eval_steps", "trl.report_to",
                     "trl.disable_tqdm", "trl.run_name", "trl.dataloader_num_workers",
                     "anchor.credit.n_workers", "anchor.overlap", "anchor.report_steps")


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(_flat(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def _recipe_text(recipe: Recipe) -> str:
    return yaml.safe_dump(json.loads(json.dumps(recipe.to_dict(), default=list)), sort_keys=False)


def run_recipe_file(folder: str | Path) -> Path | None:
    """The recipe.yaml a run folder or checkpoint was trained with: the folder's own (a run's output folder; a
    checkpoint's), else the one above it (a run's final/, an older checkpoint-N/)."""
    return next((f for f in (Path(folder) / "recipe.yaml", Path(folder).parent / "recipe.yaml") if f.is_file()),
                None)


def check_resume_recipe(recipe: Recipe, out: Path, resume: str | None) -> None:
    """Resuming (resume: auto) continues the run whose recipe.yaml the checkpoint holds (its output folder's, for
    checkpoints of older versions): a recipe that differs in more than RESUME_MAY_CHANGE (e.g. another anchor.mode,
    learning rate or data file) is an error naming the fields, not a checkpoint of one run silently continued as
    another. A checkpoint named explicitly is resumed with a warning listing the differences."""
    # the checkpoint's own recipe first: a folder trained again with resume: false holds checkpoints of two runs
    saved_file = run_recipe_file(resume) if resume else None
    if saved_file is None:
        return
    saved = _flat(yaml.safe_load(saved_file.read_text()) or {})
    now = _flat(yaml.safe_load(_recipe_text(recipe)))
    differ = {key for key in saved.keys() & now.keys() if saved[key] != now[key]}
    # a key on one side only: a field another atrl version did not have (ignored), or a section one side leaves
    # null (lora: {...} against lora: null), which is a change of that section
    for key in saved.keys() ^ now.keys():
        other = now if key in saved else saved
        differ.update(p for p in other if key.startswith(p + "."))

    def shown(side: dict[str, Any], key: str) -> Any:  # a value, or the fields of a section
        return side[key] if key in side else {k[len(key) + 1:]: v for k, v in side.items() if k.startswith(key + ".")}

    changed = [f"{key}: {shown(saved, key)!r} -> {shown(now, key)!r}" for key in sorted(differ)
               if not key.startswith(RESUME_MAY_CHANGE)]
    if not changed:
        return
    where = f"{resume}, which belongs to a run of another recipe ({saved_file}): " + "; ".join(changed)
    if recipe.resume != "auto":
        logger.warning("resume=%s continues %s", recipe.resume, where)
        return
    raise ValueError(f"resume: auto would continue {where}. Give this run its own trl.output_dir, set resume: "
                     "false to train from the start in this folder (its checkpoints are then overwritten), or name "
                     "the checkpoint in resume: to continue it with this recipe all the same")


class TrainingStopped(RuntimeError):
    """An error raised inside the training loop, with the step it stopped at and the checkpoint to resume from.
    Not a ValueError: the CLI prints input errors as one line, and this one with the traceback of its cause."""


def run_training(recipe: Recipe, callbacks: list | None = None, progress: bool = True):
    """Train according to `recipe`; returns the trainer. Saves the final model + processor to
    `<output_dir>/final`, the resolved recipe to `<output_dir>/recipe.yaml`, the trainer state (log history) to
    `<output_dir>/trainer_state.json` and a figure of what training did to `<output_dir>/training_report.png`.

    SIGTERM, SIGUSR1 or Ctrl-C stops training after the step in progress, with a checkpoint (`StopOnSignal`): then
    no final/ is written and `trainer.stopped_by_signal` names the signal.

    From a script of your own, call it under `if __name__ == "__main__":`: the credit workers are spawned
    processes, which import the main module again (Python's rule for spawned processes)."""
    from ..models.zoo import ensure_writable_dir
    from .progress import install_progress

    out = ensure_writable_dir(recipe.trl["output_dir"], argument="trl.output_dir")
    resume = resolve_resume(recipe, str(out))
    check_resume_recipe(recipe, out, resume)  # every rank reads the old recipe.yaml: none writes on a mismatch
    text = _recipe_text(recipe)
    # every rank of a launch writes the same text: each to its own temporary file, renamed into place (atomic)
    tmp = out / f"recipe.yaml.{os.getpid()}.tmp"
    tmp.write_text(text)
    os.replace(tmp, out / "recipe.yaml")
    from .checkpoints import StopOnSignal
    from .trainer import RecipeLogCallback

    stopper = StopOnSignal()
    trainer = build_trainer(recipe, [*(callbacks or []), stopper])
    trainer.stopped_by_signal = None
    trainer.recipe_yaml = text
    trainer.add_callback(RecipeLogCallback(trainer, text))
    if progress:
        install_progress(trainer)
    if resume and trainer.is_world_process_zero():
        logger.warning("resuming from %s", resume)
    try:
        trainer.train(resume_from_checkpoint=resume)
    except Exception as err:  # e.g. a reward function's bug at step 57: its traceback, the step, where to resume
        from .checkpoints import checkpoints

        complete, _ = checkpoints(out)
        where = (f"`resume: auto` continues from {complete[-1]}" if complete else "no complete checkpoint yet")
        raise TrainingStopped(f"training stopped at step {trainer.state.global_step} by {type(err).__name__}: "
                              f"{err} ({where}; the cause's traceback is above)") from err
    finally:
        stopper.restore()  # a run that raised never reached on_train_end
    if stopper.stopped_at is not None:  # checkpoint-N holds the run; final/ is for a finished one
        trainer.stopped_by_signal = stopper.received
        return trainer
    final = out / "final"
    trainer.save_model(str(final))  # on every rank: DeepSpeed and FSDP gather the weights together
    trainer.save_state()  # <output_dir>/trainer_state.json: the whole log history, whatever save_steps was
    if trainer.is_world_process_zero():
        from ..viz.plots import training_report

        trainer.processing_class.save_pretrained(str(final))
        training_report({run_label(out): trainer.state.log_history}, out / "training_report.png")
    return trainer


def run_label(folder: str | Path) -> str:
    """A run's name in plots: its folder's name, with the credit mode its recipe.yaml names (a checkpoint folder's
    recipe is its run's)."""
    name, recipe_file = Path(folder).resolve().name, run_recipe_file(folder)
    mode = ((yaml.safe_load(recipe_file.read_text()) or {}).get("anchor") or {}).get("mode") if recipe_file else None
    return f"{name} ({mode})" if mode else name
