"""A small asyncio batching queue in front of a captioner: requests that arrive together share model calls.

Each request becomes a job (its images and its decoding settings). The queue's loop takes the first job,
keeps collecting for up to ``max_wait_s`` or until ``max_batch`` images are waiting, then groups the jobs
by settings (one model call per group, split into chunks of at most ``max_batch`` images) and runs the
calls one after another in a single worker thread, so the event loop stays free to accept uploads.
Requests that arrive while the model runs pile up in the queue and form the next batch.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

RunFn = Callable[[list[Any], Any], list[Any]]


class BatcherClosedError(RuntimeError):
    """The batching queue is not running (the server is starting up or shutting down)."""


@dataclass
class BatchStats:
    """Counters since start-up; ``model_calls`` counts calls of the run function."""

    requests: int = 0
    images: int = 0
    model_calls: int = 0
    batches: int = 0
    largest_call: int = 0
    failed_calls: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


@dataclass
class _Job:
    items: list[Any]
    settings: Hashable
    future: asyncio.Future = field(repr=False)


class CaptionBatcher:
    """Batch ``run(items, settings) -> one result per item`` across concurrent ``submit`` calls.

    ``settings`` must be hashable (jobs are grouped by equality). ``run`` executes in one worker thread.
    """

    def __init__(self, run: RunFn, max_batch: int = 16, max_wait_s: float = 0.015) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if max_wait_s < 0:
            raise ValueError(f"max_wait_s must be >= 0, got {max_wait_s}")
        self._run = run
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.stats = BatchStats()
        self._queue: asyncio.Queue[_Job] | None = None
        self._task: asyncio.Task | None = None
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._current: list[_Job] = []  # the batch being run

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def start(self) -> None:
        if self.running:
            return
        self._queue = asyncio.Queue()
        # One thread: model calls never overlap (torch already spreads one call over the cores).
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="beit3cap-model")
        self._task = asyncio.create_task(self._loop(), name="beit3cap-batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._queue is not None:
            left = self._current + [self._queue.get_nowait() for _ in range(self._queue.qsize())]
            for job in left:
                if not job.future.done():
                    job.future.set_exception(BatcherClosedError("the server is shutting down"))
            self._current = []
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    async def submit(self, items: Sequence[Any], settings: Hashable) -> list[Any]:
        """Queue the items and wait for their results (in order). Raises whatever ``run`` raised."""
        if not self.running or self._queue is None:
            raise BatcherClosedError("the captioning queue is not running")
        if not items:
            return []
        job = _Job(list(items), settings, asyncio.get_running_loop().create_future())
        self.stats.requests += 1
        self.stats.images += len(job.items)
        await self._queue.put(job)
        return await job.future

    async def _loop(self) -> None:
        assert self._queue is not None
        loop = asyncio.get_running_loop()
        while True:
            jobs = [await self._queue.get()]
            waiting = len(jobs[0].items)
            deadline = loop.time() + self.max_wait_s
            while waiting < self.max_batch:
                try:
                    job = self._queue.get_nowait()
                except asyncio.QueueEmpty:
                    timeout = deadline - loop.time()
                    if timeout <= 0:
                        break
                    try:
                        job = await asyncio.wait_for(self._queue.get(), timeout)
                    except TimeoutError:
                        break
                jobs.append(job)
                waiting += len(job.items)
            self.stats.batches += 1
            self._current = jobs
            await self._run_jobs(jobs)
            self._current = []

    async def _run_jobs(self, jobs: list[_Job]) -> None:
        groups: dict[Hashable, list[_Job]] = {}
        for job in jobs:
            if not job.future.done():  # a client that went away has its future cancelled
                groups.setdefault(job.settings, []).append(job)
        loop = asyncio.get_running_loop()
        for settings, group in groups.items():
            items = [item for job in group for item in job.items]
            try:
                results: list[Any] = []
                for start in range(0, len(items), self.max_batch):
                    chunk = items[start:start + self.max_batch]
                    self.stats.model_calls += 1
                    self.stats.largest_call = max(self.stats.largest_call, len(chunk))
                    out = await loop.run_in_executor(self._executor, self._run, chunk, settings)
                    if len(out) != len(chunk):
                        raise RuntimeError(f"the captioner returned {len(out)} results for {len(chunk)} images")
                    results.extend(out)
            except Exception as exc:  # noqa: BLE001 - handed to the waiting requests, the loop goes on
                self.stats.failed_calls += 1
                for job in group:
                    if not job.future.done():
                        job.future.set_exception(exc)
                continue
            offset = 0
            for job in group:
                if not job.future.done():
                    job.future.set_result(results[offset:offset + len(job.items)])
                offset += len(job.items)
