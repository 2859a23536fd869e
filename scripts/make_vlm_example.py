"""Regenerates examples/vlm/processor: the processor of the CPU-sized VLM (configs_toml/vlm_cpu.toml).

    python scripts/make_vlm_example.py

A LlavaProcessor: SigLIP's PIL image processor at 32x32 (8x8 patches -> 16 image tokens per image) and a
byte-level tokenizer (one token per byte, so any language and LaTeX work) with an `<image>` token and a chat
template that renders OpenAI content lists. Deterministic: re-running it changes nothing.
"""

from pathlib import Path

from transformers import LlavaProcessor, SiglipImageProcessorPil

from automodel.models import byte_level_tokenizer

OUT = Path(__file__).resolve().parents[1] / "examples" / "vlm" / "processor"
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|>' }}"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for p in m['content'] %}"
    "{% if p['type'] == 'image' %}{{ '<image>' }}{% else %}{{ p['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{{ eos_token if m['role'] == 'assistant' else '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def main() -> None:
    tokenizer = byte_level_tokenizer(["a"])  # 256 bytes + specials: nothing learned, nothing data-dependent
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    processor = LlavaProcessor(
        image_processor=SiglipImageProcessorPil(size={"height": 32, "width": 32}), tokenizer=tokenizer,
        patch_size=8, vision_feature_select_strategy="full", num_additional_image_tokens=0,
        chat_template=CHAT_TEMPLATE,
    )
    processor.save_pretrained(OUT)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
