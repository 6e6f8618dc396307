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


def _streamed(chunks, markers) -> str:
    """What the chat streamer writes for text that arrives in ``chunks``, then the end of the reply."""
    from dpokit.chat import _streamer

    out = io.StringIO()
    streamer = _streamer(None, out, markers)
    for chunk in chunks:
        streamer.on_finalized_text(chunk)
    streamer.on_finalized_text("", stream_end=True)
    return out.getvalue()


@pytest.mark.parametrize("chunks, expected", [
    (["Hello <|en", "d|> and more"], "Hello \n"),  # a marker split over two chunks: nothing of it shown
    (["Hi <", "b> there"], "Hi <b> there\n"),  # held back, then shown once it cannot become a marker
    (["A</s>B<|end|>C"], "A\n"),  # the first of several markers ends the reply
    (["A<|end|>B</s>C"], "A\n"),
    (["no marker"], "no marker\n"),
])
def test_the_stream_stops_before_the_first_marker(chunks, expected):
    assert _streamed(chunks, ["<|end|>", "</s>"]) == expected


def test_a_text_that_could_start_a_marker_is_held_back_until_it_cannot():
    from dpokit.chat import _streamer

    out = io.StringIO()
    streamer = _streamer(None, out, ["<|end|>"])
    streamer.on_finalized_text("Hi <|")
    assert out.getvalue() == "Hi "  # "<|" may be the start of "<|end|>"
    streamer.on_finalized_text("x")
    assert out.getvalue() == "Hi <|x"


def test_commands_change_the_conversation_and_say_what_they_did(tmp_path):
    from dpokit.chat import command

    conversation, out = Conversation(), io.StringIO()
    assert command("/system  Be brief. ", conversation, out) and conversation.system == "Be brief."
    assert out.getvalue() == "(system prompt set)\n"
    conversation.turns += [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    saved = tmp_path / "new" / "c.json"
    assert command(f"/save {saved}", conversation, out)
    assert json.loads(saved.read_text()) == [{"role": "system", "content": "Be brief."}, *conversation.turns]
    assert out.getvalue().endswith(f"(saved 3 messages to {saved})\n")  # the system message counts
    assert command("/system", conversation, out) and conversation.system is None
    assert out.getvalue().endswith("(system prompt removed)\n")
    assert command("/save", conversation, out) and out.getvalue().endswith("usage: /save FILE\n")
    (tmp_path / "afile").write_text("")
    for unwritable in (tmp_path / "afile" / "c.json", tmp_path):  # below a file; a folder
        assert command(f"/save {unwritable}", conversation, out)
        assert out.getvalue().splitlines()[-1].startswith(f"could not save to {unwritable}: ")
        assert out.getvalue().endswith("; the conversation is kept\n")
    assert len(conversation.turns) == 2
    assert command("/exit", conversation, out) is False


def test_input_lines_lose_their_line_end_only():
    from dpokit.chat import _read_line

    stdin, out = io.StringIO("hi there \r\nsecond\n"), io.StringIO()
    assert _read_line(stdin, out, False) == "hi there "  # a Windows line end too
    assert _read_line(stdin, out, False) == "second"
    assert _read_line(stdin, out, False) is None


def test_an_interrupted_reply_drops_its_message(monkeypatch):
    """Ctrl-C while a reply is generated: the unanswered message goes, the chat goes on."""
    import dpokit.chat
    from dpokit.chat import chat_loop
    from dpokit.generate import SamplingSettings

    def reply(model, tokenizer, conversation, settings, out):
        if conversation.turns[-1]["content"] == "stop":
            raise KeyboardInterrupt
        conversation.turns.append({"role": "assistant", "content": "ok"})

    monkeypatch.setattr(dpokit.chat, "prepare_for_generation", lambda *a: None)
    monkeypatch.setattr(dpokit.chat, "reply", reply)
    out = io.StringIO()
    conversation = chat_loop(None, None, Conversation(), SamplingSettings(), io.StringIO("hi\nstop\nagain\n"), out)
    assert conversation.turns == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"},
                                  {"role": "user", "content": "again"}, {"role": "assistant", "content": "ok"}]
    assert "(interrupted; that message was dropped)" in out.getvalue()


def test_room_is_left_for_the_reply_when_old_exchanges_are_dropped(chat_tokenizer):
    """Dropping stops only once prompt + max_new_tokens fits, not once the prompt alone does."""
    turns = []
    for i in range(3):
        turns += [{"role": "user", "content": f"question {i} " * 5}, {"role": "assistant", "content": f"answer {i} " * 5}]
    turns.append({"role": "user", "content": "last question"})
    one_dropped = len(encode_prompt(Conversation(turns=turns[2:]).messages(), chat_tokenizer))
    two_dropped = encode_prompt(Conversation(turns=turns[4:]).messages(), chat_tokenizer)
    limit, max_new_tokens = one_dropped + 2, 4  # the prompt without one exchange fits, but not with the reply
    assert len(two_dropped) + max_new_tokens <= limit
    conversation, out = Conversation(turns=list(turns)), io.StringIO()
    assert _fit_context(conversation, chat_tokenizer, limit, max_new_tokens, out) == two_dropped
    assert conversation.turns == turns[4:] and "dropped the 2 oldest exchange(s)" in out.getvalue()


def test_chat_with_a_run_renders_with_the_runs_template_variables(workdir, tmp_path, monkeypatch):
    """The run rendered its pairs with data.chat_template_kwargs: its chat renders the conversation with them too."""
    import dpokit.chat
    from dpokit.chat import chat
    from dpokit.config import save_config
    from runs import run_config

    run = tmp_path / "run"
    shutil.copytree(workdir / "model", run / "final")
    save_config(run_config(workdir, "unused", "chat_template_kwargs={enable_thinking: false}"), run / "config.yaml")
    started = []
    monkeypatch.setattr(dpokit.chat, "chat_loop", lambda model, tokenizer, conversation, *a, **k: started.append(conversation))
    chat(str(run), stdin=io.StringIO(""), stdout=io.StringIO())
    assert started[0].template_kwargs == {"enable_thinking": False}
