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



@dataclass
class SFTCollator:
    """Turns examples (dicts with `prompt`, `image`, `reasoning`) into a padded batch with response-only labels."""

    processor: Any

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        tok = self.processor.tokenizer
        tok.padding_side = "right"
        prompts = [self.processor.apply_chat_template(r["prompt"], add_generation_prompt=True) for r in rows]
        texts = [p + r["reasoning"] + tok.eos_token for p, r in zip(prompts, rows)]
        images = [[r["image"]] for r in rows]
        batch = self.processor(text=texts, images=images, return_tensors="pt", padding=True)
        prompt_lens = [len(x) for x in self.processor(text=prompts, images=images)["input_ids"]]
        labels = batch["input_ids"].clone()
        labels[batch["attention_mask"] == 0] = -100
        for i, n in enumerate(prompt_lens):
            labels[i, :n] = -100
        batch["labels"] = labels
        return dict(batch)


def run_sft(model, processor, train_rows, out_dir: str | Path, *, epochs: float = 3.0, batch_size: int = 16,
            learning_rate: float = 2e-3, seed: int = 0, report_to: list[str] | None = None,
            progress: bool = True) -> Path:
    """Fine-tune `model` on `train_rows` (a datasets.Dataset from `to_hf_dataset`); saves model + processor."""
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
    model.train()
    side = processor.tokenizer.padding_side  # the collator pads on the right; the saved tokenizer keeps its own
    trainer = Trainer(model=model, args=args, train_dataset=train_rows, data_collator=SFTCollator(processor))
    trainer.train()
    processor.tokenizer.padding_side = side
    model.eval()
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out
