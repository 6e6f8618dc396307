"""Hub ids that cannot be reached from here are said at once, not after minutes of retries."""

from __future__ import annotations

import socket

import pytest

import dpokit.hub
from dpokit.config import ConfigError, DataSource, ModelConfig
from dpokit.data.sources import DataError, load_rows
from dpokit.hub import _probe, unreachable
from dpokit.modeling import load_tokenizer


@pytest.fixture
def offline_network(monkeypatch, tmp_path):
    """No proxy, online mode, an empty hub cache, and a hub host whose name lookup fails."""
    import huggingface_hub.constants

    for name in dpokit.hub.PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    asked = []
    monkeypatch.setattr(dpokit.hub, "_probe", lambda host, port: asked.append((host, port)) or "name lookup failed: test")
    return asked


def test_a_model_or_dataset_the_hub_cannot_give_is_refused_before_loading(offline_network, monkeypatch):
    import transformers

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: pytest.fail("went to the hub"))
    with pytest.raises(ConfigError, match=r"could not load the tokenizer from 'some-org/some-model': huggingface\.co cannot be "
                       r"reached from this machine \(name lookup failed: test\) and the local Hugging Face cache .* has no "
                       r"some-org/some-model\.\nGive a local folder .* or set HF_HUB_OFFLINE=1"):
        load_tokenizer(ModelConfig(name_or_path="some-org/some-model"))
    with pytest.raises(DataError, match="could not load 'some-org/prefs' from the Hugging Face Hub: huggingface.co cannot be reached"):
        load_rows(DataSource("some-org/prefs"))
    assert offline_network == [("huggingface.co", 443)] * 2


def test_not_asked_when_the_cache_has_it_offline_mode_or_a_proxy(offline_network, monkeypatch, tmp_path):
    import huggingface_hub.constants

    (tmp_path / "hub" / "models--some-org--some-model").mkdir(parents=True)
    assert unreachable("some-org/some-model", "model") is None
    assert unreachable("some-org/some-model", "dataset") is not None  # a dataset of that name is not cached
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy:3128")
    assert unreachable("other/model", "model") is None
    monkeypatch.delenv("HTTPS_PROXY")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    assert unreachable("other/model", "model") is None
    assert offline_network == [("huggingface.co", 443)]


def test_probe_tells_a_refused_connection_from_an_open_one():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        assert _probe.__wrapped__("127.0.0.1", port, timeout=5) == ""
    assert _probe.__wrapped__("127.0.0.1", port, timeout=5).startswith(f"no connection to port {port}: ")
    assert _probe.__wrapped__("name.invalid", 443, timeout=5).startswith("name lookup failed: ")
