"""The preference losses against TRL (the reference users judge us by): one batch's loss, metrics and gradients equal
TRL's DPOTrainer (sigmoid, ipo, robust, RPO's sft term), KTOTrainer, ORPOTrainer and CPOTrainer (simpo) on the same
model, tokenizer and pairs, through the chunked head and through whole logits; TRL's tokenisation is ours."""

import contextlib
import copy

import datasets
import pytest
import torch

from automodel.config import DataConfig, DataSourceConfig, PreferenceConfig
from automodel.data import CHAT_TEMPLATES, FormatOptions
from automodel.data import preference as pairs
from automodel.loss import IGNORE_INDEX
from automodel.training.forward import to_device
from automodel.training.preference import PreferenceLoss, finish_stats, nll_tokens
from tests.helpers import (PAIRS, frozen_copy as frozen, policy_and_reference, preference_set,
                           preference_tokenizer as tokenizer, tiny_llama)

trl = pytest.importorskip("trl")

CPU = torch.device("cpu")


def trl_args(config_class, tmp_path, **kwargs):
    kwargs = {"max_length": 64, **kwargs}
    return config_class(output_dir=str(tmp_path / "trl"), use_cpu=True, report_to="none", bf16=False,
                        gradient_checkpointing=False, per_device_train_batch_size=len(PAIRS), **kwargs)


def ours(pref: PreferenceConfig, policy, reference, pset, chunk: int):
    """(loss, metrics, gradients by name) of one batch of the whole set through PreferenceLoss."""
    loss = PreferenceLoss(policy, pref, chunk, torch.float32, reference=reference)
    run = lambda inputs: policy(**inputs)  # noqa: E731
    assert "chunks" in loss.calibrate(run, CPU) or chunk == 0
    batch = to_device(pairs.collate(pset, list(range(len(pset))), 2, nll_tokens(pref)), CPU)
    policy.train()
    totals = loss.prepare(lambda: contextlib.nullcontext(run), [batch])
    loss_sum, stats = loss.terms(run, batch, totals)
    value = loss_sum / totals["n"]
    policy.zero_grad()
    value.backward()
    return value.item(), {k: v.item() for k, v in finish_stats(stats).items()}, grads_of(policy)


def grads_of(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same(value, metrics, grads, trl_value, trl_metrics, trl_grads, names):
    assert value == pytest.approx(trl_value, rel=1e-5, abs=1e-7)
    for name in names:
        assert metrics[name] == pytest.approx(trl_metrics[name], rel=1e-5, abs=1e-6), name
    assert set(grads) == set(trl_grads)
    for name, g in grads.items():
        assert (g - trl_grads[name]).norm() <= 1e-5 * trl_grads[name].norm() + 1e-9, name


PAIR_METRICS = ["rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
                "logps/rejected"]


def trl_step(trainer, batch):
    """TRL's loss of one collated batch in train mode, backward; (loss, logged metrics, gradients)."""
    trainer.model.train()
    trainer.model.zero_grad()
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    return loss.item(), metrics, grads_of(trainer.model)


def test_our_tokenisation_is_trls_for_text_and_conversations(tmp_path):
    tok = tokenizer()
    tok.chat_template = CHAT_TEMPLATES["chatml"]
    chats = [{"prompt": [{"role": "user", "content": r["prompt"]}], "chosen": [{"role": "assistant", "content": r["chosen"]}],
              "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in PAIRS]
    implicit = [{"chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"]} for r in PAIRS]
    for rows in (PAIRS, chats, implicit):
        trainer = trl.DPOTrainer(model=tiny_llama(vocab_size=259), ref_model=tiny_llama(vocab_size=259),
                                 args=trl_args(trl.DPOConfig, tmp_path, max_length=256),
                                 train_dataset=datasets.Dataset.from_list(rows), processing_class=tok)
        data_cfg = DataConfig(seq_len=256, train=DataSourceConfig(source="x.jsonl", format="preference"))
        pset = pairs.tokenize_rows(datasets.Dataset.from_list(rows), data_cfg.train[0], data_cfg, tok,
                                   FormatOptions(tokenizer=tok), "train", kto=False)
        assert len(trainer.train_dataset) == len(pset) == len(rows)
        for i, row in enumerate(trainer.train_dataset):
            labels = pset.labels[2 * i]
            prompt_len = next(k for k, t in enumerate(labels) if t != IGNORE_INDEX)
            assert pset.input_ids[2 * i] == row["prompt_ids"] + row["chosen_ids"]
            assert pset.input_ids[2 * i + 1] == row["prompt_ids"] + row["rejected_ids"]
            assert prompt_len == len(row["prompt_ids"])


@pytest.mark.parametrize("chunk", [8, 0], ids=["chunked", "whole-logits"])
@pytest.mark.parametrize("loss, trl_kwargs, kwargs", [
    ("sigmoid", {}, {}),
    ("ipo", {"loss_type": ["ipo"]}, {}),
    ("robust", {"loss_type": ["robust"], "label_smoothing": 0.2}, {"label_smoothing": 0.2}),
    ("sigmoid", {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, 0.7]}, {"sft_weight": 0.7}),
], ids=["sigmoid", "ipo", "robust", "rpo"])
def test_dpo_losses_equal_trls_dpo_trainer(tmp_path, chunk, loss, trl_kwargs, kwargs):
    policy, reference = policy_and_reference()
    tok = tokenizer()
    trainer = trl.DPOTrainer(model=copy.deepcopy(policy), ref_model=copy.deepcopy(reference),
                             args=trl_args(trl.DPOConfig, tmp_path, beta=0.3, **trl_kwargs),
                             train_dataset=datasets.Dataset.from_list(PAIRS), processing_class=tok)
    examples = [trainer.train_dataset[i] for i in range(len(PAIRS))]
    expected = trl_step(trainer, trainer.data_collator(examples))
    pset = preference_set([(e["prompt_ids"], e[side]) for e in examples for side in ("chosen_ids", "rejected_ids")])
    pref = PreferenceConfig(loss=loss, beta=0.3, **kwargs)
    got = ours(pref, policy, frozen(reference), pset, chunk)
    assert_same(*got, *expected, PAIR_METRICS)


def orpo_or_cpo_rows(batch) -> list[tuple[list[int], list[int]]]:
    """(prompt, completion) ids of each pair's chosen and rejected row in ORPO/CPO's collated batch."""
    rows = []
    for i in range(batch["chosen_input_ids"].shape[0]):
        for side in ("chosen", "rejected"):
            mask = batch[f"{side}_attention_mask"][i].bool()
            ids, labels = batch[f"{side}_input_ids"][i][mask].tolist(), batch[f"{side}_labels"][i][mask].tolist()
            prompt = next(k for k, t in enumerate(labels) if t != IGNORE_INDEX)
            rows.append((ids[:prompt], ids[prompt:]))
    return rows


def cpo_family_step(trainer, batch):
    trainer.model.train()
    trainer.model.zero_grad()
    loss, metrics = trainer.get_batch_loss_metrics(trainer.model, batch, train_eval="train")
    loss.backward()
    return loss.item(), metrics, grads_of(trainer.model)


@pytest.mark.parametrize("chunk", [8, 0], ids=["chunked", "whole-logits"])
def test_orpo_equals_trls_orpo_trainer(tmp_path, chunk):
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    policy, _ = policy_and_reference()
    trainer = ORPOTrainer(model=copy.deepcopy(policy), args=trl_args(ORPOConfig, tmp_path, beta=0.25),
                          train_dataset=datasets.Dataset.from_list(PAIRS), processing_class=tokenizer())
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(PAIRS))])
    expected = cpo_family_step(trainer, batch)
    got = ours(PreferenceConfig(loss="orpo", orpo_lambda=0.25), policy, None, preference_set(orpo_or_cpo_rows(batch)),
               chunk)
    assert_same(*got, *expected, PAIR_METRICS + ["nll_loss", "log_odds_ratio", "log_odds_chosen"])


@pytest.mark.parametrize("chunk", [8, 0], ids=["chunked", "whole-logits"])
@pytest.mark.parametrize("cpo_alpha, smoothing", [(0.0, 0.0), (0.5, 0.1)], ids=["simpo", "simpo-nll-smoothed"])
def test_simpo_equals_trls_cpo_trainer(tmp_path, chunk, cpo_alpha, smoothing):
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    policy, _ = policy_and_reference()
    args = trl_args(CPOConfig, tmp_path, loss_type="simpo", beta=2.0, simpo_gamma=0.6, cpo_alpha=cpo_alpha,
                    label_smoothing=smoothing)
    trainer = CPOTrainer(model=copy.deepcopy(policy), args=args, train_dataset=datasets.Dataset.from_list(PAIRS),
                         processing_class=tokenizer())
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(PAIRS))])
    expected = cpo_family_step(trainer, batch)
    pref = PreferenceConfig(loss="simpo", beta=2.0, simpo_gamma=0.6, sft_weight=cpo_alpha, label_smoothing=smoothing)
    got = ours(pref, policy, None, preference_set(orpo_or_cpo_rows(batch)), chunk)
    assert_same(*got, *expected, PAIR_METRICS + (["nll_loss"] if cpo_alpha else []))


@pytest.mark.parametrize("chunk", [8, 0], ids=["chunked", "whole-logits"])
def test_kto_equals_trls_kto_trainer(tmp_path, chunk):
    policy, reference = policy_and_reference()
    rows = [{"prompt": r["prompt"], "completion": r["chosen" if i % 3 else "rejected"], "label": bool(i % 3)}
            for i, r in enumerate(PAIRS)]
    args = trl_args(trl.KTOConfig, tmp_path, beta=0.3, desirable_weight=1.0, undesirable_weight=1.5)
    trainer = trl.KTOTrainer(model=copy.deepcopy(policy), ref_model=copy.deepcopy(reference), args=args,
                             train_dataset=datasets.Dataset.from_list(rows), processing_class=tokenizer())
    batch = next(iter(trainer.get_train_dataloader()))
    expected = trl_step(trainer, batch)
    data_cfg = DataConfig(seq_len=64, train=DataSourceConfig(source="x.jsonl", format="kto"))
    pset = pairs.tokenize_rows(datasets.Dataset.from_list(rows), data_cfg.train[0], data_cfg, tokenizer(),
                               FormatOptions(tokenizer=tokenizer()), "train", kto=True)
    for i in range(len(rows)):  # the same rows, mismatched rows included (TRL: prompt i, completion i - 1)
        assert pset.input_ids[2 * i] == batch["input_ids"][i][batch["attention_mask"][i].bool()].tolist()
        assert pset.input_ids[2 * i + 1] == batch["KL_input_ids"][i][batch["KL_attention_mask"][i].bool()].tolist()
    pref = PreferenceConfig(loss="kto", beta=0.3, kto_undesirable_weight=1.5)
    got = ours(pref, policy, frozen(reference), pset, chunk)
    assert expected[1]["kl"] > 0  # the reference point is in play
    assert_same(*got, *expected, ["rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected", "kl",
                                  "rewards/margins"])
