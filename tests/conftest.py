"""Test setup: Triton runs in its CPU interpreter, no hub lookups, seeded RNG, few threads."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before any @triton.jit runs
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def one_thread():
    """Tiny tensors and models: thread start-up and oversubscription on a small shared machine cost
    more than a second thread saves. Modules opt in with pytestmark = usefixtures("one_thread")."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
