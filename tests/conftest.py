import multiprocessing
import os
import socket

import pytest
import torch

import triformer  # noqa: F401  (decides interpreter vs compiled before any kernel is defined)
from triformer.testing import poisoned_empty

# Tests that start processes use the forkserver, never a plain fork of the test process: by then that holds
# threads (tqdm's monitor, wandb's asyncio loop, execnet's I/O), and a fork that catches one of them holding a
# lock leaves the child waiting on it forever. The server is started once per worker with these imported, so
# its children still start in milliseconds.
multiprocessing.set_forkserver_preload(["torch", "safetensors.torch", "triformer", "training.trainer",
                                        "training.checkpoint"])
# The same for HF datasets' map(num_proc=...), whose pool comes from `multiprocess` (dill's fork of
# multiprocessing) and forks by default. A training run builds its data before wandb or any other thread
# starts; a test process has them already. (`multiprocess` comes with `datasets`; the GPU image, which runs only
# the kernel and model tests, has neither.)
try:
    import multiprocess
except ImportError:
    multiprocess = None
if multiprocess is not None:
    multiprocess.set_start_method("forkserver", force=True)

# Two xdist workers share two cores: one torch thread each keeps them from fighting.
if triformer.INTERPRET:
    torch.set_num_threads(1)


@pytest.fixture
def no_network(monkeypatch):
    """Fail any IP connection (the data and eval tests must run offline). Not autouse: DDP tests use loopback."""
    real_connect = socket.socket.connect

    def connect(sock, address):
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            raise AssertionError(f"a test tried to use the network: {address}")
        return real_connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", connect)


@pytest.fixture
def poisoned_outputs():
    """For the whole test, torch.empty returns NaN-filled memory (``triformer.testing.poisoned_empty``): ops that
    allocate their outputs with torch.empty then show any element a kernel skips. Not autouse: a kernel test
    module asks for it with ``pytestmark = pytest.mark.usefixtures("poisoned_outputs")``."""
    with poisoned_empty():
        yield


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_collection_modifyitems(config, items):
    if os.environ.get("TRIFORMER_SLOW_TESTS") == "1":
        return
    skip = pytest.mark.skip(reason="slow case: set TRIFORMER_SLOW_TESTS=1")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


# Property-based kernel fuzzing: a few cases per op on each CI run; TRIFORMER_FUZZ=long runs the full
# >= 500 generated cases per op (see README, "Testing").
from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile("ci", max_examples=12, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
settings.register_profile("long", max_examples=500, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
settings.load_profile("long" if os.environ.get("TRIFORMER_FUZZ") == "long" else "ci")
