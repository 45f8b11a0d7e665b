"""The batching rule (engine/batching.py) on plain requests, no model needed."""

import pytest

from t2i.domain import GenerateRequest
from t2i.engine.request import EngineRequest, RequestState
from t2i.engine.batching import Batcher


def request(name: str, arrival: float, size: int = 64, model_id: int = 1, deadline: float | None = None) -> EngineRequest:
    params = GenerateRequest(model_id, "p", "", size, size, 4, 5.0, 0, "euler", "normal")
    return EngineRequest(request_id=name, params=params, seed=0, arrival=arrival, deadline=deadline)


def test_idle_engine_holds_the_first_request_for_the_admission_window():
    batcher = Batcher(max_batch_size=4, admission_window=0.05)
    batcher.add(request("a", arrival=10.0))
    plan = batcher.schedule(now=10.01)
    assert plan.wait == pytest.approx(0.04)
    assert not plan.admit and not plan.evaluate
    batcher.add(request("b", arrival=10.02))
    plan = batcher.schedule(now=10.06)  # window over: both start together
    assert [r.request_id for r in plan.admit] == ["a", "b"]
    assert [r.request_id for r in plan.evaluate] == ["a", "b"]
    assert all(r.state is RequestState.RUNNING for r in plan.admit)


def test_a_lone_request_waits_only_the_gap_and_a_burst_keeps_the_window_open():
    batcher = Batcher(max_batch_size=8, admission_window=0.020, admission_gap=0.002)
    batcher.add(request("lone", arrival=5.0))
    assert batcher.schedule(now=5.001).wait == pytest.approx(0.001)
    plan = batcher.schedule(now=5.0021)  # nobody came within the gap: it starts, 18 ms early
    assert [r.request_id for r in plan.admit] == ["lone"]
    burst = Batcher(max_batch_size=8, admission_window=0.020, admission_gap=0.002)
    for i in range(4):  # arrivals 1.5 ms apart keep the window open ...
        burst.add(request(f"b{i}", arrival=10.0 + 0.0015 * i))
        assert burst.schedule(now=10.0 + 0.0015 * i + 0.001).wait > 0
    plan = burst.schedule(now=10.0 + 0.0015 * 3 + 0.0021)  # ... until a gap: all four start together
    assert [r.request_id for r in plan.admit] == ["b0", "b1", "b2", "b3"]
    capped = Batcher(max_batch_size=8, admission_window=0.005, admission_gap=0.002)
    for i in range(6):  # a steady trickle, one every millisecond, cannot hold the engine past the window
        capped.add(request(f"c{i}", arrival=20.0 + 0.001 * i))
    assert capped.schedule(now=20.0051).admit


def test_a_full_batch_does_not_wait_for_the_window():
    batcher = Batcher(max_batch_size=2, admission_window=10.0)
    batcher.add(request("a", 0.0))
    batcher.add(request("b", 0.0))
    plan = batcher.schedule(now=0.001)
    assert plan.wait == 0 and len(plan.evaluate) == 2


def test_new_arrivals_join_running_requests_at_the_next_evaluation_without_waiting():
    batcher = Batcher(max_batch_size=4, admission_window=1.0)
    batcher.add(request("a", 0.0))
    batcher.schedule(now=2.0)
    batcher.add(request("late", 2.5))
    plan = batcher.schedule(now=2.5001)
    assert plan.wait == 0
    assert [r.request_id for r in plan.admit] == ["late"]
    assert {r.request_id for r in plan.evaluate} == {"a", "late"}


def test_admission_stops_at_max_batch_size_and_resumes_when_a_request_leaves():
    batcher = Batcher(max_batch_size=2, admission_window=0.0)
    for name in "abc":
        batcher.add(request(name, 0.0))
    plan = batcher.schedule(now=1.0)
    assert [r.request_id for r in plan.evaluate] == ["a", "b"]
    assert [r.request_id for r in batcher.waiting] == ["c"]
    batcher.finish(plan.evaluate[0])
    plan = batcher.schedule(now=1.1)
    assert [r.request_id for r in plan.admit] == ["c"]
    assert {r.request_id for r in plan.evaluate} == {"b", "c"}


def test_the_oldest_running_requests_bucket_goes_next_and_its_size_rides_along():
    batcher = Batcher(max_batch_size=8, admission_window=0.0)
    batcher.add(request("small-1", 0.0, size=64))
    batcher.add(request("big", 0.1, size=128))
    batcher.add(request("small-2", 0.2, size=64))
    first = batcher.schedule(now=1.0)
    assert {r.request_id for r in first.evaluate} == {"small-1", "small-2"}
    for r in first.evaluate:
        r.last_evaluated = 1.0
    # The oldest is still small-1: its size runs again, however recently it ran.
    second = batcher.schedule(now=1.1)
    assert {r.request_id for r in second.evaluate} == {"small-1", "small-2"}
    batcher.finish(next(r for r in second.evaluate if r.request_id == "small-1"))
    # Now big is the oldest: it goes before small-2, which arrived after it.
    third = batcher.schedule(now=1.2)
    assert [r.request_id for r in third.evaluate] == ["big"]


def test_without_oldest_first_buckets_take_turns_by_least_recently_evaluated():
    batcher = Batcher(max_batch_size=8, admission_window=0.0, oldest_first=False)
    batcher.add(request("small-1", 0.0, size=64))
    batcher.add(request("big", 0.1, size=128))
    batcher.add(request("small-2", 0.2, size=64))
    first = batcher.schedule(now=1.0)
    assert {r.request_id for r in first.evaluate} == {"small-1", "small-2"}
    for r in first.evaluate:
        r.last_evaluated = 1.0
    second = batcher.schedule(now=1.1)
    assert [r.request_id for r in second.evaluate] == ["big"]
    second.evaluate[0].last_evaluated = 1.1
    third = batcher.schedule(now=1.2)
    assert {r.request_id for r in third.evaluate} == {"small-1", "small-2"}


def test_different_models_never_share_a_forward():
    batcher = Batcher(max_batch_size=8, admission_window=0.0)
    batcher.add(request("m1", 0.0, model_id=1))
    batcher.add(request("m2", 0.0, model_id=2))
    plan = batcher.schedule(now=1.0)
    assert len({r.params.model_id for r in plan.evaluate}) == 1


def test_cancelled_and_expired_requests_are_dropped_wherever_they_are():
    batcher = Batcher(max_batch_size=1, admission_window=0.0)
    running = request("running", 0.0)
    waiting = request("waiting", 0.1, deadline=5.0)
    batcher.add(running)
    batcher.add(waiting)
    batcher.schedule(now=1.0)
    batcher.abort(running)
    plan = batcher.schedule(now=6.0)  # `waiting` is past its deadline by now
    assert {r.request_id for r in plan.dropped} == {"running", "waiting"}
    # The batcher only takes them out; the engine answers them (request states are its to set).
    assert {r.request_id: r.state for r in plan.dropped} == {"running": RequestState.RUNNING, "waiting": RequestState.WAITING}
    assert not plan.evaluate and not batcher.has_work()
