"""Tool-calling conversations: OpenAI `tools` + assistant `tool_calls` + `tool` turns, and ShareGPT's
function_call/observation turns (LLaMA-Factory's glaive_toolcall_en_demo.json), rendered with the tools through the
chat template; the loss covers assistant turns and their calls, never tool results; the exported template renders
the same ids at inference; ShareGPT role maps and system columns; bad rows named."""

import json

import pytest
from transformers import AutoTokenizer

from automodel.config import ConfigError, DataSourceConfig
from automodel.data import CHAT_TEMPLATES, FormatOptions, load_examples, tokenize_examples
from automodel.data.formats import BadRow, chat, messages_of, tools_of
from automodel.loss import IGNORE_INDEX
from tests.helpers import shared_data

CHATML = FormatOptions(chat_template="chatml")


@pytest.fixture(scope="module")
def gpt2():
    return AutoTokenizer.from_pretrained(shared_data("gpt2-tokenizer"))


@pytest.fixture(scope="module")
def glaive():
    return json.loads(shared_data("llamafactory-demos/glaive_toolcall_en_demo.json").read_text())


def options(tok, **kw):
    return FormatOptions(chat_template="chatml", tokenizer=tok, **kw)


def spans(tset, tok, trained=True, row=0):
    """Decoded runs of consecutive trained (or masked) tokens."""
    out, run = [], []
    for token, label in zip(tset.input_ids[row], tset.labels[row]):
        if (label != IGNORE_INDEX) == trained:
            run.append(token)
        elif run:
            out.append(tok.decode(run))
            run = []
    return out + ([tok.decode(run)] if run else [])


def as_openai(row):
    """A glaive row written as the OpenAI API would carry it: wrapped tool schemas, assistant tool_calls whose
    arguments are JSON text, tool turns."""
    names = {"human": "user", "gpt": "assistant", "observation": "tool"}
    messages = []
    for turn in row["conversations"]:
        if turn["from"] == "function_call":
            call = json.loads(turn["value"])
            messages.append({"role": "assistant", "content": None, "tool_calls": [
                {"id": "call_0", "type": "function",
                 "function": {"name": call["name"], "arguments": json.dumps(call["arguments"])}}]})
        else:
            messages.append({"role": names[turn["from"]], "content": turn["value"]})
    return {"messages": messages, "tools": [{"type": "function", "function": t} for t in json.loads(row["tools"])]}


def test_glaive_tool_calls_are_trained_and_tool_results_are_not(gpt2, glaive):
    path = shared_data("llamafactory-demos/glaive_toolcall_en_demo.json")
    examples, skipped = load_examples(DataSourceConfig(source=str(path), format="chat"), options(gpt2))
    assert len(examples) == 300 and skipped == 0
    tset = tokenize_examples(examples, gpt2, 4096, "drop", "glaive")
    calls = 0
    for i, row in enumerate(glaive):
        trained, masked = "".join(spans(tset, gpt2, True, i)), "".join(spans(tset, gpt2, False, i))
        for turn in row["conversations"]:
            if turn["from"] == "function_call":  # the call, as the template writes it, is trained
                call = json.loads(turn["value"])
                assert (f'<tool_call>\n{{"name": "{call["name"]}", "arguments": '
                        f'{json.dumps(call["arguments"], ensure_ascii=False)}}}\n</tool_call>') in trained
                calls += 1
            elif turn["from"] == "observation":  # the result is read, never trained
                assert f"<tool_response>\n{turn['value']}\n</tool_response>" in masked
        assert "<tool_response>" not in trained and '<tool_call>\n{"name": "' not in masked  # no call is masked
        assert ("<tools>" in masked) == bool(json.loads(row["tools"]))  # the schemas, where the row has tools
    assert calls > 150


def test_openai_tool_calls_and_sharegpt_function_calls_give_the_same_tokens(gpt2, glaive):
    for row in glaive[:20]:
        a = tokenize_examples([chat(row, {}, options(gpt2))], gpt2, 4096, "drop", "t")
        b = tokenize_examples([chat(as_openai(row), {}, options(gpt2))], gpt2, 4096, "drop", "t")
        assert a.input_ids == b.input_ids and a.labels == b.labels


def test_the_exported_template_renders_the_training_ids_at_inference(gpt2, glaive):
    """What `automodel chat` or a server builds with apply_chat_template(messages, tools=...) and the template saved
    with the model (data.chat_template = "chatml") is what training tokenised."""
    served = AutoTokenizer.from_pretrained(shared_data("gpt2-tokenizer"))
    served.chat_template = CHAT_TEMPLATES["chatml"]
    for row in glaive[:20]:
        ex = chat(row, {}, options(gpt2))
        ids = tokenize_examples([ex], gpt2, 4096, "drop", "t").input_ids[0]
        messages, tools = messages_of(row, {}), tools_of(row, {})
        text = served.apply_chat_template(messages, tools=tools, tokenize=False)
        assert list(ids) == served(text, add_special_tokens=False)["input_ids"]
        prompt = served.apply_chat_template(messages[:-1], tools=tools, tokenize=False, add_generation_prompt=True)
        assert text.startswith(prompt) and text[len(prompt):] == messages[-1]["content"] + "<|im_end|>\n"


def test_a_conversation_without_tools_renders_as_plain_chatml(gpt2):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello!"}]
    ex = chat({"messages": messages}, {}, options(gpt2))
    assert "".join(t for t, _ in ex.segments) == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi"
                                                  "<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n")


def test_a_role_map_and_a_system_column_read_other_sharegpt_dialects(gpt2):
    standard = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"}],
                "system": "Be brief."}
    dialect = {"dialogue": [{"from": "person", "value": "Hi"}, {"from": "bot", "value": "Hello!"}],
               "instructions": "Be brief."}
    a = chat(standard, {}, options(gpt2))
    b = chat(dialect, {"messages": "dialogue", "system": "instructions"},
             options(gpt2, role_map={"person": "user", "bot": "assistant"}))
    assert a.segments == b.segments and a.segments[0][0].startswith("<|im_start|>system\nBe brief.<|im_end|>")
    with pytest.raises(BadRow, match=r"turn 0: unknown ShareGPT role `person`; .* or map it with data.role_map = "
                                     r"\{ person = \"<one of system\|user\|assistant\|tool\|tool_call>\" \}"):
        chat(dialect, {"messages": "dialogue"}, options(gpt2))


@pytest.mark.parametrize("turns, tools, message", [
    ([{"from": "human", "value": "Hi"}, {"from": "function_call", "value": "{'name': 'f'}"}], None,
     r"turn 1: the tool call is not valid JSON \(Expecting property name enclosed in double quotes at character 1\)"),
    ([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "",
                                          "tool_calls": [{"function": {"name": "f", "arguments": "{x"}}]}], None,
     r"turn 1: the arguments of f is not valid JSON"),
    ([{"role": "user", "content": "Hi"}, {"role": "tool", "content": "42"}, {"role": "assistant", "content": "ok"}],
     None, r"turn 1: a tool result with no tool call before it"),
    ([{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "ok"}], "[{name: f}]",
     r"column `tools` is not valid JSON"),
    ([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "", "tool_calls": [{"arguments": {}}]}],
     None, r"turn 1: a tool call needs a function name"),
])
def test_bad_tool_rows_are_one_line_errors(gpt2, turns, tools, message):
    row = {"conversations" if "from" in turns[0] else "messages": turns}
    if tools is not None:
        row["tools"] = tools
    with pytest.raises(BadRow, match=message):
        chat(row, {}, options(gpt2))


def test_a_template_that_cannot_show_tools_is_refused(gpt2, glaive):
    plain = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    with pytest.raises(ConfigError, match="the chat template does not render tools"):
        chat(glaive[0], {}, FormatOptions(chat_template=plain, tokenizer=gpt2))


def test_a_role_map_to_an_unknown_role_is_a_config_error(tmp_path):
    from tests.helpers import quickstart

    assert quickstart(tmp_path, "data.role_map.bot=assistant").data.role_map == {"bot": "assistant"}
    with pytest.raises(ConfigError, match='data.role_map.bot = "robot" is not a role; use one of system, user, '
                                          "assistant, tool, tool_call"):
        quickstart(tmp_path, "data.role_map.bot=robot")
