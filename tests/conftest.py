"""Shared test setup: the repository root on sys.path, a headless matplotlib, a bounded number
of torch threads, the `slow` marker, and a temporary workspace: FRCNN_WORKSPACE points fc.resolve
(and every process the tests start) at a folder of its own, so the datasets and runs the tests
build (data/shapes_smoke, runs/...) never land in the checkout; it is removed at the end.

Slow tests (whole notebooks, training runs) run in smoke form by default, so that `make test`
stays well under a quarter of an hour on 2 CPU cores. `pytest --full` or FRCNN_FULL_TESTS=1 runs
them at full size instead; such tests ask for the `full_tests` fixture to know which.
"""
import os
import pathlib
import shutil
import sys
import tempfile

import matplotlib

matplotlib.use("Agg")  # before anything imports pyplot: tests draw no windows

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# Two threads use both cores of the smallest machine we run on, without oversubscribing a
# larger one that runs other jobs beside the tests.
torch.set_num_threads(min(2, os.cpu_count() or 1))


def pytest_addoption(parser):
    parser.addoption("--full", action="store_true", default=False,
                     help="run slow tests at full size (also: FRCNN_FULL_TESTS=1)")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: runs a notebook or a training loop; smoke-sized "
                                       "unless --full or FRCNN_FULL_TESTS=1")
    config.frcnn_saved_workspace = os.environ.get("FRCNN_WORKSPACE")
    os.environ["FRCNN_WORKSPACE"] = config.frcnn_workspace = tempfile.mkdtemp(prefix="frcnn-tests-")


def pytest_unconfigure(config):
    shutil.rmtree(getattr(config, "frcnn_workspace", ""), ignore_errors=True)
    if getattr(config, "frcnn_saved_workspace", None) is None:
        os.environ.pop("FRCNN_WORKSPACE", None)
    else:
        os.environ["FRCNN_WORKSPACE"] = config.frcnn_saved_workspace


@pytest.fixture(scope="session")
def full_tests(request) -> bool:
    """True when slow tests should run at full size instead of in smoke form."""
    return request.config.getoption("--full") or os.environ.get("FRCNN_FULL_TESTS", "") == "1"
