import pytest

from t2i.client import Client

from testbed.server import ServerProcess


@pytest.fixture(scope="package")
def server(data_dir, tmp_path_factory):
    """The service on the demo model, shared by the tests of this package. Its UNet is behind
    `server.gate` (testbed/gate.py, open unless a test closes it), for tests that must hold
    requests in flight."""
    gate = tmp_path_factory.mktemp("gate")
    arguments = ("--no-billing", "--max-batch-size", "8", "--admission-window-ms", "20")
    with ServerProcess(data_dir, *arguments, gate=gate) as process:
        process.wait_serving()
        yield process


@pytest.fixture
def client(server):
    with Client(server.target, timeout=120) as c:
        yield c
