"""YAML recipes for `atrl train`: the schema, parsed into dataclasses and overridable from the command line.

`atrl.rl.build` turns a recipe into the trainer and its inputs (and checks it for the dry run); `atrl.rl.run`
runs it (resume policy, stop signals, the final save).

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

from .._checks import check_keys, check_types
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
# prior of the tiny default drifts with the few images of each step (docs/benchmarks.md, The default base). A
# recipe file does not inherit these: its run would otherwise stop at the demo's 150 steps whatever its
# num_train_epochs said, and take the demo's batch, temperature and checkpoint interval for fields it left out.
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
    max_prompt_length: rows whose prompt with image tokens is longer are an error (or skipped). Unset, a data
    file's prompts are checked against the model's positions (max_position_embeddings) all the same.
    max_image_pixels: an image with more pixels (read from the file's header) is a bad row (null: no bound).
    video: how a `videos` column's videos become frames (`atrl.data.video.VideoBounds`): fps (2.0), max_frames
    (32), min_frames (2), max_pixels per frame (602,112), max_seconds (600; a longer video is a bad row).
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
    max_image_pixels: int | None = 50_000_000
    video: dict[str, Any] = field(default_factory=dict)
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
        self.video_bounds()  # unknown keys and bad values fail at load time

    def video_bounds(self):
        from dataclasses import fields

        from ..data.video import VideoBounds

        known = {f.name for f in fields(VideoBounds)}
        unknown = sorted(set(self.video or {}) - known)
        if unknown:
            raise ValueError(f"data.video has unknown keys {unknown}; known: {sorted(known)}")
        return VideoBounds(**(self.video or {}))

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
        section = check_types(section, cls, name)
        try:
            kwargs[name] = cls(**section)
        except (TypeError, ValueError) as err:
            raise ValueError(f"recipe section {name!r}: {err}") from err
    model, anchor = kwargs["model"], kwargs["anchor"]
    if anchor.needs_probe and model.attn_implementation not in ("sdpa", "flash_attention_2", "flash_attention_3"):
        raise ValueError(f"model.attn_implementation={model.attn_implementation!r} with anchor.mode={anchor.mode!r}: "
                         "the probes run inside SDPA or FlashAttention; use sdpa (or flash_attention_2), or a mode "
                         "without probes (`atrl modes`)")
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
        from .._io import read_yaml

        raw = read_yaml(p, "--config")
        if raw is None:
            raise ValueError(f"--config {p}: the file is empty; a recipe is a YAML mapping of sections (model, data, "
                             "rewards, anchor, trl, ...): see configs/")
        if not isinstance(raw, dict):
            raise ValueError(f"--config {p}: a recipe is a YAML mapping of sections, not a {type(raw).__name__}")
    return recipe_from_dict(apply_overrides(raw, overrides or []), DEFAULT_TRL if path is None else BASE_TRL)


def recipe_text(recipe: Recipe) -> str:
    """The resolved recipe as YAML: what a run saves as recipe.yaml and each checkpoint keeps."""
    return yaml.safe_dump(json.loads(json.dumps(recipe.to_dict(), default=list)), sort_keys=False)


def run_recipe_file(folder: str | Path) -> Path | None:
    """The recipe.yaml a run folder or checkpoint was trained with: the folder's own (a run's output folder; a
    checkpoint's), else the one above it (a run's final/, an older checkpoint-N/)."""
    return next((f for f in (Path(folder) / "recipe.yaml", Path(folder).parent / "recipe.yaml") if f.is_file()),
                None)
