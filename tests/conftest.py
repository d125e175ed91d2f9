import pytest
import torch

from ditcache.testing import TINY_MODELS, tiny_inputs, tiny_model, tiny_uncond_inputs


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _private_profile_dir(tmp_path, monkeypatch):
    """Calibrations in tests save to a user profile directory of their own, never to ~/.cache."""
    monkeypatch.setenv("DITCACHE_PROFILE_DIR", str(tmp_path / "user-profiles"))


@pytest.fixture(params=TINY_MODELS)
def family(request):
    return request.param


@pytest.fixture
def setup(family):
    model = tiny_model(family)
    inputs = tiny_inputs(family, batch=2)
    return family, model, inputs, tiny_uncond_inputs(family, inputs)


@pytest.fixture(scope="module")
def one_torch_thread():
    """For files of many tiny-model runs: they are fastest on one thread, and on a loaded machine several threads
    per process make them 20-100x slower (oversubscription). Use with `pytest.mark.usefixtures`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
