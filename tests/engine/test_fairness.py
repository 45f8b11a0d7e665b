"""Fair shares between tenants (engine/batching.py), on synthetic requests: no model.

Each simulated step evaluates the planned bucket and charges its work as the engine core does;
requests finish after their steps, so service received is what the counters see."""

import pytest

from t2i.domain import GenerateRequest
from t2i.engine.batching import Batcher
from t2i.engine.request import EngineRequest, RequestState


def request(tenant: str, arrival: float = 0.0, size: int = 64, steps: int = 4, weight: float = 1.0, images: int = 1):
    params = GenerateRequest(1, "p", "", size, size, steps, 5.0, 0, "euler", "normal", num_images=images)
    return EngineRequest(request_id=f"{tenant}-{arrival}", params=params, seed=0, arrival=arrival, tenant=tenant, weight=weight)


class Simulation:
    """Drives a Batcher like the engine core: one forward per step over the planned rows."""

    def __init__(self, batcher: Batcher) -> None:
        self.batcher = batcher
        self.left: dict[EngineRequest, int] = {}
        self.service: dict[str, float] = {}
        self.finished: list[EngineRequest] = []
        self.now = 0.0
        self.forwards: list[tuple[EngineRequest, ...]] = []

    def add(self, r: EngineRequest) -> None:
        self.left[r] = r.params.steps
        self.batcher.add(r)

    def step(self) -> None:
        self.now += 1.0
        plan = self.batcher.schedule(self.now)
        self.forwards.append(plan.evaluate)
        for r in plan.evaluate:
            work = r.evaluation_work
            self.batcher.charge(r, work)
            self.service[r.tenant] = self.service.get(r.tenant, 0.0) + work
            r.last_evaluated = self.now
            self.left[r] -= 1
            if self.left[r] == 0:
                self.batcher.charge(r, r.decode_work)
                self.batcher.finish(r)
                r.advance(RequestState.DECODING)
                self.finished.append(r)


def backlog(sim: Simulation, tenant: str, count: int, **options) -> list[EngineRequest]:
    made = [request(tenant, arrival=sim.now + i * 1e-6, **options) for i in range(count)]
    for r in made:
        sim.add(r)
    return made


def test_two_backlogged_tenants_get_service_within_the_vtc_bound():
    sim = Simulation(Batcher(max_batch_size=2, admission_window=0.0))
    backlog(sim, "flood", 40)
    backlog(sim, "other", 40)
    largest = max(r.evaluation_work * r.params.steps + r.decode_work + r.encode_work for r in sim.left)
    for _ in range(120):
        sim.step()
        counters = sim.batcher.counters
        assert abs(counters["flood"] - counters["other"]) <= 2 * largest, counters
    assert abs(sim.service["flood"] - sim.service["other"]) <= 2 * largest


def test_a_flood_does_not_queue_ahead_of_another_tenants_request():
    fifo, fair = Simulation(Batcher(2, 0.0, fair=False)), Simulation(Batcher(2, 0.0))
    for sim in (fifo, fair):
        backlog(sim, "flood", 32)
        sim.step()
        (single,) = backlog(sim, "single", 1)
        for _ in range(5000):
            sim.step()
            if single in sim.finished:
                break
        else:
            pytest.fail("the single request never finished")
        sim.waited = single.times.queue_wait
    assert fair.waited <= 1  # joins the flood's full batch at once: its tenant had nothing running
    assert fifo.waited > 8  # FIFO makes it wait for the whole flood ahead of it
    assert len(fair.batcher.running) <= 2 * fair.batcher.max_batch_size


def test_a_tenant_back_from_idle_does_not_jump_ahead_by_more_than_one_request():
    sim = Simulation(Batcher(2, 0.0))
    backlog(sim, "busy", 50)
    for _ in range(60):
        sim.step()
    # "returning" was idle all along: it must start at the busy tenant's counter, not at zero.
    returning = backlog(sim, "returning", 20)
    assert sim.batcher.counters["returning"] == pytest.approx(sim.batcher.counters["busy"], abs=1e-9)
    one = returning[0].evaluation_work * returning[0].params.steps + returning[0].decode_work + returning[0].encode_work
    for _ in range(80):
        sim.step()
        assert sim.batcher.counters["returning"] - sim.batcher.counters["busy"] <= 2 * one
        assert sim.batcher.counters["busy"] - sim.batcher.counters["returning"] <= 2 * one


def test_weights_split_the_service_in_their_ratio():
    sim = Simulation(Batcher(8, 0.0))
    backlog(sim, "pro", 300, weight=3.0)
    backlog(sim, "free", 300, weight=1.0)
    for _ in range(120):  # both stay backlogged all along
        sim.step()
    assert sim.service["pro"] / sim.service["free"] == pytest.approx(3.0, rel=0.1)


def test_a_huge_request_and_a_stream_of_small_ones_interleave_by_cost():
    sim = Simulation(Batcher(8, 0.0))
    (huge,) = backlog(sim, "big", 1, size=1024, steps=8)
    backlog(sim, "small", 400, size=64, steps=4)
    for _ in range(5000):  # both tenants stay backlogged until the huge request finishes
        sim.step()
        if huge in sim.finished:
            break
    else:
        pytest.fail("the huge request never finished: starved")
    huge_turns = sum(1 for forward in sim.forwards if huge in forward)
    small_forwards = sum(1 for forward in sim.forwards if forward and huge not in forward)
    # A 1024x1024 evaluation costs as much as 32 forwards of eight 64x64 requests (their prompt
    # encodes and decodes are charged too): the small bucket gets many turns per huge turn,
    # and the huge request still progresses.
    assert huge_turns == huge.params.steps and small_forwards >= 5 * huge_turns
    # What each tenant received (encode, evaluations, decode) stays within the largest charge.
    largest = max(huge.evaluation_work, huge.decode_work)
    assert abs(sim.batcher.counters["big"] - sim.batcher.counters["small"]) <= 2 * largest


def test_work_conserving_nobody_waits_while_there_is_room():
    sim = Simulation(Batcher(4, 0.0))
    backlog(sim, "a", 2)
    backlog(sim, "b", 1)
    sim.step()
    assert len(sim.batcher.running) == 3 and not sim.batcher.waiting
    # One tenant alone gets the whole machine, however far its counter is ahead.
    sim2 = Simulation(Batcher(4, 0.0))
    sim2.batcher.counters["solo"] = 1e9
    backlog(sim2, "solo", 6)
    sim2.step()
    assert len(sim2.batcher.running) == 4


def test_when_the_fair_pick_does_not_fit_a_request_that_fits_is_admitted():
    sim = Simulation(Batcher(4, 0.0))
    a1, = backlog(sim, "a", 1, steps=50)
    b1, = backlog(sim, "b", 1, steps=50)
    sim.step()
    assert sim.batcher.running == [a1, b1]
    sim.batcher.counters["b"] = sim.batcher.counters["a"] + 10.0  # a is owed service: its request is the fair pick
    a2, = backlog(sim, "a", 1, images=4)
    b2, = backlog(sim, "b", 1)
    assert sim.batcher.queue_order()[0] is a2
    sim.step()
    # a2 (4 images) cannot fit beside a1 and b1; b2 fits in the two free slots and must not wait.
    assert b2 in sim.batcher.running and a2 in sim.batcher.waiting
    assert sum(r.samples for r in sim.batcher.running) == 3
    # a's own newer request never passes a2, even though it would fit.
    a3, = backlog(sim, "a", 1)
    sim.step()
    assert a3 in sim.batcher.waiting and a2 in sim.batcher.waiting
    # Once a1 is gone, a has nothing running and a2 joins over the batch at once.
    sim.batcher.finish(a1)
    sim.step()
    assert a2 in sim.batcher.running


def test_nothing_passes_a_request_larger_than_the_batch():
    sim = Simulation(Batcher(4, 0.0))
    a1, = backlog(sim, "a", 1, steps=50)
    b1, = backlog(sim, "b", 1, steps=50)
    sim.step()
    sim.batcher.counters["b"] = sim.batcher.counters["a"] + 10.0
    huge, = backlog(sim, "a", 1, images=8)  # more than max_batch_size: runs alone once the batch drains
    small, = backlog(sim, "b", 1)
    sim.step()
    assert huge in sim.batcher.waiting and small in sim.batcher.waiting


def test_only_a_tenant_with_nothing_running_joins_over_a_full_batch():
    sim = Simulation(Batcher(2, 0.0))
    backlog(sim, "flood", 10)
    sim.step()
    first, second = backlog(sim, "other", 2)
    sim.step()
    # The first joins over the full batch; the second waits for a slot like everyone else.
    assert first in sim.batcher.running and second in sim.batcher.waiting
    assert len(sim.batcher.running) == 3


def test_fifo_within_a_tenant():
    sim = Simulation(Batcher(1, 0.0))
    made = backlog(sim, "a", 5)
    backlog(sim, "b", 5)
    for _ in range(60):
        sim.step()
    order = [r for r in sim.finished if r.tenant == "a"]
    assert order == made


def test_oldest_first_gives_one_tenants_requests_the_smallest_tail():
    """One tenant, requests of three sizes and different lengths arriving one per step: oldest
    first, none waits on work of another size that came after it (the first, the longest, takes
    just its own steps; later ones of its size ride along), so the largest time in the system
    is smaller than when sizes take turns."""
    specs = [(128, 12), (64, 4), (96, 6), (64, 4), (128, 12), (96, 6), (64, 4), (96, 6)]
    latencies = {}
    for oldest_first in (True, False):
        sim = Simulation(Batcher(8, 0.0, oldest_first=oldest_first))
        arrivals = {}
        for index, (size, steps) in enumerate(specs):
            made = request("only", arrival=sim.now, size=size, steps=steps)
            arrivals[made] = index
            sim.add(made)
            sim.step()
        while len(sim.finished) < len(specs):
            sim.step()
        ended = {}
        for step, forward in enumerate(sim.forwards, start=1):
            for r in forward:
                ended[r] = step
        first = sim.finished[0] if oldest_first else None
        if oldest_first:
            assert arrivals[first] == 0 and ended[first] == specs[0][1]
        latencies[oldest_first] = max(ended[r] - arrivals[r] for r in sim.finished)
    assert latencies[True] < latencies[False], latencies


def test_idle_tenants_are_forgotten_only_when_that_changes_nothing():
    batcher = Batcher(2, 0.0)
    for i in range(3):
        batcher.add(request(f"t{i}"))
    batcher.counters.update({"gone-low": 0.0, "gone-high": 99.0})
    batcher._forget_idle()
    assert "gone-low" not in batcher.counters and "gone-high" in batcher.counters
    assert {"t0", "t1", "t2"} <= set(batcher.counters)


def test_fair_and_fifo_agree_with_one_tenant():
    runs = []
    for fair in (True, False):
        sim = Simulation(Batcher(2, 0.0, fair=fair))
        backlog(sim, "only", 6)
        for _ in range(20):
            sim.step()
        runs.append(([r.request_id for r in sim.finished], [tuple(r.request_id for r in f) for f in sim.forwards]))
    assert len(runs[0][0]) == 6 and runs[0] == runs[1]



def test_small_decodes_go_first_but_a_large_one_waits_at_most_the_patience():
    from t2i.engine.finishing import DecodeQueue

    queue = DecodeQueue(patience=2.0)
    queue.push("large-1", 512 * 512 * 8, now=0.0)
    queue.push("large-2", 512 * 512 * 8, now=0.0)
    queue.push("small", 128 * 128, now=0.5)
    assert queue.pop(now=0.6) == "small"  # not held behind the batch of large decodes
    queue.push("small-2", 128 * 128, now=1.0)
    queue.push("small-3", 128 * 128, now=1.0)
    assert queue.pop(now=1.1) == "small-2"
    assert queue.pop(now=2.5) == "large-1"  # waited past its patience: first, whatever its size
    assert [queue.pop(now=2.6), queue.pop(now=2.7), queue.pop(now=2.8)] == ["large-2", "small-3", None]
