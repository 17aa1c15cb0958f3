import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
torch.set_num_threads(min(2, torch.get_num_threads()))

SHARED_DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    # Keep the embedded-model cache shared across tests but out of the user's home.
    monkeypatch.setenv("MOGU_CACHE", os.environ.get("MOGU_TEST_CACHE", str(tmp_path_factory.getbasetemp() / "cache")))


@pytest.fixture(scope="module")
def one_thread():
    # Tiny models (hidden size 32): one thread is fastest and does not fight other jobs for the cores.
    # Modules opt in with `pytestmark = pytest.mark.usefixtures("one_thread")`.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture()
def tiny_mogu():
    """(MoGUModel on a tiny random Llama with random experts and routers, the tiny chat tokenizer)."""
    from mogu import MoGUConfig, MoGUModel
    from tiny_models import randomize_added, tiny_model, tiny_tokenizer

    tok = tiny_tokenizer()
    model = MoGUModel.from_base(tiny_model("llama"), MoGUConfig(), tokenizer=tok)
    randomize_added(model)
    return model, tok
