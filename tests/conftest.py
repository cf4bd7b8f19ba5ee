"""Shared test setup: the repo root on sys.path, a TEST_DEVICE choice, small thread counts."""

import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def device():
    """The device tests run on: TEST_DEVICE (cpu or cuda), default cpu."""
    return torch.device(os.environ.get("TEST_DEVICE", "cpu"))
