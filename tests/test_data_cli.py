"""``dpokit data inspect`` and ``dpokit data convert``."""

from __future__ import annotations

import io
import json

import pytest
from test_formats import FIXTURES, hh_rlhf_rows, orpo_mix_rows, ultrafeedback_rows

from dpokit.cli import main
from dpokit.data.formats import normalize, to_pairs
from dpokit.data_cli import inspect, percentile


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory, chat_tokenizer):
    path = tmp_path_factory.mktemp("tok")
    chat_tokenizer.save_pretrained(str(path))
    return str(path)


def write_jsonl(path, rows, extra="") -> str:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows) + extra)
    return str(path)


def hh_file(tmp_path) -> str:
    rows = hh_rlhf_rows()
    rows.append({"chosen": "\n\nHuman: Hi\n\nAssistant: Hello!", "rejected": "\n\nHuman: Hey\n\nAssistant: What?"})
    rows.append({"chosen": "\n\nHuman: Hi\n\nAssistant: Hello!", "rejected": "\n\nHuman: Hi\n\nAssistant: Hello!"})
    return write_jsonl(tmp_path / "hh.jsonl", rows, extra="{broken\n")


def test_percentile_nearest_rank():
    assert [percentile(list(range(1, 101)), p) for p in (50, 90, 99, 100)] == [50, 90, 99, 100]
    assert percentile([7], 50) == 7 and percentile([], 90) == 0
    assert percentile([1, 2, 3, 10], 90) == 10


def test_inspect_a_file(tmp_path, tokenizer_dir, capsys):
    path = hh_file(tmp_path)
    main(["data", "inspect", path, f"model.name_or_path={tokenizer_dir}", "max_length=80"])
    out = capsys.readouterr().out
    assert f"tokenizer: {tokenizer_dir}\n" in out
    assert f"train: {path}\n  format      hh-rlhf (detected from the rows)\n  rows        5 read -> 2 pairs\n" in out
    assert "  dropped     1 malformed_json, 1 leading_turns_differ, 1 chosen_equals_rejected\n" in out
    assert "  bad rows    2 (the first 2):\n" in out
    assert f"    {path}, line 5: not valid JSON" in out
    assert f"    {path}, line 3: 'rejected' turn 1 differs from turn 1 of 'chosen'" in out
    assert "with data.on_error=raise training stops at the first of these" in out
    header = next(line for line in out.splitlines() if line.startswith("  tokens"))
    assert header.split()[1:5] == ["p50", "p90", "p99", "max"] and "(before truncation, 2 pairs)" in header
    rows = _table(out)
    assert set(rows) == {"prompt", "chosen", "rejected", "pair"}
    for values in rows.values():
        assert values == sorted(values)  # p50 <= p90 <= p99 <= max
    assert rows["pair"][3] > 80 and "  over max_length (80): 1 of 2 pairs (50.0%); truncation=truncate: 1 truncated (1 dropped old turns)" in out
    example = out[out.index("  example"):]
    assert "▌ marks where the trained reply starts" in example
    assert "<|im_start|>assistant\n      ▌About one and a half cups" in example  # after truncation: what the model sees
    assert "\x1b[" not in out  # not a terminal: no colour codes


def test_inspect_reports_a_dataset_with_no_usable_pair_whole(tmp_path, tokenizer_dir, capsys):
    """Every row dropped: the report still shows why (the reasons, the bad rows), then the command fails."""
    path = write_jsonl(tmp_path / "none.jsonl", [{"prompt": "Hi", "chosen": "Same", "rejected": "Same"},
                                                 {"prompt": "Hi", "chosen": "", "rejected": "No"}])
    with pytest.raises(SystemExit) as e:
        main(["data", "inspect", path, f"model.name_or_path={tokenizer_dir}"])
    assert e.value.code == 2
    captured = capsys.readouterr()
    assert f"train: {path}\n  format      standard (detected from the rows)\n  rows        2 read -> 0 pairs\n" in captured.out
    assert "  dropped     1 chosen_equals_rejected, 1 empty\n" in captured.out
    assert f"    {path}, line 2: 'chosen' is empty" in captured.out and "  example" not in captured.out
    assert f"no usable pair in train ({path}): training would stop there" in captured.err


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_inspect_colours_on_a_terminal(tmp_path, tokenizer_dir, monkeypatch):
    monkeypatch.delenv("NO_COLOR", raising=False)
    monkeypatch.setenv("TERM", "xterm-256color")
    path = write_jsonl(tmp_path / "mm.jsonl", FIXTURES["conversational-implicit"]())
    out = FakeTerminal()
    inspect(path, [f"model.name_or_path={tokenizer_dir}"], out)
    text = out.getvalue()
    example = text[text.index("  example"):]
    assert "▌" not in example
    assert "\x1b[2m<|im_start|>system" in example  # the prompt dimmed
    assert "\x1b[0m\x1b[1;32m你好！我是一个人工智能助手" in example and "\x1b[1;31m不知道。<|im_end|>\x1b[0m" in example
    assert "format      conversational-implicit (detected from the rows)" in text


def test_inspect_a_config_with_a_mix(tmp_path, tokenizer_dir, capsys):
    write_jsonl(tmp_path / "uf.jsonl", ultrafeedback_rows())
    write_jsonl(tmp_path / "orpo.jsonl", orpo_mix_rows())
    config = tmp_path / "mix.yaml"
    config.write_text(
        f"model: {{name_or_path: {tokenizer_dir}}}\n"
        "data:\n  train:\n    - {path: uf.jsonl, weight: 1.5, format: ultrafeedback}\n    - orpo.jsonl\n"
        "  eval_fraction: 0.25\n"
    )
    main(["data", "inspect", str(config), "system_prompt=Be brief.", "format=conversational-implicit"])
    out = capsys.readouterr().out
    assert "(the default" not in out
    assert f"train[0]: {tmp_path / 'uf.jsonl'}\n  format      ultrafeedback (set by data.train[0].format)" in out
    assert f"train[1]: {tmp_path / 'orpo.jsonl'}\n  format      conversational-implicit (set by data.format)" in out
    assert "mix: train[0] 2 x 1.5 -> 3, train[1] 2 x 1 -> 2; 5 train pairs" in out
    assert "eval: 0.25 of the train pairs are held out by seed before weighting" in out
    assert "system_prompt='Be brief.'" in out and "<|im_start|>system\n      Be brief.<|im_end|>" in out


@pytest.mark.parametrize("name", list(FIXTURES))
def test_convert_writes_trl_rows_that_read_back_the_same(tmp_path, capsys, name):
    rows = FIXTURES[name]()
    source = write_jsonl(tmp_path / "in.jsonl", rows)
    target = tmp_path / "out" / "pairs.jsonl"
    main(["data", "convert", source, str(target)])
    out = capsys.readouterr().out
    written = [json.loads(line) for line in target.read_text().splitlines()]
    assert len(written) == len(rows)
    back = normalize(written, "out")
    assert back.pairs == to_pairs(rows, "in")[0]
    if name in ("standard", "standard-implicit"):
        assert back.format == "standard" and "(TRL standard: prompt/chosen/rejected strings)" in out
    else:
        assert back.format == "conversational" and "(TRL conversational: prompt/chosen/rejected message lists)" in out
        assert all(isinstance(written[0][k], list) for k in ("prompt", "chosen", "rejected"))
    assert f"{source}: {len(rows)} rows -> {len(rows)} pairs (dropped: none); format {name} (detected)" in out
    if name == "ultrafeedback":
        assert written[0]["score_chosen"] == 9.0 and written[0]["score_rejected"] == 3.5


def test_convert_with_column_mapping_and_skip(tmp_path, capsys):
    rows = [{"question": "Hi", "good": "Hello!", "bad": "Go."}, {"question": "Yo", "good": 5, "bad": "x"}]
    source = write_jsonl(tmp_path / "in.jsonl", rows)
    target = tmp_path / "out.jsonl"
    main(["data", "convert", source, str(target), "columns={prompt: question, chosen: good, rejected: bad}", "on_error=skip"])
    out = capsys.readouterr().out
    assert f"{source}: 2 rows -> 1 pairs (dropped: 1 wrong_type); format standard (detected)" in out
    assert f"  {source}, line 2: 'chosen' must be a string" in out
    assert [json.loads(line) for line in target.read_text().splitlines()] == [{"prompt": "Hi", "chosen": "Hello!", "rejected": "Go."}]


def test_data_command_errors_are_one_line(tmp_path, capsys):
    source = hh_file(tmp_path)
    target = tmp_path / "out.jsonl"
    with pytest.raises(SystemExit) as e:
        main(["data", "convert", source, str(target)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"dpokit: error: {source}, line 5: not valid JSON") and err.count("\n") == 1
    assert not target.exists() and list(tmp_path.iterdir()) == [tmp_path / "hh.jsonl"]  # nothing half-written
    with pytest.raises(SystemExit):
        main(["data", "convert", source, str(tmp_path / "out.csv")])
    assert "must be a .jsonl file" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["data", "inspect", str(tmp_path / "missing.jsonl")])
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["data", "convert", source, str(target), "format=hh"])
    assert "'data.format' must be one of" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["data"])
    assert "inspect,convert" in capsys.readouterr().err


def _table(out: str) -> dict[str, list[int]]:
    """The token length table of an inspect report: p50, p90, p99, max per column."""
    return {line.split()[0]: [int(x) for x in line.split()[1:5]] for line in out.split("  example")[0].splitlines()
            if line.startswith("    ") and line.split()[0] in ("prompt", "chosen", "rejected", "pair")}


def test_inspect_counts_a_pair_by_its_longer_reply_and_max_length_as_the_limit(tmp_path, tokenizer_dir):
    """The `pair` column is prompt + the longer reply (the rejected one here); a pair of exactly max_length
    fits; each side of the example says its own reply's length."""
    path = write_jsonl(tmp_path / "one.jsonl", [{"prompt": "Why is the sky blue?", "chosen": " Light.",
                                                 "rejected": " Because the air scatters the blue light of the sun more."}])
    out = io.StringIO()
    inspect(path, [f"model.name_or_path={tokenizer_dir}"], out)
    table = _table(out.getvalue())
    (prompt,), (chosen,), (rejected,) = (set(table[k]) for k in ("prompt", "chosen", "rejected"))  # one pair: p50 = max
    assert rejected > chosen and set(table["pair"]) == {prompt + rejected}
    assert f"    chosen ({prompt} prompt + {chosen} reply tokens):" in out.getvalue()
    assert f"    rejected ({prompt} prompt + {rejected} reply tokens):" in out.getvalue()
    for max_length, over in ((prompt + rejected, "0 of 1 pairs (0.0%)"), (prompt + rejected - 1, "1 of 1 pairs (100.0%)")):
        out = io.StringIO()
        inspect(path, [f"model.name_or_path={tokenizer_dir}", f"max_length={max_length}"], out)
        assert f"  over max_length ({max_length}): {over}" in out.getvalue()


def test_inspect_shows_the_mix_of_one_weighted_dataset(tmp_path, tokenizer_dir):
    path = write_jsonl(tmp_path / "s.jsonl", FIXTURES["standard"]())
    out = io.StringIO()
    inspect(path, [f"model.name_or_path={tokenizer_dir}", "data.train.weight=2.5"], out)
    n = len(FIXTURES["standard"]())
    assert f"mix: train {n} x 2.5 -> {round(2.5 * n)}; {round(2.5 * n)} train pairs" in out.getvalue()


def test_inspect_has_no_colour_under_no_color(tmp_path, tokenizer_dir, monkeypatch):
    monkeypatch.setenv("NO_COLOR", "1")  # https://no-color.org
    monkeypatch.setenv("TERM", "xterm-256color")
    out = FakeTerminal()
    inspect(write_jsonl(tmp_path / "s.jsonl", FIXTURES["standard"]()), [f"model.name_or_path={tokenizer_dir}"], out)
    assert "\x1b[" not in out.getvalue() and "▌ marks where the trained reply starts" in out.getvalue()


def test_convert_counts_every_row_of_the_file_and_reads_each_source_as_configured(tmp_path, capsys):
    source = hh_file(tmp_path)
    lines = len(open(source).read().splitlines())
    main(["data", "convert", source, str(tmp_path / "a.jsonl"), "on_error=skip"])
    assert f"{source}: {lines} rows -> 2 pairs (dropped: 1 malformed_json, " in capsys.readouterr().out
    # a source's own format and columns win over data.format / data.columns (here: none and auto)
    hh = write_jsonl(tmp_path / "hh2.jsonl", hh_rlhf_rows())
    main(["data", "convert", hh, str(tmp_path / "b.jsonl"), "data.train.format=standard-implicit"])
    assert "format standard-implicit\n" in capsys.readouterr().out
    assert all(isinstance(json.loads(line)["prompt"], str) for line in (tmp_path / "b.jsonl").read_text().splitlines())
    renamed = write_jsonl(tmp_path / "q.jsonl", [{"question": "Hi", "good": "Hello!", "bad": "Go."}])
    main(["data", "convert", renamed, str(tmp_path / "c.jsonl"), "data.train.columns={prompt: question, chosen: good, rejected: bad}"])
    assert [json.loads(line) for line in (tmp_path / "c.jsonl").read_text().splitlines()] == [
        {"prompt": "Hi", "chosen": "Hello!", "rejected": "Go."}]


def test_convert_writes_the_system_prompt_into_pairs_without_one(tmp_path):
    rows = FIXTURES["conversational"]()  # the first has no system message, the second its own
    main(["data", "convert", write_jsonl(tmp_path / "c.jsonl", rows), str(tmp_path / "out.jsonl"), "system_prompt=Be kind."])
    written = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert written[0]["prompt"] == [{"role": "system", "content": "Be kind."}, *rows[0]["prompt"]]
    assert written[1]["prompt"] == rows[1]["prompt"]


def test_convert_refuses_to_mix_plain_text_and_conversational_pairs_in_one_file(tmp_path, capsys):
    plain = write_jsonl(tmp_path / "plain.jsonl", FIXTURES["standard"]())
    chat = write_jsonl(tmp_path / "chat.jsonl", FIXTURES["conversational"]())
    config = tmp_path / "mix.yaml"
    config.write_text(f"data:\n  train: [{plain}, {chat}]\n")
    with pytest.raises(SystemExit) as e:
        main(["data", "convert", str(config), str(tmp_path / "out.jsonl")])
    assert e.value.code == 2 and "the datasets mix plain-text and conversational pairs" in capsys.readouterr().err
    assert not (tmp_path / "out.jsonl").exists()
