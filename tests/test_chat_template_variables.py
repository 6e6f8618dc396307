"""Chat template variables: a row's ``tools`` and ``chat_template_kwargs`` columns (as TRL reads
them), ``data.chat_template_kwargs`` for every pair, and an assistant's reasoning and tool calls,
which only a template turns into text."""

from __future__ import annotations

import copy
import io
import json

import pytest

from dpokit.chat import Conversation, _fit_context
from dpokit.cli import main
from dpokit.config import ConfigError, DataConfig, DataSource, load_config
from dpokit.data.formats import normalize
from dpokit.data.pipeline import load_data
from dpokit.data.sources import DataError
from dpokit.data.tokenize import tokenize_pairs
from dpokit.generate import encode_prompt, prompts_from_data

# A ChatML template that renders, as Qwen3's does: the tool definitions in a system block, an
# assistant's reasoning_content in <think> tags (always for the last message, empty if none), tool
# calls, and an empty <think></think> after the generation prompt when enable_thinking is false.
TEMPLATE = (
    "{%- if tools %}{{- '<|im_start|>system\\n# Tools' }}"
    "{%- for tool in tools %}{{- '\\n' + tool['function']['name'] }}{%- endfor %}{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['role'] == 'assistant' and (loop.last or message.get('reasoning_content')) %}"
    "{{- '<think>' + message.get('reasoning_content', '') + '</think>' }}{%- endif %}"
    "{{- message['content'] }}"
    "{%- for call in message.get('tool_calls', []) %}"
    "{{- '<tool_call>' + call['function']['name'] + '</tool_call>' }}{%- endfor %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and not enable_thinking %}{{- '<think></think>' }}{%- endif %}{%- endif %}"
)
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {}}}}]


@pytest.fixture(scope="module")
def tokenizer(chat_tokenizer):
    tok = copy.deepcopy(chat_tokenizer)
    tok.chat_template = TEMPLATE
    return tok


def row(**extra) -> dict:
    return {"prompt": [{"role": "user", "content": "Weather in Paris?"}],
            "chosen": [{"role": "assistant", "content": "Sunny."}],
            "rejected": [{"role": "assistant", "content": "No idea."}], **extra}


def prompt_text(pair, tokenizer, **options) -> str:
    (tp,), _ = tokenize_pairs([pair], tokenizer, 4096, "drop", **options)
    return tokenizer.decode(tp.prompt_ids)


def test_a_rows_tools_reach_the_template_as_a_list_or_json_text(tokenizer):
    listed, text = normalize([row(tools=TOOLS), row(tools=json.dumps(TOOLS))], "d").pairs
    assert listed.template_kwargs == text.template_kwargs == {"tools": TOOLS}
    rendered = prompt_text(listed, tokenizer)
    assert rendered.startswith("<|im_start|>system\n# Tools\nget_weather<|im_end|>\n<|im_start|>user\nWeather")
    (plain,) = normalize([row(tools=None)], "d").pairs  # null, "" and [] mean no tools
    assert plain.template_kwargs is None and "# Tools" not in prompt_text(plain, tokenizer)
    assert normalize([row(tools=[]), row(tools="")], "d").pairs[0].template_kwargs is None


def test_enable_thinking_from_the_config_and_a_rows_own_variables(tokenizer):
    (pair,) = normalize([row()], "d").pairs
    assert prompt_text(pair, tokenizer).endswith("<|im_start|>assistant\n")
    off = prompt_text(pair, tokenizer, template_kwargs={"enable_thinking": False})
    assert off.endswith("<|im_start|>assistant\n<think></think>")
    (own,) = normalize([row(chat_template_kwargs={"enable_thinking": True})], "d").pairs  # the row's own wins
    assert prompt_text(own, tokenizer, template_kwargs={"enable_thinking": False}).endswith("assistant\n")
    (tp,), _ = tokenize_pairs([pair], tokenizer, 4096, "drop", template_kwargs={"enable_thinking": False})
    assert tokenizer.decode(tp.chosen_ids) == "Sunny.<|im_end|>"  # the reply is what follows the empty think block
    (tp,), _ = tokenize_pairs([pair], tokenizer, 4096, "drop")
    assert tokenizer.decode(tp.chosen_ids) == "<think></think>Sunny.<|im_end|>"  # thinking on: the block is the reply's


@pytest.mark.parametrize("extra, message, reason", [
    ({"tools": {"name": "x"}}, "'tools' must be a list of tool definitions", "wrong_type"),
    ({"tools": ["get_weather"]}, "'tools' must be a list of tool definitions .*got a list holding str", "wrong_type"),
    ({"tools": "[{broken"}, "'tools' is text but not JSON", "wrong_type"),
    ({"chat_template_kwargs": ["enable_thinking"]}, "'chat_template_kwargs' must be an object of template variables", "wrong_type"),
    ({"chat_template_kwargs": {"add_generation_prompt": False}},
     "'chat_template_kwargs': 'add_generation_prompt' is not a chat template variable", "invalid"),
])
def test_bad_template_columns_name_the_row_and_field(extra, message, reason):
    with pytest.raises(DataError, match=f"d, row 2: {message}"):
        normalize([row(), row(**extra)], "d")
    assert normalize([row(), row(**extra)], "d", on_error="skip").dropped == {reason: 1}


def test_tools_on_plain_text_pairs_are_refused_not_ignored():
    plain = {"prompt": "Weather in Paris?", "chosen": "Sunny.", "rejected": "No idea.", "tools": TOOLS}
    with pytest.raises(DataError, match="row 1: 'tools' need conversational pairs .*plain text, which is trained as written"):
        normalize([plain], "d")


def test_the_config_refuses_apply_chat_template_own_arguments(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps(row()) + "\n")
    config = load_config(overrides=[f"data.train={data}", "data.chat_template_kwargs.enable_thinking=false"])
    assert config.data.chat_template_kwargs == {"enable_thinking": False}
    with pytest.raises(ConfigError, match="data.chat_template_kwargs: 'tokenize' is not a chat template variable"):
        load_config(overrides=[f"data.train={data}", "data.chat_template_kwargs={tokenize: true}"])
    with pytest.raises(ConfigError, match="'data.chat_template_kwargs' must be a mapping"):
        load_config(overrides=[f"data.train={data}", "data.chat_template_kwargs=enable_thinking"])


def test_reasoning_is_kept_rendered_and_told_apart(tokenizer, chat_tokenizer):
    """Replies that differ only in their reasoning are different replies; a template that drops the
    reasoning (plain ChatML) is refused instead of training on what is left."""
    think = lambda thought: [{"role": "assistant", "content": "Sunny.", "reasoning_content": thought}]  # noqa: E731
    result = normalize([row(chosen=think("Paris is in France."), rejected=think("Guess."))], "d")
    assert result.dropped == {} and result.pairs[0].chosen[0]["reasoning_content"] == "Paris is in France."
    (tp,), _ = tokenize_pairs(result.pairs, tokenizer, 4096, "drop")
    assert tokenizer.decode(tp.chosen_ids) == "<think>Paris is in France.</think>Sunny.<|im_end|>"
    with pytest.raises(DataError, match=r"'chosen': the chat template does not render an assistant's reasoning \('reasoning_content'\)"):
        tokenize_pairs(result.pairs, chat_tokenizer, 4096, "drop")
    # the prompt's earlier reasoning may be dropped by the template on purpose (Qwen3 keeps the last turn's)
    history = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello.", "reasoning_content": "Greet."},
               {"role": "user", "content": "Weather?"}]
    (pair,) = normalize([row(prompt=history)], "d").pairs
    assert tokenize_pairs([pair], chat_tokenizer, 4096, "drop")[1].kept == 1


def test_a_prompts_tool_call_left_out_is_refused_even_when_the_tools_name_it(chat_tokenizer):
    """A template that renders the tool definitions but not the calls: the call's name is in the
    text (from the definitions), yet the call is lost."""
    tok = copy.deepcopy(chat_tokenizer)
    calls = "{%- for call in message.get('tool_calls', []) %}{{- '<tool_call>' + call['function']['name'] + '</tool_call>' }}{%- endfor %}"
    assert calls in TEMPLATE
    tok.chat_template = TEMPLATE.replace(calls, "")
    call = {"type": "function", "id": "c1", "function": {"name": "get_weather", "arguments": "{}"}}
    history = [{"role": "user", "content": "Weather?"}, {"role": "assistant", "content": "", "tool_calls": [call]},
               {"role": "tool", "content": "sunny", "tool_call_id": "c1"}]
    (pair,) = normalize([row(prompt=history, tools=TOOLS)], "d").pairs
    with pytest.raises(DataError, match=r"'prompt': the chat template does not render tool calls \(the call to get_weather is left out\): "
                       r"its text is the same without them. Use a tokenizer whose template renders 'tool_calls'"):
        tokenize_pairs([pair], tok, 4096, "drop")


def test_convert_writes_the_columns_trl_reads(tmp_path, capsys):
    source = tmp_path / "in.jsonl"
    source.write_text(json.dumps(row(tools=json.dumps(TOOLS))) + "\n" + json.dumps(row()) + "\n")
    target = tmp_path / "out.jsonl"
    main(["data", "convert", str(source), str(target), "data.chat_template_kwargs={enable_thinking: false}"])
    first, second = [json.loads(line) for line in target.read_text().splitlines()]
    assert first["tools"] == TOOLS and first["chat_template_kwargs"] == {"enable_thinking": False}
    assert "tools" not in second and second["chat_template_kwargs"] == {"enable_thinking": False}
    assert [p.template_kwargs for p in normalize([first, second], "out").pairs] == [
        {"enable_thinking": False, "tools": TOOLS}, {"enable_thinking": False}]


def test_a_plain_text_dataset_says_the_variables_are_not_used(tmp_path, chat_tokenizer, monkeypatch):
    monkeypatch.setenv("DPOKIT_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps({"prompt": "Hi", "chosen": " Hello.", "rejected": " Go."}) + "\n")
    data = load_data(DataConfig(train=DataSource(str(path)), chat_template_kwargs={"enable_thinking": False}),
                     chat_tokenizer, seed=0, log=lambda line: None)
    assert any("data.chat_template_kwargs is not used" in note for note in data.stats["train"].notes)


def test_generation_renders_prompts_with_the_same_variables(tmp_path, tokenizer):
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps(row(tools=TOOLS)) + "\n" + json.dumps(row()) + "\n")
    prompts, variables = prompts_from_data(str(path), 2, data=DataConfig(chat_template_kwargs={"enable_thinking": False}))
    assert variables == [{"enable_thinking": False, "tools": TOOLS}, {"enable_thinking": False}]
    (pair,) = normalize([row(tools=TOOLS)], "d").pairs
    trained = tokenize_pairs([pair], tokenizer, 4096, "drop", template_kwargs={"enable_thinking": False})[0][0].prompt_ids
    assert encode_prompt(prompts[0], tokenizer, variables[0]) == trained
    conversation = Conversation(turns=[{"role": "user", "content": "Weather in Paris?"}], template_kwargs={"enable_thinking": False})
    ids = _fit_context(conversation, tokenizer, None, 8, io.StringIO())
    assert tokenizer.decode(ids).endswith("<|im_start|>assistant\n<think></think>")



def test_the_end_of_turn_marker_is_found_with_the_configured_variables(chat_tokenizer):
    """A template whose end-of-turn text comes from a variable (here ``eot``) writes it only with
    data.chat_template_kwargs: the marker is looked for with them, so a reply is its content and
    that marker, not the marker, the newline after it and an EOS besides."""
    from dpokit.data.formats import Pair
    from dpokit.data.tokenize import end_of_turn_marker

    tok = copy.deepcopy(chat_tokenizer)
    tok.chat_template = ("{% for m in messages %}{{ m['role'] + ': ' + m['content'] + eot + '\\n' }}{% endfor %}"
                         "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}")
    kwargs = {"eot": "<|im_end|>"}
    assert end_of_turn_marker(tok, kwargs) == "<|im_end|>"
    pair = Pair([{"role": "user", "content": "Hi"}], [{"role": "assistant", "content": "Yes."}], [{"role": "assistant", "content": "No."}])
    (tp,), _ = tokenize_pairs([pair], tok, 512, "drop", template_kwargs=kwargs)
    assert tok.decode(tp.chosen_ids) == "Yes.<|im_end|>" and tok.decode(tp.rejected_ids) == "No.<|im_end|>"
