"""Worker processes that map a function over chunks of items and hand the results back in chunk order.

Used to build the data cache (``dataset._Workers``); nothing here knows about records or tensors.

Why "spawn", never "fork": the parent may hold Ray's threads, torch's OpenMP pool and the Rust tokenizers' thread
pool. A forked child inherits their locks but not the threads that would release them, and can hang on one. A
spawned child starts a fresh interpreter: it imports only what unpickling the function and the shared object
needs (for a processor: torch and transformers; never Ray or MLflow), plus the parent's ``__main__`` module, as
every spawned process does (so a script must keep its work under ``if __name__ == "__main__":``).

Why in order: the parent consumes each chunk's results as they come, in chunk order, so what it writes is exactly
what one process would have written (the cache file is the same, byte for byte, and errors come in file order).
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

# Each worker runs one thread: the processes are the parallelism (N workers x N OpenMP threads would oversubscribe
# the cores), and the tokenizers library's own thread pool warns, or worse, once processes are involved.
WORKER_ENV = {"TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}

__all__ = ["BrokenProcessPool", "OrderedPool", "SetupFailed", "pickled"]


class SetupFailed(RuntimeError):
    """A worker could not unpickle the shared object (raised for every task it is given)."""


def pickled(obj: Any) -> tuple[bytes | None, str | None]:
    """``(bytes, None)``, or ``(None, why)`` when ``obj`` cannot be pickled (some remote-code processors)."""
    try:
        return pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL), None
    except Exception as err:  # noqa: BLE001 - pickle raises many types (TypeError, AttributeError, PicklingError)
        return None, f"{type(err).__name__}: {err}"


# ---------------------------------------------------------------- the worker side
_shared: Any = None  # this worker's copy of the shared object, unpickled once by _start


def _start(blob: bytes, env: dict[str, str]) -> None:
    """Pool initializer. Never raises: an initializer that fails breaks the whole pool with an unhelpful error,
    so a failure is kept and raised by each task instead (the parent then falls back to one process)."""
    global _shared
    os.environ.update(env)  # before the unpickling below imports torch / tokenizers
    try:
        _shared = pickle.loads(blob)
    except Exception as err:  # noqa: BLE001 - any import or unpickling error
        _shared = SetupFailed(f"{type(err).__name__}: {err}")


def _run(fn: Callable[[Any, list], Any], chunk: list) -> Any:
    if isinstance(_shared, SetupFailed):
        raise _shared
    return fn(_shared, chunk)


# ---------------------------------------------------------------- the parent side
class OrderedPool:
    """``processes`` spawned workers, each holding one copy of the pickled ``shared`` object; started on first use.

    ``map(fn, chunks)`` yields ``fn(shared, chunk)`` for each chunk, in chunk order, with at most ``ahead`` chunks
    submitted and not yet consumed (memory stays bounded however many chunks there are). An exception raised by
    ``fn`` in a worker is raised here unchanged (same type and message; its ``__cause__`` holds the worker's
    traceback). A worker that dies (killed, out of memory) raises ``BrokenProcessPool``; one that cannot unpickle
    ``shared`` raises ``SetupFailed`` for the first chunk.
    """

    def __init__(self, processes: int, shared: bytes, ahead: int | None = None):
        self.processes = processes
        self.ahead = ahead or 2 * processes
        self._shared = shared
        self._executor: ProcessPoolExecutor | None = None

    def map(self, fn: Callable[[Any, list], Any], chunks: Iterable[list]) -> Iterator[Any]:
        if self._executor is None:
            self._executor = ProcessPoolExecutor(self.processes, mp_context=multiprocessing.get_context("spawn"),
                                                 initializer=_start, initargs=(self._shared, WORKER_ENV))
        chunks = iter(chunks)
        pending: deque[Future] = deque()

        def submit() -> None:
            chunk = next(chunks, None)
            if chunk is not None:
                pending.append(self._executor.submit(_run, fn, chunk))

        try:
            for _ in range(self.ahead):
                submit()
            while pending:
                result = pending.popleft().result()  # the oldest first: results in chunk order
                submit()
                yield result
        finally:
            for future in pending:  # on an error, or a consumer that stopped early: drop the queued chunks
                future.cancel()

    def close(self) -> None:
        """Stops the workers (a chunk being tokenised is finished first; queued ones were cancelled by ``map``)."""
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None

    def __enter__(self) -> "OrderedPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
