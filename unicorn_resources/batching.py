"""Batched model calls that survive CUDA out-of-memory: an OOM halves the batch and retries it.

torch is imported where it is used, not here: every process that loads the Definitions imports
this module, and most of them (Stage 1 runs, the code server) never run a model on torch."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


class BatchTooLargeError(RuntimeError):
    """A single item does not fit in accelerator memory."""


class OomBatcher:
    """Maps a function over batches of `batch_size` items. On `torch.cuda.OutOfMemoryError` the
    failed batch is retried at half the size; the smaller size is kept for the rest of this
    batcher's life (one per run), so later calls do not hit the same wall again."""

    def __init__(self, batch_size: int, log: Callable[[str], None] | None = None, what: str = "batch"):
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.batch_size = batch_size
        self.log = log
        self.what = what

    def map(self, fn: Callable[[Sequence[T]], R], items: Sequence[T]) -> list[R]:
        """[fn(batch) for each batch of items], in order; each item is in exactly one batch."""
        import torch

        results: list[R] = []
        start = 0
        while start < len(items):
            batch = items[start : start + self.batch_size]
            try:
                results.append(fn(batch))
            except torch.cuda.OutOfMemoryError as err:
                self._shrink(len(batch), err)
                continue
            start += len(batch)
        return results

    def _shrink(self, failed_size: int, err: Exception) -> None:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if failed_size <= 1:
            raise BatchTooLargeError(
                f"out of GPU memory on a single {self.what}: lower the model's precision (fp16/"
                f"bf16), free the GPU from other processes, or use a smaller model ({err})"
            ) from err
        self.batch_size = max(1, failed_size // 2)
        if self.log:
            self.log(f"CUDA out of memory on a {self.what} batch of {failed_size}; "
                     f"retrying with batch size {self.batch_size}")
