"""`atrl demo`: the embedded default, end to end on the CPU.

What it runs today (stages that later land are added here as they do):
  1. builds the default tiny Qwen2.5-VL (random weights, seeded) and saves it as a checkpoint folder;
  2. draws held-out synthetic tasks and writes a PNG grid of them;
  3. lets the model answer them with greedy decoding and scores the answers (exact match).
It does not train yet: the RL trainer is not part of this release, and the printed table says so.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch


def _extract_answer(text: str) -> str:
    m = re.search(r"<answer>(.*?)</answer>", text, flags=re.S)
    return (m.group(1) if m else "").strip()


def run_demo(out_dir: Path, seed: int = 0, n_eval: int = 10, max_new_tokens: int = 48) -> dict:
    from rich.console import Console
    from rich.progress import Progress
    from rich.table import Table

    from .data.synthetic import build_prompt, generate
    from .models.zoo import build_tiny_vlm, ensure_writable_dir, save_model
    from .viz.grid import task_grid

    console = Console()
    out = ensure_writable_dir(out_dir, argument="--out")
    torch.manual_seed(seed)
    console.print("[bold]atrl demo[/bold]: tiny Qwen2.5-VL on synthetic visual-reasoning tasks (CPU)")
    model, processor = build_tiny_vlm("qwen2_5_vl", seed=seed)
    model_dir = save_model(model, processor, out / "base-model")
    held_out = generate(n_eval, seed=10_000 + seed)
    grid = task_grid(held_out, out / "tasks.png")
    console.print(f"model -> {model_dir}\ntask grid -> {grid}")

    processor.tokenizer.padding_side = "left"
    correct = 0
    rows = []
    with Progress(console=console, transient=True) as bar:
        task = bar.add_task("answering held-out tasks", total=len(held_out))
        for ex in held_out:
            text = processor.apply_chat_template(build_prompt(ex.question), add_generation_prompt=True)
            batch = processor(text=[text], images=[[ex.image]], return_tensors="pt")
            with torch.no_grad():
                ids = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False)
            response = processor.tokenizer.decode(ids[0, batch["input_ids"].shape[1]:], skip_special_tokens=True)
            ok = _extract_answer(response) == ex.answer
            correct += ok
            rows.append((ex.family, ex.question, ex.answer, response[:40], ok))
            bar.advance(task)

    table = Table(title=f"held-out tasks (untrained base, seed {seed})")
    for col in ("family", "question", "answer", "response (first 40 chars)", "correct"):
        table.add_column(col)
    for fam, q, a, r, ok in rows:
        table.add_row(fam, q, a, repr(r), "yes" if ok else "no")
    console.print(table)
    accuracy = correct / max(1, len(held_out))
    console.print(f"accuracy of the untrained base: {accuracy:.2f} ({correct}/{len(held_out)})")
    console.print("[yellow]Not yet in this release: the SFT warm start and the AT-RL training stage; "
                  "this demo shows the data, the model and its untrained answers.[/yellow]")
    return {"accuracy": accuracy, "model_dir": str(model_dir), "grid": str(grid)}
