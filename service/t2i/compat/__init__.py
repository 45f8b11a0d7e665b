"""Adapters: other APIs in front of the one engine path and the one money path.

Each adapter translates its API's requests into the one domain request (t2i.domain) and calls
the service's own GenerateImage over gRPC (t2i.compat.app), so that billing, rate limits,
validation and the engine are those of the documented API; it answers in its API's own shapes
and statuses. Its mapping rules (names, defaults, ignored fields, errors) are one table in its
module, rendered into the README. What the edge needs to route to it is its `Adapter` record
(t2i.compat.adapter), rendered into edge/envoy.yaml.

- openai_images (tables, translations) and openai_http (routes): the OpenAI Images API
  (POST /v1/images/generations, /v1/images/edits, GET /v1/models).
- a1111_api and a1111_http: A1111's /sdapi/v1 (txt2img, img2img, sd-models, samplers,
  schedulers, loras, options, progress, interrupt), prompts read by A1111's rules.

Another adapter is a pair of modules beside these, its Routes added to build_app's, and its
Adapter listed here.
"""

from __future__ import annotations

from .adapter import Adapter, Route
from .a1111_api import ADAPTER as A1111
from .openai_images import ADAPTER as OPENAI

ADAPTERS: tuple[Adapter, ...] = (OPENAI, A1111)

__all__ = ["ADAPTERS", "Adapter", "Route"]
