"""tests/core runs its tiny float64 modules on one intra-op thread: a second thread buys nothing at these sizes,
and on a shared machine waking an OpenMP team for each of thousands of tiny ops cost ~25x the wall time
(6 s vs 150 s for this folder at load 5 on 2 cores). Results do not depend on the thread count."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_intra_op_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
