"""Process-group helpers for commands that run under `accelerate launch` / `torchrun`."""

from __future__ import annotations


def leave_together() -> None:
    """Under several processes, all leave together and close the process group: a process that left while the
    first still gathered or wrote, its connections open, could abort at exit (gloo: "terminate called without an
    active exception")."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
