import pytest


@pytest.fixture(scope="session")
def jax_cache(tmp_path_factory):
    """One on-disk compilation cache for every training subprocess of these tests."""
    return tmp_path_factory.mktemp("jax_cache")
