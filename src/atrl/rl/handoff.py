"""Getting connectivity to the credit workers without making the GPU wait (docs/ALGORITHM.md, "Trainer").

    credit = CreditInFlight(options)
    credit.hand_on(start, mask_bT, capture.connectivity_parts(mask_bT))  # in the forward, after the last probed layer
    ...                                                     # the GPU computes the rest; METIS runs in the workers
    weights = credit.ready().result(rows).weights           # when the loss needs them

`hand_on` runs on the training thread and returns at once: on a GPU it queues an asynchronous device-to-host
copy of the rows' connectivity parts (per-token sums of the region masses, `atrl.probe.ConnectivityParts`)
behind the kernels that produce them and marks the point with a CUDA event; one helper thread per process waits
for that event (the training thread goes on launching kernels), finishes connectivity and profiles on the host
and submits the rows to `PendingCredit`, whose worker processes partition them. The forward thus launches 3
kernels per capture for credit instead of the whole reduction's 27. Rows already on the CPU are finished and
submitted on the calling thread: there is no copy to wait for, and a helper thread would only compete with
torch's own CPU threads (the embedded default's steps took 3-5% longer with it). `ready()` joins the hand-offs
made so far.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

import torch

from ..credit import CreditOptions, PendingCredit
from ..probe import ConnectivityParts

_HELPER: ThreadPoolExecutor | None = None


def _helper() -> ThreadPoolExecutor:
    global _HELPER
    if _HELPER is None:
        _HELPER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="atrl-credit-handoff")
    return _HELPER


class CreditInFlight:
    """One batch's credit: rows handed on as their connectivity appears, read back when a loss needs them."""

    def __init__(self, options: CreditOptions, helper: bool | None = None):
        """helper: submit from the helper thread; None = only rows that come from a CUDA device."""
        self.pending = PendingCredit(options)
        self.helper = helper
        self._handoffs: list[Future] = []

    def hand_on(self, start: int, mask_BT: torch.Tensor, parts: ConnectivityParts) -> None:
        """Rows start .. start + B - 1: copy to the host asynchronously, finish and submit from the helper thread."""
        cuda = any(t.is_cuda for t in (mask_BT, parts.visual_LBTH, parts.region_BTR))
        if not (self.helper if self.helper is not None else cuda):
            self.submit_parts_now(start, mask_BT, parts)
            return
        host_mask = mask_BT.detach().to("cpu", non_blocking=True)
        host_parts = parts.to("cpu", non_blocking=True)
        event = None
        if cuda:
            event = torch.cuda.Event()
            event.record()

        def submit() -> None:
            if event is not None:
                event.synchronize()  # the copy has landed; the GPU may be far ahead by now
            self.submit_now(start, host_mask, *host_parts.finish(host_mask))

        self._handoffs.append(_helper().submit(submit))

    def submit_parts_now(self, start: int, mask_BT: torch.Tensor, parts: ConnectivityParts) -> None:
        """Rows start .. start + B - 1, on this thread: copy to the host (waiting for the device), finish, submit."""
        mask = mask_BT.detach().cpu()
        self.submit_now(start, mask, *parts.to("cpu").finish(mask))

    def submit_now(self, start: int, mask_BT: torch.Tensor, conn_BT: torch.Tensor | None,
                   profile_BTR: torch.Tensor | None, entropy_BT: torch.Tensor | None = None) -> None:
        """Submit rows on this thread. `conn_BT` None: a mode without probes (entropy), zeros stand in. Rows whose
        inputs are unusable (e.g. non-finite connectivity) are marked failed, so that reading them raises and
        the trainer can fall back to uniform weights for them."""
        B, T = mask_BT.shape
        if conn_BT is None:
            conn_BT, profile_BTR = torch.zeros(B, T), torch.zeros(B, T, 1)
        try:
            self.pending.submit(conn_BT, profile_BTR, mask_BT, entropy_BT, row_offset=start)
        except ValueError as err:
            self.pending.fail(range(start, start + B), err)

    def ready(self) -> PendingCredit:
        """The PendingCredit once every hand-off so far has been submitted (a hand-off's own error is raised)."""
        handoffs, self._handoffs = self._handoffs, []
        for f in handoffs:
            f.result()
        return self.pending
