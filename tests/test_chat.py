"""`automodel chat` (driven over stdin in a subprocess) and `automodel generate`, against transformers' own generate on
the same saved model: the replies, the conversation history, /reset, a LoRA adapter directory, plain text."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from automodel.cli import main
from automodel.data import CHAT_TEMPLATES
from automodel.models import byte_level_tokenizer
from tests.helpers import REPO, tiny_llama

END = "<|im_end|>"


def automodel_command(*args: str, stdin: str = "") -> subprocess.CompletedProcess:
    exe = shutil.which("automodel", path=os.path.dirname(sys.executable))
    cmd = [exe] if exe else [sys.executable, "-m", "automodel"]
    return subprocess.run(cmd + list(args), input=stdin, capture_output=True, text=True, timeout=300, cwd=REPO,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})


def saved_chat_model(path, seed: int = 0):
    tokenizer = byte_level_tokenizer(["hello there, how are you? <|im_start|> user assistant"])
    tokenizer.chat_template = CHAT_TEMPLATES["chatml"]
    model = tiny_llama(vocab_size=len(tokenizer), seed=seed)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return model.eval(), tokenizer


def expected_reply(model, tokenizer, messages, max_new_tokens):
    """transformers alone: the chat template, greedy generate, decoded, cut at ChatML's end of turn."""
    enc = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
    text = tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    return text.split(END)[0].strip()


@pytest.mark.slow  # a process of its own, reading a real stdin
def test_chat_keeps_the_conversation_resets_it_and_streams_what_generate_gives(tmp_path):
    model, tokenizer = saved_chat_model(tmp_path / "model", seed=4)  # a seed whose answers depend on the history
    proc = automodel_command("chat", str(tmp_path / "model"), "--max-new-tokens", "12",
                             stdin="hello\nhow are you?\n/reset\nhow are you?\n/exit\nnever read\n")
    assert proc.returncode == 0, proc.stderr[-3000:]
    first = expected_reply(model, tokenizer, [{"role": "user", "content": "hello"}], 12)
    history = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": first},
               {"role": "user", "content": "how are you?"}]
    second = expected_reply(model, tokenizer, history, 12)
    fresh = expected_reply(model, tokenizer, [{"role": "user", "content": "how are you?"}], 12)
    assert second != fresh  # the history changes the answer, so the next check can tell /reset worked
    lines = proc.stdout.split("> ")
    assert lines[0].startswith("chat with ") and "/reset" in lines[0]
    assert [line.strip() for line in lines[1:5]] == [first, second, "(new conversation)", fresh]
    assert lines[5] == "" and "never read" not in proc.stdout  # /exit ends it


def test_generate_loads_a_lora_adapter_onto_its_base(tmp_path, capsys):
    from peft import LoraConfig, PeftModel, get_peft_model

    base, tokenizer = saved_chat_model(tmp_path / "base", seed=1)
    torch.manual_seed(2)
    adapted = get_peft_model(AutoModelForCausalLM.from_pretrained(tmp_path / "base"),
                             LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    adapted.save_pretrained(tmp_path / "adapter")
    tokenizer.save_pretrained(tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] == str(
        tmp_path / "base")
    capsys.readouterr()
    assert main(["generate", str(tmp_path / "adapter"), "--prompt", "hello", "--max-new-tokens", "10"]) == 0
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "base"),
                                         tmp_path / "adapter").eval()
    want = expected_reply(reloaded, tokenizer, [{"role": "user", "content": "hello"}], 10)
    assert want != expected_reply(base, tokenizer, [{"role": "user", "content": "hello"}], 10)  # the adapter counts
    assert capsys.readouterr().out.strip() == want


def test_talking_to_a_model_without_a_chat_template_says_what_to_do(tmp_path, capsys):
    tokenizer = AutoTokenizer.from_pretrained(REPO / "examples" / "quickstart" / "tokenizer")
    model = tiny_llama(vocab_size=len(tokenizer)).eval()
    model.save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    capsys.readouterr()
    assert main(["generate", str(tmp_path / "m"), "--prompt", "abc"]) == 2
    err = capsys.readouterr().err
    assert "no chat template" in err and "--raw" in err
    # --raw continues the text as it is: what transformers' generate continues it with.
    assert main(["generate", str(tmp_path / "m"), "--prompt", "abc", "--raw", "--max-new-tokens", "5"]) == 0
    ids = tokenizer("abc", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=5, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert capsys.readouterr().out.strip() == tokenizer.decode(out[0, ids["input_ids"].shape[1]:],
                                                              skip_special_tokens=True).strip()
    assert main(["chat", str(tmp_path / "nowhere")]) == 2
    assert "not a directory" in capsys.readouterr().err


@pytest.mark.slow  # processes of their own: what a library prints at import shows only in a fresh one
def test_commands_outside_training_print_only_their_own_output(tmp_path):
    """merge and generate in a fresh process: no FutureWarning, no DeepSpeed accelerator line, no progress bars on
    either stream; --verbose brings the libraries' output back."""
    from peft import LoraConfig, get_peft_model

    saved_chat_model(tmp_path / "base")
    adapted = get_peft_model(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), LoraConfig(r=4))
    adapted.save_pretrained(tmp_path / "adapter")
    merged = automodel_command("merge", "--base", str(tmp_path / "base"), "--adapter", str(tmp_path / "adapter"),
                               "--out", str(tmp_path / "merged"))
    assert merged.returncode == 0, merged.stderr
    assert merged.stdout.strip() == f"merged model saved to {tmp_path / 'merged'}" and merged.stderr == ""
    said = automodel_command("generate", str(tmp_path / "merged"), "--prompt", "hello", "--max-new-tokens", "3")
    assert said.returncode == 0 and said.stderr == "", said.stderr
    verbose = automodel_command("merge", "--base", str(tmp_path / "base"), "--adapter", str(tmp_path / "adapter"),
                                "--out", str(tmp_path / "merged2"), "--verbose")
    assert verbose.returncode == 0 and verbose.stderr != ""


def test_a_damaged_model_directory_or_a_bad_flag_is_one_line(tmp_path, capsys):
    """Truncated weights, a garbled config.json, missing tokenizer files and a negative --max-new-tokens: exit 2 and
    one line naming the directory, never a traceback."""
    good = tmp_path / "good"
    saved_chat_model(good)

    def damaged(name, damage):
        path = tmp_path / name
        shutil.copytree(good, path)
        damage(path)
        return path

    def truncate(path):
        with open(path / "model.safetensors", "r+b") as f:
            f.truncate(1000)

    cases = {
        damaged("truncated", truncate): "the model cannot be loaded, the directory looks damaged",
        damaged("config", lambda p: (p / "config.json").write_text("{not json")): "the model cannot be loaded",
        damaged("tokenizer", lambda p: [(p / n).unlink() for n in ("tokenizer.json", "tokenizer_config.json")]):
            "the tokenizer cannot be loaded",
    }
    for path, expected in cases.items():
        capsys.readouterr()
        assert main(["generate", str(path), "--prompt", "hi", "--max-new-tokens", "2"]) == 2, path.name
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"error: {path}: {expected}") and "\n" not in err, err
    assert main(["generate", str(good), "--prompt", "hi", "--max-new-tokens", "-5"]) == 2
    assert "--max-new-tokens must be >= 1 (got -5)" in capsys.readouterr().err


def test_a_chat_template_that_loops_is_stopped_in_generate(tmp_path, capsys):
    model_dir = tmp_path / "loops"
    _, tokenizer = saved_chat_model(model_dir)
    loop = "{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}{% endfor %}"
    capsys.readouterr()
    assert main(["generate", str(model_dir), "--prompt", "hi", "--chat-template", loop]) == 2
    assert "the tokenizer's chat template: rendering one conversation took more than 5 s" in capsys.readouterr().err
