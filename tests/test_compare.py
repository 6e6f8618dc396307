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


def test_a_run_trained_on_plain_text_gets_plain_text_prompts(workdir, tmp_path, capsys):
    """A run trained on strings (format standard) never saw a chat template: --prompts go to it as
    plain text, as its training prompts went (data.json says each train source's format); a run on
    conversations still gets them through the template."""
    from dpokit.train import train
    from runs import run_config

    data = tmp_path / "plain.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"The sky {i} is", "chosen": " blue.", "rejected": " green."}) + "\n"
                            for i in range(8)))
    run = train(run_config(workdir, str(tmp_path / "plain-run"), f"data.train={data}", "data.eval=null", "max_steps=1"))
    assert json.loads((run / "data.json").read_text())["train"]["format"] == "standard"
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The sea is\n")
    main(["compare", str(run), "--prompts", str(prompts), "--max-new-tokens", "2", "--temperature", "0"])
    assert "the run trained on plain-text pairs, so the prompts are given as plain text" in capsys.readouterr().out
    assert _rows(run / "compare.jsonl")[0]["prompt"] == "The sea is"
    chat_run = trained_run(workdir)
    main(["compare", str(chat_run), "--prompts", str(prompts), "--max-new-tokens", "2", "--temperature", "0"])
    assert _rows(chat_run / "compare.jsonl")[0]["prompt"] == [{"role": "user", "content": "The sea is"}]


def test_a_section_is_titled_with_the_question_the_reply_answers():
    """A multi-turn prompt's heading was its first turn, a system prompt's the system message (the
    same for every prompt); it is the last user message's first line."""
    from dpokit.compare import _title

    conversation = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Capital of Canada?"},
                    {"role": "assistant", "content": "Ottawa."}, {"role": "user", "content": "\nNow what about honey bees?\nBriefly."}]
    assert _title(conversation) == "Now what about honey bees?"
    assert _title("  \nThe sky is") == "The sky is" and _title([{"role": "user", "content": " "}]) == "(empty prompt)"


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


def _scripted(model, tokens: list[int]):
    """``model`` made to generate ``tokens`` (then the last one over and over), whatever it is given."""
    forward, calls = model.forward, []

    def scripted(*args, **kwargs):
        out = forward(*args, **kwargs)
        out.logits[:, -1, :] = -1e4
        out.logits[:, -1, tokens[min(len(calls), len(tokens) - 1)]] = 0
        calls.append(1)
        return out

    model.forward = scripted
    return model


def test_an_end_of_turn_marker_of_several_tokens_ends_the_reply(workdir, capsys):
    """A template whose end-of-turn marker is not one token (``<|eot|>`` here: six) trains replies to
    end with it and no eos: generation stops at it (a stop string), and the reply, streamed and
    kept, ends before it, in compare and chat alike."""
    from dpokit.chat import Conversation, reply

    resolved = resolve_model(str(workdir / "model"))
    config = model_config(resolved)
    tokenizer = load_model_tokenizer(resolved, config)
    tokenizer.chat_template = tokenizer.chat_template.replace("<|im_end|>", "<|eot|>")
    script = tokenizer("Hello there<|eot|>\n<|im_start|>user\nand on it goes", add_special_tokens=False)["input_ids"]
    assert len(tokenizer("<|eot|>", add_special_tokens=False)["input_ids"]) > 1
    greedy = SamplingSettings(temperature=0, max_new_tokens=30)
    model = _scripted(load_model(resolved, config), script)
    assert generate_replies(model, tokenizer, [[{"role": "user", "content": "Hi"}]], greedy) == ["Hello there"]
    model = _scripted(load_model(resolved, config), script)
    from dpokit.generate import prepare_for_generation

    prepare_for_generation(model, tokenizer, greedy)
    conversation = Conversation(system=None, turns=[{"role": "user", "content": "Hi"}])
    import io

    streamed = io.StringIO()
    assert reply(model, tokenizer, conversation, greedy, streamed) == "Hello there"
    assert streamed.getvalue().strip() == "Hello there" and conversation.turns[-1]["content"] == "Hello there"


def test_a_prompt_longer_than_the_context_keeps_its_end(workdir, tmp_path, capsys):
    """GPT-2's positions are learned (64 here): a prompt past them crashed generation with an
    IndexError. It keeps its last tokens, with a note; --max-new-tokens that fills the context is refused."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    tokenizer = AutoTokenizer.from_pretrained(workdir / "model")
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_positions=64, n_embd=32, n_layer=1, n_head=2, bos_token_id=None,
                               eos_token_id=tokenizer.eos_token_id)).save_pretrained(tmp_path / "gpt2")
    tokenizer.save_pretrained(tmp_path / "gpt2")
    prompts = tmp_path / "long.txt"
    prompts.write_text("Tell me " + "a lot about the moon and " * 30 + "\nhi\n")
    gpt2 = str(tmp_path / "gpt2")
    main(["compare", gpt2, "--reference", gpt2, "--prompts", str(prompts), "--max-new-tokens", "8", "--temperature", "0",
          "--output-dir", str(tmp_path / "out")])
    assert "note: 1 prompt(s) (number 1) are longer than the 56 tokens the model's context of 64 leaves" in capsys.readouterr().out
    assert len(_rows(tmp_path / "out" / "compare.jsonl")) == 2
    with pytest.raises(SystemExit):
        main(["compare", gpt2, "--reference", gpt2, "--prompts", str(prompts), "--max-new-tokens", "64", "--output-dir", str(tmp_path / "x")])
    assert "--max-new-tokens 64 leaves no room for a prompt in the model's context of 64 positions: give at most 63" in capsys.readouterr().err


def test_from_data_reads_the_data_as_the_run_did(workdir, tmp_path):
    """A run trained with data.system_prompt (and data.columns) gives compare --from-data's prompts
    the same system message and reads the same column names, as eval reads --data."""
    from runs import run_args

    from dpokit.train import train
    from dpokit.config import load_config

    renamed = tmp_path / "renamed.jsonl"
    renamed.write_text("".join(json.dumps({"question": r["prompt"], "good": r["chosen"], "bad": r["rejected"]}) + "\n"
                               for r in generate_pairs(8, 5)))
    run = train(load_config(None, run_args(workdir, str(tmp_path / "run"), f"data.train={renamed}", "data.eval=null",
                                           "max_steps=1", "data.system_prompt=You are terse.",
                                           "data.columns={prompt: question, chosen: good, rejected: bad}")))
    main(["compare", str(run), "--from-data", str(renamed), "--n", "2", "--max-new-tokens", "2", "--output-dir", str(tmp_path / "out")])
    rows = _rows(tmp_path / "out" / "compare.jsonl")
    system = [{"role": "system", "content": "You are terse."}]  # for prompts without a system message of their own
    assert [r["prompt"] for r in rows] == [p["prompt"] if p["prompt"][0]["role"] == "system" else system + p["prompt"]
                                           for p in generate_pairs(8, 5)[:2]]
    assert any(r["prompt"][0] == system[0] for r in rows)


def test_a_template_that_refuses_a_message_is_said_not_raised(workdir, tmp_path, monkeypatch, capsys):
    """Gemma's template refuses a system message: chat says so, drops the message and goes on (the
    conversation is kept); --system is refused before the model loads; compare names the prompt."""
    import io
    import shutil
    import sys

    model = tmp_path / "no-system"
    shutil.copytree(workdir / "model", model)
    template = model / "chat_template.jinja"
    template.write_text("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
                        "{% endif %}{% endfor %}" + template.read_text())
    saved = tmp_path / "kept.json"
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"hello\n/system Be nice.\nhello again\n/save {saved}\n"))
    main(["chat", str(model), "--max-new-tokens", "3"])
    out = capsys.readouterr().out
    assert "cannot render messages with roles [system, user, assistant, user]: System role not supported" in out
    assert "that message was dropped, the conversation is kept" in out
    assert [m["role"] for m in json.loads(saved.read_text())] == ["system", "user", "assistant"]
    with pytest.raises(SystemExit):
        main(["chat", str(model), "--system", "Be nice."])
    assert "--system: the chat template cannot render messages with roles [system, user]" in capsys.readouterr().err
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "hi"}) + "\n" + json.dumps({"prompt": [{"role": "system", "content": "x"},
                                                                                     {"role": "user", "content": "hi"}]}) + "\n")
    with pytest.raises(SystemExit):
        main(["compare", str(model), "--reference", str(model), "--prompts", str(prompts), "--output-dir", str(tmp_path / "o")])
    assert "prompt 2: the chat template cannot render messages with roles [system, user]" in capsys.readouterr().err


# ----------------------------------------------------------------------------- columns and files, with replies faked


def _fake_replies(monkeypatch):
    """``dpokit.compare._replies`` made to answer without a model: each reply names the model that
    gave it and the prompt; returns the calls, ``(model shown, template_kwargs)`` each, in order."""
    import dpokit.compare

    calls = []

    def replies(model, dtype, prompts, settings, batch_size, log, template_kwargs):
        calls.append((model.shown, template_kwargs))
        return [f"by {model.shown} to {prompt_text(p)}" for p in prompts]

    monkeypatch.setattr(dpokit.compare, "_replies", replies)
    return calls


def _section(markdown: str, start: str, end: str) -> str:
    """The text of ``markdown`` between the first ``start`` and the next ``end`` after it."""
    return markdown.split(start, 1)[1].split(end, 1)[0]


def test_each_column_holds_its_own_models_replies_and_both_get_the_same_template_variables(monkeypatch):
    from dpokit.compare import compare

    calls = _fake_replies(monkeypatch)
    prompts = ["The moon is", [{"role": "user", "content": "Why is the sky blue?"}]]
    variables = [{"enable_thinking": False}, None]
    comparison, policy = compare("org/policy", prompts, reference="org/reference", log=lambda line: None,
                                 template_kwargs=variables)
    assert calls == [("org/reference", variables), ("org/policy", variables)]  # the reference first, same variables
    assert policy.shown == comparison.model == "org/policy" and comparison.reference == "org/reference"
    assert comparison.reference_replies == ["by org/reference to The moon is", "by org/reference to Why is the sky blue?"]
    assert comparison.policy_replies == ["by org/policy to The moon is", "by org/policy to Why is the sky blue?"]
    assert comparison.rows() == [
        {"index": 1, "prompt": prompts[0], "reference": "by org/reference to The moon is", "policy": "by org/policy to The moon is"},
        {"index": 2, "prompt": prompts[1], "reference": "by org/reference to Why is the sky blue?",
         "policy": "by org/policy to Why is the sky blue?"},
    ]
    md = comparison.markdown()
    assert "- policy: `org/policy`" in md and "- reference: `org/reference`" in md
    for section in md.split("\n## ")[1:]:
        reference, policy_part = _section(section, "**Reference**", "**Policy**"), section.split("**Policy**", 1)[1]
        assert "by org/reference" in reference and "by org/policy" not in reference
        assert "by org/policy" in policy_part and "by org/reference" not in policy_part


def _code_blocks(markdown: str) -> list[str]:
    """The contents of ``markdown``'s backtick-fenced blocks, read as CommonMark reads them: a block
    ends at the first line of only backticks, at least as many as opened it."""
    import re

    blocks, fence, body = [], None, []
    for line in markdown.splitlines():
        if fence is None:
            opening = re.fullmatch(r"(`{3,})[^`]*", line)
            if opening:
                fence, body = opening.group(1), []
        elif re.fullmatch(f"`{{{len(fence)},}}\\s*", line):
            blocks.append("\n".join(body))
            fence = None
        else:
            body.append(line)
    assert fence is None, "a code block is left open"
    return blocks


def test_a_reply_holding_code_fences_shows_verbatim_in_one_block():
    """A reply with a ``` (or ````) block of its own gets a longer fence: its fences do not close
    the block it is shown in."""
    from dpokit.compare import Comparison

    three = "Here is code:\n```\nprint(1)\n```\nDone."
    four = "Nested:\n````markdown\n```\nx\n```\n````\nend ```inline``` too"
    comparison = Comparison("org/policy", "org/reference", SamplingSettings(), ["Show me code.", "Show me more."],
                            [three, four], [four, three])
    md = comparison.markdown()
    assert _code_blocks(md) == ["Show me code.", three, four, "Show me more.", four, three]
    assert "\n````text\n" + three + "\n````\n" in md and "\n`````text\n" + four + "\n`````\n" in md


# ----------------------------------------------------------------------------- generation, with the model faked


class _ScriptedLM:
    """Stands in for a causal LM in :func:`generate_replies`: records what ``generate`` is given and
    returns each row of ``input_ids`` followed by ``new`` (as ``generate`` returns prompt + reply)."""

    def __init__(self, new: list[int], limit: int | None = None):
        import torch
        from types import SimpleNamespace

        self.new, self.calls = new, []
        self.config = SimpleNamespace(max_position_embeddings=limit, use_cache=False)
        self._weight = torch.nn.Parameter(torch.zeros(1))

    def parameters(self):
        return iter([self._weight])

    def generate(self, input_ids, attention_mask, **kwargs):
        import torch

        self.calls.append({"input_ids": input_ids, "attention_mask": attention_mask, **kwargs})
        return torch.cat([input_ids, torch.tensor([self.new] * len(input_ids))], dim=1)


def test_a_batch_is_left_padded_and_masked_and_only_the_new_tokens_are_the_reply(chat_tokenizer):
    from dpokit.generate import encode_prompt

    new = chat_tokenizer("Sure, here it is.", add_special_tokens=False)["input_ids"]
    model = _ScriptedLM(new)
    prompts = ["The moon", "Honey bees live in large colonies with a queen", [{"role": "user", "content": "hi"}]]
    replies = generate_replies(model, chat_tokenizer, prompts, SamplingSettings(temperature=0), batch_size=3)
    assert replies == ["Sure, here it is."] * 3  # not the prompt, nor its last token
    encoded = [encode_prompt(p, chat_tokenizer) for p in prompts]
    width, pad = max(map(len, encoded)), chat_tokenizer.pad_token_id
    (call,) = model.calls
    assert call["input_ids"].tolist() == [[pad] * (width - len(ids)) + ids for ids in encoded]
    assert call["attention_mask"].tolist() == [[0] * (width - len(ids)) + [1] * len(ids) for ids in encoded]
    assert len({len(ids) for ids in encoded}) == 3  # each row has its own amount of padding


def test_sampling_settings_and_nothing_else_make_the_generation_config(chat_tokenizer):
    from dpokit.generate import prepare_for_generation

    model = _ScriptedLM([])
    prepare_for_generation(model, chat_tokenizer, SamplingSettings(temperature=0.5, top_p=0.8, top_k=7, max_new_tokens=9))
    config = model.generation_config
    assert (config.do_sample, config.temperature, config.top_p, config.top_k, config.max_new_tokens) == (True, 0.5, 0.8, 7, 9)
    assert config.eos_token_id == [chat_tokenizer.eos_token_id] and config.pad_token_id == chat_tokenizer.pad_token_id
    assert model.config.use_cache is True
    prepare_for_generation(model, chat_tokenizer, SamplingSettings(temperature=0, top_p=0.8, top_k=7))
    config = model.generation_config
    assert (config.do_sample, config.temperature, config.top_p, config.top_k) == (False, None, None, None)  # greedy


def test_a_prompt_too_long_for_the_context_keeps_its_last_tokens_and_says_so():
    from dpokit.generate import fit_prompts

    lines = []
    assert fit_prompts([[1, 2, 3, 4, 5, 6], [7]], 6, 2, lines.append) == [[3, 4, 5, 6], [7]]
    assert lines == ["note: 1 prompt(s) (number 1) are longer than the 4 tokens the model's context of 6 leaves beside "
                     "--max-new-tokens 2: they keep their last 4 tokens"]
    lines.clear()
    assert fit_prompts([[1, 2, 3, 4], [7]], 6, 2, lines.append) == [[1, 2, 3, 4], [7]] and lines == []  # fits: as it was
    assert fit_prompts([[1, 2, 3, 4, 5, 6]], None, 2, lines.append) == [[1, 2, 3, 4, 5, 6]] and lines == []  # no limit known


def test_the_models_own_eos_ids_also_stop_a_reply(chat_tokenizer):
    """Llama 3 names several eos ids in its generation config (a list): each one ends a reply."""
    from types import SimpleNamespace

    eos = chat_tokenizer.eos_token_id
    several = SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=[eos, 7, 5]))
    assert stop_token_ids(chat_tokenizer, several) == sorted({eos, 5, 7})
    one = SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=9))
    assert stop_token_ids(chat_tokenizer, one) == sorted({eos, 9})
    assert stop_token_ids(chat_tokenizer) == [eos]


def test_a_chat_prompt_gets_only_the_bos_its_template_writes(chat_tokenizer):
    """A tokenizer that adds a BOS to any text, with a template that writes one: the rendered prompt
    is encoded without special tokens (one BOS, not two); a plain-text prompt gets the tokenizer's."""
    import copy

    from tokenizers import processors

    from conftest import CHATML_TEMPLATE
    from dpokit.generate import encode_prompt

    tokenizer = copy.deepcopy(chat_tokenizer)
    tokenizer.add_special_tokens({"bos_token": "<s>"})
    bos = tokenizer.bos_token_id
    tokenizer._tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                                       special_tokens=[("<s>", bos)])
    tokenizer.chat_template = "{{ bos_token }}" + CHATML_TEMPLATE
    assert tokenizer("hi")["input_ids"][0] == bos  # the tokenizer adds one
    chat = encode_prompt([{"role": "user", "content": "hi"}], tokenizer)
    assert chat[0] == bos and chat.count(bos) == 1
    plain = encode_prompt("hi", tokenizer)
    assert plain[0] == bos and plain.count(bos) == 1


def _data_json(tmp_path, **formats):
    """A run folder whose ``data.json`` gives each label's format (``train_0`` stands for ``train[0]``)."""
    run = tmp_path / "run"
    run.mkdir(exist_ok=True)
    labels = {label.replace("_0", "[0]").replace("_1", "[1]"): {"format": f, "rows": 3} for label, f in formats.items()}
    (run / "data.json").write_text(json.dumps(labels))
    return run


def test_only_a_run_trained_on_plain_text_alone_counts_as_plain_text(tmp_path):
    """Every train source must be plain text (a mix keeps the chat template); eval data does not count."""
    from dpokit.generate import trained_on_plain_text

    assert trained_on_plain_text(_data_json(tmp_path, train="standard"))
    assert trained_on_plain_text(_data_json(tmp_path, train_0="standard", train_1="standard-implicit"))
    assert trained_on_plain_text(_data_json(tmp_path, train="standard-implicit", eval="conversational"))
    assert not trained_on_plain_text(_data_json(tmp_path, train_0="standard", train_1="conversational"))
    assert not trained_on_plain_text(_data_json(tmp_path, train_0="conversational", train_1="standard"))
    assert not trained_on_plain_text(_data_json(tmp_path, train="conversational", eval="standard"))
    assert not trained_on_plain_text(_data_json(tmp_path, eval="standard"))  # no train source: not known
    assert not trained_on_plain_text(tmp_path / "no-such-run") and not trained_on_plain_text(None)


def test_as_plain_text_turns_only_a_lone_user_message_into_its_text():
    from dpokit.generate import as_plain_text

    conversation = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi"}]
    two_users = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Bye"}]
    lone_system = [{"role": "system", "content": "Be terse."}]
    assert as_plain_text([[{"role": "user", "content": "The sky is"}], "The sea is", conversation, two_users, lone_system]) == [
        "The sky is", "The sea is", conversation, two_users, lone_system]


def test_sampling_settings_take_their_edges_and_refuse_what_is_past_them():
    """temperature 0 (greedy), top_p 1, top_k 0 (off) and one new token are settings; top_p 0, a
    negative top_k and no new token are refused naming the flag. describe() says each setting that applies."""
    from dpokit.config import ConfigError

    for fine in (SamplingSettings(temperature=0), SamplingSettings(top_p=1.0), SamplingSettings(top_k=0),
                 SamplingSettings(max_new_tokens=1)):
        assert fine.check() is fine
    for bad, flag in ((SamplingSettings(temperature=-0.1), "--temperature"), (SamplingSettings(top_p=0.0), "--top-p"),
                      (SamplingSettings(top_k=-1), "--top-k"), (SamplingSettings(max_new_tokens=0), "--max-new-tokens")):
        with pytest.raises(ConfigError, match=f"^{flag} "):
            bad.check()
    assert SamplingSettings(temperature=0.5, top_p=0.9).describe() == "temperature 0.5, top_p 0.9, max_new_tokens 256, seed 42"
    assert SamplingSettings(top_k=5, seed=1).describe() == "temperature 0.7, top_p 0.95, top_k 5, max_new_tokens 256, seed 1"
    assert SamplingSettings(temperature=0, top_k=5, max_new_tokens=8).describe() == "greedy, max_new_tokens 8, seed 42"


def test_blank_prompts_are_skipped_in_a_txt_file_and_refused_in_a_jsonl_row(tmp_path):
    """A .txt file's blank lines are no prompts; a file with none left holds no prompt; a .jsonl row
    whose prompt is blank or an empty list of messages is refused with its line number."""
    from dpokit.data.sources import DataError

    lines = tmp_path / "p.txt"
    lines.write_text("first\n\n   \nsecond\n")
    assert read_prompt_file(lines) == [[{"role": "user", "content": "first"}], [{"role": "user", "content": "second"}]]
    lines.write_text("\n  \n")
    with pytest.raises(DataError, match="holds no prompt"):
        read_prompt_file(lines)
    rows = tmp_path / "p.jsonl"
    for blank in ("  ", []):
        rows.write_text(json.dumps({"prompt": "ok"}) + "\n" + json.dumps({"prompt": blank}) + "\n")
        with pytest.raises(DataError, match=r"p\.jsonl, line 2: 'prompt' must be a non-empty string"):
            read_prompt_file(rows)


def test_a_prompt_reads_as_its_text_or_as_role_lines(chat_tokenizer):
    """compare writes a string or a lone user message as its text, a conversation as "role: content" lines."""
    assert prompt_text("The sky is") == "The sky is"
    assert prompt_text([{"role": "user", "content": "Hi"}]) == "Hi"
    assert prompt_text([{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi"}]) == "system: Be terse.\nuser: Hi"


def test_a_template_that_refuses_is_told_to_leave_out_the_system_prompt_only_when_there_is_one(chat_tokenizer):
    """The hint to leave the system prompt out follows a refusal only where the prompt holds a system message."""
    import copy

    from dpokit.data.sources import DataError
    from dpokit.generate import encode_prompt

    tokenizer = copy.deepcopy(chat_tokenizer)
    tokenizer.chat_template = "{{ raise_exception('Conversation roles must alternate') }}"
    hint = "leave the system prompt out"
    with pytest.raises(DataError, match="Conversation roles must alternate") as refused:
        encode_prompt([{"role": "user", "content": "Hi"}, {"role": "user", "content": "again"}], tokenizer)
    assert hint not in str(refused.value)
    with pytest.raises(DataError, match=hint):
        encode_prompt([{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi"}], tokenizer)


def test_the_models_own_eos_ends_the_reply_before_it_even_when_it_is_a_plain_token(chat_tokenizer):
    """A generation config's eos id that is an ordinary token (not stripped as a special one on
    decoding): the reply is the text before it, the eos and what follows left out."""
    from types import SimpleNamespace

    new = chat_tokenizer("Sure. And then more", add_special_tokens=False)["input_ids"]
    stop = chat_tokenizer(".", add_special_tokens=False)["input_ids"]
    assert len(stop) == 1 and stop[0] in new
    model = _ScriptedLM(new)
    model.generation_config = SimpleNamespace(eos_token_id=stop[0])
    assert generate_replies(model, chat_tokenizer, ["Go on"], SamplingSettings(temperature=0)) == ["Sure"]


def test_the_note_on_long_prompts_numbers_five_then_says_there_are_more():
    """Five long prompts are all numbered; a sixth makes the list end in ", ..."."""
    from dpokit.generate import fit_prompts

    lines = []
    fit_prompts([[1, 2, 3]] * 5, 4, 2, lines.append)
    fit_prompts([[1, 2, 3]] * 6, 4, 2, lines.append)
    assert [line.split(") are ")[0] for line in lines] == ["note: 5 prompt(s) (number 1, 2, 3, 4, 5",
                                                           "note: 6 prompt(s) (number 1, 2, 3, 4, 5, ..."]


def test_a_reply_is_its_text_without_special_tokens_or_surrounding_blanks(chat_tokenizer):
    """A special token inside the reply that is no stop (``<|im_start|>``) is left out, and so are the
    blanks and line ends around the reply."""
    new = chat_tokenizer("  Hi<|im_start|> there\n", add_special_tokens=False)["input_ids"]
    assert chat_tokenizer.convert_tokens_to_ids("<|im_start|>") in new
    assert generate_replies(_ScriptedLM(new), chat_tokenizer, ["Go on"], SamplingSettings(temperature=0)) == ["Hi there"]


def test_each_prompt_is_rendered_with_its_own_template_variables(chat_tokenizer):
    """generate_replies renders prompt k with template_kwargs[k]: the first prompt's variable shows in
    its ids only, the second (None) renders as without any."""
    import copy

    from conftest import CHATML_TEMPLATE

    tokenizer = copy.deepcopy(chat_tokenizer)
    tokenizer.chat_template = "{% if greeting %}{{ greeting }}\n{% endif %}" + CHATML_TEMPLATE
    model = _ScriptedLM(tokenizer("Sure.", add_special_tokens=False)["input_ids"])
    hi = [{"role": "user", "content": "hi"}]
    generate_replies(model, tokenizer, [hi, hi], SamplingSettings(temperature=0), template_kwargs=[{"greeting": "Ahoy"}, None])
    (call,) = model.calls
    first, second = (tokenizer.decode(row) for row in call["input_ids"].tolist())
    assert "Ahoy" in first and "Ahoy" not in second


def test_a_one_token_end_of_turn_marker_is_a_stop_id_even_where_the_tokenizer_adds_a_bos(chat_tokenizer):
    """A Llama 3-like tokenizer (a BOS added to any text, eos not the end-of-turn marker): the marker is
    encoded without the BOS, so it is one token, a stop id beside eos, and no stop string."""
    import copy

    from tokenizers import processors

    from dpokit.generate import stop_strings

    tokenizer = copy.deepcopy(chat_tokenizer)
    tokenizer.add_special_tokens({"bos_token": "<s>"})
    tokenizer._tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tokenizer.bos_token_id)])
    tokenizer.eos_token = "<|endoftext|>"
    im_end, eos = tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert eos != im_end
    assert stop_token_ids(tokenizer) == sorted({eos, im_end}) and stop_strings(tokenizer) is None


def test_from_data_takes_at_least_one_pair(tmp_path):
    from dpokit.config import ConfigError
    from dpokit.generate import prompts_from_data

    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}) + "\n")
    with pytest.raises(ConfigError, match="^--n must be at least 1, got 0$"):
        prompts_from_data(str(path), 0)
    assert prompts_from_data(str(path), 1)[0] == ["p"]
