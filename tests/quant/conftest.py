"""Quantization tests run on one thread: they are made of many small tensor ops, for which OpenMP's thread
synchronisation costs more than it saves on a shared 2-core machine (GPTQ on one layer: 0.27 s on one
thread vs 7.4 s on two under load)."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
