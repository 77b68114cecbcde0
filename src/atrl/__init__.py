"""atrl: Anchor-Token reinforcement learning for vision-language models (arXiv 2602.11455).

Submodules are imported on use; `import atrl` has no side effects.
"""

__version__ = "0.1.0"
