"""A training progress bar that shows the live reward and anchor fraction instead of printing every log dict."""

from __future__ import annotations

from transformers.trainer_callback import ProgressCallback

_SHOWN = {"reward": "reward", "rewards/accuracy_reward/mean": "acc", "atrl/anchor_fraction": "anchors",
          "loss": "loss"}


class AnchorProgressCallback(ProgressCallback):
    """tqdm bar over optimizer steps; its postfix carries reward, accuracy, anchor fraction and loss."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and self.training_bar is not None and logs:
            shown = {short: f"{logs[key]:.3g}" for key, short in _SHOWN.items()
                     if isinstance(logs.get(key), (int, float))}
            if shown:
                self.training_bar.set_postfix(shown, refresh=True)


def install_progress(trainer) -> None:
    """Swap the Trainer's default progress printer for `AnchorProgressCallback`."""
    trainer.remove_callback(ProgressCallback)
    if not trainer.args.disable_tqdm:
        trainer.add_callback(AnchorProgressCallback())
