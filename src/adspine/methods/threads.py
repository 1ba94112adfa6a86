"""Work spread over Python threads that each run one torch thread (SPADE's searches, the screens, NearestBank).

On small GEMMs and many small ops, a pool of single-threaded Python threads beats torch's own OpenMP threads: fewer
fork/joins, and none stalls on a barrier while another process holds a core.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import faiss
import torch

T = TypeVar("T")
R = TypeVar("R")


def map_one_thread_each(fn: Callable[[T], R], items: Sequence[T], workers: int | None = None) -> list[R]:
    """``[fn(i) for i in items]`` with torch on one thread meanwhile: on ``workers`` Python threads (default: one per
    item; faiss also runs one thread in each, under the caller's autograd mode), or here when there is one item. The
    caller's thread count is restored."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        if len(items) <= 1:
            return [fn(i) for i in items]

        inference, grad = torch.is_inference_mode_enabled(), torch.is_grad_enabled()

        def in_worker(item: T) -> R:
            faiss.omp_set_num_threads(1)  # this worker thread's OpenMP setting; the caller's is its own
            # autograd modes are per thread: the caller's (e.g. inference_mode, whose tensors may only be updated
            # in place inside it) carry over to the worker
            with torch.inference_mode(inference), torch.set_grad_enabled(grad):
                return fn(item)

        with ThreadPoolExecutor(min(workers or len(items), len(items))) as pool:
            return list(pool.map(in_worker, items))
    finally:
        torch.set_num_threads(old)
