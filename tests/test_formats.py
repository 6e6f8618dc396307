"""Every dataset shape users bring, with rows shaped like the real datasets', and every bad input.

Fixture rows copy the structure (column names, types, nesting, role names, extra columns) of
the public datasets named in each function; the texts are made up.
"""

from __future__ import annotations

import copy
import json
import typing

import pytest

from dpokit.config import Columns, FormatName
from dpokit.data.formats import SHAPES, Pair, normalize, to_pairs
from dpokit.data.sources import MAX_SHOWN, DataError


def msg(role: str, content: str) -> dict:
    return {"role": role, "content": content}


def user(content: str) -> dict:
    return msg("user", content)


def bot(content: str) -> dict:
    return msg("assistant", content)


# ----------------------------------------------------------------------------- real-shaped rows


def hh_rlhf_rows() -> list[dict]:
    """Anthropic/hh-rlhf: two transcripts per row, every turn after "\\n\\n", replies may hold blank lines."""
    return [
        {
            "chosen": "\n\nHuman: What are some good ways to cook rice?\n\nAssistant: Rinse it first, then simmer it "
            "covered.\n\nUse a tight lid.\n\nHuman: How much water should I use?\n\nAssistant: About one and a half "
            "cups of water per cup of white rice.",
            "rejected": "\n\nHuman: What are some good ways to cook rice?\n\nAssistant: Rinse it first, then simmer it "
            "covered.\n\nUse a tight lid.\n\nHuman: How much water should I use?\n\nAssistant: Just a lot.",
        },
        {
            "chosen": "\n\nHuman: Can you tell me a joke?\n\nAssistant: Why did the cat sit on the computer? To keep an eye on the mouse.",
            "rejected": "\n\nHuman: Can you tell me a joke?\n\nAssistant: No.",
        },
    ]


def align_anything_rows() -> list[dict]:
    """PKU-Alignment/Align-Anything, subset text-to-text: two responses, per-aspect ratings, overall_response."""
    base = {
        "question": "How can I sleep better at night?",
        "response_1": "Keep a regular schedule, avoid screens before bed and keep the room dark and cool.",
        "response_2": "Sleep more.",
        "p_response": 1, "prompt_following_rate_1": 3, "prompt_following_rate_2": 1,
        "p_rationale_1": "Follows the question.", "p_rationale_2": "Too short.",
        "o_response": 1, "objective_rules_rate_1": 3, "objective_rules_rate_2": 3,
        "o_rationale_1": "Correct.", "o_rationale_2": "Not wrong.",
        "c_response": 1, "clarity_rate_1": 3, "clarity_rate_2": 2, "c_rationale_1": "Clear.", "c_rationale_2": "Vague.",
        "i_response": 1, "information_richness_rate_1": 3, "information_richness_rate_2": 1,
        "i_rationale_1": "Rich.", "i_rationale_2": "Poor.",
        "s_response": 1, "safety_rate_1": 3, "safety_rate_2": 3, "s_rationale_1": "Safe.", "s_rationale_2": "Safe.",
        "text_critique_1": "A useful answer.", "text_critique_2": "Unhelpful.",
        "overall_response": 1, "overall_textfeedback": "Response 1 is better: it gives concrete advice.",
    }
    second = dict(base, question="Write a haiku about rain.", response_1="Rain.",
                  response_2="Soft rain on the roof / the garden drinks in silence / puddles hold the sky",
                  overall_response=2)
    return [base, second]


def minimind_rows() -> list[dict]:
    """MiniMind dpo.jsonl: whole conversations, content before role, Chinese text."""
    return [
        {
            "chosen": [{"content": "你好，请介绍一下你自己。", "role": "user"},
                       {"content": "你好！我是一个人工智能助手，可以回答问题和写作。", "role": "assistant"}],
            "rejected": [{"content": "你好，请介绍一下你自己。", "role": "user"},
                         {"content": "不知道。", "role": "assistant"}],
        },
        {
            "chosen": [{"content": "一加一等于几？", "role": "user"}, {"content": "一加一等于二。", "role": "assistant"}],
            "rejected": [{"content": "一加一等于几？", "role": "user"}, {"content": "三。", "role": "assistant"}],
        },
    ]


def orpo_mix_rows() -> list[dict]:
    """mlabonne/orpo-dpo-mix-40k: source, chosen/rejected whole conversations (some with a system
    message, some multi-turn), and prompt/question strings repeating the user's request."""
    system = msg("system", "You are an AI assistant. You will be given a task. You must generate a detailed answer.")
    q1 = "Translate to French: The cat sleeps."
    q2 = "What is the capital of Australia?"
    return [
        {"source": "argilla/distilabel-intel-orca-dpo-pairs",
         "chosen": [system, user(q1), bot("Le chat dort.")],
         "rejected": [system, user(q1), bot("The cat sleeps in French is chat.")],
         "prompt": q1, "question": q1},
        {"source": "argilla/Capybara-Preferences",
         "chosen": [user(q2), bot("Canberra."), user("And its population?"), bot("About 470,000 people.")],
         "rejected": [user(q2), bot("Canberra."), user("And its population?"), bot("Ten.")],
         "prompt": q2, "question": q2},
    ]


def ultrafeedback_rows() -> list[dict]:
    """HuggingFaceH4/ultrafeedback_binarized: prompt string, conversations repeating it, messages, scores."""
    rows = []
    for i, (good, bad, sc, sr) in enumerate([("Paris is the capital of France.", "Lyon.", 9.0, 3.5),
                                              ("Water boils at 100 degrees Celsius at sea level.", "At 50.", 8.5, 2.0)]):
        prompt = ["What is the capital of France?", "At what temperature does water boil?"][i]
        chosen = [user(prompt), bot(good)]
        rows.append({"prompt": prompt, "prompt_id": f"{i:064x}", "chosen": chosen, "rejected": [user(prompt), bot(bad)],
                     "messages": copy.deepcopy(chosen), "score_chosen": sc, "score_rejected": sr})
    return rows


def sharegpt_rows() -> list[dict]:
    """LLaMA-Factory ranking data in ShareGPT form: conversations + chosen/rejected message objects,
    optional system; tool use through function_call / observation."""
    return [
        {"conversations": [{"from": "human", "value": "What is the best way to learn Python?"}],
         "chosen": {"from": "gpt", "value": "Write small programs every day and read other people's code."},
         "rejected": {"from": "gpt", "value": "Don't."}},
        {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello! How can I help?"},
                           {"from": "human", "value": "What is the weather in Paris?"},
                           {"from": "function_call", "value": '{"name": "weather", "arguments": {"city": "Paris"}}'},
                           {"from": "observation", "value": '{"temperature": 21, "sky": "clear"}'}],
         "chosen": {"from": "gpt", "value": "It is 21 degrees and clear in Paris."},
         "rejected": {"from": "gpt", "value": "I cannot know that."},
         "system": "You are a weather assistant."},
    ]


def trl_standard_rows() -> list[dict]:
    return [{"prompt": "The sky is", "chosen": " blue.", "rejected": " green."},
            {"prompt": "Water is", "chosen": " wet.", "rejected": " dry."}]


def trl_standard_implicit_rows() -> list[dict]:
    return [{"chosen": "The sky is blue.", "rejected": "The sky is green."},
            {"chosen": "Water is wet.", "rejected": "Water is made of fire."}]


def trl_conversational_rows() -> list[dict]:
    return [{"prompt": [user("What color is the sky?")], "chosen": [bot("It is blue.")], "rejected": [bot("It is green.")]},
            {"prompt": [msg("system", "Be brief."), user("Hi")], "chosen": [bot("Hello!")], "rejected": [bot("What?")]}]


def trl_implicit_rows() -> list[dict]:
    return [{"chosen": [user("What color is the sky?"), bot("It is blue.")],
             "rejected": [user("What color is the sky?"), bot("It is green.")]}]


FIXTURES = {
    "hh-rlhf": hh_rlhf_rows,
    "align-anything": align_anything_rows,
    "conversational-implicit": minimind_rows,
    "ultrafeedback": ultrafeedback_rows,
    "sharegpt": sharegpt_rows,
    "standard": trl_standard_rows,
    "standard-implicit": trl_standard_implicit_rows,
    "conversational": trl_conversational_rows,
}


def _error(rows, origin="data/train.jsonl", **options) -> str:
    with pytest.raises(DataError) as e:
        normalize(rows, origin, **options)
    return str(e.value)


# ----------------------------------------------------------------------------- detection + parsing


def test_every_format_name_is_in_the_config_schema():
    assert set(typing.get_args(FormatName)) == {"auto"} | {s.name for s in SHAPES}


@pytest.mark.parametrize("name, make", [*FIXTURES.items(), ("conversational-implicit", orpo_mix_rows), ("conversational-implicit", trl_implicit_rows)])
def test_format_is_detected_and_override_agrees(name, make):
    result = normalize(make(), "d.jsonl")
    assert (result.format, result.detected) == (name, True)
    assert result.dropped == {} and len(result.pairs) == len(make())
    forced = normalize(make(), "d.jsonl", format=name)
    assert forced.pairs == result.pairs and forced.detected is False


def test_hh_rlhf_prompt_is_the_shared_turns_reply_the_last():
    (multi, single), _ = to_pairs(hh_rlhf_rows(), "hh")
    assert multi.prompt == [
        user("What are some good ways to cook rice?"),
        bot("Rinse it first, then simmer it covered.\n\nUse a tight lid."),  # blank lines stay inside a turn
        user("How much water should I use?"),
    ]
    assert multi.chosen == [bot("About one and a half cups of water per cup of white rice.")]
    assert multi.rejected == [bot("Just a lot.")]
    assert single.prompt == [user("Can you tell me a joke?")] and single.rejected == [bot("No.")]


def test_hh_rlhf_turns_lose_the_spaces_around_them():
    """Real rows carry stray spaces and newlines around turns ("Human: hi \n\nAssistant:  Sure. \n"):
    a chat template would render them into the prompt, and replies differing only there are one reply."""
    row = {"chosen": "\n\nHuman:  How do I boil an egg? \n\nAssistant:  Put it in boiling water for 9 minutes. \n",
           "rejected": "\n\nHuman:  How do I boil an egg? \n\nAssistant: Fry it.\n\n"}
    (pair,), _ = to_pairs([row], "hh")
    assert pair.prompt == [user("How do I boil an egg?")]
    assert pair.chosen == [bot("Put it in boiling water for 9 minutes.")] and pair.rejected == [bot("Fry it.")]


def test_hh_rlhf_rows_whose_leading_turns_differ_are_reported():
    rows = hh_rlhf_rows()
    rows[1]["rejected"] = "\n\nHuman: Can you tell me a story?\n\nAssistant: No."
    msg_ = _error(rows)
    assert msg_.startswith("data/train.jsonl, row 2: 'rejected' turn 1 differs from turn 1 of 'chosen'")
    assert "must be the same in both transcripts" in msg_ and "on_error=skip" in msg_
    rows[1]["rejected"] = rows[1]["chosen"].replace("joke?", "joke?\n\nAssistant: Sure.\n\nHuman: Go on.")
    assert "row 2: 'rejected' turn 2 differs" in _error(rows)
    skipped = normalize(rows, "hh", on_error="skip")
    assert len(skipped.pairs) == 1 and skipped.dropped == {"leading_turns_differ": 1}


def test_hh_rlhf_empty_last_reply_and_human_last():
    rows = hh_rlhf_rows()
    rows[0]["chosen"] = "\n\nHuman: What are some good ways to cook rice?\n\nAssistant:"  # as in some real rows
    rows[0]["rejected"] = "\n\nHuman: What are some good ways to cook rice?\n\nAssistant: Boil it."
    assert "row 1: 'chosen' reply is empty" in _error(rows)
    rows[0]["chosen"] = "\n\nHuman: Hi\n\nAssistant: Hello\n\nHuman: Bye"
    assert "row 1: 'chosen' ends with a Human turn" in _error(rows)
    rows[0] = {"chosen": "\n\nHuman: \n\nAssistant: Hi there", "rejected": "\n\nHuman: \n\nAssistant: Yo"}
    assert "row 1: the Human turns before the Assistant's reply are empty; every pair needs a prompt" in _error(rows)


def test_align_anything_overall_response_picks_the_better():
    first, second = to_pairs(align_anything_rows(), "aa")[0]
    assert first == Pair([user("How can I sleep better at night?")],
                         [bot("Keep a regular schedule, avoid screens before bed and keep the room dark and cool.")],
                         [bot("Sleep more.")])
    assert second.chosen[0]["content"].startswith("Soft rain") and second.rejected == [bot("Rain.")]
    rows = align_anything_rows()
    rows[1]["overall_response"] = "2"  # a string id works too
    assert to_pairs(rows, "aa")[0][1] == second
    rows[1]["overall_response"] = 3
    msg_ = _error(rows)
    assert msg_.startswith("data/train.jsonl, row 2: 'overall_response' must be 1 or 2") and "got 3" in msg_
    for bad in ("inf", float("inf"), float("nan")):  # inf was an OverflowError traceback
        rows[1]["overall_response"] = bad
        assert _error(rows).startswith("data/train.jsonl, row 2: 'overall_response' must be 1 or 2")
    rows = align_anything_rows()
    rows[0]["response_2"] = None
    assert _error(rows).startswith("data/train.jsonl, row 1: 'response_2' is null (align-anything rows need")


def test_conversations_with_the_prompt_inside():
    (first, second), _ = to_pairs(minimind_rows(), "minimind")
    assert first.prompt == [user("你好，请介绍一下你自己。")] and first.rejected == [bot("不知道。")]
    orca, capybara = to_pairs(orpo_mix_rows(), "orpo")[0]
    assert [m["role"] for m in orca.prompt] == ["system", "user"]  # the prompt column is not used
    assert orca.chosen == [bot("Le chat dort.")]
    assert [m["role"] for m in capybara.prompt] == ["user", "assistant", "user"]
    assert capybara.rejected == [bot("Ten.")]


def test_conversational_replies_that_repeat_the_prompt_keep_only_what_follows_it():
    """Under format: conversational, chosen/rejected may be whole conversations (ultrafeedback_binarized
    writes them so): the copy of the prompt they start with is removed, whole, and a bad message is
    numbered where it is in the conversation. A reply that starts like the prompt but differs is kept
    as given (and refused: it does not start with the assistant)."""
    result = normalize(ultrafeedback_rows(), "uf.jsonl", format="conversational")
    assert result.pairs[0] == Pair([user("What is the capital of France?")], [bot("Paris is the capital of France.")], [bot("Lyon.")])
    assert result.pairs[1].rejected == [bot("At 50.")]
    system = msg("system", "Answer in one word.")
    row = {"prompt": [system, user("Capital of France?")],
           "chosen": [system, user("Capital of France?"), bot("Paris.")],
           "rejected": [system, user("Capital of France?"), bot("Lyon.")]}
    (pair,), _ = to_pairs([row], "c", format="conversational")
    assert pair == Pair([system, user("Capital of France?")], [bot("Paris.")], [bot("Lyon.")])
    bad = copy.deepcopy(row)
    bad["rejected"].append({"role": "human", "content": "Sure?"})
    assert _error([bad], format="conversational").startswith(
        "data/train.jsonl, row 1: 'rejected' message 4: role 'human' is not one of system, user, assistant, tool")
    partial = copy.deepcopy(row)
    partial["chosen"] = [system, user("Capital of Spain?"), bot("Madrid.")]
    assert _error([partial], format="conversational").startswith(
        "data/train.jsonl, row 1: 'chosen' reply must start with an assistant message, got role 'system'")


def test_ultrafeedback_keeps_scores_as_metadata():
    pairs, _ = to_pairs(ultrafeedback_rows(), "uf")
    assert pairs[0] == Pair([user("What is the capital of France?")], [bot("Paris is the capital of France.")], [bot("Lyon.")])
    assert pairs[0].meta == {"score_chosen": 9.0, "score_rejected": 3.5}
    rows = ultrafeedback_rows()
    for row in rows:  # optional: without scores the rows read the same (as conversational-implicit)
        del row["score_chosen"], row["score_rejected"]
    assert to_pairs(rows, "uf")[0] == pairs and to_pairs(rows, "uf")[0][0].meta is None


def test_sharegpt_roles_system_and_tools():
    plain, tools = to_pairs(sharegpt_rows(), "sg")[0]
    assert plain == Pair([user("What is the best way to learn Python?")],
                         [bot("Write small programs every day and read other people's code.")], [bot("Don't.")])
    assert [m["role"] for m in tools.prompt] == ["system", "user", "assistant", "user", "assistant", "tool"]
    assert tools.prompt[0] == msg("system", "You are a weather assistant.")
    assert tools.chosen == [bot("It is 21 degrees and clear in Paris.")]
    rows = sharegpt_rows()
    rows[0]["conversations"][0]["from"] = "bot"
    msg_ = _error(rows)
    assert msg_.startswith("data/train.jsonl, row 1: 'conversations' message 1: 'from' is 'bot', not one of human, user, gpt")
    rows = sharegpt_rows()
    rows[1]["rejected"] = {"from": "gpt", "value": 42}
    assert _error(rows).startswith("data/train.jsonl, row 2: 'rejected': 'value' must be a string, got int")
    rows = sharegpt_rows()
    rows[1]["conversations"].append({"from": "gpt", "value": "Let me check."})  # the prompt ends with the assistant
    assert "row 2: 'chosen': role 'assistant' follows 'assistant', expected user or tool" in _error(rows)


def test_trl_standard_implicit_prompt_is_the_shared_words():
    pairs, _ = to_pairs(trl_standard_implicit_rows(), "s")
    assert pairs[0] == Pair("The sky is", " blue.", " green.")
    assert pairs[1] == Pair("Water is", " wet.", " made of fire.")
    msg_ = _error([{"chosen": "Blue.", "rejected": "Green."}])
    assert msg_.startswith("data/train.jsonl, row 1: 'prompt' is missing") and "add a 'prompt' column" in msg_
    # text without whitespace is cut where the replies first differ (Chinese; TRL does the same)
    (cjk,), _ = to_pairs([{"chosen": "你好世界，今天天气很好", "rejected": "你好世界，今天天气很差"}], "s")
    assert cjk == Pair("你好世界，今天天气很", "好", "差")
    msg_ = _error([{"chosen": "Same words here ", "rejected": "Same words here  "}])  # whitespace is no reply
    assert msg_.startswith("data/train.jsonl, row 1: 'chosen' is only whitespace after the text both replies start with")


def test_tool_calls_are_kept_for_the_chat_template():
    """OpenAI-style tool use: an assistant message's tool_calls (content may be null) and a tool
    result's tool_call_id and name are kept (kept as role and content alone, the call vanished into
    an empty assistant turn, and replies differing only in their calls were dropped as equal);
    OpenAI's older function_call is refused, said why."""
    call = lambda name: {"role": "assistant", "content": None, "tool_calls": [  # noqa: E731
        {"type": "function", "id": "c1", "function": {"name": name, "arguments": "{\"city\": \"Paris\"}"}}]}
    result = {"role": "tool", "tool_call_id": "c1", "name": "get_weather", "content": "18C"}
    rows = [{"prompt": [user("Weather in Paris?")], "chosen": [call("get_weather")], "rejected": [call("get_time")]},
            {"prompt": [user("Weather in Paris?"), call("get_weather"), result],
             "chosen": [bot("It is 18C and sunny.")], "rejected": [bot("No idea.")]}]
    (first, second), dropped = to_pairs(rows, "tools")
    assert not dropped
    assert first.chosen == [{"role": "assistant", "content": "", "tool_calls": call("get_weather")["tool_calls"]}]
    assert first.chosen != first.rejected
    assert second.prompt[2] == result
    legacy = [{"prompt": [user("Hi")], "chosen": [{"role": "assistant", "content": None,
                                                    "function_call": {"name": "f", "arguments": "{}"}}],
               "rejected": [bot("No.")]}]
    assert _error(legacy).startswith("data/train.jsonl, row 1: 'chosen' message 1 has a function_call (OpenAI's older form)")
    assert normalize(legacy + trl_conversational_rows(), "d", on_error="skip").dropped == {"unsupported": 1}


def test_column_mapping():
    rows = [{"question": "The sky is", "good": " blue.", "bad": " green.", "id": 1}]
    pairs, _ = to_pairs(rows, "m", columns={"prompt": "question", "chosen": "good", "rejected": "bad"})
    assert pairs == [Pair("The sky is", " blue.", " green.")]
    chat = [{"instruction": [user("Hi")], "good": [bot("Hello!")], "bad": [bot("Go.")], "sys": "Be kind."}]
    (pair,), _ = to_pairs(chat, "m", columns=Columns(prompt="instruction", chosen="good", rejected="bad", system="sys"))
    assert pair.prompt == [msg("system", "Be kind."), user("Hi")]
    rows.append({"question": "Water is", "good": " wet."})
    msg_ = _error(rows, columns={"prompt": "question", "chosen": "good", "rejected": "bad"})
    assert msg_.startswith("data/train.jsonl, row 2: 'bad' is missing (data.columns.rejected names it; this row has columns: good, question)")


def test_system_prompt_for_rows_without_one():
    rows = trl_conversational_rows()
    pairs, _ = to_pairs(rows, "c", system_prompt="You are terse.")
    assert pairs[0].prompt == [msg("system", "You are terse."), user("What color is the sky?")]
    assert pairs[1].prompt[0] == msg("system", "Be brief.")  # a row's own system message stays
    sg, _ = to_pairs(sharegpt_rows(), "sg", system_prompt="You are terse.")
    assert sg[0].prompt[0] == msg("system", "You are terse.")
    assert sg[1].prompt[0] == msg("system", "You are a weather assistant.")  # the system column wins
    plain, _ = to_pairs(trl_standard_rows(), "s", system_prompt="You are terse.")
    assert plain == to_pairs(trl_standard_rows(), "s")[0]  # plain text has no roles (the pipeline says so)


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "name, row, field, edit, expected, reason",
    [
        ("conversational", 2, "prompt", lambda r: r.pop("prompt"), "'prompt' is missing", "missing_field"),
        ("conversational", 1, "chosen", lambda r: r["chosen"][0].update(content=7), "'chosen' message 1: 'content' must be a string, got int", "wrong_type"),
        ("conversational", 1, "rejected", lambda r: r["rejected"][0].update(content="  "), "'rejected' reply is empty", "empty"),
        ("conversational", 2, "prompt", lambda r: r["prompt"].reverse(), "'prompt' message 2: role 'system' follows 'user', expected assistant", "roles_out_of_order"),
        ("conversational", 1, "prompt", lambda r: r.update(prompt=[bot("Hi")]), "'prompt' message 1: role 'assistant' comes first, expected system or user", "roles_out_of_order"),
        ("conversational", 1, "prompt", lambda r: r.update(prompt=[{"role": "human", "content": "Hi"}]), "'prompt' message 1: role 'human' is not one of system, user, assistant, tool", "unknown_role"),
        ("conversational-implicit", 2, "chosen", lambda r: [r[k].insert(1, user("again")) for k in ("chosen", "rejected")], "'chosen' message 2: role 'user' follows 'user'", "roles_out_of_order"),
        ("conversational-implicit", 1, "chosen", lambda r: r["rejected"][0].update(content="你好"), "'chosen' and 'rejected' share no leading messages", "leading_turns_differ"),
        ("ultrafeedback", 2, "rejected", lambda r: r["rejected"][1].update(content=""), "'rejected' reply is empty", "empty"),
        ("sharegpt", 2, "chosen", lambda r: r.pop("chosen"), "'chosen' is missing (sharegpt rows need", "missing_field"),
        ("align-anything", 2, "question", lambda r: r.update(question=["not", "text"]), "'question' must be a string, got list", "wrong_type"),
        ("standard", 2, "chosen", lambda r: r.update(chosen=""), "'chosen' is empty", "empty"),
        ("hh-rlhf", 2, "chosen", lambda r: r.update(chosen=3), "'chosen' must be a string, got int", "wrong_type"),
    ],
)
def test_bad_rows_name_file_row_field_and_fix(name, row, field, edit, expected, reason):
    rows = FIXTURES[name]()
    edit(rows[row - 1])
    msg_ = _error(rows)
    assert msg_.startswith(f"data/train.jsonl, row {row}: '{field}'"), msg_
    assert expected in msg_, msg_
    assert msg_.endswith("Fix or remove that row, or set data.on_error=skip to drop bad rows (they are counted by reason)"), msg_
    skipped = normalize(rows, "data/train.jsonl", on_error="skip")
    assert skipped.dropped == {reason: 1} and len(skipped.pairs) == len(rows) - 1
    assert skipped.problems.examples == [msg_.split(". Fix or remove")[0]]


def test_jsonl_lines_are_named_by_line_number():
    rows = trl_standard_rows()
    rows[1]["rejected"] = 5
    msg_ = _error(rows, lines=[3, 9])
    assert msg_.startswith("data/train.jsonl, line 9: 'rejected' must be a string")


@pytest.mark.parametrize("name", list(FIXTURES))
def test_chosen_identical_to_rejected_is_dropped_and_counted(name):
    rows = FIXTURES[name]()
    if name == "align-anything":
        rows[0]["response_2"] = rows[0]["response_1"]
    else:
        rows[0]["rejected"] = copy.deepcopy(rows[0]["chosen"])
    result = normalize(rows, "d")
    assert result.dropped == {"chosen_equals_rejected": 1} and len(result.pairs) == len(rows) - 1


def test_skip_counts_every_bad_row_by_reason_and_keeps_the_first_few():
    rows = [row for _ in range(6) for row in trl_conversational_rows()]
    for i in (1, 3, 5, 7):
        rows[i]["chosen"] = "not a list"
    for i in (2, 4, 6):
        rows[i]["prompt"] = [bot("Hi")]
    rows[8]["rejected"] = copy.deepcopy(rows[8]["chosen"])
    result = normalize(rows, "d.jsonl", on_error="skip")
    assert result.dropped == {"wrong_type": 4, "roles_out_of_order": 3, "chosen_equals_rejected": 1}
    assert result.problems.counts == {"wrong_type": 4, "roles_out_of_order": 3}
    assert len(result.problems.examples) == MAX_SHOWN == 5
    assert result.problems.examples[0].startswith("d.jsonl, row 2: 'chosen' must be a list")
    assert result.problems.examples[1].startswith("d.jsonl, row 3: 'prompt' message 1: role 'assistant' comes first")
    assert len(result.pairs) == len(rows) - 8
    with pytest.raises(DataError, match="d.jsonl, row 2: 'chosen' must be a list"):
        normalize(rows, "d.jsonl")


def test_undetectable_rows_list_the_formats():
    msg_ = _error([{"question": "q", "good": "a", "bad": "b"}])
    assert msg_.startswith("data/train.jsonl, row 1: 'chosen' is missing")
    assert "The formats dpokit reads are sharegpt, align-anything, hh-rlhf, standard" in msg_
    assert "data.columns={prompt: question, chosen: good, rejected: bad}" in msg_
    # the rows a format fits decide
    rows = [{"junk": 1}] + trl_standard_rows()
    result = normalize(rows, "d", on_error="skip")
    assert result.format == "standard" and len(result.pairs) == 2 and result.dropped == {"missing_field": 1}


def test_a_broken_first_row_does_not_decide_the_format():
    """A first row with a null prompt looks like standard-implicit; the format is the one most rows
    have, so under skip that row is dropped (not the 200 good ones as mixed_shapes) and under raise
    the error names it, not the good row after it."""
    good = [{"prompt": f"Question {i}?", "chosen": " Yes.", "rejected": " No."} for i in range(200)]
    rows = [{"prompt": None, "chosen": "The sky is blue.", "rejected": "The sky is green."}] + good
    result = normalize(rows, "d.jsonl", on_error="skip")
    assert result.format == "standard" and len(result.pairs) == 200 and result.dropped == {"missing_field": 1}
    with pytest.raises(DataError, match=r"d.jsonl, row 1: 'prompt' is null"):
        normalize(rows, "d.jsonl")


def test_pairs_know_where_they_came_from():
    pairs, _ = to_pairs(hh_rlhf_rows(), "hh.jsonl", lines=[4, 7])
    assert [p.where for p in pairs] == ["hh.jsonl, line 4", "hh.jsonl, line 7"]
    assert json.dumps(pairs[0].prompt)  # plain JSON-able messages
