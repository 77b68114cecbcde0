"""`atrl sft`: warm-start a VLM on reference reasoning traces, so that RL starts with a useful reward signal.

A plain supervised pass with the Hugging Face Trainer: each example is the chat-formatted prompt (image +
question) followed by the reference response `<think>...</think><answer>...</answer>` and the end-of-turn token;
the loss covers the response tokens only. On the synthetic tasks this teaches the response format and some
reading of the image; RL then has groups whose rewards are neither all 0 nor all 1.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

TRAIN_CHOICES = ("all", "vision")


@dataclass
class SFTCollator:
    """Turns examples (dicts with `prompt`, `image` or `videos`, `reasoning`) into a padded batch with
    response-only labels. Videos are decoded within `video_bounds` (default `VideoBounds()`)."""

    processor: Any
    video_bounds: Any = None

    def _media(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        if not any(r.get("videos") for r in rows):
            return {"images": [[r["image"]] for r in rows]}
        from ..data.formats import video_inputs
        from ..data.video import VideoBounds, decode_row_videos

        bounds = self.video_bounds or VideoBounds()
        images = [r["image"] for r in rows if r.get("image") is not None]  # a flat list: some rows have none
        videos = [v for r in rows for v in decode_row_videos(r, bounds)]
        return {**({"images": images} if images else {}), **video_inputs(self.processor, videos)}

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        tok = self.processor.tokenizer
        tok.padding_side = "right"
        prompts = [self.processor.apply_chat_template(r["prompt"], add_generation_prompt=True) for r in rows]
        texts = [p + r["reasoning"] + tok.eos_token for p, r in zip(prompts, rows)]
        media = self._media(rows)
        batch = self.processor(text=texts, return_tensors="pt", padding=True, **media)
        prompt_lens = [len(x) for x in self.processor(text=prompts, **media)["input_ids"]]
        labels = batch["input_ids"].clone()
        labels[batch["attention_mask"] == 0] = -100
        for i, n in enumerate(prompt_lens):
            labels[i, :n] = -100
        batch["labels"] = labels
        return dict(batch)


def language_model(model):
    """The decoder of a VLM (`get_decoder()`), or an error naming the class when it has none."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    if decoder is None or decoder is model:
        raise ValueError(f"{type(model).__name__}: no separate language model to freeze (get_decoder())")
    return decoder


def decoder_parameter_ids(model) -> set[int]:
    """The ids of the language model's parameters and the output head's (tied or not): what `vision` freezes."""
    ids = {id(p) for p in language_model(model).parameters()}
    return ids | {id(p) for p in model.get_output_embeddings().parameters()}


def select_trainable(model, train: str = "all", lora_r: int = 0):
    """What supervision updates: `all` the weights, or the `vision` side only (tower and connector; the language
    model frozen). `lora_r > 0` adds LoRA adapters of that rank to the language model's linear layers (with
    `vision`: they are the only decoder weights that train). Returns the model to train (a peft model with
    LoRA) and the number of trainable parameters."""
    if train not in TRAIN_CHOICES:
        raise ValueError(f"train={train!r}: choose one of {TRAIN_CHOICES}")
    if lora_r < 0:
        raise ValueError(f"lora_r={lora_r}: must be 0 (no adapters) or a positive rank")
    decoder = language_model(model)
    frozen = decoder_parameter_ids(model)
    for param in model.parameters():
        param.requires_grad_(train == "all" or id(param) not in frozen)
    if lora_r:
        from peft import LoraConfig, get_peft_model

        prefix = next(name for name, module in model.named_modules() if module is decoder)
        targets = rf"{prefix}\..*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
        trainable = {name for name, p in model.named_parameters() if p.requires_grad}
        model = get_peft_model(model, LoraConfig(r=lora_r, lora_alpha=2 * lora_r, target_modules=targets,
                                                 lora_dropout=0.0))
        for name, param in model.base_model.model.named_parameters():  # peft froze everything but the adapters
            if name in trainable:
                param.requires_grad_(True)
    return model, sum(p.numel() for p in model.parameters() if p.requires_grad)


def run_sft(model, processor, train_rows, out_dir: str | Path, *, epochs: float = 3.0, batch_size: int = 16,
            learning_rate: float = 2e-3, seed: int = 0, report_to: list[str] | None = None,
            progress: bool = True, train: str = "all", lora_r: int = 0,
            vision_learning_rate: float | None = None) -> Path:
    """Fine-tune `model` on `train_rows` (a datasets.Dataset from `to_hf_dataset`); saves model + processor.
    `train` and `lora_r` choose the weights that learn (`select_trainable`); adapters are merged before saving,
    so the folder is a plain checkpoint. `vision_learning_rate` (default: `learning_rate`) is the vision tower's
    and connector's: a random vision side beside a pretrained decoder wants a larger one."""
    from transformers import Trainer, TrainingArguments

    from .._io import ensure_writable_dir

    out = ensure_writable_dir(out_dir, argument="--out")
    args = TrainingArguments(
        output_dir=tempfile.mkdtemp(prefix="atrl-sft-"),  # nothing is saved there (save_strategy="no")
        num_train_epochs=epochs, per_device_train_batch_size=batch_size,
        learning_rate=learning_rate, lr_scheduler_type="cosine", warmup_steps=10, weight_decay=0.0,
        logging_steps=10, save_strategy="no", report_to=report_to or [], seed=seed, data_seed=seed,
        use_cpu=not torch.cuda.is_available(), remove_unused_columns=False, disable_tqdm=not progress,
        dataloader_num_workers=0,
    )
    model, _ = select_trainable(model, train, lora_r)
    model.train()
    side = processor.tokenizer.padding_side  # the collator pads on the right; the saved tokenizer keeps its own
    optimizer = None
    if vision_learning_rate is not None:
        decoder = decoder_parameter_ids(model)
        groups = [[p for p in model.parameters() if p.requires_grad and (id(p) in decoder) == is_decoder]
                  for is_decoder in (True, False)]
        optimizer = torch.optim.AdamW([{"params": groups[0], "lr": learning_rate},
                                       {"params": groups[1], "lr": vision_learning_rate}], weight_decay=0.0)
    trainer = Trainer(model=model, args=args, train_dataset=train_rows, data_collator=SFTCollator(processor),
                      optimizers=(optimizer, None))
    trainer.train()
    processor.tokenizer.padding_side = side
    if lora_r:
        model = model.merge_and_unload()
    model.eval()
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out
