"""The data pipeline on real data: chat masking, text chunking, packing, caching, bad rows, splits."""

import json
import math

import pytest
import torch
from transformers import AttentionInterface, AutoTokenizer

from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

from automodel.config import BatchShape, ConfigError, DataConfig, DataSourceConfig
from automodel.data import (BatchPlan, FormatOptions, build, collate, load_examples, pack,
                            tokenize_examples)
from automodel.data.formats import chat
from automodel.loss import IGNORE_INDEX, token_cross_entropy
from automodel.training.forward import host_ready, model_inputs
from tests.helpers import shared_data, tiny_llama

CONVERSATION = [
    {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": "", "tool_calls": [{"name": "weather", "arguments": {"city": "Paris"}}]},
    {"role": "tool", "content": "sunny"}, {"role": "assistant", "content": "It is sunny."},
]


@pytest.fixture(scope="module")
def gpt2():
    return AutoTokenizer.from_pretrained(shared_data("gpt2-tokenizer"))


def trained_spans(tset, tokenizer, row=0):
    """The decoded runs of consecutive trained tokens."""
    spans, run = [], []
    for token, label in zip(tset.input_ids[row], tset.labels[row]):
        if label != IGNORE_INDEX:
            run.append(token)
        elif run:
            spans.append(tokenizer.decode(run))
            run = []
    return spans + ([tokenizer.decode(run)] if run else [])


@pytest.mark.parametrize("train_on, expected", [
    ("assistant", ["Hello!<|im_end|>\n", '<tool_call>\n{"name": "weather", "arguments": {"city": "Paris"}}\n</tool_call>'
                   "<|im_end|>\n", "It is sunny.<|im_end|>\n"]),
    ("last_turn", ["It is sunny.<|im_end|>\n"]),
])
def test_multi_turn_chat_trains_exactly_the_assistant_text(gpt2, train_on, expected):
    ex = chat({"messages": CONVERSATION}, {}, FormatOptions(chat_template="chatml", train_on=train_on, tokenizer=gpt2))
    tset = tokenize_examples([ex], gpt2, 512, "drop", "t")
    assert trained_spans(tset, gpt2) == expected
    # Exact match prompts with everything before the final answer, which is the reference.
    assert gpt2.decode(tset.input_ids[0][:tset.prompt_lens[0]]).endswith(
        "<|im_start|>user\n<tool_response>\nsunny\n</tool_response><|im_end|>\n<|im_start|>assistant\n")
    assert tset.references[0] == ("It is sunny.",)
    text = gpt2.decode(tset.input_ids[0])
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>\n") and text.endswith("It is sunny.<|im_end|>\n")


def test_train_on_all_trains_every_token(gpt2):
    ex = chat({"messages": CONVERSATION}, {}, FormatOptions(chat_template="chatml", train_on="all", tokenizer=gpt2))
    tset = tokenize_examples([ex], gpt2, 512, "drop", "t")
    assert tset.labels[0] == tset.input_ids[0]


def test_sharegpt_and_openai_forms_give_the_same_tokens(gpt2):
    share = {"conversations": [{"from": {"user": "human", "assistant": "gpt"}.get(m["role"], m["role"]),
                                "value": m["content"]} for m in CONVERSATION[:4] + CONVERSATION[6:]]}
    openai = {"messages": CONVERSATION[:4] + CONVERSATION[6:]}
    opts = FormatOptions(chat_template="chatml", tokenizer=gpt2)
    a, b = (tokenize_examples([chat(r, {}, opts)], gpt2, 512, "drop", "t") for r in (share, openai))
    assert a.input_ids == b.input_ids and a.labels == b.labels


def test_template_sources_config_jinja_tokenizer_own_and_missing(gpt2, tmp_path):
    jinja = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}[assistant] {% endif %}"
    ex = chat({"messages": CONVERSATION[1:3]}, {}, FormatOptions(chat_template=jinja, tokenizer=gpt2))
    assert [t for t, trained in ex.segments if trained] == ["Hello!\n"]
    with pytest.raises(ConfigError, match="the tokenizer has no chat template; set data.chat_template"):
        chat({"messages": CONVERSATION[1:3]}, {}, FormatOptions(tokenizer=gpt2))
    own = AutoTokenizer.from_pretrained(shared_data("gpt2-tokenizer"))
    own.chat_template = jinja
    own.save_pretrained(tmp_path / "tok")
    reloaded = AutoTokenizer.from_pretrained(tmp_path / "tok")
    assert chat({"messages": CONVERSATION[1:3]}, {}, FormatOptions(tokenizer=reloaded)).segments == ex.segments


def test_real_sft_demo_every_trained_span_is_assistant_text(gpt2):
    """LLaMA-Factory's v1_sft_demo.jsonl (content parts with "value"): 500 conversations."""
    path = shared_data("llamafactory-demos/v1_sft_demo.jsonl")
    src = DataSourceConfig(source=str(path), format="chat")
    examples, skipped = load_examples(src, FormatOptions(chat_template="chatml", tokenizer=gpt2))
    tset = tokenize_examples(examples, gpt2, 1024, "drop", "chat")
    assert skipped == 0 and len(tset) + tset.dropped == 500 and len(tset) > 450
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    # Each example's reference is its row's last assistant text, read from the content parts' "value".
    for row, ex in zip(rows, examples):
        last = [m for m in row["messages"] if m["role"] == "assistant"][-1]
        assert ex.references[0] == "".join(part["value"] for part in last["content"])
    for i in range(len(tset)):
        answer = tset.references[i][0]
        assert trained_spans(tset, gpt2, i) == [answer + "<|im_end|>\n"]


def test_text_documents_are_joined_with_eos_and_chunked(gpt2):
    path = shared_data("llamafactory-demos/c4_demo.jsonl")
    src = DataSourceConfig(source=str(path), format="text")
    examples, _ = load_examples(src, FormatOptions())
    tset = tokenize_examples(examples, gpt2, 128, "drop", "text", chunk_documents=True)
    docs = [json.loads(line)["text"] for line in path.read_text().splitlines()]
    stream = [t for row in tset.input_ids for t in row]
    expected = [t for d in docs for t in gpt2(d)["input_ids"] + [gpt2.eos_token_id]]
    assert stream == expected[:len(stream)] and len(expected) - len(stream) < 2  # only a 1-token tail can go
    assert all(len(row) == 128 for row in tset.input_ids[:-1]) and stream.count(gpt2.eos_token_id) >= 299
    assert all(row == labels for row, labels in zip(tset.input_ids, tset.labels))


def varlen_reference_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Flash-attention's varlen contract in plain torch (flash-attn needs CUDA): the batch's tokens flattened into one
    sequence, causal attention within each [cu_seq_lens_q[i], cu_seq_lens_q[i + 1]) span, nothing across."""
    batch, heads, length, dim = query.shape
    if "cu_seq_lens_q" in kwargs:
        cu = kwargs["cu_seq_lens_q"].tolist()
        assert kwargs["max_length_q"] == max(b - a for a, b in zip(cu, cu[1:]))
    else:  # unpacked rows: flash-attention unpads by the 2D padding mask (right padding here)
        cu = [x for row, n in enumerate(attention_mask.sum(-1).tolist()) for x in (row * length, row * length + n)]
    groups = heads // key.shape[1]
    q, k, v = (x.transpose(1, 2).reshape(batch * length, -1, dim) for x in (query, key, value))
    out = torch.zeros_like(q)
    for a, b in zip(cu, cu[1:]):
        span = [x[a:b].transpose(0, 1) for x in (q, k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1))]
        out[a:b] = torch.nn.functional.scaled_dot_product_attention(*span, is_causal=True, scale=scaling).transpose(0, 1)
    return out.reshape(batch, length, heads, dim), None


@pytest.mark.parametrize("attn", ["sdpa", "eager", pytest.param("flex_attention", marks=pytest.mark.slow),
                                  "flash_attention_2"])
def test_packed_loss_equals_unpacked_loss(gpt2, attn):
    """flash_attention_2: the varlen arguments model_inputs passes (flash-attn itself needs CUDA) reach every attention
    layer, checked by a plain-torch kernel with flash-attention's varlen contract, several packed rows per batch."""
    src = DataSourceConfig(source=str(shared_data("squad-v1.1/dev-v1.1.json")), limit=24)
    tset = tokenize_examples(load_examples(src, FormatOptions())[0], gpt2, 256, "drop", "squad")
    packed = pack(tset, 512)
    assert packed.samples == len(tset) and len(packed) <= len(tset) / 2
    assert all(len(row) <= 512 for row in packed.input_ids)
    assert sum(pos.count(0) for pos in packed.position_ids) == len(tset)  # every sample in exactly one row
    assert sorted(t for row in packed.input_ids for t in row) == sorted(t for row in tset.input_ids for t in row)
    model = tiny_llama(vocab_size=len(gpt2), max_position_embeddings=512)
    if attn == "flash_attention_2":
        AttentionInterface.register("varlen_reference", varlen_reference_attention)
        AttentionMaskInterface.register("varlen_reference", flash_attention_mask)  # masks made as for flash-attn
        model.set_attn_implementation("varlen_reference")
    else:
        model.set_attn_implementation(attn)

    def total(dataset, batch_size):
        loss = count = 0
        with torch.no_grad():  # flex_attention has no backward on CPU
            for start in range(0, len(dataset), batch_size):
                batch = collate(dataset, list(range(start, min(start + batch_size, len(dataset)))), gpt2.eos_token_id)
                inputs = model_inputs(host_ready(batch) if "position_ids" in batch else batch, attn, torch.float32)
                s, n = token_cross_entropy(model(**inputs).logits, batch["labels"])
                loss, count = loss + s.item(), count + n.item()
        return loss, count

    unpacked_loss, unpacked_count = total(tset, 4)
    packed_loss, packed_count = total(packed, 2)
    assert packed_count == unpacked_count
    assert packed_loss == pytest.approx(unpacked_loss, rel=1e-5)


def test_packing_cuts_padding(gpt2):
    src = DataSourceConfig(source=str(shared_data("squad-v1.1/dev-v1.1.json")), limit=400)
    tset = tokenize_examples(load_examples(src, FormatOptions())[0], gpt2, 512, "drop", "squad")

    def padding(dataset, batch_size):
        plan = BatchPlan(len(dataset), BatchShape(batch_size, batch_size), seed=0)
        real = slots = 0
        for step in range(plan.steps_per_epoch):
            batch = collate(dataset, plan.micro_batches(step)[0], 0)
            real, slots = real + int(batch["attention_mask"].sum()), slots + batch["input_ids"].numel()
        return 1 - real / slots

    assert padding(pack(tset, 512), 4) < 0.05 < padding(tset, 8)


class CountingTokenizer:
    """Delegates to a tokenizer and counts the batch tokenisations (lists of texts) it is asked for."""

    def __init__(self, inner):
        self.inner, self.batches = inner, 0

    def __call__(self, text, **kw):
        self.batches += isinstance(text, list)
        return self.inner(text, **kw)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_second_build_reads_the_cache_instead_of_tokenising(gpt2, tmp_path):
    squad = str(shared_data("squad-v1.1/dev-v1.1.json"))
    cfg = DataConfig(seq_len=256, cache_dir=str(tmp_path), train=DataSourceConfig(source=squad, limit=50),
                     validation=DataSourceConfig(source=squad, split="train[-10:]"))
    first = CountingTokenizer(gpt2)
    train, val = build(cfg, first)
    assert first.batches == 2 and len(list(tmp_path.glob("*/meta.json"))) == 2
    second = CountingTokenizer(gpt2)
    train2, val2 = build(cfg, second)
    assert second.batches == 0
    assert (train2.input_ids, train2.labels, train2.references) == (train.input_ids, train.labels, train.references)
    assert val2.summary() == val.summary()
    # Anything that changes the tokens changes the key.
    third = CountingTokenizer(gpt2)
    build(DataConfig(seq_len=384, cache_dir=str(tmp_path), train=cfg.train,
                     validation=cfg.validation), third)
    assert third.batches == 2


@pytest.mark.parametrize("source, fmt", [("squad-v1.1/dev-v1.1.json", "squad"),
                                         ("llamafactory-demos/v1_sft_demo.jsonl", "chat"),
                                         ("llamafactory-demos/c4_demo.jsonl", "text")])
def test_parallel_tokenisation_equals_one_process(gpt2, tmp_path, monkeypatch, source, fmt):
    """data.num_proc: forked workers tokenise contiguous spans of rows; the joined result is the one process's (text
    documents: one token stream cut into rows after joining), with progress lines on the way."""
    import automodel.data.tokenize as tokenize

    monkeypatch.setattr(tokenize, "ROWS_PER_CHUNK", 20)  # parallel on a small set
    src = DataSourceConfig(source=str(shared_data(source)), format=fmt, limit=300)
    sets, lines = [], []
    for workers, span in ((1, 10**9), (1, 7), (3, 7)):  # one span; spans of 7 rows in turn; in 3 processes
        monkeypatch.setattr(tokenize, "ROWS_PER_SPAN", span)
        cfg = DataConfig(seq_len=256, num_proc=workers, chat_template="chatml", train=src)
        sets.append(build(cfg, gpt2, use_cache=False, log=lines.append)[0])
    one, serial, three = sets
    assert (serial.input_ids, serial.labels, serial.references) == (one.input_ids, one.labels, one.references)
    assert (three.input_ids, three.labels, three.prompt_lens, three.references) == (
        one.input_ids, one.labels, one.prompt_lens, one.references)
    assert three.summary() == one.summary() and len(one) > 10
    assert any("with 3 process(es)" in line for line in lines)
    assert any(line.startswith("data: tokenising train: ") and "%" in line for line in lines)


def test_a_bad_row_in_a_worker_names_its_row_in_the_file(gpt2, tmp_path, monkeypatch):
    import automodel.data.tokenize as tokenize

    monkeypatch.setattr(tokenize, "ROWS_PER_CHUNK", 10)
    path = tmp_path / "rows.jsonl"
    rows = [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(60)]
    rows[47] = {"instruction": "q47"}
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = DataConfig(seq_len=64, num_proc=3, train=DataSourceConfig(source=str(path), format="instruction"))
    with pytest.raises(ConfigError, match=r"rows.jsonl: line 48 \(split `train`\), field `output`"):
        build(cfg, gpt2, use_cache=False)


def test_bad_rows_skipped_and_counted(gpt2, tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c"}\n{"instruction": "d", "output": 3}\n'
                    '{"instruction": "e", "output": "f"}\n')
    cfg = DataConfig(seq_len=64, on_bad_row="skip", cache_dir=str(tmp_path / "c"),
                     train=DataSourceConfig(source=str(path), format="instruction"))
    train, _ = build(cfg, gpt2)
    assert len(train) == 2 and train.skipped == 2 and train.rows_read == 4
    assert "2 bad rows skipped" in train.summary()


def test_validation_fraction_carves_a_disjoint_seeded_split(gpt2, tmp_path):
    path = shared_data("llamafactory-demos/alpaca_en_demo.json")
    cfg = DataConfig(seq_len=1024, truncate="right", validation_fraction=0.1, cache_dir=str(tmp_path),
                     train=DataSourceConfig(source=str(path), format="instruction"))
    train, val = build(cfg, gpt2, seed=3)
    assert len(val) == 100 and len(train) == 899
    # Together they are the whole set, each row once (the file repeats 14 rows, so equal content can occur
    # on both sides only for those).
    from collections import Counter

    import attrs

    whole, _ = build(attrs.evolve(cfg, validation_fraction=0.0), gpt2, use_cache=False)
    full = Counter(map(tuple, whole.input_ids))
    assert Counter(map(tuple, train.input_ids)) + Counter(map(tuple, val.input_ids)) == full
    assert all(full[x] > 1 for x in set(map(tuple, train.input_ids)) & set(map(tuple, val.input_ids)))
    again, val_again = build(cfg, gpt2, seed=3, use_cache=False)
    assert val_again.input_ids == val.input_ids
    _, other = build(cfg, gpt2, seed=4, use_cache=False)
    assert other.input_ids != val.input_ids


def test_csv_and_parquet_sources_read_like_jsonl(gpt2, tmp_path):
    import datasets

    rows = [{"instruction": f"Say {i}", "output": f"0{i}"} for i in range(5)]  # "03" must stay "03"
    ds = datasets.Dataset.from_list(rows)
    ds.to_csv(tmp_path / "r.csv")
    ds.to_parquet(tmp_path / "r.parquet")
    (tmp_path / "r.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    got = [load_examples(DataSourceConfig(source=str(tmp_path / f"r.{ext}"), format="instruction"),
                         FormatOptions())[0] for ext in ("csv", "parquet", "jsonl")]
    assert got[0] == got[1] == got[2] and got[0][3].response == "03"


def test_batches_after_a_restart_equal_the_uninterrupted_ones(gpt2):
    src = DataSourceConfig(source=str(shared_data("squad-v1.1/dev-v1.1.json")), limit=64)
    tset = tokenize_examples(load_examples(src, FormatOptions())[0], gpt2, 512, "drop", "squad")
    plan = BatchPlan(len(tset), BatchShape(8, 4, world_size=1), seed=5)
    through = [[collate(tset, mb, 0) for mb in plan.micro_batches(step)] for step in range(20)]  # 2+ epochs
    restarted = BatchPlan(len(tset), BatchShape(8, 4, world_size=1), seed=5)  # a new process resuming at step 13
    for step in range(13, 20):
        for a, b in zip(through[step], [collate(tset, mb, 0) for mb in restarted.micro_batches(step)]):
            assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
@pytest.mark.parametrize("config", ["instruction_cpu", "chat_cpu", "text_cpu", "stream_cpu"])
def test_shipped_format_configs_train(tmp_path, config):
    import automodel
    from automodel.config import load_config
    from tests.helpers import REPO

    shared_data("llamafactory-demos")
    cfg = load_config(REPO / "configs_toml" / f"{config}.toml", [
        f"output_dir={tmp_path / config}", "train.max_steps=6", "schedule.warmup_steps=1", "train.log_every=1",
        "train.eval_every=0", "eval.at_start=true", "eval.max_batches=2", "checkpoint.save_final=false",
        "logging.progress_bar=\"off\"",
        # Small steps (GPT-2's 50k-token head is most of the cost: ~1 s a step here against 10 s as shipped).
        "model.config.num_hidden_layers=1", "data.seq_len=128", "train.global_batch_size=8",
        "train.micro_batch_size=4", "optim.lr=6e-3"], world_size=1)
    import os

    cwd = os.getcwd()
    os.chdir(REPO)  # the configs' ../shared/data paths are relative to the checkout
    try:
        result = automodel.train(cfg)
    finally:
        os.chdir(cwd)
    rows = [json.loads(line) for line in (result.output_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    # A fresh model is uniform over GPT-2's 50,257 tokens: the first loss is ln(50257) = 10.825 when the trained
    # positions are real tokens (measured: 10.80-10.85); masking that lost the labels would read 0 or nan.
    assert len(losses) == 6 and abs(losses[0] - math.log(50257)) < 0.1
    # It learns the format's tokens (measured at lr 6e-3, rows of 128: -1.1 to -1.9 by step 5, held-out -1.0 to -2.3).
    assert losses[4] < losses[0] - 0.5
    assert result.metrics["eval_loss"] < result.metrics["eval_loss_at_start"] - 0.4
    if cfg.data.packing:
        assert result.metrics["padding_fraction"] < 0.2  # packed rows are nearly full


def test_every_source_is_opened_and_its_first_rows_checked_before_any_is_tokenised(gpt2, tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text("".join(json.dumps({"instruction": f"q{i}", "output": f"a{i}"}) + "\n" for i in range(50)))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"instruction": "q", "answer": "a"}) + "\n")
    lines = []
    cfg = DataConfig(seq_len=64, train=[DataSourceConfig(source=str(good), format="instruction"),
                                        DataSourceConfig(source=str(bad), format="instruction")])
    with pytest.raises(ConfigError, match=r"bad.jsonl: line 1 \(split `train`\), field `output`"):
        build(cfg, gpt2, use_cache=False, log=lines.append)
    assert not any("tokenised" in line for line in lines)  # the first source was not tokenised first
