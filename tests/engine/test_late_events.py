"""A streamed request's events all reach its caller before its answer; a preview that is ready
only once the request has ended is neither made nor sent, but counted and logged at debug."""

import logging
import threading

import torch
from prometheus_client import REGISTRY

from t2i.domain import GenerateRequest, GenerateResult, Preview, Progress
from t2i.engine.finishing import ImageFinisher
from t2i.engine.request import EngineRequest, RequestState

PARAMS = GenerateRequest(model_id=1, prompt="1girl", width=64, height=64, steps=4, preview_every_steps=1)
RESULT = GenerateResult(images=[b"png"], seeds=[1])


def dropped(event: str) -> float:
    return REGISTRY.get_sample_value("t2i_stream_events_dropped_total", {"event": event}) or 0.0


class RecordingLoop:
    """Stands in for the caller's event loop: records what is handed to it, in order. With
    `settle_during_first_event`, another thread tries to end the request while the first event
    is being handed over, the worst moment for the order of events and answer."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.request: EngineRequest | None = None
        self.settle_during_first_event = False
        self.settler: threading.Thread | None = None

    def call_soon_threadsafe(self, callback, *args) -> None:
        if callback is self.request.events and self.settle_during_first_event:
            self.settle_during_first_event = False
            # The emitting thread holds the request's lock here if emit() makes the hand-over
            # atomic with its state check; only then may the settler not finish first.
            atomic = self.request._lock.locked()
            self.settler = threading.Thread(target=self.request.settle, args=(RequestState.FINISHED,), kwargs={"result": RESULT})
            self.settler.start()
            if not atomic:
                self.settler.join()
        self.calls.append("answer" if callback is not self.request.events else f"event:{type(args[0]).__name__}")


def streamed_request(loop: RecordingLoop) -> EngineRequest:
    request = EngineRequest(request_id="r-1", params=PARAMS, seed=1, loop=loop, future=object(), events=lambda event: None)
    loop.request = request
    request.advance(RequestState.RUNNING)
    request.advance(RequestState.DECODING)
    return request


def test_an_event_racing_the_answer_goes_out_before_it_or_not_at_all():
    loop = RecordingLoop()
    request = streamed_request(loop)
    loop.settle_during_first_event = True
    request.emit(Preview(step=4, jpeg=b"jpeg", width=8, height=8))
    loop.settler.join()
    request.emit(Progress(4, 4, 4, 4, 1.0, 0.0))
    assert loop.calls == ["event:Preview", "answer"]


def test_an_event_after_the_answer_is_counted_and_logged_not_sent(caplog):
    loop = RecordingLoop()
    request = streamed_request(loop)
    request.settle(RequestState.FINISHED, result=RESULT)
    before = dropped("preview")
    with caplog.at_level(logging.DEBUG, logger="t2i.engine.request"):
        request.emit(Preview(step=4, jpeg=b"jpeg", width=8, height=8))
    assert loop.calls == ["answer"]
    assert dropped("preview") == before + 1
    (record,) = [r for r in caplog.records if "after the request ended" in r.getMessage()]
    assert record.levelno == logging.DEBUG and record.request_id == "r-1" and record.event == "preview"


def test_a_preview_for_a_request_that_ended_is_not_made(monkeypatch):
    import t2i.engine.finishing as finishing

    made, real = [], finishing.latent_rgb
    monkeypatch.setattr(finishing, "latent_rgb", lambda latent: made.append(latent) or real(latent))
    finisher = ImageFinisher({}, lambda *args, **kwargs: None, png_workers=1, png_compress_level=1)
    loop = RecordingLoop()
    request = streamed_request(loop)
    request.settle(RequestState.FINISHED, result=RESULT)
    before = dropped("preview")
    finisher.submit_preview(request, 4, torch.zeros(1, 4, 8, 8))
    finisher.close()  # waits for the encode pool
    assert made == [] and loop.calls == ["answer"]
    assert dropped("preview") == before + 1
