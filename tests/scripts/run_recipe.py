"""Run `atrl train` logic in a subprocess for the resume and multi-process tests.

    python tests/scripts/run_recipe.py OUT_DIR MAX_STEPS CRASH [--section.key value ...]

Trains the embedded default (small settings) for MAX_STEPS. CRASH N > 0: the process dies with os._exit(3) at the
end of step N, before anything else is written, as a killed job would. CRASH termN: SIGTERM to the process group
during step N (exit status 143 once the run has stopped).
"""

import os
import signal
import sys

from transformers import TrainerCallback

from atrl._dist import leave_together
from atrl.rl.recipe import load_recipe
from atrl.rl.run import run_training


def diversity_reward(prompts, completions, **columns):
    """A reward that varies between completions, so that every step has a gradient."""
    return [len(set(c[-1]["content"])) / 10 for c in completions]


class Crash(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            os._exit(3)


class Terminate(TrainerCallback):
    """SIGTERM to the whole process group (workers included, as a cluster's scheduler sends it) during a step."""

    def __init__(self, step):
        self.step = step

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step + 1 == self.step:
            os.killpg(os.getpgid(0), signal.SIGTERM)


def main():
    out, max_steps = sys.argv[1], int(sys.argv[2])
    crash = sys.argv[3]  # N: os._exit at the end of step N; termN: SIGTERM during step N; 0: neither
    recipe = load_recipe(None, ["--trl.output_dir", out, "--trl.max_steps", str(max_steps), "--trl.save_steps", "2",
                                "--trl.per_device_train_batch_size", "4", "--trl.num_generations", "4",
                                "--trl.max_completion_length", "40", "--trl.learning_rate", "1e-3",
                                "--trl.report_to", "[]", "--trl.disable_tqdm", "true", "--data.n", "32",
                                "--trl.save_total_limit", "null",
                                "--rewards.custom", "{run_recipe:diversity_reward: 1.0}", *sys.argv[4:]])
    callbacks = [Terminate(int(crash[4:]))] if crash.startswith("term") else [Crash(int(crash))] if int(crash) else []
    trainer = run_training(recipe, callbacks=callbacks, progress=False)
    leave_together()  # as `atrl train` does: a rank that left first could abort at exit (gloo)
    if trainer.stopped_by_signal:
        sys.exit(128 + getattr(signal, trainer.stopped_by_signal))


if __name__ == "__main__":
    main()
