"""The image-mix serving benchmark (benchmarks/image_serving.py, part of `make bench`): its
workload, and its whole plumbing on a tiny configuration (`--smoke`: 64x64, 2 to 4 steps, 3 s of
arrivals). No timing is asserted: only that both systems served every kind of request and that
the report has its fields."""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "benchmarks.md"
KINDS = ("text-to-image", "img2img", "inpaint", "hires fix")


def test_the_image_mix_has_its_shares_and_is_seeded(data_dir):
    from benchmarks import workloads
    from t2i.models.demo import ensure_demo_model

    count_tokens = workloads.token_counter(ensure_demo_model(data_dir))
    first = workloads.image_mixed(120, 25, count_tokens, sizes=((64, 1.0),), steps=(2,))
    again = workloads.image_mixed(120, 25, count_tokens, sizes=((64, 1.0),), steps=(2,))
    assert first == again
    kinds = collections.Counter(workloads.image_kind(r) for r in first.requests)
    assert kinds["text-to-image"] == 60 and kinds["hires fix"] == 20
    assert kinds["img2img"] + kinds["inpaint"] == 40 and kinds["inpaint"] > 0
    for request in first.requests:
        if request.init_image:
            assert 0.3 <= request.denoise <= 0.8 and request.init_image.startswith(b"\x89PNG")
        else:
            assert request.denoise == 1.0 and not request.mask
        if request.hires_fix is not None:
            assert request.hires_fix.scale == 1.5 and not request.init_image
    # The text-to-image settings are the mixed workload's, drawn from the same seed.
    plain = workloads.mixed(120, 25, count_tokens, sizes=((64, 1.0),), steps=(2,))
    assert [(r.prompt, r.seed, r.sampler) for r in first.requests] == [(r.prompt, r.seed, r.sampler) for r in plain.requests]


@pytest.mark.timeout(420)
def test_smoke_run_serves_every_kind_and_reports(tmp_path):
    before = DOC.read_bytes()
    results = tmp_path / "results.json"
    run = subprocess.run(
        [sys.executable, "-m", "benchmarks.image_serving", "--smoke", "--no-write", "--results", str(results)],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))},
        capture_output=True, text=True, timeout=400,
    )
    output = run.stdout + run.stderr
    assert run.returncode == 0, output[-4000:]
    figures = json.loads(results.read_text())
    assert figures["capacity"] > 0
    names = ("service", "service, sizes in turn", "image peer")
    assert set(figures["closed"]) == set(names)
    for name in names:
        assert figures["closed"][name]["images"] > 0 and figures["closed"][name]["per_second"] > 0
        opened = figures["open"][name]
        assert opened["offered"] > 0 and opened["completed"] > 0 and opened["p99"] is not None
        assert set(opened["by_kind"]) == set(KINDS)
    assert all(figures["ratios"][key] is not None for key in ("throughput", "p50", "p99", "closed_throughput"))
    for heading in ("### Closed loop, concurrency 8", "### Open loop near capacity", "### Targets", "### Reading"):
        assert heading in run.stdout
    assert "service images/s >= 1.5x the peer's" in run.stdout and "service p99 <= 0.6x the peer's" in run.stdout
    assert DOC.read_bytes() == before  # --no-write
