"""Requests advanced together through one batched denoiser give exactly their solo results."""

import random

import torch

from t2i.sampling import SAMPLER_NAMES, SCHEDULER_NAMES, AncestralNoise, SamplingRun, get_sigmas, sample

from .toy import nonlinear_pair

F64 = torch.float64


def make_requests(count: int, seed: int = 0):
    rng = random.Random(seed)
    requests = []
    for i in range(count):
        sampler = SAMPLER_NAMES[i % len(SAMPLER_NAMES)]
        scheduler = SCHEDULER_NAMES[i % len(SCHEDULER_NAMES)]
        steps = rng.randint(3, 20)
        sigmas = get_sigmas(scheduler, steps, sampler).to(F64)
        x = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(100 + i), dtype=F64) * sigmas[0]
        requests.append(dict(sampler=sampler, sigmas=sigmas, x=x, cfg=rng.uniform(1.0, 9.0), seed=rng.randrange(2**63)))
    return requests


def solo(request):
    return sample(request["sampler"], nonlinear_pair, request["x"].clone(), request["sigmas"],
                  cfg_scale=request["cfg"], seed=request["seed"])


def run_batched(requests, arrival_order, max_batch, join_every=2):
    """An engine-like loop: requests join over time in `arrival_order`, at most `max_batch`
    are evaluated per forward, and each forward is one call on the stacked batch."""
    waiting = list(arrival_order)
    running: dict[int, SamplingRun] = {}
    results = {}
    forwards = 0
    batch_sizes = []
    while waiting or running:
        if forwards % join_every == 0 and waiting:
            i = waiting.pop(0)
            r = requests[i]
            running[i] = SamplingRun(r["sampler"], r["x"].clone(), r["sigmas"], r["cfg"], AncestralNoise(r["seed"], r["x"]))
        chosen = sorted(running)[:max_batch]
        xs = torch.cat([running[i].pending[0] for i in chosen])
        sigmas = torch.tensor([running[i].pending[1] for i in chosen], dtype=F64)
        cond, uncond = nonlinear_pair(xs, sigmas)
        batch_sizes.append(len(chosen))
        forwards += 1
        for row, i in enumerate(chosen):
            running[i].advance(cond[row : row + 1], uncond[row : row + 1])
            if running[i].done:
                results[i] = running.pop(i).result
    return results, batch_sizes


def test_batched_requests_match_their_solo_runs_exactly():
    requests = make_requests(12)
    expected = [solo(r) for r in requests]
    for order, max_batch in [(list(range(12)), 5), (list(reversed(range(12))), 8), ([3, 7, 0, 11, 1, 5, 9, 2, 4, 6, 8, 10], 3)]:
        results, batch_sizes = run_batched(requests, order, max_batch)
        assert max(batch_sizes) > 1, "the test must actually batch requests together"
        for i, want in enumerate(expected):
            assert torch.equal(results[i], want), f"request {i} ({requests[i]['sampler']}) changed when batched"


def test_mixed_batches_hold_requests_at_different_steps_and_settings():
    requests = make_requests(8, seed=3)
    seen_mixtures = set()

    waiting = list(range(8))
    running = {}
    step = 0
    while waiting or running:
        if step % 3 == 0 and waiting:
            i = waiting.pop(0)
            r = requests[i]
            running[i] = SamplingRun(r["sampler"], r["x"].clone(), r["sigmas"], r["cfg"], AncestralNoise(r["seed"], r["x"]))
        ids = sorted(running)
        seen_mixtures.add(len({running[i].evaluations_done for i in ids}))
        xs = torch.cat([running[i].pending[0] for i in ids])
        sigmas = torch.tensor([running[i].pending[1] for i in ids], dtype=F64)
        cond, uncond = nonlinear_pair(xs, sigmas)
        for row, i in enumerate(ids):
            running[i].advance(cond[row : row + 1], uncond[row : row + 1])
            if running[i].done:
                assert torch.equal(running.pop(i).result, solo(requests[i]))
        step += 1
    assert max(seen_mixtures) >= 3, "some forward should mix requests at 3+ different progress points"
