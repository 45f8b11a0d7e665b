"""A models file that cannot be used is one clear line naming the file, where in it, and what
is allowed there; `t2i serve` and `t2i up` say it and exit with status 2 before anything starts."""

import os
import subprocess
import sys

import pytest

from t2i.models.config import ModelsFileError, load_models_file


@pytest.mark.parametrize("text, expected", [
    ("models:\n  - {id: 1, name: m, path: ., colour: red}\n",
     "models[0].colour: unknown key 'colour'; the keys allowed here are id, name, path, config, min_size"),
    ("colour: red\nmodels:\n  - {id: 1, name: m, path: .}\n", "colour: unknown key 'colour'; the keys allowed here are models"),
    ("models:\n  - {id: 1, path: .}\n", "models[0].name: missing; every model needs id, name, path"),
    ("models:\n  - {id: 1, name: m, path: ., min_size: 4}\n", "models[0].min_size: Input should be greater than or equal to 8, got 4"),
    ("models: [\n", "not valid YAML"),
    ("", "must be a mapping with a `models` list, found an empty file"),
])
def test_each_problem_is_one_line_naming_the_file_the_place_and_what_is_allowed(tmp_path, text, expected):
    path = tmp_path / "models.yaml"
    path.write_text(text)
    with pytest.raises(ModelsFileError) as raised:
        load_models_file(path)
    message = str(raised.value)
    assert message.startswith(f"models file {path}: ") and expected in message, message
    assert "\n" not in message and "pydantic" not in message


def run_cli(command: str, tmp_path) -> subprocess.CompletedProcess:
    models = tmp_path / "models.yaml"
    models.write_text(f"models:\n  - {{id: 1, name: m, path: {tmp_path}, colour: red}}\n")
    return subprocess.run(
        [sys.executable, "-m", "t2i", "--log-format", "text", command, "--models", str(models), "--no-billing",
         "--data-dir", str(tmp_path / "data")],
        capture_output=True, text=True, timeout=120, env={**os.environ, "T2I_DEVICE": "cpu"},
    )


@pytest.mark.parametrize("command", ["serve", "up"])
def test_serve_and_up_say_it_in_one_line_and_exit_2(tmp_path, command):
    finished = run_cli(command, tmp_path)
    assert finished.returncode == 2, finished.stderr[-2000:]
    lines = [line for line in (finished.stdout + finished.stderr).splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert str(tmp_path / "models.yaml") in lines[0] and "unknown key 'colour'" in lines[0] and "allowed" in lines[0]


def test_a_failed_start_ends_without_an_event_loop_crash(tmp_path):
    """A start-up failure after the server was built (a model folder that holds no model) ends
    with its own error only, not also a crash of the gRPC server's finalizer."""
    (tmp_path / "empty").mkdir()
    models = tmp_path / "models.yaml"
    models.write_text("models:\n  - {id: 1, name: m, path: empty}\n")
    finished = subprocess.run(
        [sys.executable, "-m", "t2i", "--log-format", "text", "serve", "--models", str(models), "--no-billing",
         "--grpc-port", "0", "--metrics-port", "-1", "--data-dir", str(tmp_path / "data")],
        capture_output=True, text=True, timeout=300, env={**os.environ, "T2I_DEVICE": "cpu"},
    )
    assert finished.returncode == 1
    assert "model_index.json" in finished.stderr
    assert "Event loop is closed" not in finished.stderr and "was never awaited" not in finished.stderr
