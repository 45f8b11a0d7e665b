"""Names and limits on the wire, stated once: headers, the service, ports and message sizes.

The service, the client, the billing layer, the Envoy launcher and the renderers of
edge/envoy.yaml, the OpenAPI description and the README import these; tests check that the
canonical Envoy config and the Kubernetes manifests agree with them.
"""

from __future__ import annotations

PACKAGE = "illustrious.texttoimage.v1"
SERVICE = f"{PACKAGE}.TextToImageService"
GENERATE_METHOD = f"/{SERVICE}/GenerateImage"
GENERATE_STREAM_METHOD = f"/{SERVICE}/GenerateImageStream"
LIST_MODELS_METHOD = f"/{SERVICE}/ListModels"
LIST_LORAS_METHOD = f"/{SERVICE}/ListLoras"
SUBMIT_JOB_METHOD = f"/{SERVICE}/SubmitJob"
# The job calls that read or change the caller's own jobs (t2i.jobs): a valid key, no price.
JOB_METHODS = tuple(f"/{SERVICE}/{name}" for name in ("GetJob", "CancelJob", "ListJobs", "GetJobImage"))
WATCH_JOB_METHOD = f"/{SERVICE}/WatchJob"
# WatchJob's REST path: real server-sent events with ids, served by the adapters' port
# (t2i.compat.job_events_http) because the transcoder's events carry none.
JOB_EVENTS_PATH = "/jobs/{id}/events"

# Request metadata (REST: headers of the same names).
API_KEY_HEADER = "x-illustrious-api-key"
# The key may also come as `Authorization: Bearer <key>` (what OpenAI's clients send), when
# x-illustrious-api-key is absent or carries the same key (t2i.billing.interceptor).
AUTHORIZATION_HEADER = "authorization"
BEARER_SCHEME = "bearer"
IDEMPOTENCY_HEADER = "idempotency-key"
REQUEST_ID_HEADER = "x-request-id"
FORWARDED_FOR_HEADER = "x-forwarded-for"
# Set by the edge's transcoder on a REST call: the REST path it rewrote to a gRPC method.
ORIGINAL_PATH_HEADER = "x-envoy-original-path"

# Response metadata of rate-limited and successful calls.
RETRY_AFTER_HEADER = "retry-after"
RATE_LIMIT_HEADERS = ("x-ratelimit-limit", "x-ratelimit-remaining", "x-ratelimit-reset")
# Trailing metadata of an INVALID_ARGUMENT status: the request field it names (as the message
# does, e.g. `numImages`), so that an adapter (t2i.compat) can name it in its own API's terms.
ERROR_FIELD_HEADER = "x-error-field"

# Lengths the edge and the service both enforce.
MAX_IDEMPOTENCY_KEY = 255
MAX_REQUEST_ID = 128
# The largest REST request body the edge accepts (its buffer filter; larger: 413), on every
# route but the image routes below. A text-to-image request is a few KiB of JSON.
MAX_REQUEST_BYTES = 1024 * 1024
# The image routes (POST /image-to-image/generate and its stream) carry a picture and maybe a
# mask, base64 in JSON (4/3 of their size): room for a 20 MiB picture and its mask. Native gRPC
# through the edge gets this cap too (the edge cannot tell a GenerateImage with init_image from
# one without), and it is the service's own gRPC receive limit: a body near this cap transcodes
# to a smaller protobuf message (base64 becomes raw bytes, field names one-byte tags), and a
# caller that reaches the service directly cannot send more than a caller through the edge.
MAX_IMAGE_REQUEST_BYTES = 40 * 1024 * 1024
# The REST paths that take MAX_IMAGE_REQUEST_BYTES and require initImage (the additional
# google.api.http bindings of GenerateImage and GenerateImageStream in the proto).
IMAGE_PATHS = ("/image-to-image/generate", "/image-to-image/generate/stream", "/image-to-image/jobs")
# The largest request header block the edge forwards (larger: 431). Below gRPC's own metadata
# limit (which the service raises to MAX_METADATA_BYTES), so that gRPC never answers
# RESOURCE_EXHAUSTED for headers that the edge let through.
MAX_HEADER_BYTES = 16 * 1024
# The most request headers the edge reads (Envoy's max_headers_count in edge/envoy.yaml; more:
# 431 from Envoy's codec, before any filter runs).
MAX_HEADER_COUNT = 100
MAX_METADATA_BYTES = 64 * 1024
# Responses hold PNGs: up to 8 large images.
MAX_RESPONSE_BYTES = 256 * 1024 * 1024

# Ports of one machine (`t2i up`, `make run`) and of the Kubernetes Services.
GRPC_PORT = 50051
METRICS_PORT = 9464
HTTP_PORT = 8080
ENVOY_ADMIN_PORT = 9901
# The adapters' HTTP port of `t2i serve` (t2i.compat: the OpenAI Images API), behind the edge.
COMPAT_PORT = 8090
# Seconds the edge waits for one generation; the service's grace period on SIGTERM in
# Kubernetes must be at least this.
ROUTE_TIMEOUT = 300.0
