import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Run a module's small-tensor tests on one thread: extra threads only add synchronisation, which
    on a machine busy with other work costs far more than the arithmetic."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
