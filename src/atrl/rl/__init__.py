"""Training: the AT-RL trainer on TRL (`trainer`), its config (`config`), YAML recipes (`recipe`: the schema;
`build`: from a recipe to a trainer, and the dry run; `run`: resume and the run loop), verifiable rewards
(`rewards`), the SFT warm start (`sft`), checkpoints and the progress bar. Import the submodules."""
