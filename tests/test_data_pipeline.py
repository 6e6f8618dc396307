"""The data path around the formats: mixing by weight, eval split, cache, truncation policies,
``on_error: skip``, hub subsets/splits/revisions."""

from __future__ import annotations

import copy
import dataclasses
import json
import os

import pytest

import dpokit.hub
from dpokit.config import ConfigError, DataConfig, DataSource, load_config
from dpokit.data import cache, pipeline
from dpokit.data.formats import Pair, normalize
from dpokit.data.pipeline import load_data, weighted, weighted_count
from dpokit.data.sources import DataError
from dpokit.data.tokenize import tokenize_pairs


def write_jsonl(path, rows, extra_lines=()) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "".join(extra_lines))
    return str(path)


def standard_rows(n: int, tag: str = "q") -> list[dict]:
    return [{"prompt": f"Why is the sky blue? ({tag}{i})", "chosen": " Because light scatters.", "rejected": f" It is green {i}."} for i in range(n)]


def chat_rows(n: int) -> list[dict]:
    return [{"prompt": [{"role": "user", "content": f"Tell me about the sea ({i})."}],
             "chosen": [{"role": "assistant", "content": "The sea is big and blue."}],
             "rejected": [{"role": "assistant", "content": f"No {i}."}]} for i in range(n)]


@pytest.fixture
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DPOKIT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "datasets"


def quiet(_line: str) -> None:
    pass


# ----------------------------------------------------------------------------- mixing


def test_weighted_counts_copies_and_seeded_subsets():
    items = list(range(10))
    assert weighted(items, 1.0, seed=0, index=0) == items
    half = weighted(items, 0.5, seed=0, index=0)
    assert len(half) == 5 and half == sorted(half) and set(half) <= set(items)  # a subset, in order
    assert half == weighted(items, 0.5, seed=0, index=0)  # deterministic
    assert half != weighted(items, 0.5, seed=1, index=0) or half != weighted(items, 0.5, seed=2, index=0)
    assert weighted(items, 0.5, seed=0, index=1) != half or weighted(items, 0.5, seed=0, index=2) != half
    more = weighted(items, 2.5, seed=0, index=0)
    assert len(more) == 25 and more[:20] == items + items and len(set(more[20:])) == 5
    assert weighted_count(10, 0.01) == 1 and weighted_count(0, 3.0) == 0 and weighted(items, 0.01, 0, 0)[0] in items


def test_mixing_sources_by_weight(tmp_path, chat_tokenizer, private_cache):
    a = write_jsonl(tmp_path / "a.jsonl", standard_rows(10, "a"))
    b = write_jsonl(tmp_path / "b.jsonl", chat_rows(4))
    cfg_path = tmp_path / "mix.yaml"
    cfg_path.write_text("data:\n  train:\n    - {path: a.jsonl, weight: 0.5}\n    - {path: b.jsonl, weight: 2.5}\n  max_length: 256\n")
    config = load_config(cfg_path).data
    assert [s.path for s in config.train] == [a, b]  # relative to the config file
    lines: list[str] = []
    data = load_data(config, chat_tokenizer, seed=0, log=lines.append)
    alone_a = load_data(DataConfig(train=DataSource(a), max_length=256), chat_tokenizer, seed=0, log=quiet).train
    alone_b = load_data(DataConfig(train=DataSource(b), max_length=256), chat_tokenizer, seed=0, log=quiet).train
    assert len(data.train) == 5 + 10
    assert data.train[:5] == weighted(alone_a, 0.5, seed=0, index=0)
    assert data.train[5:] == alone_b * 2 + weighted(alone_b, 0.5, seed=0, index=1)
    assert set(data.stats) == {"train[0]", "train[1]"}
    assert lines[0].startswith(f"data: train[0] {a}: 10 rows -> 10 pairs") and "format standard (detected)" in lines[0]
    assert "format conversational (detected)" in lines[1]
    assert lines[-1] == "data: mix: train[0] 10 x 0.5 -> 5, train[1] 4 x 2.5 -> 10; 15 train pairs"
    other_seed = load_data(config, chat_tokenizer, seed=1, log=quiet)
    assert other_seed.train[5:] != data.train[5:] or other_seed.train[:5] != data.train[:5]


def test_single_source_shorthand_and_weight_checks(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", standard_rows(2))
    assert load_config(None, [f"data.train={path}"]).data.train == DataSource(path)
    assert load_config(None, [f"train={path}", "data.train.weight=2"]).data.train.weight == 2.0
    listed = load_config(None, [f"data.train=[{path}, {{path: {path}, split: test}}]"]).data.train
    assert listed == [DataSource(path), DataSource(path, split="test")]
    with pytest.raises(ConfigError, match=r"data.train\[1\].weight must be > 0"):
        load_config(None, [f"data.train=[{path}, {{path: {path}, weight: 0}}]"])


def test_eval_fraction_is_held_out_before_weighting(tmp_path, chat_tokenizer, private_cache):
    a = write_jsonl(tmp_path / "a.jsonl", standard_rows(20, "a"))
    b = write_jsonl(tmp_path / "b.jsonl", standard_rows(10, "b"))
    config = DataConfig(train=[DataSource(a, weight=3.0), DataSource(b)], eval_fraction=0.2, max_length=256)
    lines: list[str] = []
    data = load_data(config, chat_tokenizer, seed=5, log=lines.append)
    assert len(data.eval) == data.eval_held_out == 6  # run.json says they came from the train data
    assert not {repr(p) for p in data.eval} & {repr(p) for p in data.train}  # never trained on
    assert any("6 pairs (eval_fraction=0.2, seed=5); 24 left to train" in line for line in lines)
    again = load_data(config, chat_tokenizer, seed=5, log=quiet)
    assert (again.train, again.eval) == (data.train, data.eval)



def test_given_eval_data_is_not_counted_as_held_out(tmp_path, chat_tokenizer, private_cache):
    """eval_held_out counts eval pairs split off the train data; with data.eval given (an
    eval_fraction beside it is not used) it is 0, and all train pairs are trained on."""
    a = write_jsonl(tmp_path / "a.jsonl", standard_rows(4, "a"))
    e = write_jsonl(tmp_path / "e.jsonl", standard_rows(3, "e"))
    data = load_data(DataConfig(train=DataSource(a), eval=DataSource(e), eval_fraction=0.5), chat_tokenizer, seed=0, log=quiet)
    assert (len(data.train), len(data.eval), data.eval_held_out) == (4, 3, 0)


def test_the_log_says_how_the_format_was_chosen_and_a_single_sources_weight(tmp_path, chat_tokenizer, private_cache):
    """The counts line says "(data.format)" for a format given in the config, "(detected)" otherwise;
    a single source with a weight other than 1 gets a mix line, one of weight 1 none."""
    a = write_jsonl(tmp_path / "a.jsonl", standard_rows(4, "a"))
    lines: list[str] = []
    load_data(DataConfig(train=DataSource(a, weight=0.5), format="standard"), chat_tokenizer, seed=0, log=lines.append)
    assert lines[0].endswith("; format standard (data.format)")
    assert lines[-1] == "data: mix: train 4 x 0.5 -> 2; 2 train pairs"
    lines.clear()
    load_data(DataConfig(train=DataSource(a)), chat_tokenizer, seed=0, log=lines.append)
    assert lines[0].endswith("; format standard (detected)") and len(lines) == 1


def test_eval_list_of_sources(tmp_path, chat_tokenizer, private_cache):
    a = write_jsonl(tmp_path / "a.jsonl", standard_rows(4, "a"))
    e1 = write_jsonl(tmp_path / "e1.jsonl", standard_rows(3, "e"))
    e2 = write_jsonl(tmp_path / "e2.jsonl", chat_rows(2))
    data = load_data(DataConfig(train=DataSource(a), eval=[DataSource(e1), DataSource(e2)]), chat_tokenizer, seed=0, log=quiet)
    assert len(data.eval) == 5 and set(data.stats) == {"train", "eval[0]", "eval[1]"}


def test_eval_sources_are_weighted_like_train_sources(tmp_path, chat_tokenizer, private_cache):
    a = write_jsonl(tmp_path / "a.jsonl", standard_rows(4, "a"))
    e1 = write_jsonl(tmp_path / "e1.jsonl", standard_rows(10, "e"))
    e2 = write_jsonl(tmp_path / "e2.jsonl", chat_rows(2))
    one = load_data(DataConfig(train=DataSource(a), eval=DataSource(e1, weight=0.5)), chat_tokenizer, seed=3, log=quiet)
    alone_1 = load_data(DataConfig(train=DataSource(e1)), chat_tokenizer, seed=3, log=quiet).train
    alone_2 = load_data(DataConfig(train=DataSource(e2)), chat_tokenizer, seed=3, log=quiet).train
    assert len(one.eval) == 5 and one.eval == weighted(alone_1, 0.5, seed=3, index=0)
    config = DataConfig(train=DataSource(a), eval=[DataSource(e1, weight=0.5), DataSource(e2, weight=1.5)])
    two = load_data(config, chat_tokenizer, seed=3, log=quiet)
    assert len(two.eval) == 5 + 3
    assert two.eval == weighted(alone_1, 0.5, seed=3, index=0) + weighted(alone_2, 1.5, seed=3, index=1)


# ----------------------------------------------------------------------------- cache


def test_a_cache_that_cannot_be_written_is_said_not_fatal(tmp_path, chat_tokenizer, monkeypatch):
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv("DPOKIT_CACHE", str(tmp_path / "a-file" / "cache"))  # cannot be made
    path = write_jsonl(tmp_path / "t.jsonl", chat_rows(6))
    lines: list[str] = []
    data = load_data(DataConfig(train=DataSource(path), max_length=64), chat_tokenizer, seed=0, log=lines.append)
    assert len(data.train) == 6
    assert any(line.startswith("data: note: the tokenized pairs were not cached (") and "data.cache=false" in line for line in lines)


def test_second_load_comes_from_the_cache(tmp_path, chat_tokenizer, private_cache, monkeypatch):
    path = write_jsonl(tmp_path / "t.jsonl", chat_rows(6))
    config = DataConfig(train=DataSource(path), max_length=64)
    first_lines: list[str] = []
    first = load_data(config, chat_tokenizer, seed=0, log=first_lines.append)
    assert "from cache" not in first_lines[0]
    files = list(private_cache.iterdir())
    assert len(files) == 1 and files[0].suffix == ".npz"  # one file, no temporary left behind

    def boom(*args, **kwargs):
        raise AssertionError("tokenized again instead of reading the cache")

    monkeypatch.setattr(pipeline, "tokenize_pairs", boom)
    monkeypatch.setattr(pipeline, "normalize", boom)
    lines: list[str] = []
    second = load_data(config, chat_tokenizer, seed=0, log=lines.append)
    assert second.train == first.train
    assert lines[0] == first_lines[0] + ", from cache" and second.stats["train"].cached == str(files[0])
    assert second.stats["train"].tokenize == first.stats["train"].tokenize  # counts and lengths too
    # num_proc does not change the output, so it shares the entry
    assert load_data(DataConfig(train=DataSource(path), max_length=64, num_proc=2), chat_tokenizer, 0, quiet).train == first.train

    for changed in (
        DataConfig(train=DataSource(path), max_length=65),
        DataConfig(train=DataSource(path), max_length=64, truncation="drop"),
        DataConfig(train=DataSource(path), max_length=64, system_prompt="Be brief."),
        DataConfig(train=DataSource(path), max_length=64, chat_template_kwargs={"enable_thinking": False}),
    ):
        with pytest.raises(AssertionError, match="tokenized again"):
            load_data(changed, chat_tokenizer, seed=0, log=quiet)
    other_template = copy.deepcopy(chat_tokenizer)
    other_template.chat_template = chat_tokenizer.chat_template.replace("You are a helpful assistant.", "Hi.")
    with pytest.raises(AssertionError, match="tokenized again"):
        load_data(config, other_template, seed=0, log=quiet)
    write_jsonl(tmp_path / "t.jsonl", chat_rows(7))  # the data changed
    with pytest.raises(AssertionError, match="tokenized again"):
        load_data(config, chat_tokenizer, seed=0, log=quiet)
    monkeypatch.undo()
    monkeypatch.setenv("DPOKIT_CACHE", str(private_cache.parent))
    assert len(load_data(config, chat_tokenizer, seed=0, log=quiet).train) == 7



def test_reading_the_same_file_another_way_is_not_served_from_the_cache(tmp_path, chat_tokenizer, private_cache):
    """The format and the columns are part of the cache key: hh-rlhf transcripts read again with
    data.format=standard-implicit give plain-text pairs, and a source's own columns that swap which
    column is chosen give swapped pairs, not the entry the first reading cached."""
    from dpokit.config import Columns
    from dpokit.data.tokenize import TokenizedPair

    hh = write_jsonl(tmp_path / "hh.jsonl", [{"chosen": f"\n\nHuman: Hi {i}\n\nAssistant: Hello!",
                                              "rejected": f"\n\nHuman: Hi {i}\n\nAssistant: What?"} for i in range(3)])
    as_chat = load_data(DataConfig(train=DataSource(hh)), chat_tokenizer, 0, quiet)
    assert as_chat.stats["train"].format == "hh-rlhf"
    plain = DataConfig(train=DataSource(hh), format="standard-implicit")
    as_text = load_data(plain, chat_tokenizer, 0, quiet)
    assert as_text.stats["train"].cached is None and as_text.stats["train"].format == "standard-implicit"
    assert as_text.train != as_chat.train
    assert as_text.train == load_data(dataclasses.replace(plain, cache=False), chat_tokenizer, 0, quiet).train

    rows = [{"question": f"Why is the sky blue? ({i})", "good": " Because light scatters.", "bad": f" It is green {i}."} for i in range(3)]
    path = write_jsonl(tmp_path / "renamed.jsonl", rows)
    config = DataConfig(train=DataSource(path), columns=Columns(prompt="question", chosen="good", rejected="bad"))
    first = load_data(config, chat_tokenizer, 0, quiet)
    swapped = load_data(dataclasses.replace(config, train=DataSource(path, columns=Columns(prompt="question", chosen="bad", rejected="good"))),
                        chat_tokenizer, 0, quiet)
    assert swapped.stats["train"].cached is None
    assert swapped.train == [TokenizedPair(p.prompt_ids, p.rejected_ids, p.chosen_ids) for p in first.train]


def test_a_cache_hit_is_reported_under_the_name_the_data_is_given_now(tmp_path, chat_tokenizer, private_cache, monkeypatch):
    """The same file named another way (relative, then absolute path) is the same cache entry, and
    its counts are reported under the name the config gives now, not the one of the run that cached it."""
    monkeypatch.chdir(tmp_path)
    write_jsonl(tmp_path / "t.jsonl", standard_rows(3))
    load_data(DataConfig(train=DataSource("t.jsonl")), chat_tokenizer, 0, quiet)
    absolute = str(tmp_path / "t.jsonl")
    lines: list[str] = []
    again = load_data(DataConfig(train=DataSource(absolute)), chat_tokenizer, 0, lines.append)
    assert again.stats["train"].cached is not None and again.stats["train"].origin == absolute
    assert lines[0].startswith(f"data: train {absolute}: 3 rows -> 3 pairs") and lines[0].endswith(", from cache")


def test_a_same_size_edit_of_a_data_file_is_read_again_not_served_from_the_cache(tmp_path, chat_tokenizer, private_cache):
    """The file's modification time is part of the cache key: an edit in place that keeps its size
    (one character for another) gives the new pairs, not the cached ones."""
    path = tmp_path / "t.jsonl"
    write_jsonl(path, standard_rows(4, "a"))
    config = DataConfig(train=DataSource(str(path)), max_length=64)
    first = load_data(config, chat_tokenizer, seed=0, log=quiet)
    before = os.stat(path)
    write_jsonl(path, standard_rows(4, "b"))
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns + 1_000_000_000))
    assert os.stat(path).st_size == before.st_size and os.stat(path).st_ino == before.st_ino
    lines: list[str] = []
    second = load_data(config, chat_tokenizer, seed=0, log=lines.append)
    assert "from cache" not in lines[0]
    assert second.train != first.train
    assert second.train == load_data(DataConfig(train=DataSource(str(path)), max_length=64, cache=False), chat_tokenizer, 0, quiet).train


def test_cache_off_writes_nothing_and_errors_are_not_cached(tmp_path, chat_tokenizer, private_cache):
    path = write_jsonl(tmp_path / "t.jsonl", standard_rows(3))
    load_data(DataConfig(train=DataSource(path), cache=False), chat_tokenizer, seed=0, log=quiet)
    assert not private_cache.exists()
    bad = write_jsonl(tmp_path / "bad.jsonl", standard_rows(2), extra_lines=["{oops\n"])
    for _ in range(2):
        with pytest.raises(DataError, match="bad.jsonl, line 3: not valid JSON"):
            load_data(DataConfig(train=DataSource(bad)), chat_tokenizer, seed=0, log=quiet)


def test_a_damaged_cache_file_is_a_miss(tmp_path, chat_tokenizer, private_cache):
    path = write_jsonl(tmp_path / "t.jsonl", standard_rows(3))
    config = DataConfig(train=DataSource(path))
    first = load_data(config, chat_tokenizer, seed=0, log=quiet)
    (entry,) = private_cache.iterdir()
    entry.write_bytes(b"not a zip")
    assert load_data(config, chat_tokenizer, seed=0, log=quiet).train == first.train
    assert cache.load(entry.stem) is not None  # rewritten


def test_tokenizer_fingerprint_sees_vocab_template_and_specials(chat_tokenizer):
    base = cache.tokenizer_fingerprint(chat_tokenizer)
    assert cache.tokenizer_fingerprint(copy.deepcopy(chat_tokenizer)) == base
    other = copy.deepcopy(chat_tokenizer)
    other.add_tokens(["<new-token>"])
    assert cache.tokenizer_fingerprint(other) != base
    other = copy.deepcopy(chat_tokenizer)
    other.eos_token = "<|endoftext|>"
    assert cache.tokenizer_fingerprint(other) != base



def test_cache_files_round_trip_token_ids_of_any_size(private_cache):
    """Ids are stored as int32 when they fit and int64 otherwise: ids at and past 2**31, and
    negative ones, come back as they were, with the info and the untruncated lengths."""
    from dpokit.data.tokenize import TokenizedPair

    pairs = [TokenizedPair([1, 2], [3], [4, 5, 6]), TokenizedPair([2**31 - 1], [2**31, 7], [2**40])]
    assert cache.save("big", pairs, {"origin": "x"}, [(2, 1, 3), (9, 8, 7)]) == private_cache / "big.npz"
    assert cache.load("big") == (pairs, {"origin": "x"}, [(2, 1, 3), (9, 8, 7)])
    for name, pairs in (("negative", [TokenizedPair([-1, 0], [2**31 - 1], [5])]),
                        ("largest-int32", [TokenizedPair([0], [2**31 - 1], [5])]),
                        ("past-int32", [TokenizedPair([0], [2**31], [5])])):
        cache.save(name, pairs, {}, [(1, 1, 1)])
        assert cache.load(name)[0] == pairs, name
    assert cache.load("absent") is None


def test_the_cache_key_sees_a_change_in_any_file_of_the_data_code(tmp_path, monkeypatch):
    """An edit of the code that reads, normalizes, tokenizes or stores the data changes every cache
    key: an upgraded dpokit never serves pairs an older one made."""
    import shutil
    from pathlib import Path

    code = tmp_path / "data"
    shutil.copytree(Path(cache.__file__).parent, code)
    monkeypatch.setattr(cache, "__file__", str(code / "cache.py"))
    keys = {}
    try:
        for name in (None, "sources.py", "formats.py", "tokenize.py", "pipeline.py", "cache.py"):
            if name:
                with open(code / name, "a") as f:
                    f.write("\n# edited\n")
            cache._code_hash.cache_clear()
            keys[name] = cache.cache_key({"path": "t.jsonl"}, "tok", {"max_length": 64})
    finally:
        cache._code_hash.cache_clear()
    assert len(set(keys.values())) == 6, keys


@pytest.mark.parametrize("library", ["transformers", "tokenizers", "jinja2", "datasets", "pyarrow"])
def test_the_cache_key_sees_another_release_of_a_library_that_reads_renders_or_tokenizes(monkeypatch, library):
    """A chat template rendered by another jinja2 or transformers, text split by another tokenizers,
    or rows read by another datasets or pyarrow may give other ids: their releases are in the key."""
    import importlib.metadata

    key = cache.cache_key({"path": "t.jsonl"}, "tok", {"max_length": 64})
    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.0.1" if name == library else real(name))
    assert cache.cache_key({"path": "t.jsonl"}, "tok", {"max_length": 64}) != key


# ----------------------------------------------------------------------------- skip, drops, template


def test_tokenizer_fingerprint_of_a_tokenizer_without_a_fast_backend():
    """A "slow" tokenizer (no backend_tokenizer: its algorithm is its class's code) is fingerprinted
    by its vocabulary, its class and its add_bos_token / add_eos_token settings: a change of any of
    them changes the fingerprint."""

    class SlowTokenizer:
        chat_template = None
        special_tokens_map = {"eos_token": "</s>"}
        bos_token_id, eos_token_id, pad_token_id, unk_token_id = None, 2, None, None
        add_bos_token, add_eos_token = False, False

        def __init__(self, vocab):
            self.vocab = vocab

        def get_vocab(self):
            return dict(self.vocab)

    class OtherSlowTokenizer(SlowTokenizer):
        pass

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "sky": 3}
    base = cache.tokenizer_fingerprint(SlowTokenizer(vocab))
    assert cache.tokenizer_fingerprint(SlowTokenizer(dict(vocab))) == base
    assert cache.tokenizer_fingerprint(SlowTokenizer({**vocab, "sea": 4})) != base
    assert cache.tokenizer_fingerprint(OtherSlowTokenizer(vocab)) != base
    for setting in ("add_bos_token", "add_eos_token"):
        other = SlowTokenizer(vocab)
        setattr(other, setting, True)
        assert cache.tokenizer_fingerprint(other) != base, setting



def test_on_error_skip_counts_and_shows_bad_rows(tmp_path, chat_tokenizer, private_cache):
    rows = standard_rows(6)
    rows[1]["chosen"] = 4
    rows[2]["rejected"] = rows[2]["chosen"]
    rows[4].pop("prompt")
    path = write_jsonl(tmp_path / "t.jsonl", rows, extra_lines=["not json\n"])
    with pytest.raises(DataError, match=r"t.jsonl, line 7: not valid JSON.*set data.on_error=skip"):
        load_data(DataConfig(train=DataSource(path)), chat_tokenizer, seed=0, log=quiet)
    lines: list[str] = []
    data = load_data(DataConfig(train=DataSource(path), on_error="skip"), chat_tokenizer, seed=0, log=lines.append)
    stats = data.stats["train"]
    assert len(data.train) == 3 and stats.rows == 7
    assert stats.dropped == {"malformed_json": 1, "wrong_type": 1, "missing_field": 1, "chosen_equals_rejected": 1}
    assert lines[0] == (f"data: train {path}: 7 rows -> 3 pairs (dropped: 1 malformed_json, 1 wrong_type, 1 chosen_equals_rejected, "
                        "1 missing_field), 0 truncated; format standard (detected)")
    assert lines[1] == "data: train: skipped 3 bad rows (data.on_error=skip); the first 3:"
    assert lines[2].startswith(f"  {path}, line 7: not valid JSON")
    assert lines[3].startswith(f"  {path}, line 2: 'chosen' must be a string")
    assert lines[4].startswith(f"  {path}, line 5: 'prompt' is missing")


REWRITING_TEMPLATE = (  # renders a user turn differently once a reply follows it, if it says "rewrite"
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + "
    "(' (answered)' if m['role'] == 'user' and not loop.last and 'rewrite' in m['content'] else '') + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def test_template_that_does_not_put_the_reply_at_the_end(tmp_path, chat_tokenizer, private_cache):
    tok = copy.deepcopy(chat_tokenizer)
    tok.chat_template = REWRITING_TEMPLATE
    rows = chat_rows(3)
    rows[1]["prompt"][0]["content"] = "Please rewrite this."
    path = write_jsonl(tmp_path / "t.jsonl", rows)
    with pytest.raises(DataError) as e:
        load_data(DataConfig(train=DataSource(path)), tok, seed=0, log=quiet)
    msg = str(e.value)
    assert msg.startswith(f"{path}, line 2: 'chosen': the chat template does not put the reply at the end")
    assert "Use a tokenizer whose template renders earlier turns the same" in msg and "on_error=skip" in msg
    lines: list[str] = []
    data = load_data(DataConfig(train=DataSource(path), on_error="skip"), tok, seed=0, log=lines.append)
    assert len(data.train) == 2 and data.stats["train"].dropped == {"reply_not_at_end": 1}
    assert lines[2].startswith(f"  {path}, line 2: 'chosen': the chat template does not put the reply at the end")


def test_system_prompt_on_plain_text_is_reported_not_silently_ignored(tmp_path, chat_tokenizer, private_cache):
    path = write_jsonl(tmp_path / "t.jsonl", standard_rows(2))
    lines: list[str] = []
    load_data(DataConfig(train=DataSource(path), system_prompt="Be brief."), chat_tokenizer, seed=0, log=lines.append)
    assert lines[1] == f"data: note: data.system_prompt is not used for {path}: its pairs are plain text (standard), which has no roles"


def test_a_system_column_that_is_not_used_is_reported(tmp_path, chat_tokenizer, private_cache):
    plain = [dict(row, system="Be kind.") for row in standard_rows(3)]
    plain[0]["system"] = " "  # blank: nothing to miss
    own = chat_rows(3)
    for row in own[:2]:
        row["prompt"] = [{"role": "system", "content": "Answer in French."}] + row["prompt"]
        row["system"] = "Be kind."
    own[2]["system"] = "Be kind."  # no system message of its own: the column becomes it
    for rows, note in (
        (plain, "the 'system' column of 2 row(s) of {} is not used: its pairs are plain text (standard), which has no "
                "roles; give the prompt as messages to train with a system message"),
        (own, "the 'system' column of 2 row(s) of {} is not used: their prompt starts with a system message of its own, "
              "which is kept"),
    ):
        path = write_jsonl(tmp_path / f"{len(rows[0]['prompt'])}.jsonl", rows)
        for _ in ("read", "cached"):
            lines: list[str] = []
            load_data(DataConfig(train=DataSource(path)), chat_tokenizer, seed=0, log=lines.append)
            assert f"data: note: {note.format(path)}" in lines
    result = normalize(own, "own.jsonl")
    assert [p.prompt[0]["content"] for p in result.pairs] == ["Answer in French.", "Answer in French.", "Be kind."]
    assert result.unused_system == {"own_system_message": 2}


# ----------------------------------------------------------------------------- truncation policies


def _turns(n_old: int) -> list[dict]:
    """System + ``n_old`` long old turns + a short last question."""
    messages = [{"role": "system", "content": "You are a helpful assistant who says short things."}]
    for i in range(n_old):
        messages += [{"role": "user", "content": f"Old question {i}: " + "why is the sky blue " * 6},
                     {"role": "assistant", "content": "Because light from the sun scatters. " * 3}]
    return messages + [{"role": "user", "content": "And the sea?"}]


def _lengths(pair, tok):
    (tp,), _ = tokenize_pairs([pair], tok, 100_000, "drop")
    return tp


def test_truncate_drops_whole_old_turns_before_cutting_tokens(chat_tokenizer):
    tok = chat_tokenizer
    reply_c, reply_r = [{"role": "assistant", "content": "Also blue."}], [{"role": "assistant", "content": "Green."}]
    full = Pair(_turns(2), reply_c, reply_r)
    last_only = Pair(_turns(0), reply_c, reply_r)
    one_dropped = Pair(_turns(0)[:1] + _turns(2)[3:], reply_c, reply_r)
    tf, tl, t1 = _lengths(full, tok), _lengths(last_only, tok), _lengths(one_dropped, tok)
    longest = len(tf.chosen_ids)

    # room for the system + the newest old turn + the question: only the oldest turn goes
    (cut,), stats = tokenize_pairs([full], tok, len(t1.prompt_ids) + longest, "truncate")
    assert cut == t1 and (stats.truncated, stats.turns_dropped, stats.prompt_cut, stats.replies_cut) == (1, 1, 0, 0)
    # room for the system + the question only: both old turns go, the system message stays
    (cut,), stats = tokenize_pairs([full], tok, len(tl.prompt_ids) + longest + 1, "truncate")
    assert cut == tl and (stats.turns_dropped, stats.prompt_cut) == (1, 0)
    text = tok.decode(cut.prompt_ids)
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant who says short things.") and "Old question" not in text
    # not even the last turn fits: old turns go, then prompt tokens from the left, then reply tokens
    (cut,), stats = tokenize_pairs([full], tok, 12, "truncate")
    assert (stats.turns_dropped, stats.prompt_cut, stats.replies_cut) == (1, 1, 1)
    assert cut.prompt_ids == tl.prompt_ids[-6:] and cut.chosen_ids[-1] == tok.convert_tokens_to_ids("<|im_end|>")
    assert len(cut.prompt_ids) + len(cut.chosen_ids) <= 12
    assert stats.truncation_summary() == "1 truncated (1 dropped old turns, 1 cut the prompt, 1 cut replies)"
    assert stats.lengths == [(len(tf.prompt_ids), len(tf.chosen_ids), len(tf.rejected_ids))]  # before truncation
    # drop: the pair goes, counted
    kept, stats = tokenize_pairs([full, last_only], tok, len(tl.prompt_ids) + longest, "drop")
    assert kept == [tl] and stats.dropped_too_long == 1 and stats.truncated == 0



def test_a_too_long_prompt_of_one_turn_is_cut_not_counted_as_dropping_turns(chat_tokenizer):
    """A prompt of a system message and one question has no old turn to drop: it is cut from the
    left, and the counts say so (prompt_cut, not turns_dropped)."""
    tok = chat_tokenizer
    prompt = _turns(0)[:1] + [{"role": "user", "content": "Why is the sky blue? " * 12}]
    pair = Pair(prompt, [{"role": "assistant", "content": "Also blue."}], [{"role": "assistant", "content": "Green."}])
    full = _lengths(pair, tok)
    (cut,), stats = tokenize_pairs([pair], tok, len(full.prompt_ids) + len(full.chosen_ids) - 5, "truncate")
    assert (stats.truncated, stats.turns_dropped, stats.prompt_cut, stats.replies_cut) == (1, 0, 1, 0)
    assert cut.prompt_ids == full.prompt_ids[5:] and cut.chosen_ids == full.chosen_ids
    assert stats.truncation_summary() == "1 truncated (1 cut the prompt)"


def test_dropping_old_turns_renders_a_long_conversation_a_few_times(chat_tokenizer, monkeypatch):
    """The kept turns are found by binary search: a 256-turn prompt is rendered ~10 times, not once
    per dropped turn (a 1000-turn prompt took minutes), with the same result as one turn at a time."""
    from dpokit.data import tokenize

    reply_c, reply_r = [{"role": "assistant", "content": "Also blue."}], [{"role": "assistant", "content": "Green."}]
    full = Pair(_turns(256), reply_c, reply_r)
    budget_turns = 5  # room for the system, the newest 5 old turns and the question
    kept = Pair(_turns(0)[:1] + _turns(256)[-(2 * budget_turns + 1):], reply_c, reply_r)
    fits = _lengths(kept, chat_tokenizer)
    calls = []
    encode = tokenize._encode_pairs
    monkeypatch.setattr(tokenize, "_encode_pairs", lambda pairs, *a, **k: calls.append(len(pairs)) or encode(pairs, *a, **k))
    (cut,), stats = tokenize_pairs([full], chat_tokenizer, len(fits.prompt_ids) + len(fits.chosen_ids), "truncate")
    assert cut == fits and (stats.turns_dropped, stats.prompt_cut) == (1, 0)
    assert len(calls) <= 1 + 10


def test_truncation_counts_per_policy_in_the_log(tmp_path, chat_tokenizer, private_cache):
    long_rows = [{"prompt": _turns(2), "chosen": [{"role": "assistant", "content": "Also blue."}],
                  "rejected": [{"role": "assistant", "content": "Green."}]}] * 2
    path = write_jsonl(tmp_path / "t.jsonl", long_rows + chat_rows(2))
    lines: list[str] = []
    load_data(DataConfig(train=DataSource(path), max_length=60), chat_tokenizer, seed=0, log=lines.append)
    assert "4 rows -> 4 pairs (dropped: none), 2 truncated (2 dropped old turns)" in lines[0]
    load_data(DataConfig(train=DataSource(path), max_length=60, truncation="drop"), chat_tokenizer, seed=0, log=lines.append)
    assert "4 rows -> 2 pairs (dropped: 2 too_long), 0 truncated" in lines[1]


def test_replies_the_same_once_cut_are_dropped_not_trained(tmp_path, chat_tokenizer, private_cache):
    """Replies that differ only past max_length are the same tokens once cut: nothing to prefer (a
    trained pair gave loss log 2 and margin 0); dropped and counted (equal_tokens), in the log and
    in inspect's report."""
    shared = "Here is a detailed explanation of the topic. " * 20
    rows = [{"prompt": [{"role": "user", "content": f"Explain topic {i}."}],
             "chosen": [{"role": "assistant", "content": shared + "In short: yes."}],
             "rejected": [{"role": "assistant", "content": shared + "In short: no, never."}]} for i in range(3)]
    path = write_jsonl(tmp_path / "same.jsonl", rows + chat_rows(2))
    lines: list[str] = []
    data = load_data(DataConfig(train=DataSource(path), max_length=128), chat_tokenizer, seed=0, log=lines.append)
    assert "5 rows -> 2 pairs (dropped: 3 equal_tokens), 0 truncated" in lines[0]
    assert all(pair.chosen_ids != pair.rejected_ids for pair in data.train)
    _, stats = tokenize_pairs(normalize(rows, "same.jsonl").pairs, chat_tokenizer, 100_000, "truncate")
    assert stats.kept == 3 and stats.dropped_equal_tokens == 0  # whole, they differ


def test_without_a_chat_template_the_error_names_the_data_and_its_fix(tmp_path, chat_tokenizer, private_cache):
    """Chat-shaped data and a tokenizer without a template: the error names the file and format,
    and for hh-rlhf transcripts (strings in the file) the plain-text format that reads them."""
    import copy as copy_

    tok = copy_.deepcopy(chat_tokenizer)
    tok.chat_template = None
    hh = write_jsonl(tmp_path / "hh.jsonl", [{"chosen": "\n\nHuman: Hi\n\nAssistant: Hello!",
                                              "rejected": "\n\nHuman: Hi\n\nAssistant: What?"}])
    with pytest.raises(DataError, match=rf"{hh} \(format hh-rlhf\): the pairs are chat messages .* no chat template.*"
                                        r"data.format=standard-implicit trains on them as plain text"):
        load_data(DataConfig(train=DataSource(hh)), tok, seed=0, log=quiet)
    chat = write_jsonl(tmp_path / "chat.jsonl", chat_rows(2))
    with pytest.raises(DataError, match=rf"{chat} \(format conversational\): .*format standard\)$"):
        load_data(DataConfig(train=DataSource(chat)), tok, seed=0, log=quiet)


def test_a_system_prompt_that_prompts_own_system_messages_keep_out_is_said(tmp_path, chat_tokenizer, private_cache):
    rows = chat_rows(3)
    for row in rows[:2]:
        row["prompt"].insert(0, {"role": "system", "content": "You are terse."})
    path = write_jsonl(tmp_path / "own.jsonl", rows)
    lines: list[str] = []
    load_data(DataConfig(train=DataSource(path), system_prompt="You are a pirate."), chat_tokenizer, seed=0, log=lines.append)
    assert any("data.system_prompt is not used for 2 pair(s)" in line and "system message of its own" in line for line in lines)


# ----------------------------------------------------------------------------- hub


def test_hub_subset_split_and_revision_reach_load_dataset(monkeypatch, chat_tokenizer, private_cache):
    import datasets

    calls = []

    def fake_load_dataset(path, name=None, split=None, revision=None, **kwargs):
        calls.append((path, name, split, revision))
        return datasets.Dataset.from_list([{"question": "Hi", "response_1": "Hello!", "response_2": "What?",
                                            "overall_response": 1, "safety_rate_1": 3}] * 2)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    monkeypatch.setattr(dpokit.hub, "unreachable", lambda repo_id, kind: None)  # the hub "answers"
    source = DataSource("PKU-Alignment/Align-Anything", name="text-to-text", split="val", revision="abc123")
    lines: list[str] = []
    data = load_data(DataConfig(train=source), chat_tokenizer, seed=0, log=lines.append)
    assert calls == [("PKU-Alignment/Align-Anything", "text-to-text", "val", "abc123")]
    assert len(data.train) == 2
    assert lines[0].startswith("data: train PKU-Alignment/Align-Anything (hub dataset, name=text-to-text, split=val, revision=abc123): 2 rows")
    assert "format align-anything (detected)" in lines[0]
    config = load_config(None, ["data.train={path: org/ds, name: sub, split: test, revision: v1}"])
    assert config.data.train == DataSource("org/ds", name="sub", split="test", revision="v1")


def test_cache_files_are_written_atomically(tmp_path, chat_tokenizer, private_cache, monkeypatch):
    path = write_jsonl(tmp_path / "t.jsonl", standard_rows(3))

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    lines: list[str] = []
    assert len(load_data(DataConfig(train=DataSource(path)), chat_tokenizer, seed=0, log=lines.append).train) == 3
    assert any("not cached (disk full)" in line for line in lines)  # said; the run goes on
    assert list(private_cache.iterdir()) == []  # no half-written file, no temporary


def test_an_entry_written_under_skip_serves_raise_only_without_bad_rows(tmp_path, chat_tokenizer, private_cache, monkeypatch):
    clean = write_jsonl(tmp_path / "clean.jsonl", standard_rows(3))
    dirty = write_jsonl(tmp_path / "dirty.jsonl", standard_rows(3), extra_lines=["{oops\n"])
    for path in (clean, dirty):
        load_data(DataConfig(train=DataSource(path), on_error="skip"), chat_tokenizer, seed=0, log=quiet)  # as inspect does
    lines: list[str] = []
    load_data(DataConfig(train=DataSource(clean)), chat_tokenizer, seed=0, log=lines.append)
    assert lines[0].endswith("from cache")
    with pytest.raises(DataError, match="dirty.jsonl, line 4: not valid JSON"):  # read again, stops at the bad row
        load_data(DataConfig(train=DataSource(dirty)), chat_tokenizer, seed=0, log=quiet)
    lines = []
    load_data(DataConfig(train=DataSource(dirty), on_error="skip"), chat_tokenizer, seed=0, log=lines.append)
    assert "from cache" in lines[0] and lines[1].startswith("data: train: skipped 1 bad rows")
