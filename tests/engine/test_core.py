"""The engine core with the real demo UNet: batching must not change any request's result."""

import torch

from t2i.domain import GenerateRequest
from t2i.engine.core import EngineCore
from t2i.engine.denoise import UNetInput, evaluate, size_conditioning, stack_contexts
from t2i.engine.request import EngineRequest, RequestState
from t2i.engine.batching import Batcher
from t2i.engine.text import encode_prompts, prepare_prompt

from ..support.tolerance import EPS32, max_abs, max_diff, network_reductions, reduction_bound
from .test_text import DOCUMENTED_PROMPT

TOKENS = 77  # attention's longest sum over positions here: a 77-token window (latents are at most 16x8)


def unet_tolerance(model, magnitude: float, evaluations: int = 1, text: bool = False) -> float:
    """float32 rounding bound between two runs that sum in other orders (another batch):
    `evaluations` UNet forwards, after both text encoders when `text`
    (tests/support/tolerance.py)."""
    depth, terms = network_reductions(model.unet, positions=TOKENS)
    depth *= evaluations
    if text:
        text_depth, text_terms = network_reductions(*model.text_encoders, positions=TOKENS)
        depth, terms = depth + text_depth, max(terms, text_terms)
    return reduction_bound(eps=EPS32, magnitude=magnitude, terms=terms, depth=depth)


def params(**overrides) -> GenerateRequest:
    base = dict(model_id=1, prompt="1girl, masterpiece", negative_prompt="worst quality", height=64, width=64,
                steps=6, cfg_scale=6.0, seed=11, sampler="euler_ancestral", scheduler="karras")
    return GenerateRequest(**{**base, **overrides})


def engine_request(model, name: str, p: GenerateRequest) -> EngineRequest:
    """A request as the AsyncEngine makes it: prompts checked and chunked before queueing."""
    prompts = (prepare_prompt(model, p.prompt), prepare_prompt(model, p.negative_prompt, "negativePrompt"))
    return EngineRequest(request_id=name, params=p, seed=p.seed, prompts=prompts)


def encode(model, *texts):
    return encode_prompts(model, [prepare_prompt(model, t) for t in texts])


def run_core(model, requests: list[GenerateRequest], max_batch: int = 8, stagger: int = 0):
    """Run requests through EngineCore; with `stagger`, request i joins after i*stagger steps.
    Returns the final latents and each request's batch sizes."""
    core = EngineCore({1: model}, Batcher(max_batch, admission_window=0.0))
    engine_requests = [engine_request(model, str(i), p) for i, p in enumerate(requests)]
    pending = list(engine_requests)
    steps = 0
    while pending or core.has_work():
        while pending and steps >= stagger * (len(engine_requests) - len(pending)):
            core.add(pending.pop(0))
        result = core.step()
        assert not result.failed
        steps += 1
    return [r.run.result for r in engine_requests], [r.times.batch_sizes for r in engine_requests]


def test_a_request_gives_the_same_latent_alone_and_in_a_busy_mixed_batch(demo_model):
    target = params()
    others = [
        params(prompt=DOCUMENTED_PROMPT, seed=1, sampler="dpm_2", scheduler="normal", steps=5, cfg_scale=3.0),
        params(prompt="x", negative_prompt="", seed=2, sampler="dpmpp_2s_ancestral_cfg_pp", scheduler="beta", cfg_scale=1.5),
        params(seed=3, sampler="euler", scheduler="ddim_uniform", steps=9),
        params(seed=4, height=128, width=64),  # another bucket
        params(seed=5, sampler="euler_cfg_pp", scheduler="exponential", cfg_scale=1.0, steps=3),
    ]
    (alone,), _ = run_core(demo_model, [target])
    together, sizes = run_core(demo_model, [others[0], others[1], target, *others[2:]], stagger=1)
    assert max(sizes[2]) >= 3, "the target must actually share forwards with others"
    # The prompts are encoded with the others', then 6 steps of one UNet forward each.
    tolerance = unet_tolerance(demo_model, max_abs(alone), evaluations=target.steps, text=True)
    assert max_diff(together[2], alone) <= tolerance
    # Sanity: the comparison is sharp enough to tell a different seed apart.
    (other_seed,), _ = run_core(demo_model, [params(seed=12)])
    assert max_diff(other_seed, alone) > 100 * tolerance


def test_padding_and_masking_a_shorter_context_leaves_its_prediction_unchanged(demo_model):
    short, long = encode(demo_model, "1girl", DOCUMENTED_PROMPT)
    assert long.tokens > short.tokens
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * 3
    time_ids = size_conditioning(64, 64, demo_model.device)
    alone = evaluate(demo_model, [UNetInput(x, 3.0, short, short, time_ids)])[0]
    padded = evaluate(demo_model, [UNetInput(x, 3.0, short, long, time_ids)])[0]
    tolerance = unet_tolerance(demo_model, max_abs(alone[0]))
    assert max_diff(alone[0], padded[0]) <= tolerance  # cond row was padded and masked
    context, mask = stack_contexts([short.context, long.context])
    assert mask is not None and mask[0].sum() == short.tokens and mask[1].all()
    # Teeth: the same padding without the mask moves the prediction well past the tolerance.
    sigma, t = 3.0, float(demo_model.sigma_table.timestep(3.0))
    with torch.inference_mode():
        eps = demo_model.unet(
            torch.cat([x, x]) / (sigma**2 + 1) ** 0.5, torch.tensor([t, t]), encoder_hidden_states=context,
            added_cond_kwargs={"text_embeds": torch.cat([short.pooled, long.pooled]), "time_ids": time_ids.expand(2, -1)},
        ).sample
    assert max_diff(x - sigma * eps[:1], alone[0]) > 10 * tolerance
    assert stack_contexts([short.context, short.context])[1] is None


def test_x0_follows_the_eps_parameterisation_with_integer_timesteps(demo_model):
    (cond,) = encode(demo_model, "1girl")
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    sigma = 2.5
    time_ids = size_conditioning(64, 64, demo_model.device)
    x0, _ = evaluate(demo_model, [UNetInput(x, sigma, cond, cond, time_ids)])[0]
    t = demo_model.sigma_table.timestep(sigma)
    with torch.inference_mode():
        eps = demo_model.unet(
            x / (sigma**2 + 1) ** 0.5, torch.tensor([float(t)]), encoder_hidden_states=cond.context,
            added_cond_kwargs={"text_embeds": cond.pooled, "time_ids": time_ids},
        ).sample
    # One forward each (a batch of two rows against one); x0 carries eps's error times sigma.
    assert max_diff(x0, x - sigma * eps) <= unet_tolerance(demo_model, max_abs(x) + sigma * max_abs(eps))


def test_engine_core_runs_every_sampler_and_marks_states(demo_model):
    from t2i.sampling import SAMPLER_NAMES

    requests = [params(sampler=name, seed=i, steps=3) for i, name in enumerate(SAMPLER_NAMES)]
    core = EngineCore({1: demo_model}, Batcher(4, admission_window=0.0))
    engine_requests = [engine_request(demo_model, str(i), p) for i, p in enumerate(requests)]
    for r in engine_requests:
        core.add(r)
    finished = []
    while core.has_work():
        finished += core.step().finished
    assert len(finished) == len(requests)
    for r in engine_requests:
        assert r.state is RequestState.DECODING
        assert r.run.evaluations_done == r.run.total_evaluations == r.times.evaluations
        assert max(r.times.batch_sizes) <= 4
        assert torch.isfinite(r.run.result).all()
