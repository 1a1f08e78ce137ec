"""The /generate scheduler: arrival order for patient clients, the oldest answerable request otherwise."""

from __future__ import annotations

import asyncio

import pytest

from eagle3_appliance.serving.scheduling import PATIENCE_TTL_S, Patience, Scheduler, pick


def test_without_departures_the_oldest_runs_first() -> None:
    waiting = [(["anonymous"], 0.0), (["s1"], 5.0), (["anonymous"], 9.0)]
    assert pick(waiting, now=20.0, forward_s=3.0, patience=lambda s: None) == 0


def test_the_oldest_request_that_can_still_be_answered_in_time_runs_first() -> None:
    # Clients give up after 10 s; a forward takes 3 s: only a request younger than 7 s can make it.
    waiting = [(["anonymous"], 8.0), (["anonymous"], 11.0), (["anonymous"], 14.0), (["anonymous"], 16.0)]
    assert pick(waiting, now=20.0, forward_s=3.0, patience=lambda s: 10.0) == 2


def test_when_no_request_can_make_it_the_youngest_runs() -> None:
    waiting = [(["anonymous"], 0.0), (["anonymous"], 1.0), (["anonymous"], 2.0)]
    assert pick(waiting, now=20.0, forward_s=3.0, patience=lambda s: 10.0) == 2


def test_a_patient_session_keeps_its_place_among_impatient_ones() -> None:
    limits = {"anonymous": 10.0, "ours": None}
    waiting = [(["anonymous"], 0.0), (["ours"], 1.0), (["anonymous"], 18.0)]
    assert pick(waiting, now=20.0, forward_s=3.0, patience=limits.get) == 1
    # A micro-batched group is answerable when one of its requests is.
    group = [(["anonymous", "ours"], 0.0), (["anonymous"], 18.0)]
    assert pick(group, now=20.0, forward_s=3.0, patience=limits.get) == 0


def test_patience_is_the_median_of_recent_departures_per_session() -> None:
    p = Patience()
    assert p.estimate("anonymous", now=0.0) is None
    for waited in (6.0, 5.0, 30.0):
        p.gave_up("anonymous", waited, now=100.0)
    assert p.estimate("anonymous", now=100.0) == 6.0
    assert p.estimate("other", now=100.0) is None and p.estimate(None) is None
    assert p.estimate("anonymous", now=100.0 + PATIENCE_TTL_S + 1) is None  # forgotten


def test_the_scheduler_runs_one_unit_at_a_time_in_its_chosen_order() -> None:
    async def main() -> list[str]:
        scheduler = Scheduler(lambda: 1.0)
        order: list[str] = []
        gate = asyncio.Event()

        async def unit(name: str, session: str, arrived: float) -> None:
            async with scheduler.turn([session], arrived):
                order.append(f"{name}+")
                if name == "first":
                    await gate.wait()
                await asyncio.sleep(0)
                order.append(f"{name}-")

        first = asyncio.ensure_future(unit("first", "anonymous", 0.0))
        await asyncio.sleep(0)
        others = [asyncio.ensure_future(unit(n, "anonymous", float(i))) for i, n in enumerate(["a", "b", "c"], 1)]
        await asyncio.sleep(0)
        assert scheduler.waiting == 3
        others[1].cancel()  # "b" leaves while waiting: never runs
        await asyncio.sleep(0)
        gate.set()
        await asyncio.gather(first, others[0], others[2], return_exceptions=False)
        with pytest.raises(asyncio.CancelledError):
            await others[1]
        return order

    assert asyncio.run(main()) == ["first+", "first-", "a+", "a-", "c+", "c-"]


def test_a_unit_cancelled_as_its_turn_comes_passes_the_turn_on() -> None:
    async def main() -> list[str]:
        scheduler = Scheduler(lambda: 1.0)
        order: list[str] = []
        release = asyncio.Event()

        async def holder() -> None:
            async with scheduler.turn(["s"], 0.0):
                await release.wait()

        async def unit(name: str) -> None:
            async with scheduler.turn(["s"], 1.0):
                order.append(name)

        first = asyncio.ensure_future(holder())
        await asyncio.sleep(0)
        doomed = asyncio.ensure_future(unit("doomed"))
        after = asyncio.ensure_future(unit("after"))
        await asyncio.sleep(0)
        release.set()
        await asyncio.sleep(0)  # the holder leaves and hands the turn to "doomed"...
        assert first.done() and not doomed.done()
        doomed.cancel()  # ...which is cancelled before it could run
        await asyncio.wait_for(after, timeout=5)
        return order

    assert asyncio.run(main()) == ["after"]
