"""Inputs: procedural visual-reasoning tasks with verifiable answers."""
