"""The data path around the formats: mixing by weight, eval split, cache, truncation policies,
``on_error: skip``, hub subsets/splits/revisions."""

from __future__ import annotations

import copy
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


# ----------------------------------------------------------------------------- skip, drops, template


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
