"""Preference data: the row shapes people bring (TRL's columns, implicit prompts, ShareGPT pairs, chosen_messages,
KTO), truncation and its counts, one-line errors naming file and row, the batch layout, and the config rules."""

import json

import datasets

import pytest
import torch

from automodel.config import ConfigError, DataConfig, DataSourceConfig, load_config
from automodel.data import FormatOptions
from automodel.data import preference as pairs
from automodel.loss import IGNORE_INDEX
from tests.helpers import REPO, preference_tokenizer, shared_data, tokenize_pairs, write_jsonl


def tokenizer(chat: bool = False):
    return preference_tokenizer(chat)


def tokenize(rows, fmt="preference", tok=None, **data):
    return tokenize_pairs(rows, fmt, tok, **data)


def prompt_and_completion(pset, row: int, tok) -> tuple[str, str]:
    ids, labels = pset.input_ids[row], pset.labels[row]
    start = next(i for i, t in enumerate(labels) if t != IGNORE_INDEX)
    return tok.decode(ids[:start]), tok.decode(ids[start:])


def test_trl_columns_text_and_implicit_prompts_give_the_same_rows():
    explicit = tokenize([{"prompt": "Q: sky?\n", "chosen": "blue", "rejected": "green"}])
    implicit = tokenize([{"chosen": "Q: sky?\nblue", "rejected": "Q: sky?\ngreen"}])
    assert explicit.input_ids == implicit.input_ids and explicit.labels == implicit.labels
    tok = tokenizer()
    assert prompt_and_completion(explicit, 0, tok) == ("Q: sky?\n", "blue</s>")  # EOS appended, as TRL
    assert prompt_and_completion(explicit, 1, tok) == ("Q: sky?\n", "green</s>")
    assert "1 pairs from 1 rows" in explicit.summary()


def test_sharegpt_pairs_chosen_messages_and_kto_messages_from_the_shared_demos():
    tok = tokenizer(chat=True)
    demos = shared_data("llamafactory-demos")
    sharegpt = json.loads((demos / "dpo_en_demo.json").read_text())[:20]
    pset = tokenize(sharegpt, tok=tok, seq_len=50_000)
    assert len(pset) == 20
    prompt, chosen = prompt_and_completion(pset, 0, tok)
    assert prompt.endswith("<|im_start|>assistant\n") and sharegpt[0]["conversations"][0]["value"] in prompt
    assert chosen == sharegpt[0]["chosen"]["value"] + "<|im_end|>\n"
    assert prompt_and_completion(pset, 1, tok) == (prompt, sharegpt[0]["rejected"]["value"] + "<|im_end|>\n")

    v1 = [json.loads(line) for line in (demos / "v1_dpo_demo.jsonl").read_text().splitlines()]
    pset = tokenize(v1, tok=tok, seq_len=50_000)
    prompt, chosen = prompt_and_completion(pset, 0, tok)
    assert prompt.startswith("<|im_start|>system\nYou are an AI assistant.")
    assert chosen.startswith(v1[0]["chosen_messages"][-1]["content"][0]["value"][:40])

    kto = json.loads((demos / "kto_en_demo.json").read_text())[:30]
    kset = tokenize(kto, fmt="kto", tok=tok, seq_len=50_000)
    assert list(kset.desirable) == [row["label"] for row in kto]
    prompt, completion = prompt_and_completion(kset, 2, tok)  # example 1's own row
    assert completion == kto[1]["messages"][-1]["content"] + "<|im_end|>\n"
    prompt, completion = prompt_and_completion(kset, 3, tok)  # its mismatched row: prompt 1, example 0's completion
    assert completion == kto[0]["messages"][-1]["content"] + "<|im_end|>\n"
    assert kto[1]["messages"][0]["content"] in prompt


def test_truncation_keeps_the_prompts_end_and_the_completions_start_and_counts_it():
    rows = [{"prompt": "abcdefghij", "chosen": "KLMNOP", "rejected": "klm"},
            {"prompt": "x" * 40, "chosen": "y", "rejected": "z"}]
    tok = tokenizer()
    pset = tokenize(rows, seq_len=12, max_prompt_tokens=8)
    assert prompt_and_completion(pset, 0, tok) == ("cdefghij", "KLMN")
    assert prompt_and_completion(pset, 1, tok) == ("cdefghij", "klm</s>")
    assert (pset.prompts_cut, pset.completions_cut, pset.dropped) == (2, 1, 0)
    dropped = tokenize(rows, seq_len=12)  # no prompt budget: the long prompt fills seq_len, its pair is dropped
    assert (len(dropped), dropped.dropped) == (1, 1)
    assert "1 dropped" in dropped.summary()


@pytest.mark.parametrize("row, message", [
    ({"prompt": "p", "chosen": "a"}, "line 2 (split `train`), field `rejected`: missing column `rejected`"),
    ({"prompt": "p", "chosen": "same", "rejected": "same"}, "line 2 (split `train`), field `chosen`: chosen and rejected "
                                                            "are the same"),
    ({"prompt": "p", "chosen": "  ", "rejected": "b"}, "field `chosen`: the chosen completion is empty"),
    ({"prompt": [{"role": "user", "content": "p"}], "chosen": "a", "rejected": "b"}, "the prompt is messages and "
                                                                                       "the chosen is text"),
])
def test_a_bad_pair_is_one_line_naming_the_file_row_and_field(tmp_path, row, message):
    path = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b"}, row])
    cfg = DataConfig(train=DataSourceConfig(source=str(path), format="preference"))
    with pytest.raises(ConfigError) as e:
        pairs.build_sources(cfg, tokenizer(), FormatOptions(tokenizer=tokenizer()), use_cache=False)
    assert str(path) in str(e.value) and message in str(e.value) and "\n" not in str(e.value)
    skip = DataConfig(on_bad_row="skip", train=DataSourceConfig(source=str(path), format="preference"))
    train, _ = pairs.build_sources(skip, tokenizer(), FormatOptions(tokenizer=tokenizer()), use_cache=False)
    assert (len(train[0]), train[0].skipped) == (1, 1)


def test_a_kto_label_that_is_not_a_boolean_is_an_error(tmp_path):
    path = write_jsonl(tmp_path / "kto.jsonl", [{"prompt": "p", "completion": "c", "label": "yes"}])
    cfg = DataConfig(train=DataSourceConfig(source=str(path), format="kto"))
    with pytest.raises(ConfigError, match=r"line 1 .*field `label`: column `label` should be true or false"):
        pairs.build_sources(cfg, tokenizer(), FormatOptions(tokenizer=tokenizer()), use_cache=False)


def test_sources_chain_end_to_end_for_a_weighted_mixture():
    first = tokenize([{"prompt": "a", "chosen": "b", "rejected": "c"}])
    second = tokenize([{"prompt": "d", "chosen": "e", "rejected": "f"}, {"prompt": "g", "chosen": "h", "rejected": "i"}])
    both = pairs.chain([first, second], "train")
    assert len(both) == 3 and both.input_ids[2] == second.input_ids[0] and both.labels[5] == second.labels[3]
    kto = pairs.chain([tokenize([{"prompt": "a", "completion": "b", "label": True}], fmt="kto"),
                       tokenize([{"prompt": "c", "completion": "d", "label": False}], fmt="kto")], "train")
    assert list(kto.desirable) == [True, False] and kto.kind == "kto"


def test_the_batch_names_every_log_prob_the_loss_needs_on_the_host():
    rows = [{"prompt": "ab", "chosen": "cde", "rejected": "f"}, {"prompt": "g", "chosen": "hi", "rejected": "jkl"}]
    pset = tokenize(rows)
    batch = pairs.collate(pset, [1, 0], pad_id=2, nll="completion")
    # [chosen 1, chosen 0, rejected 1, rejected 0]: completion + EOS per row, the prompt masked
    assert batch["input_ids"].shape == (4, 6)
    per_row = torch.zeros(4, dtype=torch.long).index_add(0, batch["logp_row"], batch["logp_completion"].long())
    assert per_row.tolist() == [3, 4, 4, 2]
    targets = batch["input_ids"].reshape(-1)[batch["logp_index"] + 1]
    assert (targets == batch["labels"].reshape(-1)[batch["logp_index"] + 1]).all()  # trained tokens only
    assert batch["logp_nll"].sum() == 7 and (batch["logp_row"][batch["logp_nll"]] < 2).all()  # chosen completions
    orpo = pairs.collate(pset, [1, 0], pad_id=2, nll="all")  # ORPO's NLL: every chosen token after the first
    assert orpo["logp_nll"].sum() == 3 + 5 and orpo["logp_completion"].sum() == 13


def dpo_config(tmp_path, *overrides):
    return load_config(REPO / "configs_toml" / "dpo_cpu.toml", [f"output_dir={tmp_path}", *overrides])


@pytest.mark.parametrize("overrides, message", [
    (["recipe=llm_finetune"], 'recipe = "llm_dpo" and a [preference] section go together'),
    (["data.packing=true"], "preference pairs are padded, not packed"),
    (["data.train.streaming=true", "preference.precompute_reference=true"], "precompute_reference needs the pairs "
                                                                               "read in full"),
    (["preference.loss=kto"], 'data.train.format = "preference": preference.loss = "kto" trains on format = "kto"'),
    (["preference.label_smoothing=0.5", "preference.loss=robust"], "preference.label_smoothing must be in [0, 0.5)"),
    (["preference.loss=orpo", "preference.reference=runs/x"], 'loss = "orpo" uses no reference model'),
    (["eval.generate_samples=10"], "reward accuracy of held-out pairs, not exact match"),
])
def test_config_rules(tmp_path, overrides, message):
    with pytest.raises(ConfigError) as e:
        dpo_config(tmp_path, *overrides)
    assert message in str(e.value)


def test_label_smoothing_is_taken_by_robust_and_simpo_and_refused_elsewhere(tmp_path):
    for loss in ("robust", "simpo"):
        assert dpo_config(tmp_path, f"preference.loss={loss}", "preference.label_smoothing=0.1").preference.loss == loss
    with pytest.raises(ConfigError, match=r'loss = "ipo" ignores it'):
        dpo_config(tmp_path, "preference.loss=ipo", "preference.label_smoothing=0.1")


def test_the_shipped_dpo_configs_load(tmp_path):
    assert dpo_config(tmp_path).preference.loss == "sigmoid"
    gpu = load_config(REPO / "configs_toml" / "dpo.toml", [])
    assert gpu.recipe == "llm_dpo" and gpu.peft is not None


@pytest.mark.parametrize("fmt", ["preference", "kto"])
def test_streamed_pairs_are_the_pairs_read_in_full_and_resume_where_they_stopped(fmt):
    """Read as training goes (one rank, file order), a step's batches are those of the pairs read in full (KTO's
    mismatched rows pair within a window of the stream, so its first example is left out of the comparison); a
    stream reopened at a step's position gives the next step's batches exactly."""
    from automodel.config import BatchShape
    from automodel.data import stream

    prefix = "kto_" if fmt == "kto" else ""
    source = DataSourceConfig(source=str(REPO / "examples" / "preference" / f"{prefix}train.jsonl"), format=fmt,
                              streaming=True)
    cfg = DataConfig(seq_len=32, train=source)
    tok = tokenizer()
    shape = BatchShape(global_batch_size=8, micro_batch_size=4, world_size=1)
    collate = lambda samples: pairs.collate_samples(samples, tok.pad_token_id, "completion")  # noqa: E731
    opened = stream.open_train_stream(cfg, tok, FormatOptions(tokenizer=tok), shape, seed=0, rank=0, collate=collate)
    steps = [opened.next_step() for _ in range(3)]
    full = pairs.tokenize_rows(datasets.Dataset.from_json(source.source), source, cfg, tok, FormatOptions(tokenizer=tok),
                               "train", kto=fmt == "kto")
    first = 1 if fmt == "kto" else 0
    for k, (batches, _) in enumerate(steps):
        for m, batch in enumerate(batches):
            indices = list(range(8 * k + 4 * m, 8 * k + 4 * m + 4))
            expected = pairs.collate(full, indices, tok.pad_token_id, "completion")
            rows = slice(first, None)  # KTO: example 0's mismatched row differs
            keys = ("input_ids", "labels") + (("kl_input_ids", "kl_labels") if fmt == "kto" else ())
            for key in keys:
                mine, theirs = batch[key], expected[key]
                if key.startswith("kl_") and k == m == 0:  # example 0's mismatched row: the window's last completion
                    mine, theirs = mine[rows], theirs[rows]
                width = min(mine.shape[1], theirs.shape[1])  # padded to each batch's longest
                assert torch.equal(mine[:, :width], theirs[:, :width]), (k, m, key)
    reopened = stream.open_train_stream(cfg, tok, FormatOptions(tokenizer=tok), shape, seed=0, rank=0,
                                        position=json.loads(json.dumps(steps[1][1])), collate=collate)
    again, _ = reopened.next_step()
    assert all(torch.equal(a[key], b[key]) for a, b in zip(again, steps[2][0]) for key in a)
