"""What the server can serve right now: the engine once it is warm, refusals before that.

Shared by the servicer and by interceptors (billing prices requests per model) so that the
"still loading" answer is decided in one place.
"""

from __future__ import annotations

from contextvars import ContextVar

from ..domain import GenerateRequest
from ..engine.engine import AsyncEngine, Checked
from ..errors import Unavailable
from ..models.loader import LoadedModel


# A request the billing layer checked before pricing it, with that check (engine.Checked): the
# servicer hands it to the engine, so that a request's prompts are tokenised and its picture's
# header read once. Set in the call's own context; it is the check of the message it names only.
checked_call: ContextVar[tuple[object, Checked] | None] = ContextVar("checked_call", default=None)


def checked_for(message: object) -> Checked | None:
    """The check made of this very request message in this call, if one was made."""
    held = checked_call.get()
    return held[1] if held is not None and held[0] is message else None


class ModelCatalog:
    def __init__(self) -> None:
        self._engine: AsyncEngine | None = None
        # Jobs (t2i.jobs.service.JobService), set by billing: they live in its database.
        self.jobs = None

    def attach(self, engine: AsyncEngine) -> None:
        self._engine = engine

    def engine(self) -> AsyncEngine:
        if self._engine is None:
            raise Unavailable("the server is starting: models are still loading")
        return self._engine

    def model(self, model_id: int) -> LoadedModel:
        """The loaded model; NotFound for an unknown id."""
        return self.engine().model(model_id)

    def unavailable(self) -> Unavailable | None:
        """Why no generation can be taken now, whatever it asks: starting, shutting down, or the
        engine gave up. None otherwise (a full queue is the engine's to say, per request)."""
        try:
            refusal = self.engine().admission_error()
        except Unavailable as starting:
            return starting
        return refusal if isinstance(refusal, Unavailable) else None

    def admission_check(self) -> None:
        """Unavailable or Overloaded when the engine would refuse a new request right now."""
        refusal = self.engine().admission_error()
        if refusal is not None:
            raise refusal

    def check(self, request: GenerateRequest) -> Checked:
        """NotFound or InvalidArgument for a request the engine would refuse; else what the
        engine's check found (engine.Checked: its prompts' chunks, its LoRAs)."""
        return self.engine().check(request)
