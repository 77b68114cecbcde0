"""Memory over a long run: the trainer process's resident memory (and its workers') every 25 optimizer steps.

    python benchmarks/memory_soak.py OUT_DIR STEPS [--section.key value ...]

Trains the embedded default with small settings (8 completions a step, 48 tokens) for STEPS steps, saving every 100
and writing anchor reports every 50 and TensorBoard logs, as a long run does; prints one `RSS (step, seconds,
trainer MiB, workers MiB, workers)` line each 25 steps and writes them to OUT_DIR/rss.json. A leak per step (a list
that grows, a tensor kept per batch) shows as a rising trainer column.
"""

import json
import sys
import time

import psutil
from transformers import TrainerCallback

from atrl.rl.recipe import load_recipe
from atrl.rl.run import run_training


class ResidentMemory(TrainerCallback):
    def __init__(self, every: int = 25):
        self.every, self.rows, self.t0 = every, [], time.time()

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.every == 0:
            me = psutil.Process()
            workers = me.children(recursive=True)
            row = (state.global_step, round(time.time() - self.t0, 1), me.memory_info().rss >> 20,
                   sum(w.memory_info().rss for w in workers) >> 20, len(workers))
            self.rows.append(row)
            print("RSS", row, flush=True)


if __name__ == "__main__":
    out, steps = sys.argv[1], sys.argv[2]
    recipe = load_recipe(None, ["--trl.output_dir", out, "--trl.max_steps", steps, "--trl.save_steps", "100",
                                "--trl.per_device_train_batch_size", "8", "--trl.num_generations", "4",
                                "--trl.max_completion_length", "48", "--trl.report_to", "[tensorboard]",
                                "--trl.disable_tqdm", "true", "--data.n", "256", "--anchor.report_steps", "50",
                                *sys.argv[3:]])
    watch = ResidentMemory()
    run_training(recipe, callbacks=[watch], progress=False)
    with open(f"{out}/rss.json", "w") as f:
        json.dump(watch.rows, f)
