"""Sources, formats, prompt masking and batch order, on the real data in ../shared/data."""

import json

import pytest
import torch
from transformers import AutoTokenizer

from automodel.config import BatchShape, ConfigError, DataConfig, DataSourceConfig
from automodel.data import (BatchPlan, FormatOptions, build, collate, eval_batches, load_examples,
                            load_rows, tokenize_examples)
from automodel.loss import IGNORE_INDEX
from tests.helpers import shared_data


@pytest.fixture(scope="module")
def gpt2():
    return AutoTokenizer.from_pretrained(shared_data("gpt2-tokenizer"))


def test_official_squad_json_is_flattened_to_the_hub_schema():
    path = shared_data("squad-v1.1/dev-v1.1.json")
    rows = load_rows(DataSourceConfig(source=str(path), split="train"))
    assert len(rows) == 10570  # every question of SQuAD v1.1 dev
    row = rows[0]
    assert set(row) == {"id", "title", "context", "question", "answers"}
    assert row["answers"]["text"] and row["context"][row["answers"]["answer_start"][0]:].startswith(
        row["answers"]["text"][0])
    head = load_rows(DataSourceConfig(source=str(path), split="train[:100]"))
    tail = load_rows(DataSourceConfig(source=str(path), split="train[10%:]", limit=5))
    assert len(head) == 100 and len(tail) == 5 and tail[0]["id"] == rows[1057]["id"]


def test_squad_prompt_is_masked_and_the_answer_is_trained(gpt2):
    src = DataSourceConfig(source=str(shared_data("squad-v1.1/dev-v1.1.json")), limit=50)
    examples = load_examples(src, FormatOptions())[0]
    tset = tokenize_examples(examples, gpt2, seq_len=512, truncate="drop", name="train")
    assert len(tset) + tset.dropped == 50
    for ids, labels, plen, ex in zip(tset.input_ids, tset.labels, tset.prompt_lens, examples):
        assert labels[:plen] == [IGNORE_INDEX] * plen
        assert gpt2.decode(ids[:plen]) == ex.prompt
        trained = [t for t in labels if t != IGNORE_INDEX]
        assert gpt2.decode(trained) == ex.response + gpt2.eos_token  # answer + EOS, nothing else
        assert ex.prompt.endswith("Answer:") and ex.response == " " + ex.references[0]


def test_instruction_format_with_alpaca_template_and_column_mapping(gpt2, tmp_path):
    path = shared_data("llamafactory-demos/alpaca_en_demo.json")
    examples = load_examples(DataSourceConfig(source=str(path), format="instruction", limit=20), FormatOptions(prompt_template="alpaca"))[0]
    raw = json.loads(path.read_text())[:20]
    for ex, row in zip(examples, raw):
        assert ex.response == row["output"]
        assert f"### Instruction:\n{row['instruction']}\n\n" in ex.prompt and ex.prompt.endswith("### Response:\n")
        assert ("### Input:\n" in ex.prompt) == bool(row["input"].strip())
    # Any prompt/response columns, mapped; `input` is optional when unmapped and absent.
    qa = tmp_path / "qa.jsonl"
    qa.write_text('{"question": "2+2?", "answer": "4"}\n{"question": "Capital of France?", "answer": "Paris"}\n')
    src = DataSourceConfig(source=str(qa), format="instruction", columns={"instruction": "question", "output": "answer"})
    examples = load_examples(src, FormatOptions())[0]
    assert [(e.prompt, e.response) for e in examples] == [("2+2?\n", "4"), ("Capital of France?\n", "Paris")]


def test_bad_rows_name_the_file_row_and_field(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": ""}\n')
    with pytest.raises(ConfigError, match=r"bad.jsonl: line 2 \(split `train`\), field `output`: column `output` is empty; "
                                          r"fix the row or set data.on_bad_row = \"skip\""):
        load_examples(DataSourceConfig(source=str(path), format="instruction"), FormatOptions())
    path.write_text('{"prompt": "a", "output": "b"}\n')
    with pytest.raises(ConfigError, match=r"line 1 .*field `instruction`: missing column `instruction` \(columns "
                                          r"here: prompt, output\); map it with data.<split>.columns.instruction"):
        load_examples(DataSourceConfig(source=str(path), format="instruction"), FormatOptions())
    path.write_text('{"context": "c", "question": "q", "answers": {"text": []}}\n')
    with pytest.raises(ConfigError, match=r"line 1 .*field `answers`.*at least one answer"):
        load_examples(DataSourceConfig(source=str(path), format="squad"), FormatOptions())


def test_too_long_samples_are_dropped_or_truncated_and_counted(gpt2):
    src = DataSourceConfig(source=str(shared_data("squad-v1.1/dev-v1.1.json")), limit=200)
    examples = load_examples(src, FormatOptions())[0]
    lengths = [len(gpt2(e.prompt)["input_ids"]) + len(gpt2(e.response, add_special_tokens=False)["input_ids"]) + 1
               for e in examples]
    too_long = sum(n > 160 for n in lengths)
    assert 0 < too_long < 200
    dropped = tokenize_examples(examples, gpt2, 160, "drop", "train")
    assert dropped.dropped == too_long and len(dropped) == 200 - too_long and dropped.truncated == 0
    cut = tokenize_examples(examples, gpt2, 160, "right", "train")
    assert max(map(len, cut.input_ids)) == 160
    # Truncation that leaves no answer token drops the sample instead (nothing to train on).
    assert cut.truncated + cut.dropped == too_long and len(cut) + cut.dropped == 200
    # More than 1% dropped: the data line says the share and the keys to change; 1% or less: it does not.
    share = 100 * too_long / 200
    assert f"warning: {share:.1f}% of the rows were dropped" in dropped.summary()
    assert 'raise data.seq_len, or set data.truncate = "right"' in dropped.summary()
    assert "warning" not in tokenize_examples(examples, gpt2, 4096, "drop", "train").summary()


def test_build_reports_an_empty_split_clearly(gpt2):
    cfg = DataConfig(seq_len=8, train=DataSourceConfig(source=str(shared_data("squad-v1.1/dev-v1.1.json")), limit=5))
    with pytest.raises(ConfigError, match="no train samples left.*raise data.seq_len"):
        build(cfg, gpt2)


def test_batch_order_is_a_pure_function_of_seed_and_step():
    plan = BatchPlan(num_samples=103, shape=BatchShape(global_batch_size=8, micro_batch_size=2, world_size=2), seed=7)
    assert plan.steps_per_epoch == 12 and plan.accumulation_steps == 2
    epoch0 = [i for s in range(12) for i in plan.global_indices(s)]
    assert len(set(epoch0)) == 96  # no sample twice within an epoch
    assert plan.global_indices(12) != plan.global_indices(0)  # next epoch reshuffles
    assert BatchPlan(103, BatchShape(8, 2, 2), seed=7).global_indices(5) == plan.global_indices(5)
    assert BatchPlan(103, BatchShape(8, 2, 2), seed=8).global_indices(5) != plan.global_indices(5)
    # Ranks split the global batch; together they see it exactly once, in micro-batches of 2.
    parts = [plan.micro_batches(5, rank) for rank in range(2)]
    assert all(len(mb) == 2 for p in parts for mb in p)
    assert [i for p in parts for mb in p for i in mb] == plan.global_indices(5)
    # The global batch does not depend on how it is split.
    assert BatchPlan(103, BatchShape(8, 8, 1), seed=7).global_indices(5) == plan.global_indices(5)
    with pytest.raises(ConfigError, match="fewer than one global batch"):
        BatchPlan(num_samples=5, shape=BatchShape(8, 2))


def test_collate_pads_right_and_masks_padding(gpt2):
    src = DataSourceConfig(source=str(shared_data("squad-v1.1/dev-v1.1.json")), limit=4)
    tset = tokenize_examples(load_examples(src, FormatOptions())[0], gpt2, 512, "drop", "v")
    batch = collate(tset, [0, 1, 2, 3], pad_id=0)
    lengths = [len(x) for x in tset.input_ids]
    assert batch["input_ids"].shape == (4, max(lengths))
    assert batch["attention_mask"].sum(1).tolist() == lengths
    assert torch.all(batch["labels"][batch["attention_mask"] == 0] == IGNORE_INDEX)
    assert eval_batches(tset, 3) == [[0, 1, 2], [3]] and eval_batches(tset, 3, max_batches=1) == [[0, 1, 2]]


def test_rows_are_named_by_the_line_an_editor_shows(tmp_path):
    """1-based lines of a .jsonl file, blank lines counted as an editor counts them; a slice of a split, or a JSON
    array, keeps its 0-based row."""
    path = tmp_path / "gaps.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\n\n\n{"instruction": "c", "output": ""}\n')
    with pytest.raises(ConfigError, match=r"gaps.jsonl: line 4 \(split `train`\), field `output`"):
        load_examples(DataSourceConfig(source=str(path), format="instruction"), FormatOptions())
    with pytest.raises(ConfigError, match=r"gaps.jsonl: row 0 \(split `train\[1:\]`\), field `output`"):
        load_examples(DataSourceConfig(source=str(path), format="instruction", split="train[1:]"), FormatOptions())
    array = tmp_path / "rows.json"
    array.write_text(json.dumps([{"instruction": "a", "output": "b"}, {"instruction": "c", "output": ""}]))
    with pytest.raises(ConfigError, match=r"rows.json: row 1 \(split `train`\), field `output`"):
        load_examples(DataSourceConfig(source=str(array), format="instruction"), FormatOptions())


def test_an_unknown_role_in_openai_messages_is_an_error_naming_the_row(tmp_path):
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "human", "content": "hi"},
                                             {"role": "assistant", "content": "hello"}]}) + "\n")
    with pytest.raises(ConfigError, match=r"chat.jsonl: line 1 .*turn 0: unknown role `human`; expected one of system, "
                                          r"developer, user, assistant, .*ShareGPT's \"human\" is \"user\" here"):
        load_examples(DataSourceConfig(source=str(path), format="chat"), FormatOptions())
    path.write_text(json.dumps({"messages": [{"role": "narrator", "content": "hi"}]}) + "\n")
    with pytest.raises(ConfigError, match=r"unknown role `narrator`; expected one of [a-z, ]*ipython; fix the row"):
        load_examples(DataSourceConfig(source=str(path), format="chat"), FormatOptions())


def test_a_line_that_is_not_json_names_the_file_and_line_or_is_skipped(tmp_path):
    """pyarrow parses JSON Lines in blocks and names neither file nor line; the error names both (1-based), and
    data.on_bad_row = "skip" leaves such lines out."""
    from automodel.data import load_rows

    good = {"instruction": "a", "output": "b"}
    path = tmp_path / "broken.jsonl"
    path.write_text("".join(json.dumps(good) + "\n" for _ in range(5000)) + '{"instruction": "c", "output": \n'
                    + json.dumps({"instruction": "d", "output": "e"}) + "\n")
    src = DataSourceConfig(source=str(path), format="instruction")
    with pytest.raises(ConfigError, match=r"broken.jsonl: line 5001 is not valid JSON \(.*\); fix the line or set "
                                          r"data.on_bad_row = \"skip\""):
        load_rows(src)
    rows = load_rows(src, on_bad_row="skip")
    assert len(rows) == 5001 and rows[5000] == {"instruction": "d", "output": "e"}
    examples, _ = load_examples(src, FormatOptions(), on_bad_row="skip")
    assert len(examples) == 5001
