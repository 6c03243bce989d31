"""Fixtures that several test modules import by name (``from fixtures_shared import ...``);
conftest.py holds the session's own."""

import os

import pytest
import torch


@pytest.fixture(autouse=True)
def torch_on_one_thread(monkeypatch):
    """torch on one thread for the test, in this process and in the lab's entry points the test
    starts (``LAB_THREADS``; set it to ask for more). The models here are tiny, and the tests run
    beside the smoke report on two cores, where a second OpenMP thread mostly spin-waits for a
    core: test_zoo took 61 s of CPU on two threads and 13 s on one (load average 14)."""
    threads = os.environ.get("LAB_THREADS", "1")
    monkeypatch.setenv("LAB_THREADS", threads)
    before = torch.get_num_threads()
    torch.set_num_threads(int(threads))
    yield
    torch.set_num_threads(before)
