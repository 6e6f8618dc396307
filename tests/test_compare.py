"""``dpokit compare``: both columns for the same prompts, same sampling stream, readable files."""

import json

import pytest

from dpokit.cli import main
from dpokit.generate import SamplingSettings, generate_replies, prompt_text, read_prompt_file, stop_token_ids
from dpokit.quickstart_data import generate_pairs
from dpokit.resolve import load_model, load_model_tokenizer, model_config, resolve_model
from trained import trained_run

PROMPTS = ["Tell me about the moon.", "Why is the sky blue?", "Write a short poem about bees."]


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_compare_run_writes_both_columns_for_the_same_prompts(workdir, tmp_path):
    run = trained_run(workdir)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS[:2]) + "\n\n" + PROMPTS[2] + "\n")
    main(["compare", str(run), "--prompts", str(prompts), "--max-new-tokens", "6", "--temperature", "1", "--batch-size", "2"])
    rows = _rows(run / "compare.jsonl")
    assert [prompt_text(r["prompt"]) for r in rows] == PROMPTS
    assert all(isinstance(r["reference"], str) and isinstance(r["policy"], str) for r in rows)
    md = (run / "compare.md").read_text()
    assert md.count("**Reference**") == md.count("**Policy**") == len(PROMPTS)
    assert f"reference: `{workdir / 'model'}`" in md and f"policy: `{run / 'final'}`" in md
    assert "temperature 1.0, top_p 0.95, max_new_tokens 6, seed 42" in md
    for prompt in PROMPTS:
        assert prompt in md


def test_same_model_same_settings_gives_the_same_replies(workdir, tmp_path):
    """Both columns draw the same random stream: a model compared with itself agrees with itself."""
    model = str(workdir / "model")
    args = ["compare", model, "--reference", model, "--from-data", str(workdir / "eval.jsonl"), "--n", "3",
            "--max-new-tokens", "8", "--temperature", "1.0", "--batch-size", "2"]
    main([*args, "--output-dir", str(tmp_path / "a")])
    rows = _rows(tmp_path / "a" / "compare.jsonl")
    assert [r["prompt"] for r in rows] == [p["prompt"] for p in generate_pairs(12, 2)[:3]]  # the data's first prompts
    assert all(r["reference"] == r["policy"] for r in rows)
    assert any(r["policy"] for r in rows)
    main([*args, "--output-dir", str(tmp_path / "b")])  # and a second run repeats the first
    assert _rows(tmp_path / "b" / "compare.jsonl") == rows


def test_left_padded_batches_equal_one_prompt_at_a_time(workdir):
    resolved = resolve_model(str(workdir / "model"))
    config = model_config(resolved)
    model, tokenizer = load_model(resolved, config), load_model_tokenizer(resolved, config)
    assert stop_token_ids(tokenizer, model) == [tokenizer.convert_tokens_to_ids("<|im_end|>")]
    prompts = ["The moon", "Honey bees live in large colonies with a single queen and", [{"role": "user", "content": "hi"}]]
    greedy = SamplingSettings(temperature=0, max_new_tokens=8)
    batched = generate_replies(model, tokenizer, prompts, greedy, batch_size=3)
    assert batched == [generate_replies(model, tokenizer, [p], greedy)[0] for p in prompts]
    assert any(batched)


def test_prompt_files(workdir, tmp_path, capsys):
    good = tmp_path / "p.jsonl"
    good.write_text(json.dumps({"prompt": "one"}) + "\n\n" + json.dumps(
        {"prompt": [{"role": "system", "content": "s"}, {"role": "user", "content": "two"}]}) + "\n")
    assert read_prompt_file(good) == [[{"role": "user", "content": "one"}],
                                      [{"role": "system", "content": "s"}, {"role": "user", "content": "two"}]]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "ok"}) + "\n" + json.dumps({"question": "x"}) + "\n")
    with pytest.raises(SystemExit) as exc:
        main(["compare", str(workdir / "model"), "--reference", str(workdir / "model"), "--prompts", str(bad)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"{bad}, line 2" in err and "'prompt'" in err
