"""Run `atrl train` logic in a subprocess for the resume and multi-process tests.

    python tests/scripts/run_recipe.py OUT_DIR MAX_STEPS CRASH_AT_STEP [--section.key value ...]

Trains the embedded default (small settings) for MAX_STEPS; with CRASH_AT_STEP > 0 the process dies with
os._exit(3) at the end of that step, before anything else is written, as a killed job would.
"""

import os
import sys

from transformers import TrainerCallback

from atrl.rl.recipe import load_recipe, run_training


def diversity_reward(prompts, completions, **columns):
    """A reward that varies between completions, so that every step has a gradient."""
    return [len(set(c[-1]["content"])) / 10 for c in completions]


class Crash(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            os._exit(3)


def main():
    out, max_steps = sys.argv[1], int(sys.argv[2])
    crash = int(sys.argv[3])
    recipe = load_recipe(None, ["--trl.output_dir", out, "--trl.max_steps", str(max_steps), "--trl.save_steps", "2",
                                "--trl.per_device_train_batch_size", "4", "--trl.num_generations", "4",
                                "--trl.max_completion_length", "40", "--trl.learning_rate", "1e-3",
                                "--trl.report_to", "[]", "--trl.disable_tqdm", "true", "--data.n", "32",
                                "--trl.save_total_limit", "null",
                                "--rewards.custom", "{run_recipe:diversity_reward: 1.0}", *sys.argv[4:]])
    run_training(recipe, callbacks=[Crash(crash)] if crash else None, progress=False)


if __name__ == "__main__":
    main()
