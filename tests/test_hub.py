"""Hub ids that cannot be reached from here are said at once, not after minutes of retries."""

from __future__ import annotations

import socket

import pytest

import dpokit.hub
import dpokit.modeling
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


def test_revisions_reach_the_hub_loads(monkeypatch, tmp_path):
    """model.revision picks the policy's (and tokenizer's) version, ref_revision the separate
    reference's: each reaches from_pretrained with its own model."""
    import transformers

    from dpokit.modeling import load_causal_lm, load_reference
    from dpokit.tiny import build_tiny_model

    tiny = build_tiny_model(tmp_path / "tiny", hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)
    real = transformers.AutoModelForCausalLM.from_pretrained
    asked = []

    def from_pretrained(path, **kwargs):
        asked.append((path, kwargs.get("revision")))
        return real(tiny)

    monkeypatch.setattr(dpokit.modeling, "unreachable", lambda *a: None)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", from_pretrained)
    config = ModelConfig(name_or_path="org/policy", revision="v1", ref_model_name_or_path="org/reference", ref_revision="r2")
    load_causal_lm(config)
    load_reference(config)
    assert asked == [("org/policy", "v1"), ("org/reference", "r2")]
    asked.clear()
    load_reference(ModelConfig(name_or_path="org/policy", revision="v1"))  # the reference is the starting policy
    assert asked == [("org/policy", "v1")]


@pytest.mark.parametrize("key, model", [("revision", "name_or_path"), ("ref_revision", "ref_model_name_or_path")])
def test_a_revision_of_a_local_folder_is_refused(tmp_path, key, model):
    """transformers reads a local folder as it is, whatever the revision: it would change nothing."""
    from dpokit.config import load_config

    (tmp_path / "pairs.jsonl").write_text("")
    base = [f"data.train={tmp_path / 'pairs.jsonl'}", f"output_dir={tmp_path / 'out'}"]
    for name in (str(tmp_path), "builtin:tiny-llama"):
        with pytest.raises(ConfigError, match=f"model.{key}=v1 picks a version of a hub model, and model.{model}={name} is "):
            load_config(None, [*base, f"{model}={name}", f"{key}=v1"])
    load_config(None, [*base, f"{model}=org/name", f"{key}=v1"])


@pytest.mark.parametrize("endpoint, asked", [("http://hub.internal", ("hub.internal", 80)),
                                             ("https://hub.internal", ("hub.internal", 443)),
                                             ("https://hub.internal:8443", ("hub.internal", 8443))])
def test_the_host_and_port_asked_are_the_endpoints(offline_network, monkeypatch, endpoint, asked):
    """HF_ENDPOINT (a mirror, a private hub) is the host to reach, at its port or its scheme's default."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", endpoint)
    assert unreachable("org/model", "model").startswith(f"{asked[0]} cannot be reached from this machine")
    assert offline_network == [asked]


def test_nothing_is_said_when_the_host_answers_or_is_not_a_host(monkeypatch, tmp_path):
    import huggingface_hub.constants

    for name in dpokit.hub.PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(dpokit.hub, "_probe", lambda host, port: "")  # it answers
    assert unreachable("org/model", "model") is None
    monkeypatch.setattr(dpokit.hub, "_probe", lambda host, port: pytest.fail("asked a host"))
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "file:///srv/hub")  # no host to ask
    assert unreachable("org/model", "model") is None


@pytest.mark.parametrize("variable", ["HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"])
def test_any_proxy_variable_means_the_host_is_not_asked(offline_network, monkeypatch, variable):
    """The variables requests (and so huggingface_hub) reads: the hub is reached through the proxy."""
    monkeypatch.setenv(variable, "http://proxy:3128")
    assert unreachable("org/model", "model") is None and offline_network == []
