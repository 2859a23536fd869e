"""Row formats: how one dataset row becomes ordered text segments, each trained or masked.

A format is a plain function `(row, columns, options) -> Example`, registered by name in FORMATS;
configs pick one by name, so no config value imports code.
"""

import contextlib
import json
import signal
import threading
from typing import Any, Callable, Iterator, Mapping, Optional

import attrs

from automodel.config.schema import CHAT_ROLES

Segment = tuple[str, bool]  # (text, trained)


@attrs.frozen
class Example:
    segments: tuple[Segment, ...]  # in order; trained ones are what the loss covers
    references: tuple[str, ...] = ()  # accepted answers for exact match (SQuAD has several)
    add_special_tokens: bool = True  # the tokenizer's own specials (e.g. BOS) first; chat templates render theirs
    add_eos: bool = True  # EOS after the last segment (trained when the last segment is)

    @property
    def prompt(self) -> str:
        """The masked text before the first trained segment."""
        out = []
        for text, trained in self.segments:
            if trained:
                break
            out.append(text)
        return "".join(out)

    @property
    def response(self) -> str:
        return "".join(text for text, trained in self.segments if trained)


@attrs.frozen
class FormatOptions:
    prompt_template: str = "plain"
    chat_template: str = ""  # "" = the tokenizer's; "chatml"; or a Jinja template
    train_on: str = "assistant"
    tokenizer: Any = None  # renders chat templates
    role_map: Mapping[str, str] = attrs.field(factory=dict)  # ShareGPT `from` -> role (over SHAREGPT_ROLES)


class BadRow(ValueError):
    """A row that does not fit its format; `field` is the format field (not yet the user's column)."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


def _text(row: Mapping[str, Any], columns: Mapping[str, str], field: str, required: bool = True) -> str:
    column = columns.get(field, field)
    if column not in row:
        if not required and field not in columns:
            return ""
        raise BadRow(field, f"missing column `{column}` (columns here: {', '.join(row)}); "
                            f"map it with data.<split>.columns.{field} = \"<your column>\"")
    value = row[column]
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        raise BadRow(field, f"column `{column}` should hold text, got {type(value).__name__} {value!r:.80}")
    return value


def squad(row: Mapping[str, Any], columns: Mapping[str, str], options: FormatOptions) -> Example:
    """SQuAD: context + question -> the first answer. `answers` is {"text": [...]} as on the hub."""
    context = _text(row, columns, "context")
    question = _text(row, columns, "question")
    column = columns.get("answers", "answers")
    answers = row.get(column)
    texts = answers.get("text") if isinstance(answers, Mapping) else answers
    if isinstance(texts, str):
        texts = [texts]
    if not isinstance(texts, (list, tuple)) or not texts or not all(isinstance(t, str) for t in texts):
        raise BadRow("answers", f"column `{column}` should be {{\"text\": [answer, ...]}} with at least one "
                                f"answer, got {answers!r:.80}")
    if not texts[0].strip():
        raise BadRow("answers", f"column `{column}` has an empty first answer")
    return Example(segments=((f"Context: {context}\nQuestion: {question}\nAnswer:", False), (f" {texts[0]}", True)),
                   references=tuple(texts))


PROMPT_TEMPLATES = {
    # instruction, then input when there is one, each on its own line; the response follows.
    "plain": ("{instruction}\n{input}\n", "{instruction}\n"),
    # Stanford Alpaca's template.
    "alpaca": (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n",
        "Below is an instruction that describes a task. Write a response that appropriately completes the "
        "request.\n\n### Instruction:\n{instruction}\n\n### Response:\n",
    ),
}


def instruction(row: Mapping[str, Any], columns: Mapping[str, str], options: FormatOptions) -> Example:
    """Instruction tuning: `instruction` (+ optional `input`) -> `output`; map them with columns."""
    instr = _text(row, columns, "instruction")
    inp = _text(row, columns, "input", required=False)
    output = _text(row, columns, "output")
    if not output.strip():
        raise BadRow("output", f"column `{columns.get('output', 'output')}` is empty")
    with_input, without_input = PROMPT_TEMPLATES[options.prompt_template]
    prompt = (with_input if inp.strip() else without_input).format(instruction=instr, input=inp)
    return Example(segments=((prompt, False), (output, True)), references=(output,))


# ---------------------------------------------------------------------------------------------
# Chat: OpenAI-style messages or ShareGPT conversations, rendered with a chat template

# ChatML, with tools as Qwen2.5 and Hermes render them: the function schemas in the system turn, an assistant's calls
# as <tool_call> JSON blocks after its text, each tool result as a user turn in <tool_response>. A conversation
# without tools renders as plain ChatML.
_CHATML_TOOLS_PREAMBLE = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function "
    "signatures within <tools></tools> XML tags:\n<tools>"
)
_CHATML_TOOLS_CALL_FORMAT = (
    "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}"
    "\n</tool_call><|im_end|>\n"
)
CHAT_TEMPLATES = {
    "chatml": (
        "{% if tools %}{{ '<|im_start|>system\n' }}{% if messages[0]['role'] == 'system' %}"
        "{{ messages[0]['content'] + '\n\n' }}{% endif %}{{ " + json.dumps(_CHATML_TOOLS_PREAMBLE) + " }}"
        "{% for tool in tools %}{{ '\n' + (tool | tojson) }}{% endfor %}{{ " + json.dumps(_CHATML_TOOLS_CALL_FORMAT)
        + " }}{% endif %}"
        "{% for message in messages %}{% if tools and loop.first and message['role'] == 'system' %}"
        "{% elif message['role'] == 'tool' %}"
        "{{ '<|im_start|>user\n<tool_response>\n' + message['content'] + '\n</tool_response><|im_end|>\n' }}"
        "{% else %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] }}"
        "{% for call in message['tool_calls'] or [] %}{% if message['content'] or not loop.first %}{{ '\n' }}{% endif %}"
        "{{ '<tool_call>\n{\"name\": \"' + call['function']['name'] + '\", \"arguments\": ' "
        "+ (call['function']['arguments'] | tojson) + '}\n</tool_call>' }}{% endfor %}"
        "{{ '<|im_end|>\n' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
}


def trained_chat_template(sources: list[Any], data_cfg: Any, tokenizer: Any) -> Optional[str]:
    """The chat template to save with the model, so that whoever serves it builds prompts the way training did; None
    leaves the tokenizer as it is.

    - chat data with `data.chat_template` set: that template (e.g. ChatML for a tokenizer without one);
    - instruction data and a tokenizer without a template: one that renders a user turn as the prompt template does
      (and the tokenizer's leading special tokens, as training adds them) and an assistant turn as the response and
      EOS, so `automodel chat` and `apply_chat_template` reproduce the training prompt of a single turn (only the
      last user turn is rendered: the model was trained on single prompts).
    """
    formats = {s.format for s in sources if s is not None}
    if "chat" in formats and data_cfg.chat_template:
        return CHAT_TEMPLATES.get(data_cfg.chat_template, data_cfg.chat_template)
    if formats == {"instruction"} and not getattr(tokenizer, "chat_template", None):
        before, after = PROMPT_TEMPLATES[data_cfg.prompt_template][1].split("{instruction}")
        specials = tokenizer("", add_special_tokens=True)["input_ids"]
        start = json.dumps("".join(tokenizer.convert_ids_to_tokens(specials)))
        # An instruction model answers one prompt: the template renders the last user turn (and what follows it).
        return ("{% set last = namespace(user=0) %}{% for message in messages %}{% if message['role'] == 'user' %}"
                "{% set last.user = loop.index0 %}{% endif %}{% endfor %}"
                "{{ " + start + " }}{% for message in messages[last.user:] %}{% if message['role'] == 'user' %}{{ "
                + json.dumps(before) + " + message['content'] + " + json.dumps(after) + " }}{% elif message['role'] == "
                "'assistant' %}{{ message['content'] + eos_token }}{% endif %}{% endfor %}")
    return None


OPENAI_ROLES = ("system", "developer", "user", "assistant", "tool", "function", "ipython")
# ShareGPT's `from` values -> roles; "tool_call" is an assistant turn whose value is a call (JSON).
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system",
                  "function_call": "tool_call", "observation": "tool", "tool": "tool"}


def _content_text(content: Any, where: str) -> str:
    """A message's content as text: a string, or OpenAI content parts ({"type": "text", "text"|"value": ...})."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, Mapping) and part.get("type", "text") == "text":
                parts.append(str(part.get("text", part.get("value", ""))))
            else:
                raise BadRow("messages", f"{where}: only text content parts are supported here, got {part!r:.80}")
        return "".join(parts)
    if content is None:
        return ""
    raise BadRow("messages", f"{where}: content should be text or a list of parts, got {type(content).__name__}")


def _json(value: Any, what: str, field: str) -> Any:
    """`value` parsed when it is a JSON string (as ShareGPT and the OpenAI API carry calls), else as it is."""
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError as e:
        raise BadRow(field, f"{what} is not valid JSON ({e.msg} at character {e.pos}): {value!r:.80}") from None


def _tool_calls(calls: Any, where: str, field: str) -> list[dict]:
    """Tool calls as chat templates take them: [{"type": "function", "function": {"name", "arguments": {...}}}], from
    that form, its {"name", "arguments"} shorthand (ShareGPT's), or either as JSON text; arguments may be JSON text."""
    calls = _json(calls, f"{where}: the tool call", field)
    if isinstance(calls, Mapping):
        calls = [calls]
    if not isinstance(calls, list) or not calls:
        raise BadRow(field, f"{where}: tool calls should be a list of {{\"name\", \"arguments\"}}, got {calls!r:.80}")
    out = []
    for call in calls:
        function = call.get("function", call) if isinstance(call, Mapping) else None
        if not isinstance(function, Mapping) or not isinstance(function.get("name"), str) or not function["name"]:
            raise BadRow(field, f"{where}: a tool call needs a function name, got {call!r:.80}")
        arguments = _json(function.get("arguments", {}), f"{where}: the arguments of {function['name']}", field)
        if not isinstance(arguments, Mapping):
            raise BadRow(field, f"{where}: the arguments of {function['name']} should be an object, got "
                                f"{arguments!r:.80}")
        out.append({"type": "function", "function": {"name": function["name"], "arguments": dict(arguments)}})
    return out


def messages_of(row: Mapping[str, Any], columns: Mapping[str, str],
                role_map: Optional[Mapping[str, str]] = None) -> list[dict]:
    """[{"role", "content"(, "tool_calls")}] from `messages` (OpenAI) or `conversations` (ShareGPT), after the
    row's `system` column (ShareGPT's system prompt) when it has one and the turns do not."""
    column = columns.get("messages")
    if column is None:
        column = "messages" if "messages" in row else "conversations" if "conversations" in row else None
    if column is None or column not in row:
        raise BadRow("messages", f"missing column `{column or 'messages'}` (columns here: {', '.join(row)}); map it "
                                 "with data.<split>.columns.messages = \"<your column>\"")
    turns = turns_of(row[column], column, role_map=role_map)
    system = row.get(columns.get("system", "system"))
    if isinstance(system, str) and system.strip() and turns[0]["role"] != "system":
        turns.insert(0, {"role": "system", "content": system})
    return turns


def tools_of(row: Mapping[str, Any], columns: Mapping[str, str]) -> Optional[list[dict]]:
    """The row's `tools` (OpenAI function schemas, bare or as {"type": "function", "function": ...}; a list or its
    JSON text, as ShareGPT tool data carries it) in OpenAI's form, or None when it has none."""
    column = columns.get("tools", "tools")
    tools = _json(row.get(column), f"column `{column}`", "tools")
    if tools is None or tools == []:
        return None
    if not isinstance(tools, list):
        raise BadRow("tools", f"column `{column}` should be a list of function schemas, got {tools!r:.80}")
    out = []
    for tool in tools:
        function = tool.get("function", tool) if isinstance(tool, Mapping) else None
        if not isinstance(function, Mapping) or not isinstance(function.get("name"), str):
            raise BadRow("tools", f"column `{column}`: a tool should be a function schema with a name, got "
                                  f"{tool!r:.80}")
        out.append({"type": "function", "function": dict(function)})
    return out


def turns_of(turns: Any, column: str, field: str = "messages",
             role_map: Optional[Mapping[str, str]] = None) -> list[dict]:
    """[{"role", "content"(, "tool_calls")}] from a list of OpenAI messages or ShareGPT turns (`column` names it in
    errors). ShareGPT's function_call turns become assistant turns with tool_calls and its observations tool turns;
    a tool turn must answer a call made before it."""
    if not isinstance(turns, list) or not turns:
        raise BadRow(field, f"column `{column}` should be a non-empty list of turns, got {turns!r:.80}")
    roles = {**SHAREGPT_ROLES, **(role_map or {})}
    out: list[dict] = []
    called = False  # a tool call came before, with no user turn since
    for i, turn in enumerate(turns):
        if not isinstance(turn, Mapping):
            raise BadRow(field, f"turn {i} should be an object, got {turn!r:.80}")
        calls = None
        if "from" in turn:  # ShareGPT
            role = roles.get(turn["from"])
            if role is None:
                raise BadRow(field, f"turn {i}: unknown ShareGPT role `{turn['from']}`; expected one of "
                                    f"{', '.join(roles)}, or map it with data.role_map = {{ {turn['from']} = "
                                    f"\"<one of {'|'.join(CHAT_ROLES)}>\" }}")
            if role == "tool_call":
                role, calls, content = "assistant", _tool_calls(turn.get("value"), f"turn {i}", field), ""
            else:
                content = _content_text(turn.get("value"), f"turn {i}")
        else:
            role = turn.get("role")
            if not isinstance(role, str):
                raise BadRow(field, f"turn {i} has no `role`")
            if role not in OPENAI_ROLES:  # trained on silently, a "human" turn would teach the template's fallback
                alias = (f'; ShareGPT\'s "{role}" is "{SHAREGPT_ROLES[role]}" here: rename it in the data, or write '
                         'the turns as ShareGPT ({"from", "value"})' if role in SHAREGPT_ROLES else "")
                raise BadRow(field, f"turn {i}: unknown role `{role}`; expected one of {', '.join(OPENAI_ROLES)}"
                             + alias)
            content = _content_text(turn.get("content"), f"turn {i}")
            if turn.get("tool_calls"):
                calls = _tool_calls(turn["tool_calls"], f"turn {i}", field)
        if role == "tool" and not called:
            raise BadRow(field, f"turn {i}: a tool result with no tool call before it (an assistant turn with "
                                "tool_calls, or ShareGPT's function_call)")
        called = bool(calls) or (called and role == "tool")
        message = {"role": role, "content": content}
        if calls:
            message["tool_calls"] = calls
        out.append(message)
    return out


class TemplateTimeout(Exception):
    """A chat template took longer than RENDER_SECONDS to render one conversation (a loop without end?)."""


RENDER_SECONDS = 5.0


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raises TemplateTimeout in the body after `seconds` (a real-time timer: on the main thread only; elsewhere the
    body runs unbounded). Jinja's sandbox stops a template from reaching out, not from looping for ever."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(signum, frame):
        raise TemplateTimeout(f"rendering one conversation took more than {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def render_chat_template(tokenizer: Any, template: str) -> Callable[[list[dict], bool], str]:
    """(messages, add_generation_prompt, tools) -> text, through the tokenizer's sandboxed Jinja renderer, within
    RENDER_SECONDS per conversation."""
    chosen: Optional[str] = CHAT_TEMPLATES.get(template, template) or None
    if chosen is None and not getattr(tokenizer, "chat_template", None):
        from automodel.config import ConfigError

        raise ConfigError("the tokenizer has no chat template; set data.chat_template = \"chatml\" (built in) or "
                          "to a Jinja template")

    def render(messages: list[dict], add_generation_prompt: bool, tools: Optional[list[dict]] = None) -> str:
        if tools and "tools" not in (chosen or tokenizer.chat_template):
            from automodel.config import ConfigError

            raise ConfigError("the chat template does not render tools (it never reads `tools`), so the model would "
                              "be trained on calls to functions it was never shown; set data.chat_template = "
                              "\"chatml\" (built in, renders tools as Qwen2.5 and Hermes do) or a template that does")
        with time_limit(RENDER_SECONDS):
            return tokenizer.apply_chat_template(messages, chat_template=chosen, tokenize=False, tools=tools,
                                                 add_generation_prompt=add_generation_prompt)

    return render


def chat(row: Mapping[str, Any], columns: Mapping[str, str], options: FormatOptions) -> Example:
    """A conversation rendered with the chat template. Trained spans are found in the rendered text: for
    assistant turn i, the text added between rendering turns [:i] with the generation prompt and rendering
    turns [:i+1] (its content and end-of-turn marker)."""
    messages = messages_of(row, columns, options.role_map)
    tools = tools_of(row, columns)
    assistant = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if not assistant:
        raise BadRow("messages", "the conversation has no assistant turn to train on")
    last = messages[assistant[-1]]
    if not last["content"].strip() and not last.get("tool_calls"):
        raise BadRow("messages", "the last assistant turn is empty")
    template = render_chat_template(options.tokenizer, options.chat_template)
    render = lambda turns, prompt: template(turns, prompt, tools)  # noqa: E731
    full = render(messages, False)
    segments: list[Segment] = []
    done = 0
    for i in assistant:
        before = render(messages[:i], True)
        through = render(messages[:i + 1], False)
        if not (through.startswith(before) and full.startswith(through) and before.startswith(full[:done])):
            from automodel.config import ConfigError

            raise ConfigError("the chat template does not render conversations prefix by prefix (turn i's text "
                              "changes when later turns are added), so assistant spans cannot be found; use "
                              "data.chat_template = \"chatml\" or another template")
        trained = options.train_on == "all" or options.train_on == "assistant" or i == assistant[-1]
        segments += [(before[done:], options.train_on == "all"), (through[len(before):], trained)]
        done = len(through)
    segments.append((full[done:], options.train_on == "all"))
    # Exact match compares the last assistant turn's text (its calls, as JSON, when it only calls tools).
    reference = last["content"] or json.dumps([c["function"] for c in last["tool_calls"]], ensure_ascii=False)
    return Example(segments=tuple(s for s in segments if s[0]), references=(reference,),
                   add_special_tokens=False, add_eos=False)


def text(row: Mapping[str, Any], columns: Mapping[str, str], options: FormatOptions) -> Example:
    """A plain document for continued pre-training; every token is trained (documents are concatenated
    with EOS between them and cut into seq_len rows when tokenised)."""
    doc = _text(row, columns, "text")
    if not doc.strip():
        raise BadRow("text", f"column `{columns.get('text', 'text')}` is empty")
    return Example(segments=((doc, True),), add_special_tokens=False, add_eos=True)


FORMATS: dict[str, Callable[[Mapping[str, Any], Mapping[str, str], FormatOptions], Example]] = {
    "squad": squad,
    "instruction": instruction,
    "chat": chat,
    "text": text,
}
