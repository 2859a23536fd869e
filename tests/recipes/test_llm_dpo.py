"""Preference tuning (recipe llm_dpo): exact normalisation (2 x 4 == 1 x 8, KTO's reference point included), the
LoRA adapter-off reference equal to a frozen copy bit for bit, a few full steps equal TRL's losses, and end to end:
the shipped CPU config learns, precomputed reference log-probs equal computing them on the fly, a killed run
resumes exactly, 2 ranks and 2-rank ZeRO-3 equal one process, and the export talks."""

import copy

import datasets
import pytest
import torch
from transformers import AutoModelForCausalLM

import automodel
from automodel.backends import build_functional
from automodel.config import ConfigError, OptimConfig, PeftConfig, PreferenceConfig
from automodel.data import preference as pairs
from automodel.peft import apply as apply_lora
from automodel.training.preference import PreferenceLoss, nll_tokens
from tests import helpers
from tests.helpers import (PAIRS, REPO, frozen_copy as frozen, policy_and_reference, preference_set,
                           preference_tokenizer as tokenizer, tiny_llama, tokenize_pairs)

CPU = torch.device("cpu")
DPO_CPU = "configs_toml/dpo_cpu.toml"


def dpo_backend(model, pref, reference, chunk=8, lr=3e-3, betas=(0.9, 0.999)):
    return build_functional(model, optim=OptimConfig(lr=lr, betas=betas), clip_grad_norm=1.0, lr_fn=lambda s: lr,
                            device=CPU, grad_method="autograd", all_reduce=None, rank=0, world_size=1, seed=0,
                            loss_chunk_tokens=chunk, master_dtype="auto",
                            objective=lambda m, c, d, p: PreferenceLoss(m, pref, c, d, reference=reference,
                                                                        partitioned=p))


def eight_pairs(kind="pairs"):
    rows = [{**r, "chosen": r["chosen"] + suffix} for suffix in ("", "!") for r in PAIRS]
    if kind == "kto":
        rows = [{"prompt": r["prompt"], "completion": r["chosen" if i % 3 else "rejected"], "label": bool(i % 3)}
                for i, r in enumerate(rows)]
    return tokenize_pairs(rows, fmt="preference" if kind == "pairs" else "kto")


@pytest.mark.parametrize("pref", [PreferenceConfig(loss="sigmoid", sft_weight=0.5), PreferenceConfig(loss="orpo"),
                                  PreferenceConfig(loss="kto", kto_desirable_weight=1.3)], ids=["rpo", "orpo", "kto"])
def test_two_micro_batches_of_four_equal_one_of_eight(pref):
    pset = eight_pairs("kto" if pref.loss == "kto" else "pairs")
    nll = nll_tokens(pref)
    results = []
    for sizes in ([8], [4, 4], [2, 2, 2, 2]):
        policy, reference = policy_and_reference()
        backend = dpo_backend(policy, pref, None if pref.loss == "orpo" else frozen(reference))
        starts = [sum(sizes[:i]) for i in range(len(sizes))]
        batches = [pairs.collate(pset, list(range(s, s + n)), 2, nll) for s, n in zip(starts, sizes)]
        state, metrics = backend.step(backend.state, batches)
        state, second = backend.step(state, batches)
        results.append((metrics.loss.item(), second.loss.item(), {k: v.item() for k, v in metrics.extras.items()},
                        state.params))
    (loss, again, extras, params), *others = results
    assert "rewards/chosen" in extras and ("kl" in extras) == (pref.loss == "kto")
    for other_loss, other_again, other_extras, other_params in others:
        assert other_loss == pytest.approx(loss, rel=1e-6) and other_again == pytest.approx(again, rel=1e-6)
        assert other_extras == pytest.approx(extras, rel=1e-5, abs=1e-6)
        for name, value in params.items():  # after two AdamW steps: reduction order moves the last bits (lr 3e-3)
            torch.testing.assert_close(other_params[name], value, rtol=1e-5, atol=2e-5)


def test_activation_checkpointing_gives_the_same_step():
    """Recomputed layers (and the reference's no-grad pass through a checkpointed model, here the LoRA base with the
    adapter off) change nothing but memory."""
    from automodel.models import enable_activation_checkpointing

    pset = eight_pairs()
    batch = pairs.collate(pset, list(range(8)), 2, "completion")
    pref = PreferenceConfig(loss="sigmoid", sft_weight=0.3)
    results = []
    for checkpointing in (False, True):
        model, _ = policy_and_reference()
        if checkpointing:
            enable_activation_checkpointing(model)
        model = apply_lora(model, PeftConfig(rank=4, alpha=8.0), seed=0, base_path="base")
        backend = dpo_backend(model, pref, None)
        state, _ = backend.step(backend.state, [batch])
        state, metrics = backend.step(state, [batch])
        results.append((metrics.loss.item(), metrics.extras["rewards/margins"].item(), state.params))
    (loss, margin, params), (ac_loss, ac_margin, ac_params) = results
    assert ac_loss == pytest.approx(loss, rel=1e-6) and ac_margin == pytest.approx(margin, rel=1e-4, abs=1e-7)
    for name, value in params.items():
        torch.testing.assert_close(ac_params[name], value, rtol=1e-5, atol=2e-5)


def test_the_lora_adapter_off_reference_is_a_frozen_copy_bit_for_bit():
    """The base with the adapter switched off gives exactly the log-probs of a frozen copy of the base, so the
    losses and gradients of a LoRA DPO step are the same bits either way (and no second copy is needed)."""
    base, _ = policy_and_reference()
    copy_of_base = frozen(base)
    lora = PeftConfig(rank=4, alpha=8.0, target_modules=["q_proj", "v_proj"])
    pset = eight_pairs()
    batch = pairs.collate(pset, list(range(8)), 2)
    pref = PreferenceConfig(loss="sigmoid", beta=0.2)
    results = []
    for reference in (None, copy_of_base):
        model = apply_lora(copy.deepcopy(base), lora, seed=0, base_path="base")
        with torch.no_grad():  # a trained adapter, so the policy differs from its reference
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.05, generator=torch.Generator().manual_seed(3))
        backend = dpo_backend(model, pref, reference)
        state, metrics = backend.step(backend.state, [batch])
        results.append((metrics.loss, metrics.extras, state.params))
    (loss_a, extras_a, params_a), (loss_b, extras_b, params_b) = results
    assert torch.equal(loss_a, loss_b) and extras_a["rewards/chosen"] != 0
    assert all(torch.equal(extras_a[k], extras_b[k]) for k in extras_a)
    assert all(torch.equal(params_a[k], params_b[k]) for k in params_a)


def test_three_full_steps_equal_trls_dpo_trainer(tmp_path):
    """The same init, pairs (all four every step), AdamW and clipping: TRL's DPOTrainer.train() logs the losses our
    functional step computes, step by step."""
    import trl

    policy, reference = policy_and_reference()
    args = trl.DPOConfig(output_dir=str(tmp_path / "trl"), use_cpu=True, report_to="none", bf16=False,
                         gradient_checkpointing=False, per_device_train_batch_size=4, max_length=64, beta=0.3,
                         learning_rate=3e-3, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
                         max_grad_norm=1.0, optim="adamw_torch", max_steps=3, logging_steps=1, save_strategy="no",
                         adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, seed=0)
    trainer = trl.DPOTrainer(model=copy.deepcopy(policy), ref_model=copy.deepcopy(reference), args=args,
                             train_dataset=datasets.Dataset.from_list(PAIRS), processing_class=tokenizer())
    examples = [trainer.train_dataset[i] for i in range(len(PAIRS))]
    trainer.train()
    trl_losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    pset = preference_set([(e["prompt_ids"], e[side]) for e in examples for side in ("chosen_ids", "rejected_ids")])
    backend = dpo_backend(policy, PreferenceConfig(beta=0.3), frozen(reference), lr=3e-3)
    state, losses = backend.state, []
    for _ in range(3):
        state, metrics = backend.step(state, [pairs.collate(pset, [0, 1, 2, 3], 2)])
        losses.append(metrics.loss.item())
    assert len(trl_losses) == 3 and losses[2] < losses[0]
    assert losses == pytest.approx(trl_losses, rel=1e-5)


# ---------------------------------------------------------------------------------------------
# End to end


def dpo_cpu(tmp_path, *overrides):
    return automodel.load_config(REPO / DPO_CPU, [f'output_dir="{tmp_path}"', 'logging.progress_bar="off"',
                                                  *overrides], world_size=1)


SHORT = ["train.max_steps=6", "train.log_every=1", "train.eval_every=3", "schedule.warmup_steps=1",
         "data.train.limit=96", "data.validation.limit=16", "train.global_batch_size=8", "train.micro_batch_size=4"]


@pytest.mark.slow
def test_the_shipped_cpu_config_learns_to_rank_the_right_answer(tmp_path):
    result = automodel.train(dpo_cpu(tmp_path, "train.max_steps=120", "train.eval_every=40", "checkpoint.keep_best=true",
                                     'train.best_metric="eval_rewards/accuracies"'))
    rows = helpers.rows(tmp_path)
    evals = [r for r in rows if "eval_loss" in r]
    assert evals[0]["eval_rewards/accuracies"] == 0.0  # the policy is its reference: every margin is 0
    assert evals[-1]["eval_rewards/accuracies"] >= 0.9 and evals[-1]["eval_rewards/margins"] > 0.5
    best = max(evals, key=lambda r: (r["eval_rewards/accuracies"], -r["step"]))  # the first of the best
    assert result.metrics["best_step"] == best["step"]
    assert result.metrics["eval_rewards/accuracies"] == best["eval_rewards/accuracies"]
    assert result.metrics["eval_rewards/accuracies_at_start"] == 0.0
    train = [r for r in rows if "loss" in r]
    assert {"rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
            "logps/rejected", "nll_loss"} <= set(train[-1])
    card = (result.final_dir / "README.md").read_text()
    assert "Preference-tuned with DPO" in card
    model = AutoModelForCausalLM.from_pretrained(result.final_dir)
    assert model.config.num_hidden_layers == 4


@pytest.mark.slow
def test_precomputed_reference_equals_computing_it_and_a_resumed_run_reuses_it(tmp_path, capsys):
    on_the_fly = automodel.train(dpo_cpu(tmp_path / "fly", *SHORT))
    pre = automodel.train(dpo_cpu(tmp_path / "pre", *SHORT, "preference.precompute_reference=true",
                                  "checkpoint.every=3"))
    assert (tmp_path / "pre" / "reference" / "train.npy").is_file()
    fly_losses, pre_losses = helpers.train_losses(tmp_path / "fly"), helpers.train_losses(tmp_path / "pre")
    assert list(pre_losses.values()) == pytest.approx(list(fly_losses.values()), rel=1e-5)
    assert pre.metrics["eval_loss"] == pytest.approx(on_the_fly.metrics["eval_loss"], rel=1e-5)
    capsys.readouterr()
    automodel.train(dpo_cpu(tmp_path / "pre", *SHORT, "preference.precompute_reference=true", "checkpoint.every=3",
                            f'train.resume="{tmp_path / "pre" / "checkpoints" / "step_000003"}"'))
    out = capsys.readouterr().out
    assert "reference log-probs read from" in out and "computed in one pass" not in out
    assert "reference: a frozen copy" not in out  # no reference model is built when the log-probs are stored
    assert helpers.train_losses(tmp_path / "pre") == pytest.approx(pre_losses, rel=0, abs=0)


@pytest.mark.slow
def test_a_stopped_lora_kto_run_resumes_exactly(tmp_path):
    """KTO with LoRA (the reference is the adapter-off base): stopped after step 3 (a shorter run of the same steps,
    at a constant LR) and resumed, the losses and KTO's reference point are those of the uninterrupted run."""
    kto = ['preference.loss="kto"', 'data.train.source="examples/preference/kto_train.jsonl"',
           'data.train.format="kto"', 'data.validation.source="examples/preference/kto_validation.jsonl"',
           'data.validation.format="kto"', "preference.sft_weight=0.0", "peft.rank=8"]
    whole, cut = whole_and_resumed(tmp_path, kto, ("loss", "kl", "rewards/chosen"))
    assert cut == whole
    assert helpers.eval_losses(tmp_path / "cut")[-1] == helpers.eval_losses(tmp_path / "whole")[-1]


def whole_and_resumed(tmp_path, overrides: list[str], keys: tuple[str, ...]) -> tuple[list, list]:
    """`keys` of every logged step of a 6-step run, and of the same run stopped after step 3 (a shorter run of the
    same steps, at a constant LR, checkpointed at 3) and resumed."""
    common = [*SHORT, *overrides, 'schedule.kind="constant"', "schedule.warmup_steps=0", "checkpoint.every=3"]
    automodel.train(dpo_cpu(tmp_path / "whole", *common))
    automodel.train(dpo_cpu(tmp_path / "cut", *common, "train.max_steps=3"))
    automodel.train(dpo_cpu(tmp_path / "cut", *common))
    return tuple([[r[k] for k in keys] for r in helpers.rows(tmp_path / run) if "loss" in r]
                 for run in ("whole", "cut"))


@pytest.mark.slow
def test_streamed_pairs_train_and_resume_exactly(tmp_path):
    """The pairs read as training goes: stopped after step 3 and resumed from the checkpoint's stream position, the
    losses and rewards are the uninterrupted run's."""
    whole, cut = whole_and_resumed(tmp_path, ["data.train.streaming=true"], ("loss", "rewards/margins", "passes"))
    assert cut == whole
    assert whole[-1][2] == [1]


@pytest.mark.slow
@pytest.mark.parametrize("launcher, backend", [("torchrun", []),
                                               ("torchrun", ["distributed.backend=deepspeed",
                                                             "distributed.zero_stage=3"])],
                         ids=["functional-2-ranks", "zero3-2-ranks"])
def test_two_ranks_equal_one_process(tmp_path, launcher, backend):
    common = SHORT + ["train.loss_chunk_tokens=16", "checkpoint.save_final=false", 'logging.progress_bar="off"',
                      "train.max_steps=4"]
    one = helpers.launch_run("python", common + [f"output_dir={tmp_path / 'one'}"], config=DPO_CPU)
    assert one.returncode == 0, one.stderr[-3000:]
    two = helpers.launch_run(launcher, common + backend + [f"output_dir={tmp_path / 'two'}"], config=DPO_CPU)
    assert two.returncode == 0, two.stdout[-2000:] + two.stderr[-3000:]
    assert "2 rank(s)" in two.stdout and "reference: a frozen copy of the initial policy" in two.stdout
    ref, got = helpers.rows(tmp_path / "one"), helpers.rows(tmp_path / "two")
    keys = ("loss", "rewards/accuracies", "rewards/margins", "logps/chosen")
    assert [r[k] for r in got if "loss" in r for k in keys] == pytest.approx(
        [r[k] for r in ref if "loss" in r for k in keys], rel=1e-5, abs=1e-6)
    assert helpers.eval_losses(tmp_path / "two") == pytest.approx(helpers.eval_losses(tmp_path / "one"), rel=1e-5)


def test_a_reference_with_another_vocabulary_is_a_one_line_error(tmp_path):
    tiny_llama(vocab_size=300).save_pretrained(tmp_path / "ref")
    cfg = dpo_cpu(tmp_path / "run", f'preference.reference="{tmp_path / "ref"}"', "train.max_steps=1",
                  "schedule.warmup_steps=0")
    with pytest.raises(ConfigError, match=r"preference.reference .* 300-token output vocabulary, the policy 259"):
        automodel.train(cfg)
    with pytest.raises(ConfigError, match=r"preference.reference: "):
        automodel.train(dpo_cpu(tmp_path / "run2", f'preference.reference="{tmp_path / "missing"}"',
                                "train.max_steps=1", "schedule.warmup_steps=0"))
