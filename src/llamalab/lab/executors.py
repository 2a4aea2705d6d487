"""Where tasks run: local worker processes (concurrent.futures), Ray tasks, or this process.

Every executor has `submit(fn, task, cpus) -> concurrent.futures.Future` and `shutdown()`, so the driver
waits on one kind of future whatever runs the work (a Ray ObjectRef becomes one with `.future()`).
Each task gets a fresh process (`max_tasks_per_child=1`, Ray's `max_calls=1`): a cell's memory, thread
count and registries never leak into the next, and the peak memory a cell reports is its own.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import multiprocessing
import sys
from collections.abc import Callable
from typing import Any

from llamalab.errors import LlamalabError


class InlineExecutor:
    """Runs each task at once in this process (`--workers 0`): for debugging and overhead measurements."""

    name = "inline"

    def submit(self, fn: Callable[[dict], dict], task: dict[str, Any], cpus: int = 1) -> cf.Future:
        fut: cf.Future = cf.Future()
        fut.set_result(fn(task))
        return fut

    def shutdown(self) -> None:
        pass


class LocalExecutor:
    """`--workers N` worker processes on this machine (spawned, so no forked torch thread pools)."""

    name = "local"

    def __init__(self, workers: int) -> None:
        kwargs: dict[str, Any] = {"max_workers": workers, "mp_context": multiprocessing.get_context("spawn")}
        if sys.version_info >= (3, 11):
            kwargs["max_tasks_per_child"] = 1
        self.pool = cf.ProcessPoolExecutor(**kwargs)

    def submit(self, fn: Callable[[dict], dict], task: dict[str, Any], cpus: int = 1) -> cf.Future:
        return self.pool.submit(fn, task)

    def shutdown(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


class RayExecutor:
    """Ray tasks on a cluster: `address` is `auto` (the cluster this machine belongs to), `local` (start
    one here for this run), or a cluster address (`host:6379`, `ray://host:10001`). Each task asks for as
    many CPUs as the cell's threads. Artifacts and relative paths must be on a file system every node
    sees (the grid folder on a shared mount)."""

    name = "ray"

    def __init__(self, address: str) -> None:
        try:
            import ray
        except ImportError:
            raise LlamalabError("--ray needs the ray package: pip install 'llamalab[lab]'") from None
        self.ray = ray
        self.owned = False
        if not ray.is_initialized():
            kwargs: dict[str, Any] = {
                "include_dashboard": False,
                "log_to_driver": False,
                "logging_level": logging.WARNING,
            }
            try:
                if address == "local":  # every CPU of this machine; tasks ask for their threads' worth
                    ray.init(**kwargs)
                else:
                    ray.init(address=address, **kwargs)
            except (ConnectionError, RuntimeError, ValueError) as e:
                raise LlamalabError(f"--ray {address}: cannot connect to a Ray cluster: {e}") from None
            self.owned = True
        self._remote: dict[Callable, Any] = {}

    def submit(self, fn: Callable[[dict], dict], task: dict[str, Any], cpus: int = 1) -> cf.Future:
        if fn not in self._remote:
            self._remote[fn] = self.ray.remote(max_calls=1)(fn)
        # a task asking for more CPUs than the largest node has would wait forever: ask for at most that
        most = max((n["Resources"].get("CPU", 0) for n in self.ray.nodes() if n.get("Alive")), default=1)
        return self._remote[fn].options(num_cpus=min(cpus, max(most, 1))).remote(task).future()

    def shutdown(self) -> None:
        if self.owned:
            self.ray.shutdown()


def make_executor(workers: int, ray: str | None):
    if ray:
        return RayExecutor(ray)
    if workers < 0:
        raise LlamalabError(f"--workers must be 0 (this process) or more, got {workers}")
    return InlineExecutor() if workers == 0 else LocalExecutor(workers)
