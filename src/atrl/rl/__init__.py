"""Training: the AT-RL trainer on TRL (`trainer`), its config (`config`), YAML recipes (`recipe`), verifiable
rewards (`rewards`), the SFT warm start (`sft`), checkpoints and the progress bar. Import the submodules."""
