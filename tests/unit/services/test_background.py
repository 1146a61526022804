"""Stopping a background task waits until it has really ended, cleanup included."""

from __future__ import annotations

import asyncio

from twarga_lab.services.background import cancel_and_wait


async def test_cancel_and_wait_returns_after_the_task_has_cleaned_up():
    started = asyncio.Event()
    cleaned = []

    async def worker() -> None:
        started.set()
        try:
            await asyncio.Event().wait()
        finally:
            await asyncio.sleep(0)  # cleanup that itself awaits
            cleaned.append(True)

    task = asyncio.ensure_future(worker())
    await asyncio.wait_for(started.wait(), 5)
    await cancel_and_wait(task)
    assert task.cancelled() and cleaned == [True]


async def test_none_and_finished_tasks_are_fine():
    await cancel_and_wait(None)

    async def done() -> int:
        return 3

    task = asyncio.ensure_future(done())
    await task
    await cancel_and_wait(task)
    assert task.result() == 3


async def test_an_error_other_than_cancellation_is_raised():
    async def broken() -> None:
        raise ValueError("boom")

    task = asyncio.ensure_future(broken())
    await asyncio.sleep(0)
    try:
        await cancel_and_wait(task)
    except ValueError as e:
        assert str(e) == "boom"
    else:
        raise AssertionError("the task's error was swallowed")
