"""`python -m testbed.gated_serve GATE_FOLDER <t2i arguments>`: the `t2i` command with a
FileGate (testbed/gate.py) in front of the UNet of every model it loads.

For tests that must hold a served request in flight: `ServerProcess(..., gate=folder)` and
`UpProcess(..., gate=folder)` start the server this way (`t2i up` starts `t2i serve` as a
child, which is started through this module too). Nothing in t2i knows about it; the loader
is wrapped before the command runs.
"""

from __future__ import annotations

import sys
from pathlib import Path

from testbed.gate import FileGate


def gated(load_model, gate: FileGate):
    def load(*args, **kwargs):
        model = load_model(*args, **kwargs)
        gate.install(model.unet)
        return model

    return load


def gate_children(folder: str) -> None:
    """`t2i up` starts `python -m t2i serve ...`: start it as `python -m testbed.gated_serve
    FOLDER serve ...` instead (it inherits PYTHONPATH, which finds testbed)."""
    from t2i.edge import launcher

    child = getattr(launcher, "_child", None)
    if child is None:
        return

    def gated_child(command: list[str]):
        if command[1:4] == ["-m", "t2i", "serve"]:
            command = [command[0], "-m", "testbed.gated_serve", folder, *command[3:]]
        return child(command)

    launcher._child = gated_child


def main() -> None:
    gate = FileGate(Path(sys.argv[1]))
    from t2i.models import loader
    from t2i.server import app as server_app

    # The server loads its models through the name it imported; wrap both names so that either
    # way of calling it is gated, and the model only once.
    original = loader.load_model
    loader.load_model = gated(original, gate)
    if getattr(server_app, "load_model", None) is original:
        server_app.load_model = loader.load_model
    gate_children(sys.argv[1])

    from t2i.cli import app

    app(args=sys.argv[2:], prog_name="t2i")


if __name__ == "__main__":
    main()
