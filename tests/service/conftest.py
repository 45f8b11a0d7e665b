import pytest

from t2i.client import Client

from testbed.server import ServerProcess


@pytest.fixture(scope="package")
def server(data_dir):
    """The service on the demo model, shared by the tests of this package."""
    with ServerProcess(data_dir, "--no-billing", "--max-batch-size", "8", "--admission-window-ms", "20") as process:
        process.wait_serving()
        yield process


@pytest.fixture
def client(server):
    with Client(server.target, timeout=120) as c:
        yield c
