"""Row formats: how one dataset row becomes a prompt (masked out of the loss) and a response (trained).

A format is a plain function `(row, columns, prompt_template) -> Example`, registered by name in
FORMATS; configs pick one by name, so no config value imports code.
"""

from typing import Any, Callable, Mapping

import attrs


@attrs.frozen
class Example:
    prompt: str
    response: str
    references: tuple[str, ...]  # accepted answers for exact match (SQuAD has several)


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


def squad(row: Mapping[str, Any], columns: Mapping[str, str], prompt_template: str) -> Example:
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
    return Example(prompt=f"Context: {context}\nQuestion: {question}\nAnswer:", response=f" {texts[0]}",
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


def instruction(row: Mapping[str, Any], columns: Mapping[str, str], prompt_template: str) -> Example:
    """Instruction tuning: `instruction` (+ optional `input`) -> `output`; map them with columns."""
    instr = _text(row, columns, "instruction")
    inp = _text(row, columns, "input", required=False)
    output = _text(row, columns, "output")
    if not output.strip():
        raise BadRow("output", f"column `{columns.get('output', 'output')}` is empty")
    with_input, without_input = PROMPT_TEMPLATES[prompt_template]
    prompt = (with_input if inp.strip() else without_input).format(instruction=instr, input=inp)
    return Example(prompt=prompt, response=output, references=(output,))


FORMATS: dict[str, Callable[[Mapping[str, Any], Mapping[str, str], str], Example]] = {
    "squad": squad,
    "instruction": instruction,
}

# Format fields that `columns` may map, per format (for error messages and validation).
FORMAT_FIELDS = {"squad": ("context", "question", "answers"), "instruction": ("instruction", "input", "output")}
