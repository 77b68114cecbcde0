"""Inputs: procedural visual-reasoning tasks (`synthetic`) and loaders for users' data-set files (`formats`)."""
