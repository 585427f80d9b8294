"""The scheduler's bridge between the model thread and asyncio, on a scripted fake engine (no model): events
reach the right queue, the queue bound, cancellation, an engine crash, shutdown's final event, jobs."""
from __future__ import annotations

import asyncio
import threading
import time
from types import SimpleNamespace

import pytest

from llamaforge.generate.engine import TokenEvent
from llamaforge.server.metrics import Metrics
from llamaforge.server.scheduler import ERROR, SHUTDOWN, QueueFullError, Scheduler, ShuttingDownError, Stream


class FakeRequest(SimpleNamespace):
    __hash__ = object.__hash__  # identity, like the engine's Request
    __eq__ = object.__eq__


class FakeEngine:
    """Each request emits `params.max_tokens` tokens (id = its position), one per step, `max_batch` at a time."""

    crash_next = False

    def __init__(self, lm, max_batch, max_seq_len):
        self.max_batch, self.max_seq_len = max_batch, max_seq_len or 64
        self._queue, self._rows, self.lock = [], [], threading.Lock()

    @property
    def active(self):
        return len(self._rows)

    @property
    def queued(self):
        return len(self._queue)

    def has_work(self):
        return bool(self._queue or self._rows)

    def add(self, ids, params, processors=None, *, user_data=None):
        r = FakeRequest(prompt_ids=list(ids), params=params, user_data=user_data, done=False, n=0,
                        completion_tokens=0, finish_reason=None, id=len(ids))
        with self.lock:
            self._queue.append(r)
        return r

    def cancel(self, r):
        with self.lock:
            if r in self._queue:
                self._queue.remove(r)
            if r in self._rows:
                self._rows.remove(r)
            r.done = True

    def step(self):
        time.sleep(0.002)  # a step takes time, as a model forward does
        if FakeEngine.crash_next:
            FakeEngine.crash_next = False
            raise RuntimeError("boom")
        with self.lock:
            while self._queue and len(self._rows) < self.max_batch:
                self._rows.append(self._queue.pop(0))
            out = []
            for r in list(self._rows):
                r.n += 1
                r.completion_tokens = r.n
                fin = "length" if r.n >= r.params.max_tokens else None
                if fin:
                    r.done, r.finish_reason = True, fin
                    self._rows.remove(r)
                out.append((r, TokenEvent(r.n, f"t{r.n} ", 0.0, None, fin)))
        return out


def _sched(**kw):
    return Scheduler(SimpleNamespace(name="fake"), engine_factory=FakeEngine, metrics=Metrics(), **kw)


async def _collect(q: asyncio.Queue, n_streams: int) -> dict[int, list]:
    got: dict[int, list] = {}
    done = 0
    while done < n_streams:
        idx, ev = await asyncio.wait_for(q.get(), 10)
        got.setdefault(idx, []).append(ev)
        done += ev.finish_reason is not None
    return got


def test_events_reach_their_streams_and_queue_bound():
    async def main():
        s = _sched(max_batch=2, max_queue=1)
        loop, q = asyncio.get_running_loop(), asyncio.Queue()
        streams = [Stream(loop, q, index=i) for i in range(3)]
        for i, st in enumerate(streams):
            s.submit([1] * (i + 1), SimpleNamespace(max_tokens=3 + i), st)
        with pytest.raises(QueueFullError):  # 2 rows + 1 waiting: the 4th has no room
            s.submit([1], SimpleNamespace(max_tokens=1), Stream(loop, q, index=9))
        got = await _collect(q, 3)
        assert {i: [e.text for e in evs] for i, evs in got.items()} == {
            0: ["t1 ", "t2 ", "t3 "], 1: ["t1 ", "t2 ", "t3 ", "t4 "], 2: ["t1 ", "t2 ", "t3 ", "t4 ", "t5 "]}
        assert s.metrics.generated_tokens.value(model="fake") == 12
        assert s.metrics.rejected.value(model="fake") == 1
        assert not s.busy
        s.shutdown()
    asyncio.run(main())


def test_cancel_stops_events_and_frees_row():
    async def main():
        s = _sched(max_batch=1, max_queue=4)
        loop, q = asyncio.get_running_loop(), asyncio.Queue()
        a, b = Stream(loop, q, index=0), Stream(loop, q, index=1)
        s.submit([1], SimpleNamespace(max_tokens=10_000), a)
        s.submit([1], SimpleNamespace(max_tokens=2), b)
        idx, ev = await asyncio.wait_for(q.get(), 10)
        assert idx == 0
        n_at_cancel = a.request.n
        s.cancel(a)
        got = await _collect(q, 1)
        assert [e.finish_reason for e in got[1]] == [None, "length"]
        # a produced at most the tokens of the step(s) in flight while we cancelled, and nothing after
        assert a.request.n <= n_at_cancel + 2
        assert all(e.id <= n_at_cancel + 2 for e in got.get(0, []))
        assert s.metrics.cancelled.value(model="fake") == 1 and not s.busy
        s.shutdown()
    asyncio.run(main())


def test_engine_crash_fails_requests_and_recovers():
    async def main():
        s = _sched(max_batch=2, max_queue=4)
        loop, q = asyncio.get_running_loop(), asyncio.Queue()
        FakeEngine.crash_next = True
        s.submit([1], SimpleNamespace(max_tokens=5), Stream(loop, q, index=0))
        idx, ev = await asyncio.wait_for(q.get(), 10)
        assert ev.finish_reason == ERROR and "boom" in ev.text
        s.submit([1], SimpleNamespace(max_tokens=2), Stream(loop, q, index=1))  # a fresh engine serves
        got = await _collect(q, 1)
        assert got[1][-1].finish_reason == "length"
        s.shutdown()
    asyncio.run(main())


def test_shutdown_sends_final_event_and_refuses_work():
    async def main():
        s = _sched(max_batch=1, max_queue=4)
        loop, q = asyncio.get_running_loop(), asyncio.Queue()
        s.submit([1], SimpleNamespace(max_tokens=10 ** 9), Stream(loop, q, index=0))
        s.submit([1], SimpleNamespace(max_tokens=10 ** 9), Stream(loop, q, index=1))  # still queued
        await asyncio.wait_for(q.get(), 10)
        await asyncio.to_thread(s.shutdown)
        finals = {}
        while len(finals) < 2:
            idx, ev = await asyncio.wait_for(q.get(), 10)
            if ev.finish_reason is not None:
                finals[idx] = ev.finish_reason
        assert finals == {0: SHUTDOWN, 1: SHUTDOWN}
        with pytest.raises(ShuttingDownError):
            s.submit([1], SimpleNamespace(max_tokens=1), Stream(loop, q))
        with pytest.raises(ShuttingDownError):
            s.run_job(lambda: 1)
    asyncio.run(main())


def test_jobs_run_on_the_model_thread_between_steps():
    async def main():
        s = _sched()
        fut = s.run_job(lambda: threading.current_thread().name)
        assert await asyncio.wrap_future(fut) == "scheduler-fake"
        bad = s.run_job(lambda: 1 / 0)
        with pytest.raises(ZeroDivisionError):
            await asyncio.wrap_future(bad)
        s.shutdown()
    asyncio.run(main())
