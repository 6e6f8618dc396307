"""The data path: files -> rows -> pairs -> token ids -> train/eval, and its error messages."""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import subprocess
import sys
import textwrap

import pytest

from dpokit.config import DataConfig, DataSource
from dpokit.data.formats import Pair, normalize, to_pairs
from dpokit.data.pipeline import load_data, split_eval
from dpokit.data.sources import DataError, load_rows, open_source
from dpokit.data.tokenize import (
    TokenizedPair,
    end_of_turn_marker,
    fit_length,
    render_chat,
    tokenize_pairs,
)

# ----------------------------------------------------------------------------- rows


def standard_rows(n: int = 3) -> list[dict]:
    return [
        {
            "prompt": f"Why is the sky blue? ({i})",
            "chosen": " Because the sun light is small and blue light is better.",
            "rejected": f" The sky is green {i}.",
        }
        for i in range(n)
    ]


def explicit_rows(n: int = 3) -> list[dict]:
    return [
        {
            "prompt": [{"role": "user", "content": f"Tell me a short story about a cat ({i})."}],
            "chosen": [{"role": "assistant", "content": "A small cat said hello to the moon."}],
            "rejected": [{"role": "assistant", "content": f"No {i}."}],
        }
        for i in range(n)
    ]


def implicit_rows(n: int = 3) -> list[dict]:
    rows = []
    for i in range(n):
        shared = [
            {"role": "system", "content": "You are a helpful assistant who says short things."},
            {"role": "user", "content": "Hi!"},
            {"role": "assistant", "content": "Hello, how can I help?"},
            {"role": "user", "content": f"Explain why the sea is blue ({i})."},
        ]
        rows.append(
            {
                "chosen": shared + [{"role": "assistant", "content": "Water takes red light, so blue is what you see."}],
                "rejected": copy.deepcopy(shared) + [{"role": "assistant", "content": "Because the sea is big."}],
                "score_chosen": 8.0,
            }
        )
    return rows


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


# ----------------------------------------------------------------------------- sources


def test_jsonl_json_parquet_csv_round_trip(tmp_path):
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = implicit_rows(4)
    jsonl = write_jsonl(tmp_path / "d.jsonl", rows)
    (tmp_path / "list.json").write_text(json.dumps(rows))
    (tmp_path / "split.json").write_text(json.dumps({"train": rows, "test": rows[:1]}))
    (tmp_path / "lines.json").write_text("\n".join(json.dumps(r) for r in rows))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    pd.DataFrame(standard_rows(4)).to_csv(tmp_path / "d.csv", index=False)

    assert load_rows(DataSource(jsonl)) == rows
    assert load_rows(DataSource(str(tmp_path / "list.json"))) == rows
    assert load_rows(DataSource(str(tmp_path / "split.json"))) == rows
    assert load_rows(DataSource(str(tmp_path / "split.json"), split="test")) == rows[:1]
    assert load_rows(DataSource(str(tmp_path / "lines.json"))) == rows
    assert load_rows(DataSource(str(tmp_path / "d.parquet"))) == rows
    assert load_rows(DataSource(str(tmp_path / "d.csv"))) == standard_rows(4)
    # message lists written out by pandas' to_csv (Python reprs) or as JSON text: refused, not trained as text
    pd.DataFrame(rows).to_csv(tmp_path / "messages.csv", index=False)
    with pytest.raises(DataError, match=r"messages.csv, row 1: column 'chosen' holds a list of messages written out as "
                                        r"text .*save this data as .jsonl or .parquet"):
        load_rows(DataSource(str(tmp_path / "messages.csv")))
    pd.DataFrame([{k: json.dumps(v) for k, v in row.items()} for row in rows]).to_csv(tmp_path / "json.csv", index=False)
    with pytest.raises(DataError, match="json.csv, row 1: column 'chosen' holds a list of messages"):
        load_rows(DataSource(str(tmp_path / "json.csv")))
    # Every file type gives the same pairs.
    pairs = to_pairs(load_rows(DataSource(str(tmp_path / "d.parquet"))), "d.parquet")[0]
    assert pairs == to_pairs(rows, "x")[0]
    csv_pairs = to_pairs(load_rows(DataSource(str(tmp_path / "d.csv"))), "d.csv")[0]
    assert csv_pairs == to_pairs(standard_rows(4), "x")[0]


def test_line_separators_in_strings_bom_gzip_ndjson_and_one_row_json(tmp_path):
    """Files as real tools write them: JSON Lines splits at "\\n" only (U+2028, U+2029 and U+0085
    stay inside strings, as json.dumps(ensure_ascii=False) writes them raw), a byte-order mark is
    dropped, .gz text files are read through gzip, .ndjson is JSON Lines, and a one-row JSON Lines
    file saved as .json (datasets' to_json) is that row."""
    import gzip

    import datasets

    rows = standard_rows(3)
    rows[0]["chosen"] = " Hello\u2028friend,\u2029new\x85line."
    lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    (tmp_path / "raw.jsonl").write_text(lines, encoding="utf-8")
    (tmp_path / "bom.jsonl").write_text("\ufeff" + lines, encoding="utf-8")
    (tmp_path / "bom.json").write_text("\ufeff" + json.dumps(rows), encoding="utf-8")
    (tmp_path / "d.ndjson").write_text(lines, encoding="utf-8")
    with gzip.open(tmp_path / "d.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write(lines)
    with gzip.open(tmp_path / "d.json.gz", "wt", encoding="utf-8") as f:
        f.write(json.dumps({"train": rows}))
    with gzip.open(tmp_path / "d.csv.gz", "wt", encoding="utf-8", newline="") as f:
        f.write("prompt,chosen,rejected\r\n" + "".join(f'"{r["prompt"]}","{r["chosen"]}","{r["rejected"]}"\r\n' for r in rows[1:]))
    for name in ("raw.jsonl", "bom.jsonl", "bom.json", "d.ndjson", "d.jsonl.gz", "d.json.gz"):
        assert load_rows(DataSource(str(tmp_path / name))) == rows, name
    assert load_rows(DataSource(str(tmp_path / "d.csv.gz"))) == rows[1:]
    datasets.Dataset.from_list(rows[:1]).to_json(str(tmp_path / "one.json"))
    assert load_rows(DataSource(str(tmp_path / "one.json"))) == rows[:1]
    (tmp_path / "one-line.json").write_text(json.dumps(rows[0]))
    assert load_rows(DataSource(str(tmp_path / "one-line.json"))) == rows[:1]
    # an existing file of another type is named as such, not looked up on the hub
    (tmp_path / "pairs.txt").write_text(lines)
    with pytest.raises(DataError, match=r"pairs.txt is a file dpokit cannot read: data files are .jsonl, .ndjson"):
        load_rows(DataSource(str(tmp_path / "pairs.txt")))
    (tmp_path / "broken.jsonl.gz").write_bytes(b"not gzip")
    with pytest.raises(DataError, match="broken.jsonl.gz: could not read it"):
        load_rows(DataSource(str(tmp_path / "broken.jsonl.gz")))


def test_gz_is_looked_through_only_for_text_files(tmp_path):
    """A ``.gz`` ending is read through gzip for the text types alone (in any case): a .tar.gz
    archive (even of a .jsonl), a gzipped .parquet or a bare .gz is not a data file, and is named as
    such (not read as the type inside it, nor looked up on the hub)."""
    import gzip
    import io
    import tarfile

    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = standard_rows(2)
    lines = "".join(json.dumps(r) + "\n" for r in rows).encode()
    with gzip.open(tmp_path / "UPPER.JSONL.GZ", "wb") as f:
        f.write(lines)
    assert load_rows(DataSource(str(tmp_path / "UPPER.JSONL.GZ"))) == rows
    with tarfile.open(tmp_path / "train.tar.gz", "w:gz") as tar:
        member = tarfile.TarInfo("train.jsonl")
        member.size = len(lines)
        tar.addfile(member, io.BytesIO(lines))
    parquet = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), parquet)
    (tmp_path / "train.parquet.gz").write_bytes(gzip.compress(parquet.getvalue()))
    (tmp_path / "train.gz").write_bytes(gzip.compress(lines))
    for name in ("train.tar.gz", "train.parquet.gz", "train.gz"):
        with pytest.raises(DataError, match=rf"{name} is a file dpokit cannot read: data files are .jsonl, .*\.jsonl\.gz"):
            load_rows(DataSource(str(tmp_path / name)))


def test_saved_to_disk_folder(tmp_path):
    import datasets

    datasets.Dataset.from_list(standard_rows(3)).save_to_disk(str(tmp_path / "ds"))
    datasets.DatasetDict({"test": datasets.Dataset.from_list(standard_rows(2))}).save_to_disk(str(tmp_path / "dd"))
    assert load_rows(DataSource(str(tmp_path / "ds"))) == standard_rows(3)
    assert load_rows(DataSource(str(tmp_path / "dd"), split="test")) == standard_rows(2)
    with pytest.raises(DataError, match="splits \\['test'\\], not 'train'"):
        load_rows(DataSource(str(tmp_path / "dd")))
    (tmp_path / "plain").mkdir()
    with pytest.raises(DataError, match="not a dataset saved with datasets' save_to_disk"):
        load_rows(DataSource(str(tmp_path / "plain")))


def test_malformed_jsonl_names_file_and_line(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps(standard_rows(1)[0]) + "\n\n" + '{"prompt": "x", "chosen": \n')
    with pytest.raises(DataError) as e:
        load_rows(DataSource(str(path)))
    msg = str(e.value)
    assert str(path) in msg and "line 3" in msg and "not valid JSON" in msg and "fix or remove" in msg

    path.write_text('["a list", "not an object"]\n')
    with pytest.raises(DataError, match="line 1: expected a JSON object"):
        load_rows(DataSource(str(path)))



def test_json_rows_that_are_not_objects_and_broken_json_lines_can_be_skipped(tmp_path):
    """A .json list's non-object rows are reported by row number, or skipped (counted) under skip,
    as in .jsonl; JSON Lines saved as .json whose first line is broken are read as JSON Lines (the
    whole file failed as "not valid JSON", and skip could not help)."""
    good = standard_rows(2)
    array = tmp_path / "rows.json"
    array.write_text(json.dumps([good[0], "oops", None, good[1]]))
    with pytest.raises(DataError, match="rows.json, row 2: expected an object"):
        to_pairs(load_rows(DataSource(str(array))), str(array))
    result = normalize(load_rows(DataSource(str(array))), str(array), on_error="skip")
    assert len(result.pairs) == 2 and result.dropped == {"not_an_object": 2}
    lines = tmp_path / "lines.json"
    lines.write_text('{"prompt": "x", "chosen": \n' + "".join(json.dumps(r) + "\n" for r in good))
    with pytest.raises(DataError, match="lines.json, line 1: not valid JSON"):
        load_rows(DataSource(str(lines)))
    assert open_source(DataSource(str(lines))).read(on_error="skip").rows == good


def test_missing_empty_and_bad_files(tmp_path):
    missing = str(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match=f"data file {missing} does not exist"):
        load_rows(DataSource(missing))
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match="empty.jsonl has no rows"):
        load_rows(DataSource(str(tmp_path / "empty.jsonl")))
    (tmp_path / "obj.json").write_text(json.dumps({"data": standard_rows(1)}))
    with pytest.raises(DataError, match="under the split name 'train'"):
        load_rows(DataSource(str(tmp_path / "obj.json")))
    (tmp_path / "bad.json").write_text("[{")
    with pytest.raises(DataError, match="bad.json: not valid JSON"):
        load_rows(DataSource(str(tmp_path / "bad.json")))
    (tmp_path / "bad.parquet").write_text("not parquet")
    with pytest.raises(DataError, match="could not read it as Parquet"):
        load_rows(DataSource(str(tmp_path / "bad.parquet")))
    (tmp_path / "header.csv").write_text("prompt,chosen,rejected\n")
    with pytest.raises(DataError, match="has no rows"):
        load_rows(DataSource(str(tmp_path / "header.csv")))


@pytest.mark.parametrize("bad_row", [2, 150])
def test_a_csv_row_with_more_cells_than_the_header_names_file_and_row(tmp_path, bad_row):
    """A row with a cell past the header's columns (an unquoted comma) is a DataError naming the
    row and the fix, wherever it is: among the first 100 rows (which the message-list check reads;
    the extra cells are a list there) and past them."""
    rows = [f"Why is the sky blue? ({i}),Because.,No." for i in range(1, 201)]
    rows[bad_row - 1] = "Why is the sky blue?,Because light scatters, mostly.,No."
    path = tmp_path / "pairs.csv"
    path.write_text("prompt,chosen,rejected\n" + "\n".join(rows) + "\n")
    with pytest.raises(DataError) as e:
        load_rows(DataSource(str(path)))
    assert str(e.value) == (f"{path}, row {bad_row}: has more cells than the header (4 cells, 3 columns: prompt, chosen, "
                            'rejected); quote every cell that holds a comma ("like, this"), or name every column in the header line')


def test_hub_failure_is_a_clear_error(tmp_path):
    code = textwrap.dedent(
        """
        from dpokit.config import DataSource
        from dpokit.data.sources import DataError, load_rows
        try:
            load_rows(DataSource("no-such-org/no-such-dataset"))
        except DataError as e:
            print("DataError:", e)
        """
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert "DataError: could not load 'no-such-org/no-such-dataset' from the Hugging Face Hub" in out.stdout, out.stderr
    assert "No local file or folder" in out.stdout


# ----------------------------------------------------------------------------- formats


def test_standard_shape():
    pairs, dropped = to_pairs(standard_rows(3), "s.jsonl")
    assert dropped == {}
    assert pairs[1] == Pair("Why is the sky blue? (1)", " Because the sun light is small and blue light is better.", " The sky is green 1.")
    assert not pairs[0].is_chat


def test_conversational_explicit_shape():
    pairs, _ = to_pairs(explicit_rows(2), "c.jsonl")
    assert pairs[0].is_chat
    assert pairs[0].prompt == [{"role": "user", "content": "Tell me a short story about a cat (0)."}]
    assert pairs[0].chosen == [{"role": "assistant", "content": "A small cat said hello to the moon."}]
    # ultrafeedback_binarized style: string prompt, replies repeating the prompt turn.
    row = {
        "prompt": "Write a poem.",
        "chosen": [{"role": "user", "content": "Write a poem."}, {"role": "assistant", "content": "Blue sea."}],
        "rejected": [{"role": "user", "content": "Write a poem."}, {"role": "assistant", "content": "No."}],
        "messages": [],
    }
    (pair,), _ = to_pairs([row], "uf")
    assert pair == Pair([{"role": "user", "content": "Write a poem."}], [{"role": "assistant", "content": "Blue sea."}], [{"role": "assistant", "content": "No."}])


def test_conversational_implicit_shape_multi_turn_with_system():
    pairs, dropped = to_pairs(implicit_rows(2), "i.jsonl")
    assert dropped == {}
    p = pairs[1]
    assert [m["role"] for m in p.prompt] == ["system", "user", "assistant", "user"]
    assert p.prompt[-1]["content"] == "Explain why the sea is blue (1)."
    assert p.chosen == [{"role": "assistant", "content": "Water takes red light, so blue is what you see."}]
    assert p.rejected == [{"role": "assistant", "content": "Because the sea is big."}]


def test_identical_replies_are_dropped_and_counted():
    std = standard_rows(3)
    std[1]["rejected"] = std[1]["chosen"]
    pairs, dropped = to_pairs(std, "s")
    assert len(pairs) == 2 and dropped == {"chosen_equals_rejected": 1}
    imp = implicit_rows(3)
    imp[0]["rejected"] = imp[0]["chosen"]
    imp[2]["rejected"] = imp[2]["chosen"]
    pairs, dropped = to_pairs(imp, "i")
    assert len(pairs) == 1 and dropped == {"chosen_equals_rejected": 2}


def _error(rows, origin="data/train.jsonl") -> str:
    with pytest.raises(DataError) as e:
        to_pairs(rows, origin)
    return str(e.value)


@pytest.mark.parametrize(
    "make_rows, row, field, edit, expected",
    [
        (standard_rows, 17, "chosen", lambda r: r.pop("chosen"), "'chosen' is missing (each row needs prompt, chosen and rejected"),
        (standard_rows, 5, "rejected", lambda r: r.update(rejected=None), "'rejected' is null"),
        (standard_rows, 3, "prompt", lambda r: r.update(prompt=["x"]), "'prompt' must be a string (the dataset's format is standard: strings)"),
        (standard_rows, 2, "chosen", lambda r: r.update(chosen="  "), "'chosen' is empty"),
        (standard_rows, 1, "prompt", lambda r: r.pop("prompt"), "'prompt' is missing (each row needs prompt, chosen and rejected"),
        (explicit_rows, 9, "chosen", lambda r: r["chosen"][0].update(content=[{"type": "text"}]), "'chosen' message 1: 'content' must be a string, got list"),
        (explicit_rows, 4, "rejected", lambda r: r.update(rejected="text"), "'rejected' must be a list of {\"role\", \"content\"} messages"),
        (explicit_rows, 6, "chosen", lambda r: r.update(chosen=[]), "'chosen' has no reply messages"),
        (explicit_rows, 7, "rejected", lambda r: r["rejected"][0].update(content=""), "'rejected' reply is empty"),
        (explicit_rows, 8, "chosen", lambda r: r["chosen"][0].update(role="user"), "'chosen' reply must start with an assistant message"),
        (explicit_rows, 2, "prompt", lambda r: r["prompt"][0].pop("role"), "'prompt' message 1: 'role' must be a string, got nothing"),
        (implicit_rows, 11, "chosen", lambda r: r["chosen"][0].update(content="Different."), "'chosen' and 'rejected' share no leading messages"),
        (implicit_rows, 12, "rejected", lambda r: r.update(rejected=r["rejected"][:-1]), "'rejected' has nothing after the 4 prompt message(s)"),
        (implicit_rows, 13, "chosen", lambda r: r.update(chosen="text"), "'chosen' must be a list of"),
    ],
)
def test_row_errors_name_file_row_and_field(make_rows, row, field, edit, expected):
    rows = make_rows(20)
    edit(rows[row - 1])
    msg = _error(rows)
    assert msg.startswith(f"data/train.jsonl, row {row}: '{field}'"), msg
    assert expected in msg, msg


def test_rows_that_would_be_read_wrongly_are_errors():
    """A lone surrogate (half an emoji, which JSON carries) is not text a tokenizer can read; a prompt
    in a later row of a dataset whose first row has none would be ignored; conversations that differ
    at an earlier assistant turn have no shared prompt (the reply would train on user turns)."""
    rows = standard_rows(3)
    rows[1]["chosen"] = "Sure \ud83d"
    msg = _error(rows)
    assert msg.startswith("data/train.jsonl, row 2: 'chosen' is not valid Unicode text: it holds a lone surrogate "
                          "('\\ud83d' at character 6"), msg
    pairs, dropped = to_pairs(rows, "d", on_error="skip")
    assert len(pairs) == 2 and dropped == {"invalid_unicode": 1}
    chat = explicit_rows(2)
    chat[1]["prompt"][0]["content"] += "\udc00"
    assert _error(chat).startswith("data/train.jsonl, row 2: 'prompt' is not valid Unicode text")

    implicit = [{"prompt": None, "chosen": "Paris is the capital.", "rejected": "Paris is a city."},
                {"prompt": "Is the sky blue?", "chosen": "The answer is yes.", "rejected": "The answer is no."}]
    msg = _error(implicit)
    assert msg.startswith("data/train.jsonl, row 2: 'prompt' is set in this row, but the dataset's format is "
                          "standard-implicit, whose rows have none"), msg  # a tie: the first row's shape
    hh = [{"chosen": "\n\nHuman: Hi\n\nAssistant: Hello!", "rejected": "\n\nHuman: Hi\n\nAssistant: What?"}] * 2
    hh = [hh[0], {**hh[1], "prompt": "Hi"}]
    assert "row 2: 'prompt' is set in this row" in _error(hh) and "format is hh-rlhf" in _error(hh)

    def turn(role, content):
        return {"role": role, "content": content}

    differ_early = {"chosen": [turn("user", "Hi"), turn("assistant", "Hello there."), turn("user", "Tell me a joke"), turn("assistant", "Why...")],
                    "rejected": [turn("user", "Hi"), turn("assistant", "Go away."), turn("user", "Tell me a joke"), turn("assistant", "No.")]}
    msg = _error([differ_early])
    assert msg.startswith("data/train.jsonl, row 1: 'chosen' and 'rejected' differ at message 2, an assistant turn followed by "
                          "more turns ('chosen' message 3 is the user's)"), msg
    assert to_pairs([differ_early], "d", on_error="skip")[1] == {"leading_turns_differ": 1}
    # a reply of several messages without a user turn (a tool call, its result, the answer) stays a reply
    tools = [turn("user", "Weather?"), turn("assistant", "Calling the tool."), turn("tool", "Sunny"), turn("assistant", "Sunny.")]
    (pair,), _ = to_pairs([{"chosen": tools, "rejected": tools[:1] + [turn("assistant", "No idea.")]}], "t")
    assert [m["role"] for m in pair.chosen] == ["assistant", "tool", "assistant"]


def test_undetectable_first_row():
    msg = _error([{"question": "q", "answer": "a"}])
    assert msg.startswith("data/train.jsonl, row 1: 'chosen' is missing") and "this row has columns: answer, question" in msg
    msg = _error([{"prompt": "q", "chosen": 3, "rejected": 4}])
    assert "row 1: 'chosen' must be a string or a list" in msg


# ----------------------------------------------------------------------------- tokenize


def test_end_of_turn_marker_and_rendered_texts_chatml(chat_tokenizer):
    assert end_of_turn_marker(chat_tokenizer) == "<|im_end|>"
    (pair,), _ = to_pairs(explicit_rows(1), "c")
    prompt, chosen, rejected = render_chat(pair, chat_tokenizer, "<|im_end|>")
    assert prompt == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nTell me a short story about a cat (0).<|im_end|>\n<|im_start|>assistant\n"
    )
    assert chosen == "A small cat said hello to the moon.<|im_end|>" and rejected == "No 0.<|im_end|>"


def test_chat_reply_boundary(chat_tokenizer):
    tok = chat_tokenizer
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    pairs, _ = to_pairs(implicit_rows(3), "i")
    (tp, *_), stats = tokenize_pairs(pairs, tok, max_length=4096, truncation="drop")
    assert stats.kept == 3 and stats.truncated == 0
    for reply_ids, reply in ((tp.chosen_ids, pairs[0].chosen), (tp.rejected_ids, pairs[0].rejected)):
        assert reply_ids[-1] == im_end
        assert tok.decode(reply_ids) == reply[0]["content"] + "<|im_end|>"  # no trailing newline
        full = tok.apply_chat_template(pairs[0].prompt + reply, tokenize=False)
        full_ids = tok(full, add_special_tokens=False)["input_ids"]
        assert tp.prompt_ids + reply_ids == full_ids[: len(tp.prompt_ids) + len(reply_ids)]
        assert tok.decode(full_ids[len(tp.prompt_ids) + len(reply_ids) :]) == "\n"
    prompt_text = tok.decode(tp.prompt_ids)
    assert prompt_text.startswith("<|im_start|>system\nYou are a helpful assistant who says short things.<|im_end|>")
    assert prompt_text.endswith("<|im_start|>assistant\n")


def test_standard_pairs_get_eos_and_bos(chat_tokenizer):
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    tok = chat_tokenizer
    pairs, _ = to_pairs(standard_rows(2), "s")
    (tp, _), _ = tokenize_pairs(pairs, tok, max_length=4096, truncation="drop")
    assert tp.prompt_ids == tok(pairs[0].prompt)["input_ids"]
    assert tp.chosen_ids == tok(pairs[0].chosen, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert tp.rejected_ids[-1] == tok.eos_token_id

    backend = copy.deepcopy(tok.backend_tokenizer)
    backend.post_processor = processors.TemplateProcessing(single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", 0)])
    bos_tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|endoftext|>", eos_token="<|im_end|>")
    (bp, _), _ = tokenize_pairs(pairs, bos_tok, max_length=4096, truncation="drop")
    assert bp.prompt_ids == [0] + tp.prompt_ids and bp.chosen_ids == tp.chosen_ids
    # Truncating the prompt from the left keeps the BOS first.
    long_prompt = [Pair("Why is the sky blue? " * 10, "Because.", "No.")]
    (full,), _ = tokenize_pairs(long_prompt, bos_tok, max_length=4096, truncation="drop")
    max_length = len(full.prompt_ids) + max(len(full.chosen_ids), len(full.rejected_ids)) - 2
    (cut,), stats = tokenize_pairs(long_prompt, bos_tok, max_length=max_length, truncation="truncate")
    assert stats.truncated == 1
    assert cut.prompt_ids == [0] + full.prompt_ids[3:] and (cut.chosen_ids, cut.rejected_ids) == (full.chosen_ids, full.rejected_ids)

    # Text a chat template already wrote (TRL tutorials' ChatML strings): its BOS and end-of-turn
    # tokens are not doubled (no second BOS; no EOS after a reply ending with <|im_end|>).
    templated = [Pair("<|endoftext|><|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
                      "The answer is 4.<|im_end|>\n", "5")]
    (t,), _ = tokenize_pairs(templated, bos_tok, max_length=4096, truncation="drop")
    assert t.prompt_ids == bos_tok(templated[0].prompt, add_special_tokens=False)["input_ids"] and t.prompt_ids[:2] != [0, 0]
    assert t.chosen_ids == bos_tok("The answer is 4.<|im_end|>\n", add_special_tokens=False)["input_ids"]
    assert t.chosen_ids.count(tok.eos_token_id) == 1
    assert t.rejected_ids == bos_tok("5", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]  # its end added


TOOL_TEMPLATE = (  # ChatML with Qwen2.5's way of writing tool calls and results
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] }}"
    "{%- for call in message.get('tool_calls', []) %}"
    "{{- '<tool_call>' + call['function']['name'] + ' ' + call['function']['arguments'] + '</tool_call>' }}"
    "{%- endfor %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def test_tool_calls_are_rendered_or_the_pair_refused(chat_tokenizer):
    """Replies that differ only in their tool call train as different replies under a template that
    renders tool_calls; a template that drops them (as the plain ChatML one here) is refused by name."""
    call = lambda name: [{"role": "assistant", "content": "", "tool_calls": [  # noqa: E731
        {"type": "function", "id": "c1", "function": {"name": name, "arguments": "{}"}}]}]
    pair = Pair([{"role": "user", "content": "Weather in Paris?"}], call("get_weather"), call("get_time"))
    tok = copy.deepcopy(chat_tokenizer)
    tok.chat_template = TOOL_TEMPLATE
    (tp,), stats = tokenize_pairs([pair], tok, 4096, "drop")
    assert "<tool_call>get_weather {}</tool_call><|im_end|>" in tok.decode(tp.chosen_ids)
    assert tp.chosen_ids != tp.rejected_ids and stats.kept == 1
    with pytest.raises(DataError, match=r"'chosen': the chat template does not render tool calls \(the call to get_weather"):
        tokenize_pairs([pair], chat_tokenizer, 4096, "drop")
    _, stats = tokenize_pairs([pair], chat_tokenizer, 4096, "drop", on_error="skip")
    assert stats.kept == 0 and stats.problems.counts == {"unsupported": 1}


def test_a_reply_of_several_messages_runs_to_its_last_end_of_turn_marker(chat_tokenizer):
    """A reply of a tool call, the tool's result and the answer holds ChatML's <|im_end|> after each
    message: it is trained whole, up to the last marker, not cut after the call's."""
    call = {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "id": "c1", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]}
    result = {"role": "tool", "tool_call_id": "c1", "name": "get_weather", "content": "18C and sunny"}
    answer = {"role": "assistant", "content": "It is 18C and sunny in Paris."}
    pair = Pair([{"role": "user", "content": "Weather in Paris?"}], [call, result, answer],
                [{"role": "assistant", "content": "No idea."}])
    tok = copy.deepcopy(chat_tokenizer)
    tok.chat_template = TOOL_TEMPLATE
    (tp,), stats = tokenize_pairs([pair], tok, 4096, "drop")
    assert stats.kept == 1
    assert tok.decode(tp.chosen_ids) == ('<tool_call>get_weather {"city": "Paris"}</tool_call><|im_end|>\n'
                                         "<|im_start|>tool\n18C and sunny<|im_end|>\n"
                                         "<|im_start|>assistant\nIt is 18C and sunny in Paris.<|im_end|>")
    assert tok.decode(tp.rejected_ids) == "No idea.<|im_end|>"


def test_conversational_data_needs_a_chat_template(chat_tokenizer):
    tok = copy.deepcopy(chat_tokenizer)
    tok.chat_template = None
    pairs, _ = to_pairs(explicit_rows(1), "c")
    with pytest.raises(DataError, match="tokenizer has no chat template"):
        tokenize_pairs(pairs, tok, 512, "drop")
    tokenize_pairs(to_pairs(standard_rows(1), "s")[0], tok, 512, "drop")  # strings need no template


def test_template_that_rewrites_the_prompt_is_an_error(chat_tokenizer):
    tok = copy.deepcopy(chat_tokenizer)
    # Renders the user turn differently once an assistant turn follows it.
    tok.chat_template = (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + "
        "(' (answered)' if m['role'] == 'user' and not loop.last else '') + '<|im_end|>\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    )
    pairs, _ = to_pairs(explicit_rows(1), "c")
    with pytest.raises(DataError, match="c, row 1: 'chosen': the chat template does not put the reply at the end"):
        tokenize_pairs(pairs, tok, 512, "drop")


def test_template_render_error_is_a_data_error(chat_tokenizer):
    tok = copy.deepcopy(chat_tokenizer)
    tok.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
        "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    )
    pairs, _ = to_pairs(implicit_rows(1), "i")
    with pytest.raises(DataError, match=r"i, row 1: 'prompt': the chat template cannot render messages with roles \[system, user.*System role not supported"):
        tokenize_pairs(pairs, tok, 512, "drop")


NO_MARKER_TEMPLATE = (  # writes nothing after an assistant's message: no end-of-turn marker
    "{% for m in messages %}{{ m['role'] + ': ' + m['content'] }}{% if m['role'] != 'assistant' %}{{ '\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
)


def test_template_without_end_marker_uses_eos(chat_tokenizer):
    tok = copy.deepcopy(chat_tokenizer)
    tok.chat_template = NO_MARKER_TEMPLATE
    assert end_of_turn_marker(tok) == ""
    pairs, _ = to_pairs(explicit_rows(1), "c")
    (tp,), _ = tokenize_pairs(pairs, tok, 512, "drop")
    assert tp.chosen_ids[-1] == tok.eos_token_id
    assert tok.decode(tp.chosen_ids[:-1]) == "A small cat said hello to the moon."


def test_template_without_end_marker_ends_both_replies_with_one_eos(chat_tokenizer):
    tok = copy.deepcopy(chat_tokenizer)
    tok.chat_template = NO_MARKER_TEMPLATE
    pairs, _ = to_pairs(explicit_rows(2), "c")
    tokenized, _ = tokenize_pairs(pairs, tok, 512, "drop")
    for tp, pair in zip(tokenized, pairs):
        for ids, reply in ((tp.chosen_ids, pair.chosen), (tp.rejected_ids, pair.rejected)):
            assert ids[-1] == tok.eos_token_id and ids.count(tok.eos_token_id) == 1
            assert tok.decode(ids[:-1]) == reply[0]["content"]


def _long_pairs(n: int, words: int) -> list[Pair]:
    body = " ".join(["the sky is blue because light"] * words)
    return [Pair(f"Question {i}: " + body, "Sure, " + body, "No.") for i in range(n)]


def test_fit_length_rule():
    tp = TokenizedPair(list(range(10)), [100, 101, 102, 103, 999], [200, 999])
    assert fit_length(tp, 15, "drop") == (tp, False)  # 10 + 5 fits exactly
    assert fit_length(tp, 14, "drop") == (None, False)
    cut, truncated = fit_length(tp, 14, "truncate")
    # prompt keeps max(14 - 5, min(10, 7)) = 9 tokens from the right; replies fit as they are
    assert truncated and cut == TokenizedPair(list(range(1, 10)), [100, 101, 102, 103, 999], [200, 999])
    cut, _ = fit_length(TokenizedPair(list(range(10)), list(range(100, 120)) + [999], [200, 999]), 12, "truncate")
    # the reply is longer than max_length: prompt keeps min(10, 6) = 6, replies get 6 with EOT last
    assert cut.prompt_ids == [4, 5, 6, 7, 8, 9]
    assert cut.chosen_ids == [100, 101, 102, 103, 104, 999] and cut.rejected_ids == [200, 999]


def test_a_pair_whose_rejected_reply_alone_is_cut_counts_as_truncated(chat_tokenizer):
    # prompt keeps max(6 - 5, min(2, 3)) = 2 tokens; chosen fits in the 4 left, rejected is cut to them
    cut, truncated = fit_length(TokenizedPair([1, 2], [3, 4], [5, 6, 7, 8, 9]), 6, "truncate")
    assert truncated and cut == TokenizedPair([1, 2], [3, 4], [5, 6, 7, 9])
    pair = Pair("Why?", " Yes.", " " + " ".join(["the sky is blue because light"] * 8))
    (full,), _ = tokenize_pairs([pair], chat_tokenizer, 100_000, "drop")
    max_length = len(full.prompt_ids) + len(full.rejected_ids) - 3
    (tp,), stats = tokenize_pairs([pair], chat_tokenizer, max_length, "truncate")
    assert (tp.prompt_ids, tp.chosen_ids) == (full.prompt_ids, full.chosen_ids) and len(tp.rejected_ids) == len(full.rejected_ids) - 3
    assert (stats.truncated, stats.replies_cut, stats.prompt_cut) == (1, 1, 0)


def test_truncation_drop_and_truncate_counts(chat_tokenizer):
    tok = chat_tokenizer
    short = to_pairs(standard_rows(3), "s")[0]
    pairs = short[:1] + _long_pairs(2, 30) + short[1:]
    max_length = 64
    kept, stats = tokenize_pairs(pairs, tok, max_length, "drop")
    assert (stats.total, stats.kept, stats.dropped_too_long, stats.truncated) == (5, 3, 2, 0)
    full, _ = tokenize_pairs(pairs, tok, 100_000, "drop")
    assert kept == [full[0], full[3], full[4]]

    cut, stats = tokenize_pairs(pairs, tok, max_length, "truncate")
    assert (stats.total, stats.kept, stats.dropped_too_long, stats.truncated) == (5, 5, 0, 2)
    assert cut[0] == full[0] and cut[3:] == full[3:]
    for tp, orig in zip(cut[1:3], full[1:3]):
        assert len(tp.prompt_ids) + max(len(tp.chosen_ids), len(tp.rejected_ids)) <= max_length
        assert tp.prompt_ids == orig.prompt_ids[-len(tp.prompt_ids) :]  # cut from the left
        assert tp.chosen_ids[-1] == tok.eos_token_id  # EOT kept last
        assert tp.chosen_ids[:-1] == orig.chosen_ids[: len(tp.chosen_ids) - 1]  # cut from the right
        assert tp.rejected_ids == orig.rejected_ids  # already short


def test_chat_truncation_keeps_im_end(chat_tokenizer):
    tok = chat_tokenizer
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    row = implicit_rows(1)[0]
    row["chosen"][-1]["content"] = " ".join(["blue light from the sun"] * 40)
    pairs, _ = to_pairs([row], "i")
    (tp,), stats = tokenize_pairs(pairs, tok, 80, "truncate")
    assert stats.truncated == 1
    assert len(tp.prompt_ids) == 40 and len(tp.chosen_ids) == 40 and tp.chosen_ids[-1] == im_end
    assert tp.rejected_ids[-1] == im_end


def test_truncation_keeps_an_end_of_turn_marker_of_several_tokens(chat_tokenizer):
    """Phi-3's template ends an assistant turn with <|end|>, a newline and EOS: a cut reply keeps all
    of it last, whatever the reply's own last character merges with (here "<|end|>" is several
    byte-level tokens, and "." before it can merge with "<|")."""
    tok = copy.deepcopy(chat_tokenizer)
    tok.chat_template = (
        "{% for m in messages %}{{ '<|' + m['role'] + '|>\\n' + m['content'] + '<|end|>\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% else %}{{ eos_token }}{% endif %}"
    )
    marker = end_of_turn_marker(tok)
    assert marker == "<|end|>\n<|im_end|>"
    row = implicit_rows(1)[0]
    row["chosen"][-1]["content"] = " ".join(["blue light from the sun"] * 40) + "."
    pairs, _ = to_pairs([row], "i")
    (full,), _ = tokenize_pairs(pairs, tok, 100_000, "drop")
    assert len(full.chosen_ids) > 60 and tok.decode(full.chosen_ids).endswith(marker)
    (tp,), stats = tokenize_pairs(pairs, tok, 100, "truncate")
    assert stats.replies_cut == 1 and len(tp.prompt_ids) + len(tp.chosen_ids) <= 100
    assert tok.decode(tp.chosen_ids).endswith(marker)  # the whole marker, not only its last token
    kept_end = next(k for k in range(1, 20) if tok.decode(full.chosen_ids[-k:]).endswith(marker))
    assert tp.chosen_ids[-kept_end:] == full.chosen_ids[-kept_end:] and kept_end > 1
    assert tp.chosen_ids[:-kept_end] == full.chosen_ids[: len(tp.chosen_ids) - kept_end]  # the rest cut from the right
    assert tp.rejected_ids == full.rejected_ids  # short: untouched



def test_each_cut_reply_keeps_its_own_end_of_turn_tokens(chat_tokenizer):
    """A marker whose first characters merge with a reply's last ones (byte-level BPE: " s" + "un"
    is the one token " sun") takes 2 tokens at the end of one reply and 3 at the end of another:
    when both are cut, each keeps its own count, so both still end with the whole marker."""
    tok = copy.deepcopy(chat_tokenizer)
    tok.chat_template = ("{% for m in messages %}{{ m['role'] + ': ' + m['content'] + 'un<|im_end|>\\n' }}{% endfor %}"
                         "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}")
    marker = end_of_turn_marker(tok)
    assert marker == "un<|im_end|>"
    body = " ".join(["blue light from the sun"] * 20)
    pair = Pair([{"role": "user", "content": "Why?"}], [{"role": "assistant", "content": body + " s"}],
                [{"role": "assistant", "content": body + " x"}])
    (full,), _ = tokenize_pairs([pair], tok, 100_000, "drop")
    assert tok.decode(full.chosen_ids[-2:]) == " sun<|im_end|>" and tok.decode(full.rejected_ids[-3:]).endswith("un<|im_end|>")
    (tp,), stats = tokenize_pairs([pair], tok, 40, "truncate")
    assert stats.replies_cut == 1 and len(tp.chosen_ids) < len(full.chosen_ids) and len(tp.rejected_ids) < len(full.rejected_ids)
    assert tok.decode(tp.chosen_ids).endswith(marker) and tok.decode(tp.rejected_ids).endswith(marker)


def test_num_proc_gives_identical_output(chat_tokenizer):
    pairs = to_pairs(implicit_rows(12), "i")[0] + _long_pairs(4, 30)
    one = tokenize_pairs(pairs, chat_tokenizer, 150, "drop")
    many = tokenize_pairs(pairs, chat_tokenizer, 150, "drop", num_proc=2)
    assert one[1].kept == 12 and one[1].dropped_too_long == 4
    assert one == many



def test_a_template_that_does_not_write_the_reply_as_given_is_refused(chat_tokenizer):
    """A chat template that rewrites the assistant's text (here: upper-cases it) leaves no end-of-turn
    marker to find after it: refused by name, not given a "marker" made of the whole conversation."""
    tok = copy.deepcopy(chat_tokenizer)
    tok.chat_template = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] | upper + '<|im_end|>\\n' }}{% endfor %}"
    with pytest.raises(DataError, match="does not write the assistant's message content as given"):
        end_of_turn_marker(tok)


def test_a_reply_the_template_does_not_close_with_its_marker_is_refused(chat_tokenizer):
    """A template that writes its end-of-turn marker after some assistant messages only (here: not
    after an empty one) cannot say where such a reply ends: the pair is refused by field and marker
    (reason no_end_marker), not trained on a reply cut at a guessed place."""
    tok = copy.deepcopy(chat_tokenizer)
    tok.chat_template = (
        "{% for m in messages %}{{ m['role'] + ': ' + m['content'] }}{% if m['content'] %}{{ '<END>' }}{% endif %}{{ '\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
    )
    assert end_of_turn_marker(tok) == "<END>"
    pair = Pair([{"role": "user", "content": "Hi"}], [{"role": "assistant", "content": "Hello."}], [{"role": "assistant", "content": ""}])
    with pytest.raises(DataError, match=r"row 7: 'rejected': the chat template does not end the reply with its end-of-turn marker '<END>'") as e:
        render_chat(pair, tok, "<END>", where="d.jsonl, row 7")
    assert e.value.reason == "no_end_marker"


def test_plain_text_pairs_need_an_eos_token_chat_pairs_with_a_marker_do_not(chat_tokenizer):
    """A string pair's replies end with EOS: a tokenizer without one is an error naming the setting,
    not replies ending in None. Chat replies end with the template's marker and need no EOS."""
    tok = copy.deepcopy(chat_tokenizer)
    tok.eos_token = None
    with pytest.raises(DataError, match="the tokenizer has no eos_token, needed to end each reply: set tokenizer.eos_token"):
        tokenize_pairs([Pair("Why?", "Yes.", "No.")], tok, 512, "drop")
    pairs, _ = to_pairs(explicit_rows(1), "c")
    (tp,), _ = tokenize_pairs(pairs, tok, 512, "drop")
    assert tok.decode(tp.chosen_ids) == "A small cat said hello to the moon.<|im_end|>"


def test_fit_length_with_room_for_one_prompt_token_and_fewer_reply_tokens_than_its_end():
    """With max_length 3 the prompt keeps min(4, 3 // 2) = 1 token: its last one, the one the reply
    follows, not a lone BOS; each reply gets the 2 left, which is fewer than its 3 end-of-turn
    tokens: it keeps the last 2 of them, and the pair fits max_length."""
    tp = TokenizedPair([7, 1, 2, 3], [10, 11, 12, 13, 14, 15, 16], [20, 21, 22, 23, 24])
    cut, truncated = fit_length(tp, 3, "truncate", bos=7, tails=(3, 3))
    assert truncated and cut == TokenizedPair([3], [15, 16], [23, 24])
    cut, _ = fit_length(tp, 4, "truncate", bos=7, tails=(3, 3))  # room for 2 prompt tokens: BOS and the last
    assert cut == TokenizedPair([7, 3], [15, 16], [23, 24])


def test_end_tokens_of_a_reply_that_is_only_its_marker(chat_tokenizer):
    """A reply with empty content is only its end-of-turn marker: all of its tokens hold the marker
    (here the 8 byte-level tokens of "<|end|>\\n<|im_end|>"), up to ``most``, so a cut keeps them all."""
    from dpokit.data.tokenize import end_tokens

    marker = "<|end|>\n<|im_end|>"
    ids = chat_tokenizer(marker, add_special_tokens=False)["input_ids"]
    assert len(ids) == 8 and end_tokens(ids, marker, chat_tokenizer) == 8
    assert end_tokens([5, 6] + ids, marker, chat_tokenizer, most=8) == 8
    assert end_tokens([5, 6] + ids, marker, chat_tokenizer, most=7) == 1  # not found within most: the last token
    assert end_tokens(ids, "", chat_tokenizer) == 1


def test_tokenize_pairs_refuses_an_unknown_truncation_even_when_all_pairs_fit(chat_tokenizer):
    """A misspelt truncation policy is an error at once, not only once some pair is too long."""
    with pytest.raises(ValueError, match="truncation must be 'truncate' or 'drop', got 'cut'"):
        tokenize_pairs([Pair("Why?", "Yes.", "No.")], chat_tokenizer, 4096, "cut")


def test_tokenize_stats_add_and_truncation_summary():
    """Stats of chunks (num_proc) add up counter by counter, problems and lengths in order; the
    summary names each truncation step with its own count."""
    from dpokit.data.tokenize import TokenizeStats

    a = TokenizeStats(total=10, kept=6, truncated=3, dropped_too_long=1, dropped_equal_tokens=2, turns_dropped=1, prompt_cut=2,
                      replies_cut=3, lengths=[(1, 2, 3)])
    a.problems.add("template_error", "pair 1: bad")
    b = TokenizeStats(total=5, kept=4, truncated=2, dropped_too_long=0, dropped_equal_tokens=1, turns_dropped=4, prompt_cut=0,
                      replies_cut=5, lengths=[(4, 5, 6)])
    b.problems.add("unsupported", "pair 12: bad")
    a.add(b)
    assert (a.total, a.kept, a.truncated, a.dropped_too_long, a.dropped_equal_tokens) == (15, 10, 5, 1, 3)
    assert (a.turns_dropped, a.prompt_cut, a.replies_cut) == (5, 2, 8)
    assert a.lengths == [(1, 2, 3), (4, 5, 6)] and a.problems.counts == {"template_error": 1, "unsupported": 1}
    assert a.drops() == {"too_long": 1, "equal_tokens": 3} and TokenizeStats(dropped_equal_tokens=2).drops() == {"equal_tokens": 2}
    assert a.truncation_summary() == "5 truncated (5 dropped old turns, 2 cut the prompt, 8 cut replies)"
    assert TokenizeStats(truncated=1, prompt_cut=1).truncation_summary() == "1 truncated (1 cut the prompt)"
    assert TokenizeStats().truncation_summary() == "0 truncated"


def test_num_proc_numbers_skipped_pairs_as_one_process_does(chat_tokenizer):
    """Skipped pairs without a file row are named "pair N", N counted from 1 over all pairs, the same
    with a process pool (each chunk starts where it is in the list) as without."""
    call = [{"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "id": "c1", "function": {"name": "get_weather", "arguments": "{}"}}]}]
    good = to_pairs(explicit_rows(8), "c")[0]
    pairs = [dataclasses.replace(p, where="") for p in good]
    for i in (2, 6):  # pairs 3 and 7: a tool call the plain ChatML template drops
        pairs[i] = Pair([{"role": "user", "content": f"Weather {i}?"}], call, [{"role": "assistant", "content": "No."}])
    one = tokenize_pairs(pairs, chat_tokenizer, 4096, "drop", on_error="skip")
    many = tokenize_pairs(pairs, chat_tokenizer, 4096, "drop", num_proc=2, on_error="skip")
    assert [m.split(":")[0] for m in one[1].problems.examples] == ["pair 3", "pair 7"]
    assert one == many


# ----------------------------------------------------------------------------- pipeline


def test_load_data_eval_fraction_split_is_deterministic(tmp_path, chat_tokenizer):
    path = write_jsonl(tmp_path / "train.jsonl", standard_rows(40))
    config = DataConfig(train=DataSource(path), eval_fraction=0.1, max_length=512)
    lines: list[str] = []
    a = load_data(config, chat_tokenizer, seed=1, log=lines.append)
    b = load_data(config, chat_tokenizer, seed=1, log=lambda _: None)
    c = load_data(config, chat_tokenizer, seed=2, log=lambda _: None)
    assert len(a.eval) == 4 and len(a.train) == 36
    assert a.train == b.train and a.eval == b.eval
    assert a.eval != c.eval
    everything = load_data(DataConfig(train=DataSource(path), max_length=512), chat_tokenizer, seed=1, log=lambda _: None)
    assert everything.eval is None
    assert sorted(map(repr, a.train + a.eval)) == sorted(map(repr, everything.train))
    assert any("40 rows -> 40 pairs (dropped: none), 0 truncated" in line for line in lines), lines
    assert any("4 pairs (eval_fraction=0.1, seed=1)" in line for line in lines), lines


def test_split_eval_bounds():
    train, held = split_eval(list(range(5)), 0.01, seed=0)
    assert len(held) == 1 and len(train) == 4 and sorted(train + held) == list(range(5))
    assert train == sorted(train)  # original order kept
    with pytest.raises(DataError, match="leaves nothing to train on"):
        split_eval([1], 0.5, seed=0)


def test_load_data_separate_eval_and_counts(tmp_path, chat_tokenizer):
    rows = standard_rows(6)
    rows[2]["rejected"] = rows[2]["chosen"]
    rows[4]["prompt"] = " ".join(["why is the sky blue"] * 200)
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    evalp = write_jsonl(tmp_path / "eval.jsonl", implicit_rows(2))
    config = DataConfig(train=DataSource(train), eval=DataSource(evalp), eval_fraction=0.5, max_length=128, truncation="drop")
    lines: list[str] = []
    data = load_data(config, chat_tokenizer, seed=0, log=lines.append)
    assert len(data.train) == 4 and len(data.eval) == 2
    assert data.stats["train"].dropped == {"chosen_equals_rejected": 1}
    assert data.stats["train"].tokenize.dropped_too_long == 1
    assert lines[0] == f"data: train {train}: 6 rows -> 4 pairs (dropped: 1 chosen_equals_rejected, 1 too_long), 0 truncated; format standard (detected)"
    assert lines[1].startswith(f"data: eval {evalp}: 2 rows -> 2 pairs")


def test_load_data_with_no_surviving_pair(tmp_path, chat_tokenizer):
    rows = standard_rows(2)
    for r in rows:
        r["rejected"] = r["chosen"]
    path = write_jsonl(tmp_path / "same.jsonl", rows)
    with pytest.raises(DataError, match=f"no usable pair in {path}: .*2 chosen_equals_rejected.*check that chosen and rejected differ$") as e:
        load_data(DataConfig(train=DataSource(path)), chat_tokenizer, seed=0, log=lambda _: None)
    assert str(e.value).count(str(path)) == 1  # named once
    # every row skipped as bad: the first one's message is the hint (it used to say "check that chosen
    # and rejected differ", and the per-row messages were never shown)
    orca = write_jsonl(tmp_path / "orca.jsonl", [{"system": "", "question": "Hi?", "chosen": "Hello!", "rejected": "Go."}] * 2)
    with pytest.raises(DataError, match=r"\(dropped: 2 leading_turns_differ\).*the first bad row: .*orca.jsonl, line 1: "
                                        r"'prompt' is missing .*: name the column that holds it: data.columns.prompt=question$"):
        load_data(DataConfig(train=DataSource(orca), on_error="skip"), chat_tokenizer, seed=0, log=lambda _: None)



def test_no_usable_pair_hints_at_the_truncation_setting_only_when_it_drops(tmp_path, chat_tokenizer):
    """Pairs all too long under truncation=drop: the hint names both fixes (max_length, truncation);
    under truncation=truncate, pairs cut to the same tokens: only max_length."""
    rows = [{"prompt": f"Why is the sky blue? ({i})", "chosen": " The sky is blue.", "rejected": " The sky is green."} for i in range(2)]
    path = write_jsonl(tmp_path / "long.jsonl", rows)
    with pytest.raises(DataError, match=r"\(dropped: 2 too_long\).*raise data.max_length or use data.truncation=truncate$"):
        load_data(DataConfig(train=DataSource(path), max_length=4, truncation="drop"), chat_tokenizer, seed=0, log=lambda _: None)
    with pytest.raises(DataError, match=r"\(dropped: 2 equal_tokens\).*\. raise data.max_length$"):
        load_data(DataConfig(train=DataSource(path), max_length=4), chat_tokenizer, seed=0, log=lambda _: None)


def test_a_dataset_inspected_with_no_usable_pair_is_not_cached_for_training(tmp_path, chat_tokenizer, monkeypatch):
    """``dpokit data inspect`` reads a dataset with no usable pair whole (allow_empty); that empty
    result is not cached, so training on it afterwards still stops with the error."""
    from dpokit.data.pipeline import prepare_source

    monkeypatch.setenv("DPOKIT_CACHE", str(tmp_path / "cache"))
    rows = standard_rows(2)
    for r in rows:
        r["rejected"] = r["chosen"]
    path = write_jsonl(tmp_path / "same.jsonl", rows)
    config = DataConfig(train=DataSource(path))
    pairs, stats = prepare_source(DataSource(path), config, chat_tokenizer, allow_empty=True)
    assert pairs == [] and stats.dropped == {"chosen_equals_rejected": 2}
    assert not (tmp_path / "cache" / "datasets").exists()
    with pytest.raises(DataError, match=f"no usable pair in {path}"):
        load_data(config, chat_tokenizer, seed=0, log=lambda _: None)


# ----------------------------------------------------------------------------- batching


def test_packing_puts_a_sequence_that_exactly_fills_a_row_in_it():
    """A packed row takes a sequence while its length stays within row_tokens, the bound included."""
    from dpokit.data.batching import make_batch

    pair = TokenizedPair([1, 2], [3, 4], [5, 6, 7])  # sequences of 4 and 5 tokens
    assert make_batch([pair], "packed", row_tokens=9).input_ids.tolist() == [[1, 2, 3, 4, 1, 2, 5, 6, 7]]
    assert make_batch([pair], "packed", row_tokens=8).input_ids.shape[0] == 2
    pairs = [pair, TokenizedPair([8], [9, 10], [11, 12])]  # shared-prompt pairs of 7 and 5 tokens
    assert make_batch(pairs, "prefix_packed", row_tokens=12).input_ids.tolist() == [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]]
    assert make_batch(pairs, "prefix_packed", row_tokens=11).input_ids.shape[0] == 2


def _fields(batch) -> dict:
    names = ("input_ids", "attention_mask", "position_ids", "groups", "branches", "pred_rows", "pred_cols", "targets",
             "seq_index", "seq_tokens")
    return {n: None if getattr(batch, n) is None else getattr(batch, n).tolist() for n in names} | {
        "num_real_tokens": batch.num_real_tokens}


def test_each_layout_laid_out_by_hand():
    """Every field of a small batch in each layout, written out by hand: pad id 99 and padding's
    mask 0, position 0, group -1, branch 0; a reply token predicted by the column before it, the
    first rejected token of a shared prompt by the prompt's last column; padding not counted real."""
    from dpokit.data.batching import make_batch

    one = [TokenizedPair([5, 6, 7], [8, 9], [11])]
    assert _fields(make_batch(one, "padded", pad_token_id=99)) == dict(
        input_ids=[[5, 6, 7, 8, 9], [5, 6, 7, 11, 99]], attention_mask=[[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]],
        position_ids=[[0, 1, 2, 3, 4], [0, 1, 2, 3, 0]], groups=None, branches=None,
        pred_rows=[0, 0, 1], pred_cols=[2, 3, 2], targets=[8, 9, 11], seq_index=[0, 0, 1], seq_tokens=[2, 1],
        num_real_tokens=9)
    assert _fields(make_batch(one, "packed", pad_token_id=99)) == dict(
        input_ids=[[5, 6, 7, 8, 9, 5, 6, 7, 11]], attention_mask=None, position_ids=[[0, 1, 2, 3, 4, 0, 1, 2, 3]],
        groups=[[0, 0, 0, 0, 0, 1, 1, 1, 1]], branches=None,
        pred_rows=[0, 0, 0], pred_cols=[2, 3, 7], targets=[8, 9, 11], seq_index=[0, 0, 1], seq_tokens=[2, 1],
        num_real_tokens=9)
    two = [TokenizedPair([5, 6], [7, 8], [9]), TokenizedPair([1], [2], [3, 4])]
    assert _fields(make_batch(two, "prefix_padded", pad_token_id=99)) == dict(
        input_ids=[[5, 6, 7, 8, 9], [1, 2, 3, 4, 99]], attention_mask=None,
        position_ids=[[0, 1, 2, 3, 2], [0, 1, 1, 2, 0]],
        groups=[[0, 0, 0, 0, 0], [1, 1, 1, 1, -1]], branches=[[0, 0, 1, 1, 2], [0, 1, 2, 2, 0]],
        pred_rows=[0, 0, 0, 1, 1, 1], pred_cols=[1, 2, 1, 0, 0, 2], targets=[7, 8, 9, 2, 3, 4],
        seq_index=[0, 0, 1, 2, 3, 3], seq_tokens=[2, 1, 1, 2], num_real_tokens=9)
    assert _fields(make_batch(two, "prefix_packed", pad_token_id=99)) == dict(
        input_ids=[[5, 6, 7, 8, 9, 1, 2, 3, 4]], attention_mask=None, position_ids=[[0, 1, 2, 3, 2, 0, 1, 1, 2]],
        groups=[[0, 0, 0, 0, 0, 1, 1, 1, 1]], branches=[[0, 0, 1, 1, 2, 0, 1, 2, 2]],
        pred_rows=[0, 0, 0, 0, 0, 0], pred_cols=[1, 2, 1, 5, 5, 7], targets=[7, 8, 9, 2, 3, 4],
        seq_index=[0, 0, 1, 2, 3, 3], seq_tokens=[2, 1, 1, 2], num_real_tokens=9)


def test_an_empty_reply_scores_no_token_and_counts_zero():
    """make_batch takes a reply of no tokens (dpokit's data makes none; a direct caller may): it adds
    no scored token, the tokens after it keep their predictors, and its count is 0, also as the
    batch's last sequence (seq_tokens has one entry per sequence, 2 per pair)."""
    from dpokit.data.batching import make_batch

    pairs = [TokenizedPair([5], [], [6, 7]), TokenizedPair([1, 2], [3], [])]
    for layout in ("padded", "prefix_padded"):
        batch = make_batch(pairs, layout)
        assert batch.seq_tokens.tolist() == [0, 2, 1, 0], layout
        assert batch.targets.tolist() == [6, 7, 3] and batch.seq_index.tolist() == [1, 1, 2], layout
    assert make_batch(pairs, "padded").pred_cols.tolist() == [0, 1, 1]  # rows [5 6 7], [1 2 3]
    assert make_batch(pairs, "prefix_padded").pred_cols.tolist() == [0, 1, 1]  # rows [5 6 7], [1 2 3]


def test_packing_puts_a_sequence_in_the_first_row_with_room():
    """Not only the last row: with row_tokens 10, sequences of 6, 8, 4 and 10 tokens go to rows 0, 1,
    0 (6 + 4 = 10 fits) and 2, so three rows, the first holding the first and third sequences."""
    from dpokit.data.batching import make_batch

    pairs = [TokenizedPair([1], [2] * 5, [3] * 7), TokenizedPair([4], [5] * 3, [6] * 9)]
    batch = make_batch(pairs, "packed", row_tokens=10)
    assert batch.input_ids.tolist() == [[1, 2, 2, 2, 2, 2, 4, 5, 5, 5], [1, 3, 3, 3, 3, 3, 3, 3, 0, 0], [4] + [6] * 9]
    assert batch.groups.tolist()[0] == [0] * 6 + [2] * 4


def test_epoch_orders_of_other_seeds_are_not_shifted_copies():
    """The shuffle is fixed by (seed, epoch) and by both apart: seed 1's second epoch is not seed 2's
    first (nor seed 0's second epoch seed 1's first), so runs of neighbouring seeds see other orders."""
    from dpokit.data.batching import epoch_order

    assert epoch_order(50, 1, 1) == epoch_order(50, 1, 1) and sorted(epoch_order(50, 1, 1)) == list(range(50))
    assert epoch_order(50, 1, 1) != epoch_order(50, 2, 0) and epoch_order(50, 0, 1) != epoch_order(50, 1, 0)
    assert epoch_order(50, 1, 0) != epoch_order(50, 1, 1)


def test_eval_batches_stripe_every_pair_over_processes_in_order():
    """Evaluation pairs dealt round-robin: rank r of w takes pairs r, r + w, ..., in batches of the
    given size, the last one short; over all ranks, every pair exactly once."""
    from dpokit.data.batching import eval_batches

    assert eval_batches(7, 2, 0, 2) == [[0, 2], [4, 6]]
    assert eval_batches(7, 2, 1, 2) == [[1, 3], [5]]
    assert eval_batches(5, 3, 0, 1) == [[0, 1, 2], [3, 4]]
    assert eval_batches(1, 4, 0, 1) == [[0]]
    assert sorted(i for r in range(3) for b in eval_batches(10, 2, r, 3) for i in b) == list(range(10))
