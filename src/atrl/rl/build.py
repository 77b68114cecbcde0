"""From a recipe to a trainer: the GRPOConfig, the model and processor, the data, the rewards, LoRA, and the dry
run's checks and summary (`check_recipe`). Nothing here loads weights before the inputs are checked."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from .recipe import Recipe

logger = logging.getLogger("atrl")


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
    from .._checks import check_types

    trl = check_types(trl, GRPOConfig, "trl")
    try:
        args = GRPOConfig(**trl)
    except (TypeError, ValueError) as err:  # an unknown field, or one of TRL's own checks
        raise ValueError(f"recipe section 'trl': {err}") from err
    _check_ranges(args)
    return args


def _check_ranges(args) -> None:
    """Values the run would refuse only once the model is loaded (the optimizer, the sampler): refused now."""
    checks = [("learning_rate", args.learning_rate >= 0, "must be >= 0"),
              ("temperature", args.temperature > 0, "must be > 0 (the rollouts sample at it)"),
              ("top_p", 0 < args.top_p <= 1, "must be in (0, 1]"),
              ("max_completion_length", args.max_completion_length is None or args.max_completion_length > 0,
               "must be > 0")]
    for name, ok, need in checks:
        if not ok:
            raise ValueError(f"trl.{name}={getattr(args, name)!r}: {need}")


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
    """The model's processor where the data need it before they are read (data files with
    data.max_prompt_length: the prompt-length check counts image tokens), else None. Loads no weights. (Without
    data.max_prompt_length, `build_dataset` loads it after the rows are read, for the check against the model's
    positions.)"""
    if recipe.data.max_prompt_length is None or not _data_files(recipe):
        return None
    return _processor(recipe)


def _prompt_limit(recipe: Recipe) -> tuple[int | None, str | None]:
    """The prompt length a data file's rows must fit, and its name: data.max_prompt_length, else the model's
    positions (a prompt past them trains on positions the model never had)."""
    if recipe.data.max_prompt_length is not None:
        return recipe.data.max_prompt_length, None
    positions = getattr(_model_config(recipe).get_text_config(), "max_position_embeddings", None)
    if positions is None:
        return None, None
    name = f"the model's {int(positions):,} positions (max_position_embeddings; data.max_prompt_length is unset)"
    return int(positions), name


def _processor(recipe: Recipe):
    """The model's processor with the recipe's pixel range (as the run will see images); no weights."""
    from ..models.zoo import build_tiny_vlm, check_processor_matches, load_processor, set_pixel_range

    path = _model_path(recipe)
    processor = load_processor(path) if path is not None else build_tiny_vlm("qwen2_5_vl")[1]
    if path is not None:
        check_processor_matches(_model_config(recipe), processor, path)
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
    if args.use_vllm:
        from .vllm_rollouts import check_vllm

        features = [getattr(d, "features", None) or {} for d, _ in data.values() if d is not None]
        if _model_path(recipe) is None:
            raise ValueError("trl.use_vllm=true: vLLM loads the model from a checkpoint folder, and model.path is "
                             "null with no embedded default base on this machine: set model.path")
        check_vllm(args, _model_config(recipe), processor if processor is not None else _processor(recipe),
                   has_videos=any("videos" in f for f in features))
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
    config = _model_config(recipe)
    lines = _summary(recipe, args, rewards, data, peft_config, config, _processor(recipe), weights="not loaded")
    if args.save_strategy != "no":
        lines.append(checkpoint_space_line(recipe, config, peft_config, args.output_dir))
    return lines


def checkpoint_bytes(config, dtype: str, trainable_share: float = 1.0) -> int:
    """A checkpoint's size estimated from the model's config alone: the weights in `dtype` plus AdamW's two states
    for the trainable share of them (a weightless copy of the model is built to count the parameters)."""
    import torch
    from transformers import AutoModelForImageTextToText

    with torch.device("meta"):
        skeleton = AutoModelForImageTextToText.from_config(config)
    params = sum(p.numel() for p in skeleton.parameters())
    size = torch.empty((), dtype=getattr(torch, dtype)).element_size()
    return int(params * size * (1 + 2 * trainable_share))


def checkpoint_space_line(recipe: Recipe, config, peft_config, output_dir: str) -> str:
    """The dry run's line on checkpoint space: the estimate against what is free where the run writes; an error
    where not even one checkpoint fits."""
    import shutil

    need = checkpoint_bytes(config, recipe.model.dtype, 0.01 if peft_config is not None else 1.0)
    folder = Path(output_dir)
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    free = shutil.disk_usage(folder).free
    if free < need:
        raise ValueError(f"trl.output_dir {output_dir}: {free / 2**30:,.2f} GiB free, a checkpoint takes about "
                         f"{need / 2**30:,.2f} GiB (weights and optimizer states): free space or write elsewhere")
    keep = recipe.trl.get("save_total_limit")
    return (f"checkpoints: about {need / 2**30:,.2f} GiB each (weights and optimizer states, estimated from the "
            f"config), {free / 2**30:,.1f} GiB free in {folder}" + (f"; trl.save_total_limit keeps {keep}"
                                                                      if keep else ""))


def _summary(recipe: Recipe, args, rewards: list, data: dict, peft_config, config, processor,
             weights: str, model=None) -> list[str]:
    """What a run will do, line by line: printed by the dry run, logged at the start of a run (with its model)."""
    from ..probe import full_attention_layers, probe_layers_for

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
    if not files:
        lines.append("prompt lengths: not checked (the check applies to data files; these are synthetic)")
    elif recipe.data.max_prompt_length is None:
        limit, name = _prompt_limit(recipe)
        lines.append(f"prompt lengths: {' and '.join(files)} checked against {name}" if limit is not None else
                     "prompt lengths: not checked (data.max_prompt_length is not set, nor the model's positions)")
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
    site = a.capture_site(args) if a.credit_mode.scored_in_forward else "none (no probes)"
    layers = (probe_layers_for(num_layers, a.probe_layers, full_attention_layers(config.get_text_config()))
              if a.needs_probe else "none")
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

    package = {"flash_attention_2": "flash_attn", "flash_attention_3": "flash_attn_interface"}.get(
        recipe.model.attn_implementation)
    if package is not None and importlib.util.find_spec(package) is None:
        raise ValueError(f"model.attn_implementation={recipe.model.attn_implementation!r} needs the {package} "
                         "package, which is not installed: install it, or use sdpa (the probes run inside either)")
    if args.use_vllm:
        from .vllm_rollouts import vllm_version

        if vllm_version() is None:  # the rest of what vLLM rollouts need is checked with the data (check_vllm)
            raise ValueError("trl.use_vllm=true needs vLLM, which is not installed (pip install vllm on a GPU; "
                             "on the CPU see the README's vLLM section), or set trl.use_vllm: false to generate "
                             "with the training model")


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
    samples, report = load_samples(source, d.format, image_root=d.image_root, on_error=d.on_error,
                                   max_image_pixels=d.max_image_pixels, video=d.video_bounds())
    limit, name = _prompt_limit(recipe)
    if limit is not None:
        processor = processor if processor is not None else _processor(recipe)
        samples = check_prompt_lengths(samples, processor, limit, on_error=d.on_error, report=report,
                                       limit_name=name, video=d.video_bounds())
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


def _import_module(module_name: str):
    """`module_name` imported; a module not found is looked for in the current folder too (the console script's
    search path does not hold it, where `python -m` would)."""
    import importlib
    import sys

    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name != module_name.split(".")[0] or os.getcwd() in sys.path:
            raise
    sys.path.insert(0, os.getcwd())
    return importlib.import_module(module_name)


def _import_function(ref: str):
    module_name, sep, name = ref.partition(":")
    if not sep:
        raise ValueError(f"rewards.custom key {ref!r}: write it as 'package.module:function'")
    try:
        module = _import_module(module_name)
        func = getattr(module, name)
    except ModuleNotFoundError as err:
        raise ValueError(f"rewards.custom {ref!r} cannot be imported: {err}. The module must be importable: a file "
                         f"{module_name.replace('.', '/')}.py in the folder atrl runs from, on PYTHONPATH, or an "
                         "installed package") from err
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
                       anchor_config=recipe.anchor, callbacks=callbacks, video_bounds=recipe.data.video_bounds())
