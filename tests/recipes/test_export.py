"""What a run leaves for whoever uses the model: the chat template it trained with on the saved tokenizer, and a model
card (README.md) whose front matter huggingface_hub reads and whose loading code runs."""

import json
import re

import pytest
from huggingface_hub import ModelCard
from transformers import AutoTokenizer

import automodel
from automodel import data
from tests.helpers import quickstart, shared_data

pytestmark = pytest.mark.slow  # trains whole (short) runs


def plain_messages(row: dict) -> list[dict]:
    """v1_sft_demo's content parts ({"type": "text", "value": ...}) as plain strings."""
    return [{"role": m["role"], "content": "".join(p["value"] for p in m["content"])} for m in row["messages"]]


def test_the_export_carries_the_chat_template_and_renders_the_training_token_ids(tmp_path):
    source = shared_data("llamafactory-demos/v1_sft_demo.jsonl")
    tokenizer_dir = shared_data("gpt2-tokenizer")
    assert AutoTokenizer.from_pretrained(tokenizer_dir).chat_template is None  # GPT-2 has none
    cfg = quickstart(tmp_path, f"tokenizer.name_or_path={json.dumps(str(tokenizer_dir))}",
                     f"data.train.source={json.dumps(str(source))}", 'data.train.format="chat"', "data.train.limit=40",
                     f"data.validation.source={json.dumps(str(source))}", 'data.validation.format="chat"',
                     "data.validation.limit=4", 'data.chat_template="chatml"', "data.seq_len=1024",
                     "train.max_steps=2", "train.global_batch_size=4", "train.micro_batch_size=4", "eval.at_start=false",
                     "model.config.vocab_size=50257")
    result = automodel.train(cfg)
    final = AutoTokenizer.from_pretrained(result.final_dir)
    assert final.chat_template == data.CHAT_TEMPLATES["chatml"]

    # The saved template renders each conversation to exactly the ids the run trained on.
    train_set, _ = data.build(cfg.data, AutoTokenizer.from_pretrained(tokenizer_dir), use_cache=False)
    rows = [json.loads(line) for line in source.read_text().splitlines()[:40]]
    assert len(train_set) == 40 and train_set.dropped == 0
    for row, ids in zip(rows, train_set.input_ids):
        assert final.apply_chat_template(plain_messages(row), tokenize=True, return_dict=True)["input_ids"] == ids

    # A chat run's model card: front matter huggingface_hub reads; the data and the final eval loss in the body.
    card = ModelCard.load(result.final_dir / "README.md")
    assert card.data.library_name == "transformers" and "automodel" in card.data.tags
    assert card.data.pipeline_tag == "text-generation"
    assert f"| eval_loss | {result.metrics['eval_loss']:.4f} |" in card.text
    assert str(source) in card.text and 'chat_template = "chatml"' in card.text


def test_a_lora_runs_model_card_names_peft_and_its_loading_code_runs(tmp_path):
    result = automodel.train(quickstart(tmp_path, "train.max_steps=3", "eval.at_start=false", "data.validation.limit=8",
                                        "peft.rank=4"))
    card = ModelCard.load(result.final_dir / "README.md")
    assert card.data.library_name == "peft" and "lora" in card.data.tags
    assert "base_model" not in card.data.to_dict()  # built from config: no hub model to name
    code = re.search(r"```python\n(.*?)```", card.text, re.S).group(1)
    scope: dict = {}
    exec(code, scope)  # the card's own instructions load the adapter onto its base, and the tokenizer
    assert type(scope["model"]).__name__ == "PeftModelForCausalLM"
    assert scope["tokenizer"].vocab_size == AutoTokenizer.from_pretrained(result.final_dir).vocab_size
    assert "| steps | 3 |" in card.text


def test_an_instruction_run_exports_a_template_that_renders_its_prompts_so_chat_works(tmp_path, capsys):
    from automodel.cli import main

    cfg = quickstart(tmp_path, "train.max_steps=2", "eval.at_start=false", "data.validation.limit=8",
                     "checkpoint.save_final=true")
    assert AutoTokenizer.from_pretrained(cfg.tokenizer.name_or_path).chat_template is None
    result = automodel.train(cfg)
    final = AutoTokenizer.from_pretrained(result.final_dir)
    train_set, _ = data.build(cfg.data, AutoTokenizer.from_pretrained(cfg.tokenizer.name_or_path), use_cache=False)
    rows = [json.loads(line) for line in open(cfg.data.train[0].source)][:50]
    for row, ids, labels in zip(rows, train_set.input_ids, train_set.labels):
        # the whole training row (prompt, answer, EOS), and the prompt alone (a chat's generation prompt)
        conversation = [{"role": "user", "content": row["instruction"]}, {"role": "assistant", "content": row["output"]}]
        assert final.apply_chat_template(conversation, tokenize=True, return_dict=True)["input_ids"] == ids
        prompt = final.apply_chat_template(conversation[:1], tokenize=True, add_generation_prompt=True,
                                           return_dict=True)["input_ids"]
        assert prompt == ids[:len(prompt)] and all(label == -100 for label in labels[:len(prompt)])
    capsys.readouterr()
    assert main(["generate", str(result.final_dir), "--prompt", rows[0]["instruction"], "--max-new-tokens", "4"]) == 0
