"""What every test of test_mim.py and test_cli.py shares: no network."""
import urllib.request

import pytest


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Downloads fail as they would offline; tests that download stub them."""
    def refuse(*args, **kwargs):
        raise OSError("network disabled in tests")
    monkeypatch.setattr(urllib.request, "urlopen", refuse)
