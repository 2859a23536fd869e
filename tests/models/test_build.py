import pytest
import torch
from transformers import AutoModelForCausalLM

from automodel.config import ConfigError, ModelConfig, TokenizerConfig
from automodel.models import build_model, build_tokenizer, byte_level_tokenizer, pick_attention
from automodel.training.state import ParamBinding
from tests.helpers import REPO, tiny_llama

TOKENIZER = str(REPO / "examples" / "quickstart" / "tokenizer")
LLAMA = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "tie_word_embeddings": True}


def random_cfg(**config):
    return ModelConfig(init="random", config={**LLAMA, **config})


def test_random_init_takes_vocab_and_special_ids_from_the_tokenizer_and_is_seeded():
    tok = build_tokenizer(TokenizerConfig(name_or_path=TOKENIZER), random_cfg())
    model = build_model(random_cfg(), tok, seed=3)
    assert model.config.vocab_size == len(tok) == 259
    assert (model.config.bos_token_id, model.config.eos_token_id, model.config.pad_token_id) == (0, 1, 2)
    again = build_model(random_cfg(), tok, seed=3)
    other = build_model(random_cfg(), tok, seed=4)
    w = "model.layers.0.mlp.up_proj.weight"
    assert torch.equal(model.get_parameter(w), again.get_parameter(w))
    assert not torch.equal(model.get_parameter(w), other.get_parameter(w))
    assert model.training


def test_pretrained_dir_with_config_overrides_and_vocab_check(tmp_path):
    tok = byte_level_tokenizer(["abc"])
    tiny_llama(vocab_size=len(tok)).save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    cfg = ModelConfig(name_or_path=str(tmp_path / "m"), config={"attention_dropout": 0.25}, dtype="bfloat16")
    model = build_model(cfg, build_tokenizer(TokenizerConfig(), cfg), seed=0)
    assert model.config.attention_dropout == 0.25 and model.dtype == torch.bfloat16
    small = tmp_path / "small"
    tiny_llama(vocab_size=100).save_pretrained(small)
    with pytest.raises(ConfigError, match="tokenizer has 259 tokens but the model's embedding has 100 rows"):
        build_model(ModelConfig(name_or_path=str(small)), tok, seed=0)
    # A missing local directory is named as one (not as a malformed hub repository id).
    with pytest.raises(ConfigError, match=r"model.name_or_path: no such directory `.*/missing`"):
        build_model(ModelConfig(name_or_path=str(tmp_path / "missing")), tok, seed=0)
    with pytest.raises(ConfigError, match=r"tokenizer.name_or_path: no such directory `\./tokenizr`"):
        build_tokenizer(TokenizerConfig(name_or_path="./tokenizr"), cfg)
    with pytest.raises(ConfigError, match=r"model.config: cannot build a `llama` config: The hidden size \(130\) is "
                                          r"not a multiple of the number of attention heads \(4\)"):
        build_model(ModelConfig(init="random", config={"model_type": "llama", "hidden_size": 130,
                                                       "num_attention_heads": 4}), tok, seed=0)


def test_param_binding_owns_the_weights_and_keeps_ties(tmp_path):
    model = tiny_llama(tie_word_embeddings=True)
    x = torch.randint(0, 64, (2, 8))
    ref = model(input_ids=x).logits
    binding = ParamBinding(model)
    params = binding.take()
    assert "lm_head.weight" not in params  # tied: one tensor, one name
    assert all(p.device.type == "meta" for p in model.parameters())
    assert model.lm_head.weight is model.model.embed_tokens.weight
    out = torch.func.functional_call(model, params, (), {"input_ids": x}).logits
    assert torch.equal(out, ref)
    with binding.bound(params) as bound:
        assert torch.equal(bound(input_ids=x).logits, ref)
        bound.save_pretrained(tmp_path / "saved")
    assert all(p.device.type == "meta" for p in model.parameters())
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "saved")
    assert torch.equal(reloaded(input_ids=x).logits, ref)


def test_auto_attention_is_sdpa_on_cpu_and_flex_attention_refuses_cpu_training():
    cpu = torch.device("cpu")
    assert pick_attention("auto", cpu, "bfloat16", packing=False) == ("sdpa", "auto")
    attn, why = pick_attention("auto", cpu, "float32", packing=True)
    assert attn == "sdpa" and "dense (batch, 1, T, T)" in why  # the fallback says what it costs
    assert pick_attention("eager", cpu, "float32", packing=False) == ("eager", "model.attn_implementation")
    with pytest.raises(ConfigError, match="flex_attention.*CUDA only"):
        pick_attention("flex_attention", cpu, "float32", packing=True)


def test_a_model_that_cannot_load_fails_before_the_data_is_tokenised(tmp_path, capsys):
    """A mistyped hub id (offline here: the hub cannot be asked) is one line, and nothing was tokenised."""
    import automodel
    from tests.helpers import quickstart

    cfg = quickstart(tmp_path, 'model.init="pretrained"', 'model.name_or_path="nobody-here/no-such-model"',
                     "train.max_steps=2")
    with pytest.raises(ConfigError, match=r"model.name_or_path: `nobody-here/no-such-model` could not be loaded "
                                          r"\(its config.json\), so nothing was tokenised"):
        automodel.train(cfg)
    assert "data:" not in capsys.readouterr().out


def test_the_wrong_kind_of_model_for_the_recipe_says_which_recipe_it_needs(tmp_path):
    import automodel
    from automodel.config import load_config

    tiny_llama(vocab_size=300).save_pretrained(tmp_path / "text_model")
    cfg = load_config(REPO / "configs_toml" / "vlm_cpu.toml", [
        f'output_dir="{tmp_path / "run"}"', 'model.init="pretrained"', f'model.name_or_path="{tmp_path / "text_model"}"',
        "model.config={}", 'tokenizer.name_or_path="examples/vlm/processor"'], world_size=1)
    with pytest.raises(ConfigError) as error:
        automodel.train(cfg)
    message = str(error.value)
    assert 'is LlamaForCausalLM (model_type "llama"), a text-only model' in message
    assert 'Use recipe = "llm_finetune" for it' in message and "\n" not in message
