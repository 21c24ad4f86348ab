"""Work split over several programs and merged by the last one to finish, inside one launch (split-K decode
attention, the MoE router at decode): each program stores its partial result, counts itself in on a per-group
counter, and the one that counts last reads every part and finishes. The counters live in buffers kept across
launches, each launch leaving them zero, so no memset runs and a captured CUDA graph can replay.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def last_to_finish(count_ptr, SPLITS):
    """Call after this program's part is stored: whether it is the last of the SPLITS programs counting on
    ``count_ptr``. The last one resets the counter for the next launch, and should read the parts with
    ``cache_modifier=".cg"`` (from L2, past its SM's L1)."""
    tl.debug_barrier()  # every thread's stores happen before the release
    last = tl.atomic_add(count_ptr, 1, sem="acq_rel") == SPLITS - 1
    if last:
        tl.store(count_ptr, 0)
    return last


_COUNTERS: dict = {}  # device -> every counter buffer made there, the largest last


def counters(n: int, device) -> torch.Tensor:
    """At least ``n`` zeroed counters on ``device``, shared by the kernels that merge this way (they run one after
    another on the stream). A larger need makes a larger buffer and the smaller ones stay alive: a captured CUDA
    graph keeps using the one it was captured with."""
    made = _COUNTERS.setdefault(torch.device(device), [])
    if not made or made[-1].numel() < n:
        made.append(torch.zeros(max(n, 64), dtype=torch.int32, device=device))
    return made[-1]
