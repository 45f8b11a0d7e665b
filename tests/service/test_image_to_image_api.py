"""Image to image, inpainting and hires fix at the service's edge: every refusal is
INVALID_ARGUMENT naming its field (through AsyncEngine.generate, and through a real in-process
gRPC server with billing, where a refused request is never charged), successful requests come
out at their sizes, and each is charged what billing/pricing.py's formula says, computed here
by hand with the evaluations counted from the sigma tail."""

import asyncio
import io
import math
from fractions import Fraction

import grpc
import numpy as np
import pytest
from PIL import Image

from t2i.billing.pricing import price
from t2i.billing.settings import BillingSettings
from t2i.billing.setup import build_billing
from t2i.client import AsyncClient, ClientError
from t2i.domain import GenerateRequest, HiresFix
from t2i.engine.engine import AsyncEngine
from t2i.errors import InvalidArgument
from t2i.sampling import compute_sigmas
from t2i.sampling import partial as partial_module
from t2i.server.app import Server
from t2i.server.catalog import ModelCatalog
from t2i.settings import EngineConfig, ServeSettings

from ..engine.test_pictures import png_header_only
from ..support.images import png_pixels

MAX_PIXELS = 8294400  # the demo model's limit (2880 x 2880)


def encoded(image: Image.Image, fmt: str = "PNG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def picture(width: int = 64, height: int = 64, seed: int = 0, fmt: str = "PNG") -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return encoded(Image.fromarray(pixels), fmt)


def mask(width: int = 64, height: int = 64) -> bytes:
    ramp = np.tile(np.linspace(0, 255, width, dtype=np.uint8), (height, 1))
    return encoded(Image.fromarray(ramp))


def animated_webp() -> bytes:
    frames = [Image.fromarray(np.full((16, 16, 3), 60 * i, dtype=np.uint8)) for i in range(3)]
    return encoded(frames[0], "WEBP", save_all=True, append_images=frames[1:], lossless=True)


PICTURE = picture()
TRUNCATED = picture(seed=1)[: len(picture(seed=1)) // 2]
BASE = dict(model_id=1, prompt="1girl", negative_prompt="", width=64, height=64, steps=3, cfg_scale=5.0, seed=3,
            sampler="euler", scheduler="normal")


def request(**changes) -> GenerateRequest:
    return GenerateRequest(**{**BASE, **changes})


# (case, request, field, what the message must also say)
REFUSALS = [
    ("not an image", request(init_image=b"hello, not a picture at all"), "initImage", ["not an image"]),
    ("gif", request(init_image=picture(fmt="GIF")), "initImage", ["a GIF picture", "PNG, JPEG, WEBP"]),
    ("truncated png", request(init_image=TRUNCATED), "initImage", ["truncated or corrupt PNG data"]),
    ("header over max_pixels", request(init_image=png_header_only(3000, 3000)), "initImage",
     ["3000 x 3000 = 9000000 pixels", f"at most {MAX_PIXELS} pixels"]),
    ("animated webp", request(init_image=animated_webp()), "initImage", ["an animated WEBP (3 frames)"]),
    ("mask without picture", request(mask=mask()), "mask", ["needs initImage"]),
    ("mask of another size", request(init_image=PICTURE, mask=mask(48, 40)), "mask", ["48x40", "64x64"]),
    ("width without height", request(init_image=PICTURE, width=64, height=0), "height", ["give both width and height"]),
    ("denoise 0", request(init_image=PICTURE, denoise=0.0), "denoise", ["from 0.01 to 1"]),
    ("denoise 1.5", request(init_image=PICTURE, denoise=1.5), "denoise", ["from 0.01 to 1"]),
    ("denoise nan", request(init_image=PICTURE, denoise=float("nan")), "denoise", ["finite"]),
    ("denoise without picture", request(denoise=0.5), "denoise", ["needs initImage"]),
    ("scale 1", request(hires_fix=HiresFix(scale=1.0)), "hiresFix.scale", ["more than 1 and at most 4"]),
    ("scale 4.5", request(hires_fix=HiresFix(scale=4.5)), "hiresFix.scale", ["more than 1 and at most 4"]),
    ("scale nan", request(hires_fix=HiresFix(scale=float("nan"))), "hiresFix.scale", ["finite"]),
    ("unknown method", request(hires_fix=HiresFix(scale=2.0, upscale_method="lanczos")), "hiresFix.upscaleMethod",
     ["nearest-exact, bilinear, area, bicubic"]),
    ("upscaled over the maximum", request(width=2048, height=64, hires_fix=HiresFix(scale=1.5)), "hiresFix.scale",
     ["2048x64 into 3072x96", "2880"]),
    ("upscaled picture over the maximum",
     request(init_image=png_header_only(2048, 64), width=0, height=0, hires_fix=HiresFix(scale=1.5)),
     "hiresFix.scale", ["2048x64 into 3072x96"]),
    ("too small after cropping", request(init_image=picture(70, 62), width=0, height=0), "height",
     ["56", "initImage is 70x62, cropped to multiples of 8: 64x56"]),
]


@pytest.mark.parametrize("case,params,field,says", REFUSALS, ids=[case[0] for case in REFUSALS])
async def test_each_refusal_names_its_field(demo_model, case, params, field, says):
    engine = AsyncEngine({1: demo_model}, EngineConfig())  # never started: a refusal must come before any queueing
    with pytest.raises(InvalidArgument) as caught:
        await asyncio.wait_for(engine.generate(params), timeout=30)
    error = caught.value
    assert error.field == field, str(error)
    assert str(error).startswith(f"invalid {field} ")
    for part in says:
        assert part in str(error)
    if case != "truncated png":  # the pixels are decoded only after the checks: the check itself refuses the others
        with pytest.raises(InvalidArgument):
            engine.check(params)
    else:
        engine.check(params)


def test_the_refusals_are_not_vacuous(demo_model):
    """Teeth: the same requests with the offending field fixed pass the check."""
    engine = AsyncEngine({1: demo_model}, EngineConfig())
    engine.check(request(init_image=PICTURE, mask=mask(), denoise=0.5))
    engine.check(request(init_image=PICTURE, width=0, height=0, denoise=1.0))
    engine.check(request(init_image=picture(70, 66), width=0, height=0))
    engine.check(request(hires_fix=HiresFix(scale=4.0, upscale_method="bicubic")))
    engine.check(request(width=1920, height=64, hires_fix=HiresFix(scale=1.5)))  # 2880 x 96: at the limit
    assert engine.check(request(init_image=picture(70, 66), width=0, height=0)).params.width == 64


# --- pricing, by hand -----------------------------------------------------------------------

# billing/pricing.py's docstring: k per extra chunk, d for the decode, e for the picture's encode.
K, D, E = Fraction("0.06"), Fraction(5), Fraction("1.5")
TWO_STAGE = {"dpm_2", "dpm_2_ancestral", "dpmpp_2s_ancestral", "dpmpp_2s_ancestral_cfg_pp"}


def counted_evaluations(table, scheduler: str, sampler: str, steps: int, denoise: float) -> int:
    """Evaluations counted from the sigmas the pass runs: the tail of int(steps / denoise) steps
    below full denoise; the two-stage samplers evaluate twice a step, once on a step to 0."""
    if denoise > 0.9999:
        sigmas = compute_sigmas(table, scheduler, steps, sampler).tolist()
    else:
        sigmas = compute_sigmas(table, scheduler, int(steps / denoise), sampler).tolist()[-(steps + 1):]
    return sum(2 if sampler in TWO_STAGE and after > 0 else 1 for after in sigmas[1:])


def megapixels(width: int, height: int) -> Fraction:
    return Fraction(width * height, 2**20)


def hand_price(passes, rate, *, picture=None, images=1, chunks=1, multiplier=1, minimum=1) -> int:
    """images * max(minimum, ceil(multiplier * work / R)), work = sum over passes of
    megapixels * evaluations * (1 + k (chunks - 1)) + d * megapixels(output) + e * megapixels(picture) / images."""
    work = sum(megapixels(w, h) * evaluations * (1 + K * (chunks - 1)) for w, h, evaluations in passes)
    work += D * megapixels(*passes[-1][:2])
    if picture is not None:
        work += E * megapixels(*picture) / images
    return images * max(minimum, math.ceil(Fraction(str(multiplier)) * work / Fraction(str(rate))))


def priced(engine, model, params, settings) -> int:
    checked = engine.check(params)  # a picture's own size filled in: what runs is what is priced
    return price(checked.params, model.spec.price_multiplier, model.sigma_table, settings, checked.context_chunks)


@pytest.mark.parametrize("rate", [7.0, 0.01])
def test_img2img_and_hires_prices_follow_the_formula(demo_model, rate):
    engine = AsyncEngine({1: demo_model}, EngineConfig())
    settings = BillingSettings(megapixel_evaluations_per_stardust=rate)
    table = demo_model.sigma_table
    big = png_header_only(1024, 1024)  # only its header is read to price it
    common = dict(width=1024, height=1024, steps=28, sampler="dpm_2", scheduler="karras")
    text = request(**common)
    img2img = request(**{**common, "width": 0, "height": 0}, init_image=big, denoise=0.5)
    # dpm_2 over 28 steps: 27 two-evaluation steps and a last one to 0; the tail of the 56-step
    # schedule (with its extra step) runs the same 28 steps, so the same evaluations.
    full, tail = (counted_evaluations(table, "karras", "dpm_2", 28, denoise) for denoise in (1.0, 0.5))
    assert full == tail == 55
    t2i_price = hand_price([(1024, 1024, full)], rate)
    img2img_price = hand_price([(1024, 1024, tail)], rate, picture=(1024, 1024))
    assert priced(engine, demo_model, text, settings) == t2i_price
    assert priced(engine, demo_model, img2img, settings) == img2img_price
    # A denoise of 0.5 runs as many steps (ComfyUI's rule), and the picture's encode is added: an
    # img2img request costs at least what the same text-to-image request costs (more where the
    # rate resolves the encode), never less.
    assert img2img_price >= t2i_price
    if rate < 1:
        assert img2img_price > t2i_price
    # Two images share the one encode.
    two = request(**{**common, "width": 0, "height": 0}, init_image=big, denoise=0.5, num_images=2)
    assert priced(engine, demo_model, two, settings) == hand_price([(1024, 1024, 55)], rate, picture=(1024, 1024), images=2)
    # Hires fix: both passes at their sizes, one decode at the upscaled size.
    hires = request(**common, hires_fix=HiresFix(scale=1.5, steps=10, denoise=0.4))
    second = counted_evaluations(table, "karras", "dpm_2", 10, 0.4)  # the tail of a 25-step schedule
    assert second == 19
    expected = hand_price([(1024, 1024, 55), (1536, 1536, second)], rate)
    assert priced(engine, demo_model, hires, settings) == expected
    if rate < 1:
        # Teeth: a decode of the first pass, or the second pass priced at the first size, is another price.
        with_first_decode = hand_price([(1024, 1024, 55 + 5), (1536, 1536, second)], rate)
        at_first_size = hand_price([(1024, 1024, 55), (1024, 1024, second)], rate)
        assert expected not in (with_first_decode, at_first_size)


# ComfyUI's KSampler takes denoise in steps of 0.01 (its widget), so its schedules are at most
# 100 times the steps: 15000 for the demo model's 150.
SCHEDULE_LIMIT = 100 * 150


@pytest.mark.parametrize("field,params", [
    ("denoise", request(init_image=PICTURE, steps=150, scheduler="simple", denoise=0.01)),  # the control: accepted, bounded
    ("denoise", request(init_image=PICTURE, steps=150, scheduler="simple", denoise=1e-5)),
    ("denoise", request(init_image=PICTURE, denoise=1e-300)),
    ("denoise", request(init_image=PICTURE, denoise=5e-324)),
    ("hiresFix.denoise", request(steps=150, scheduler="simple", hires_fix=HiresFix(scale=1.5, denoise=1e-6))),
], ids=["0.01", "1e-5", "1e-300", "5e-324", "hires 1e-6"])
def test_a_tiny_denoise_is_refused_or_its_schedule_is_bounded(demo_model, monkeypatch, field, params):
    """A denoise the check accepts must give a schedule the service can compute: the schedule is
    made for int(steps / denoise) steps, in pricing (on the event loop, billing/interceptor.py)
    and in the engine (on the denoise thread). Unbounded, 1e-5 with 150 simple steps is a
    15-million-step schedule (tens of seconds of CPU, gigabytes), 1e-300 raises ValueError and
    5e-324 OverflowError: INTERNAL for a caller's bad value."""
    real = partial_module.compute_sigmas

    def bounded(table, scheduler, steps, sampler=None):
        assert steps <= SCHEDULE_LIMIT, f"a schedule of {steps:.3g} steps was about to be computed"
        return real(table, scheduler, steps, sampler)

    monkeypatch.setattr(partial_module, "compute_sigmas", bounded)
    engine = AsyncEngine({1: demo_model}, EngineConfig())
    try:
        checked = engine.check(params)
    except InvalidArgument as error:
        assert error.field == field
        return
    # Accepted: what the billing interceptor does next must work.
    assert price(checked.params, 1.0, demo_model.sigma_table, BillingSettings(), checked.context_chunks) >= 1


# --- through the gRPC server ----------------------------------------------------------------

RATE = 0.001  # megapixel-evaluations per stardust: fine enough that 64 x 64 requests differ in price
BALANCE = 10**6


async def settled_balance(billing, record) -> int:
    """The key's balance once nothing is reserved (releases are queued, not awaited)."""
    for _ in range(400):
        key = billing.ledger.get_key(record.id)
        if key.reserved == 0:
            return key.balance
        await asyncio.sleep(0.05)
    raise AssertionError(f"still reserved: {key.reserved}")


async def test_through_the_grpc_server(demo_model, tmp_path):
    (tmp_path / "billing.yaml").write_text(f"megapixel_evaluations_per_stardust: {RATE}\n")
    settings = ServeSettings(grpc_port=0, metrics_port=-1, data_dir=tmp_path, grace_period=2,
                             billing_config=tmp_path / "billing.yaml")
    catalog = ModelCatalog()
    billing = build_billing(settings, catalog)
    server = Server(settings, catalog, [billing], models={1: demo_model})
    record, key = billing.ledger.create_key("pictures", BALANCE, "unlimited")
    await server.start()
    client = AsyncClient(f"127.0.0.1:{server.port}", api_key=key, timeout=120)
    try:
        # Every refusal: INVALID_ARGUMENT naming the field, and nothing charged.
        for case, params, field, says in REFUSALS:
            options = {name: value for name, value in params.__dict__.items() if name != "prompt"}
            with pytest.raises(ClientError) as caught:
                await client.generate(params.prompt, **options)
            assert caught.value.code is grpc.StatusCode.INVALID_ARGUMENT, (case, caught.value)
            assert caught.value.message.startswith(f"invalid {field} "), (case, caught.value.message)
            assert all(part in caught.value.message for part in says), (case, caught.value.message)
        assert await settled_balance(billing, record) == BALANCE

        table = demo_model.sigma_table
        img2img = await client.generate("1girl", **_options(init_image=PICTURE, width=0, height=0, denoise=0.5))
        assert png_pixels(img2img.images[0]).shape == (64, 64, 3)
        assert img2img.stardust_usage == hand_price(
            [(64, 64, counted_evaluations(table, "normal", "euler", 3, 0.5))], RATE, picture=(64, 64))

        inpaint = await client.generate("1girl", **_options(init_image=PICTURE, mask=mask(), sampler="dpm_2"))
        assert png_pixels(inpaint.images[0]).shape == (64, 64, 3)
        assert inpaint.stardust_usage == hand_price([(64, 64, counted_evaluations(table, "normal", "dpm_2", 3, 1.0))], RATE,
                                                    picture=(64, 64))
        assert counted_evaluations(table, "normal", "dpm_2", 3, 1.0) == 5

        hires = await client.generate("1girl", **_options(hires_fix={"scale": 1.5, "steps": 2}))
        assert png_pixels(hires.images[0]).shape == (96, 96, 3)
        second = counted_evaluations(table, "normal", "euler", 2, 0.5)
        assert hires.stardust_usage == hand_price([(64, 64, 3), (96, 96, second)], RATE)

        text = await client.generate("1girl", **_options())
        assert text.stardust_usage == hand_price([(64, 64, 3)], RATE)
        # The picture's encode is paid for: the same request with a picture costs more.
        assert img2img.stardust_usage > text.stardust_usage
        charged = img2img.stardust_usage + inpaint.stardust_usage + hires.stardust_usage + text.stardust_usage
        assert await settled_balance(billing, record) == BALANCE - charged
    finally:
        await client.close()
        await server.stop(grace=2)


def _options(**changes) -> dict:
    return {name: value for name, value in {**BASE, **changes}.items() if name != "prompt"}
