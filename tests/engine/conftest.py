import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    """The engine tests train toy models with tensors of a few hundred numbers: a second intra-op thread
    only adds synchronisation (and contention with parallel test runs)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
