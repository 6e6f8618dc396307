"""The built-in tiny tokenizer and models, and the quickstart data generator."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dpokit import quickstart_data, tiny
from dpokit.quickstart_data import generate_pairs

ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
             intermediate_size=64)


@pytest.fixture(scope="module")
def tok():
    return tiny.build_tokenizer()


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


# ----------------------------------------------------------------------------- tokenizer


def test_tokenizer_files_identical_across_builds(tok, tmp_path):
    tok.save_pretrained(tmp_path / "a")
    tiny.build_tokenizer().save_pretrained(tmp_path / "b")
    a, b = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert "tokenizer.json" in a and a == b


def test_tokenizer_identical_in_another_process():
    # a fresh process has fresh hash seeds: training must not depend on them
    code = ("import hashlib; from dpokit.tiny import _train_tokenizer; "
            "print(hashlib.sha256(_train_tokenizer().to_str().encode()).hexdigest())")
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == hashlib.sha256(tiny._train_tokenizer().to_str().encode()).hexdigest()


def test_tokenizer_special_tokens_and_size(tok):
    assert 2000 <= len(tok) <= 4000
    assert tok.convert_ids_to_tokens([0, 1, 2]) == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    assert tok.pad_token == "<|endoftext|>" and tok.pad_token_id == 0
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == 2
    assert tok.unk_token is None and tok.bos_token is None
    assert tok.model_max_length == tiny.MODEL_MAX_LENGTH
    assert tok("hello")["input_ids"][0] != 0  # no bos added


@pytest.mark.parametrize("text", [
    "Hello, world!",
    "  leading and trailing spaces \t\n\n",
    "héllo wörld, naïve café — “quotes” ½ ≠ ∞",
    "日本語のテキスト 中文 한국어 עברית العربية",
    "emoji 🤖🎉👩‍👩‍👧 and \u200b zero width, \x00 nul, \U0010ffff",
    "code: def f(x):\n    return x ** 2  # ok\r\n",
])
def test_tokenizer_round_trips_any_utf8(tok, text):
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text


def test_quickstart_text_tokenizes_compactly(tok):
    text = "Sure! Here is a short answer about the moon. The same side of the moon always faces us."
    assert len(tok(text)["input_ids"]) <= len(text.split()) + 4  # about one token per word


def test_chat_template_renders_chatml(tok):
    msgs = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi there?"},
            {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "Bye."}]
    assert tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nHi there?<|im_end|>\n"
        "<|im_start|>assistant\nHello!<|im_end|>\n"
        "<|im_start|>user\nBye.<|im_end|>\n"
        "<|im_start|>assistant\n")
    # no default system message; no generation prompt unless asked
    assert tok.apply_chat_template(msgs[1:2], tokenize=False) == "<|im_start|>user\nHi there?<|im_end|>\n"
    ids = tok.apply_chat_template(msgs[1:2], tokenize=True, add_generation_prompt=True)
    ids = ids["input_ids"] if not isinstance(ids, list) else ids
    assert ids[0] == tok.convert_tokens_to_ids("<|im_start|>")
    assert tok.convert_tokens_to_ids("<|im_end|>") in ids


# ----------------------------------------------------------------------------- models


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_build_tiny_model_loads_with_auto_classes(arch, tok, tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    out = tiny.build_tiny_model(tmp_path / arch, arch=arch, tokenizer=tok, **SMALL)
    assert out == tmp_path / arch
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json"} <= names
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # temp folder gone

    config = AutoConfig.from_pretrained(out)
    assert config.model_type == arch and config.vocab_size == len(tok)
    assert config.eos_token_id == 2 and config.pad_token_id == 0
    gen = GenerationConfig.from_pretrained(out)
    assert gen.eos_token_id == 2 and gen.pad_token_id == 0

    model = AutoModelForCausalLM.from_pretrained(out)
    loaded_tok = AutoTokenizer.from_pretrained(out)
    assert loaded_tok.eos_token == "<|im_end|>" and loaded_tok.pad_token == "<|endoftext|>"
    assert loaded_tok.chat_template == tok.chat_template
    assert model.dtype == torch.float32
    assert model.get_input_embeddings().weight is model.get_output_embeddings().weight  # tied
    batch = loaded_tok(["Can you tell me about the moon?", "Hi"], return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (2, batch["input_ids"].shape[1], len(tok))
    assert torch.isfinite(logits).all()


def test_build_tiny_model_is_seeded_and_keeps_caller_rng(tok, tmp_path):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    tiny.build_tiny_model(tmp_path / "a", tokenizer=tok, seed=5, **SMALL)
    assert torch.equal(torch.rand(3), expected)  # the build did not consume the caller's RNG
    tiny.build_tiny_model(tmp_path / "b", tokenizer=tok, seed=5, **SMALL)
    tiny.build_tiny_model(tmp_path / "c", tokenizer=tok, seed=6, **SMALL)
    a, b, c = (_files(tmp_path / x)["model.safetensors"] for x in "abc")
    assert a == b and a != c


def test_build_tiny_model_untied_and_existing_folders(tok, tmp_path):
    from transformers import AutoModelForCausalLM

    (tmp_path / "empty").mkdir()
    out = tiny.build_tiny_model(tmp_path / "empty", tokenizer=tok, tie_word_embeddings=False, **SMALL)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.get_input_embeddings().weight is not model.get_output_embeddings().weight
    with pytest.raises(FileExistsError, match="overwrite=True"):
        tiny.build_tiny_model(out, tokenizer=tok, **SMALL)
    tiny.build_tiny_model(out, tokenizer=tok, overwrite=True, **SMALL)
    assert AutoModelForCausalLM.from_pretrained(out).config.tie_word_embeddings
    with pytest.raises(ValueError, match="arch"):
        tiny.build_tiny_model(tmp_path / "x", arch="gpt2", tokenizer=tok)


# ----------------------------------------------------------------------------- builtins


def test_resolve_builtin_builds_once_then_uses_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("DPOKIT_CACHE", str(tmp_path / "cache"))
    path = Path(tiny.resolve_builtin("builtin:tiny-qwen2"))
    assert path.is_relative_to(tmp_path / "cache") and f"-v{tiny.SPEC_VERSION}-" in path.name
    mtimes = {p.name: p.stat().st_mtime_ns for p in path.iterdir()}

    def no_rebuild(*a, **k):
        raise AssertionError("rebuilt a cached model")

    monkeypatch.setattr(tiny, "build_tiny_model", no_rebuild)
    assert tiny.resolve_builtin("builtin:tiny-qwen2") == str(path)
    assert {p.name: p.stat().st_mtime_ns for p in path.iterdir()} == mtimes

    from transformers import AutoConfig
    config = AutoConfig.from_pretrained(path)
    spec = tiny.BUILTIN_MODELS["tiny-qwen2"]
    assert config.hidden_size == spec["hidden_size"]
    assert config.num_hidden_layers == spec["num_hidden_layers"]


def test_resolve_builtin_unknown_name_lists_known(monkeypatch, tmp_path):
    monkeypatch.setenv("DPOKIT_CACHE", str(tmp_path))
    with pytest.raises(ValueError) as e:
        tiny.resolve_builtin("builtin:tiny-gpt5")
    assert "builtin:tiny-qwen2" in str(e.value) and "builtin:tiny-llama" in str(e.value)
    assert not any(tmp_path.iterdir())
    assert tiny.is_builtin("builtin:tiny-llama") and not tiny.is_builtin("Qwen/Qwen2-0.5B")


def test_resolve_builtin_cache_key_follows_spec(monkeypatch):
    key = tiny._cache_key("tiny-qwen2")
    assert key == tiny._cache_key("tiny-qwen2") and key != tiny._cache_key("tiny-llama")
    monkeypatch.setitem(tiny.BUILTIN_MODELS, "tiny-qwen2",
                        {**tiny.BUILTIN_MODELS["tiny-qwen2"], "hidden_size": 64})
    assert tiny._cache_key("tiny-qwen2") != key


def test_resolve_builtin_loses_race_gracefully(monkeypatch, tmp_path, tok):
    """Another process renames its build into place while this one builds: use theirs."""
    monkeypatch.setenv("DPOKIT_CACHE", str(tmp_path))
    monkeypatch.setitem(tiny.BUILTIN_MODELS, "tiny-test", dict(arch="llama", **SMALL))
    target = tmp_path / "models" / tiny._cache_key("tiny-test")
    real_write = tiny._write_model

    def write_and_race(out, **kw):
        real_write(out, tokenizer=tok, **{k: v for k, v in kw.items() if k != "tokenizer"})
        real_write(target, tokenizer=tok, **{k: v for k, v in kw.items() if k != "tokenizer"})

    monkeypatch.setattr(tiny, "_write_model", write_and_race)
    assert tiny.resolve_builtin("builtin:tiny-test") == str(target)
    assert [p.name for p in (tmp_path / "models").iterdir()] == [target.name]  # temp removed


BUILD_IN_A_PROCESS_GROUP = """
import os
import sys
from pathlib import Path

from datetime import timedelta

import torch
import torch.distributed as dist

from dpokit import tiny
from dpokit.data.cache import tokenizer_fingerprint
from dpokit.modeling import load_tokenizer
from dpokit.config import ModelConfig
from dpokit import launch, train

accelerator = train.new_accelerator(1234)  # the process group, as dpokit's commands start it (run.ddp_timeout=1234)
rank, out = accelerator.process_index, Path(sys.argv[1])
waits = dist.distributed_c10d._get_default_group()._get_backend(torch.device("cpu")).options._timeout
assert waits == timedelta(seconds=1234), waits  # not gloo's default (1800 s), nor NCCL's (600 s) on GPUs
tiny.build_tiny_model(out / f"own-{rank}", arch="llama", hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, intermediate_size=64)
assert tiny._is_complete(out / f"own-{rank}"), sorted(p.name for p in (out / f"own-{rank}").iterdir())
found = [None, None]
dist.all_gather_object(found, tokenizer_fingerprint(load_tokenizer(ModelConfig(name_or_path="builtin:tiny-qwen2"))))
assert found[0] == found[1], found
accelerator.wait_for_everyone()  # as dpokit's commands end: a process leaving first can make gloo's threads abort the other
launch.end_process_group(accelerator)  # called from Python, not the command line: the group is destroyed
# transformers imported torch.distributed.nn after the group existed: had it kept the group alive,
# gloo's threads would be running still, to stop in the interpreter's teardown, where they aborted
# 9 runs in 51 under load ("terminate called without an active exception")
if train.torch_release() >= train.GLOO_RELEASED_FROM:
    threads = [Path(f"/proc/self/task/{t}/comm").read_text().strip() for t in os.listdir("/proc/self/task")]
    assert not [name for name in threads if "gloo" in name], threads
"""


def test_every_process_of_a_run_builds_a_whole_model(tmp_path, monkeypatch):
    """In a process group transformers writes weights only on rank 0: a tiny model built by another
    process (a second machine's first use) lacked its weights, and two processes resolving a
    ``builtin:`` model at once could leave that half model in the cache for both to load. The
    group waits ``run.ddp_timeout`` in its collectives, and is freed by ``dpokit.launch.end_process_group``."""
    from runs import accelerate_launch

    script = tmp_path / "build.py"
    script.write_text(BUILD_IN_A_PROCESS_GROUP)
    env_cache = tmp_path / "cache"
    monkeypatch.setenv("DPOKIT_CACHE", str(env_cache))
    accelerate_launch(str(script), str(tmp_path), timeout=300)
    (built,) = (env_cache / "models").iterdir()
    assert tiny._is_complete(built)


# ----------------------------------------------------------------------------- data


def test_generate_pairs_is_deterministic():
    assert generate_pairs(300, seed=7) == generate_pairs(300, seed=7)
    assert generate_pairs(300, seed=7) != generate_pairs(300, seed=8)
    assert generate_pairs(0, seed=1) == []


def test_generate_pairs_shape_and_mix():
    rows = generate_pairs(2000, seed=0)
    n_multi = n_system = 0
    for row in rows:
        assert list(row) == ["prompt", "chosen", "rejected"]
        prompt = row["prompt"]
        roles = [m["role"] for m in prompt]
        assert all(set(m) == {"role", "content"} for m in prompt)
        assert roles[-1] == "user"
        assert roles in (["user"], ["system", "user"], ["user", "assistant", "user"],
                         ["system", "user", "assistant", "user"])
        n_system += roles[0] == "system"
        n_multi += roles.count("user") == 2
        for key in ("chosen", "rejected"):
            (msg,) = row[key]
            assert msg["role"] == "assistant" and isinstance(msg["content"], str)
            assert 10 <= len(msg["content"].split()) <= 40, msg["content"]
        assert row["chosen"][0]["content"] != row["rejected"][0]["content"]
        assert row["chosen"][0]["content"].endswith(quickstart_data.CLOSINGS)
        assert not row["rejected"][0]["content"].endswith(quickstart_data.CLOSINGS)
    assert 0.10 < n_multi / len(rows) < 0.20
    assert 0.06 < n_system / len(rows) < 0.14
    assert len({r["chosen"][0]["content"] for r in rows}) > 500  # varied, not one string


def test_quickstart_files_match_generator(tmp_path):
    spec = importlib.util.spec_from_file_location("make_qs", ROOT / "scripts" / "make_quickstart_data.py")
    make_qs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_qs)
    make_qs.main(["--train", "30", "--eval", "10", "--out", str(tmp_path)])
    first = _files(tmp_path)
    make_qs.main(["--train", "30", "--eval", "10", "--out", str(tmp_path)])
    assert _files(tmp_path) == first
    rows = [json.loads(line) for line in (tmp_path / "train.jsonl").read_text().splitlines()]
    assert rows == generate_pairs(30, make_qs.TRAIN_SEED)

    shipped = ROOT / "examples" / "data" / "quickstart"
    if not (shipped / "train.jsonl").exists():
        pytest.skip("examples/data/quickstart not generated")
    for name, n, seed in (("train", 2000, make_qs.TRAIN_SEED), ("eval", 200, make_qs.EVAL_SEED)):
        lines = (shipped / f"{name}.jsonl").read_text(encoding="utf-8").splitlines()
        assert [json.loads(x) for x in lines] == generate_pairs(n, seed), f"regenerate {name}.jsonl"
    size = sum(p.stat().st_size for p in shipped.glob("*.jsonl"))
    assert size < 2_000_000


def test_a_builtin_is_named_as_given_in_reports(tmp_path):
    """eval.json, compare.md and the log lines name a builtin reference ``builtin:tiny-qwen2``, not
    the cache folder it was built in."""
    from dpokit.config import Config, DataConfig, DataSource, save_config
    from dpokit.resolve import default_reference, resolve_model

    model = resolve_model("builtin:tiny-qwen2")
    assert model.shown == "builtin:tiny-qwen2" and Path(model.path).is_dir()
    run = tmp_path / "run"
    run.mkdir()
    save_config(Config(data=DataConfig(train=DataSource("pairs.jsonl"))), run / "config.yaml")
    tiny.build_tiny_model(run / "final", num_hidden_layers=1, hidden_size=32)
    assert default_reference(resolve_model(str(run))).shown == "builtin:tiny-qwen2"
    assert resolve_model(str(run)).shown == str(run / "final")  # folders keep their path
