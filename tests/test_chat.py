"""``dpokit chat`` driven through stdin: streamed replies, /system, /reset, /save, /exit, end of input."""

import io
import json
import shutil
import sys

import pytest

from dpokit.chat import Conversation, _fit_context
from dpokit.generate import context_limit
from dpokit.cli import main
from dpokit.generate import encode_prompt
from dpokit.resolve import load_model_tokenizer, model_config, resolve_model


def _chat(monkeypatch, capsys, model, script: str, *flags: str) -> str:
    monkeypatch.setattr(sys, "stdin", io.StringIO(script))
    main(["chat", str(model), "--max-new-tokens", "6", "--temperature", "1.0", *flags])
    return capsys.readouterr().out


def test_chat_commands_and_saved_conversation(workdir, tmp_path, monkeypatch, capsys):
    saved, after_reset, no_system = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "c.json"
    script = (
        "Tell me about the moon.\n"
        "/system You are brief.\n"
        "\n"
        "And the sun?\n"
        f"/save {saved}\n"
        "/reset\n"
        f"/save {after_reset}\n"
        "/system\n"
        f"/save {no_system}\n"
        "/nope\n"
        "/exit\n"
        "this line comes after /exit\n"
    )
    out = _chat(monkeypatch, capsys, workdir / "model", script, "--system", "You are kind.")
    messages = json.loads(saved.read_text())
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user", "assistant"]
    assert messages[0]["content"] == "You are brief."  # /system replaced --system
    assert [messages[1]["content"], messages[3]["content"]] == ["Tell me about the moon.", "And the sun?"]
    for reply in (messages[2]["content"], messages[4]["content"]):
        assert reply in out  # what was streamed is what was kept
    assert any(m["content"] for m in messages if m["role"] == "assistant")
    assert json.loads(after_reset.read_text()) == [{"role": "system", "content": "You are brief."}]
    assert json.loads(no_system.read_text()) == []
    assert "unknown command /nope" in out and "(conversation cleared)" in out
    assert "after /exit" not in out


def test_chat_ends_at_end_of_input_and_is_reproducible(workdir, monkeypatch, capsys):
    first = _chat(monkeypatch, capsys, workdir / "model", "hello\nhow are you?\n")  # no /exit: EOF ends it
    second = _chat(monkeypatch, capsys, workdir / "model", "hello\nhow are you?\n")
    assert first == second and first.count("\n") >= 3  # banner + two streamed replies


def test_chat_needs_a_chat_template(workdir, tmp_path, monkeypatch, capsys):
    plain = tmp_path / "plain"
    shutil.copytree(workdir / "model", plain)
    (plain / "chat_template.jinja").unlink()
    config = json.loads((plain / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (plain / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(SystemExit) as exc:
        _chat(monkeypatch, capsys, plain, "hi\n")
    assert exc.value.code == 2
    assert "no chat template" in capsys.readouterr().err


def test_long_conversations_drop_the_oldest_exchanges(workdir):
    resolved = resolve_model(str(workdir / "model"))
    tokenizer = load_model_tokenizer(resolved, model_config(resolved))
    turns = []
    for i in range(3):
        turns += [{"role": "user", "content": f"question {i} " * 5}, {"role": "assistant", "content": f"answer {i} " * 5}]
    turns.append({"role": "user", "content": "last question"})
    conversation, out = Conversation(system="sys", turns=list(turns)), io.StringIO()
    last_two = Conversation(system="sys", turns=turns[-3:]).messages()
    limit = len(encode_prompt(last_two, tokenizer)) + 4
    ids = _fit_context(conversation, tokenizer, limit, 4, out)
    assert ids == encode_prompt(last_two, tokenizer) and conversation.turns == turns[-3:]
    assert "dropped the 2 oldest" in out.getvalue()
    tiny = Conversation(turns=[{"role": "user", "content": "far too long " * 50}])
    assert _fit_context(tiny, tokenizer, 20, 4, out) is None and tiny.turns == []
    # a message too long even alone is refused, and the conversation before it is kept whole
    kept = Conversation(system="sys", turns=turns[:-1] + [{"role": "user", "content": "far too long " * 50}])
    assert _fit_context(kept, tokenizer, limit, 4, out) is None and kept.turns == turns[:-1]


def test_the_context_of_an_image_text_model_is_its_language_models():
    """Gemma 3's image-text config keeps max_position_embeddings in its text_config."""
    from transformers import AutoConfig

    config = AutoConfig.for_model("gemma3", text_config={"max_position_embeddings": 640})
    assert context_limit(config) == 640
    assert context_limit(AutoConfig.for_model("qwen2", max_position_embeddings=320)) == 320
