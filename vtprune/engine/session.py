"""The forward in progress on one wrapped model, and what it records: all that the hooks share between them."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import torch

from ..errors import ConcurrentCallError, WrappedCopyError
from ..record import PruneRecord
from .state import PruneState


class Uncopyable:
    """What a wrapped model and the caches it produced lead to (its handle, its session): refuses to be copied."""

    def __deepcopy__(self, memo: dict) -> Any:
        raise WrappedCopyError(
            "a vtprune-wrapped model (or a cache it produced) cannot be copied: the copy's hooks would still act "
            "on the original. Copy the model before pruning it (or after handle.remove()), then prune the copy."
        )

    def __reduce_ex__(self, protocol: Any) -> Any:
        raise WrappedCopyError(
            "a vtprune-wrapped model (or a cache it produced) cannot be pickled: its hooks belong to this "
            "process. Call handle.remove() (or leave the `with` block) first, and prune again after loading."
        )


class Session(Uncopyable):
    """One forward at a time: the state the input stage made for it (read by the decoder hooks) and its record.

    The input stage calls :meth:`begin` and sets :attr:`state`; a forward hook on the model calls :meth:`end`
    after every forward, failed ones included, so inner modules called later see no pruning.
    """

    def __init__(self, num_layers: int, schedule: str) -> None:
        self.num_layers = num_layers
        self.schedule = schedule
        #: State of the forward in progress (None: none, or a forward with nothing to prune).
        self.state: PruneState | None = None
        #: Record of the last prefill.
        self.record: PruneRecord | None = None
        # The decoder hooks read the state of "the" forward in progress, so forwards must not overlap.
        self._lock = threading.Lock()
        self._thread: int | None = None

    def begin(self) -> None:
        """Claim the model for this thread's forward, or refuse."""
        if not self._lock.acquire(blocking=False):
            raise ConcurrentCallError(
                "this vtprune-wrapped model is already running a forward in another thread; vtprune keeps the "
                "state of the forward in progress on the handle, so calls on one wrapped model must not overlap. "
                "Serialise the calls (a lock around generate()/forward) or prune one model instance per thread."
            )
        self._thread = threading.get_ident()

    def owns_forward(self) -> bool:
        """Whether this thread is inside a forward of the wrapped model."""
        return self._thread == threading.get_ident()

    def end(self) -> None:
        """End this thread's forward (the state lives on on its cache for the next decode step)."""
        if self._thread == threading.get_ident():
            self.state = None
            self._thread = None
            self._lock.release()

    def begin_record(self, state: PruneState | None, valid: torch.Tensor) -> None:
        lengths = valid.sum(dim=1, keepdim=True).cpu().expand(-1, self.num_layers).clone()
        images = [] if state is None else [item.record for item in state.items]
        self.record = PruneRecord(images=images, layer_lengths=lengths, schedule=self.schedule)

    def record_layer(self, layer: int, state: PruneState) -> None:
        """Tokens entering ``layer`` (and, until a later stage says otherwise, every layer after it)."""
        assert self.record is not None, "begin_record comes first"
        self.record.layer_lengths[:, layer:] = state.valid.sum(dim=1, keepdim=True).cpu()

    @contextmanager
    def timing(self, field: str) -> Iterator[None]:
        """Add the wall time of the block to ``record.<field>`` when it ran during a prefill.

        Unless a decoding step is known to be running, the block is also a ``vtprune.<field>`` range in
        ``torch.profiler`` traces, so a profile of a prefill shows vtprune's own share (``eval/bench_prefill.py
        --profile``). A range costs ~7 us, so the layer hooks, which run on every layer of every decoding step, open
        none there; the input hook opens one per step, since it learns whether the step decodes inside its block."""
        start = time.perf_counter()
        traced = self.state is None or self.state.prefilling
        try:
            with torch.profiler.record_function(f"vtprune.{field}") if traced else nullcontext():
                yield
        finally:
            if self.state is not None and self.state.prefilling and self.record is not None:
                setattr(self.record, field, getattr(self.record, field) + time.perf_counter() - start)
