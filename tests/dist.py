"""A pool of gloo ranks that stays up for the whole test session (as in lightly's tests).

Starting processes and a process group costs seconds, so the ranks start once and then run
any number of picklable functions: ``pool.run(fn, *args)`` calls ``fn(*args)`` in every rank at
the same time and returns the results in rank order. Functions must live in an importable
module (a test file is fine: spawned ranks get the parent's ``sys.path``).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import socket
import traceback
from collections.abc import Callable
from datetime import timedelta
from queue import Empty
from typing import Any

# A collective that a failed rank never joins times out after this, instead of hanging a test.
COLLECTIVE_TIMEOUT_S = 30
RESULT_TIMEOUT_S = 120


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(rank: int, world_size: int, port: int, tasks: mp.Queue, results: mp.Queue) -> None:
    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)  # two ranks on two cores
    dist.init_process_group(
        "gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S)
    )
    try:
        while (task := tasks.get()) is not None:
            fn, args, kwargs = task
            try:
                results.put((rank, True, fn(*args, **kwargs)))
            except BaseException:
                results.put((rank, False, traceback.format_exc()))
    finally:
        dist.destroy_process_group()


class GlooPool:
    """``world_size`` spawned processes in one gloo process group on 127.0.0.1."""

    def __init__(self, world_size: int = 2):
        self.world_size = world_size
        self._procs: list[mp.Process] = []

    def _start(self) -> None:
        ctx = mp.get_context("spawn")
        port = _free_port()
        self._tasks = [ctx.Queue() for _ in range(self.world_size)]
        self._results = ctx.Queue()
        self._procs = [
            ctx.Process(
                target=_serve,
                args=(rank, self.world_size, port, self._tasks[rank], self._results),
                daemon=True,
            )
            for rank in range(self.world_size)
        ]
        for p in self._procs:
            p.start()

    def run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> list[Any]:
        """``fn(*args, **kwargs)`` in every rank; the results in rank order.

        Raises:
            RuntimeError: A rank raised (its traceback is in the message) or did not answer.
                The pool is then restarted on the next call, since the group may be unusable.
        """
        if not self._procs or not all(p.is_alive() for p in self._procs):
            self.close()
            self._start()
        for q in self._tasks:
            q.put((fn, args, kwargs))
        out: dict[int, Any] = {}
        while len(out) < self.world_size:
            try:
                rank, ok, value = self._results.get(timeout=RESULT_TIMEOUT_S)
            except Empty:
                value, ok = f"a rank gave no answer within {RESULT_TIMEOUT_S}s", False
                rank = "?"
            if not ok:
                # The other ranks may be stuck in a collective: stop them now, restart next call.
                self.close(wait_s=0)
                raise RuntimeError(f"{getattr(fn, '__name__', fn)} failed on rank {rank}:\n{value}")
            out[rank] = value
        return [out[r] for r in range(self.world_size)]

    def close(self, wait_s: float = 10) -> None:
        """Stop the ranks: ask them to leave the group, then terminate any still running."""
        for p, q in zip(self._procs, getattr(self, "_tasks", []), strict=False):
            if p.is_alive():
                q.put(None)
        for p in self._procs:
            p.join(timeout=wait_s)
            if p.is_alive():
                p.terminate()
                p.join(timeout=5)
        self._procs = []
