"""VLM collate time in the first epoch (answer spans measured) and later ones (spans cached), against the
prefix-by-prefix measure (the processor, images and all, on every prompt prefix: two calls per answer); and
loading + cropping an im2latex page against converting the whole page before cropping it.

    python bench/bench_vlm_collate.py                     # mllm_demo + im2latex from ../shared/data, 384 px SigLIP
    python bench/bench_vlm_collate.py --image-size 32     # the size of configs_toml/vlm_cpu.toml

The processor is LLaVA's (SigLIP image processor, patch 14: 729 image tokens at 384 px) with a byte-level
tokenizer, built here; the two collators alternate in each round and the medians are compared.
"""

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from automodel.config import DataSourceConfig
from automodel.data.vlm import VlmCollator, load_image, load_samples
from automodel.models import byte_level_tokenizer

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


class PrefixByPrefix(VlmCollator):
    """The baseline: each answer's start and end measured by the processor on the prefix, with its images."""

    def _measure_spans(self, sample, text, pil, length):
        spans, used = [], 0
        for i, message in enumerate(sample.messages):
            used_before = used
            used += sum(p["type"] == "image" for p in message["content"])
            if message["role"] == "assistant":
                prompt = self._render(sample.messages[:i], add_generation_prompt=True)
                spans.append((self._length(prompt, pil[:used_before]),
                              self._length(self._render(sample.messages[:i + 1]), pil[:used])))
        return spans


def crop_whole_page(image):
    """The baseline crop: the whole page to RGB on white, then cropped to what differs from its corner."""
    from PIL import Image, ImageChops

    rgba = image.convert("RGBA")
    image = Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba).convert("RGB")
    box = ImageChops.difference(image, Image.new("RGB", image.size, image.getpixel((0, 0)))).getbbox()
    return image.crop((max(0, box[0] - 4), max(0, box[1] - 4), min(image.width, box[2] + 4),
                       min(image.height, box[3] + 4)))


def llava_processor(image_size: int, texts: list[str], where: Path):
    from transformers import AutoProcessor, LlavaProcessor, SiglipImageProcessorPil

    tok = byte_level_tokenizer(texts, vocab_size=400)
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    template = ("{% for m in messages %}{{ '<|' + m['role'] + '|>' }}{% for p in m['content'] %}"
                "{% if p['type'] == 'image' %}{{ '<image>' }}{% else %}{{ p['text'] }}{% endif %}{% endfor %}"
                "{{ eos_token if m['role'] == 'assistant' else '\\n' }}{% endfor %}"
                "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}")
    images = SiglipImageProcessorPil(size={"height": image_size, "width": image_size})
    LlavaProcessor(image_processor=images, tokenizer=tok, patch_size=14 if image_size > 64 else 8,
                   vision_feature_select_strategy="full", num_additional_image_tokens=0,
                   chat_template=template).save_pretrained(where)
    return AutoProcessor.from_pretrained(where)


def im2latex_rows(n: int) -> list[dict]:
    root = SHARED / "im2latex-sample"
    formulas = (root / "formulas.lst").read_text(encoding="latin-1").splitlines()
    rows = []
    for line in (root / "train.lst").read_text().splitlines()[:n]:
        index, name, _ = line.split()
        rows.append({"image": str(root / "images" / f"{name}.png"), "question": "LaTeX:",
                     "answer": formulas[int(index)].strip() or "?"})
    return rows


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--image-size", type=int, default=384)
    p.add_argument("--batch", type=int, default=6)
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()

    demo = SHARED / "llamafactory-demos" / "mllm_demo.json"
    rows = json.loads(demo.read_text())
    with tempfile.TemporaryDirectory() as tmp:
        processor = llava_processor(args.image_size, [t["content"] for r in rows for t in r["messages"]], Path(tmp))
    demo_samples = load_samples(DataSourceConfig(source=str(demo), format="vlm"))[0]
    latex_rows = im2latex_rows(30)
    latex = Path(tempfile.mkdtemp()) / "im2latex.jsonl"
    latex.write_text("".join(json.dumps(r) + "\n" for r in latex_rows))
    latex_samples = load_samples(DataSourceConfig(source=str(latex), format="vlm", columns={
        "image": "image", "question": "question", "answer": "answer"}))[0]
    samples = demo_samples + latex_samples
    batches = [samples[i:i + args.batch] for i in range(0, len(samples), args.batch)]
    print(f"{len(samples)} conversations ({len(demo_samples)} mllm_demo, {len(latex_samples)} im2latex), "
          f"batches of {args.batch}, {args.image_size} px images")

    from PIL import Image

    pages = [r["image"] for r in latex_rows]
    times: dict[str, list[float]] = {}
    for _ in range(args.rounds):
        for name, load in (("whole_page", lambda p: crop_whole_page(Image.open(p))),
                           ("load_image", lambda p: load_image(p, crop_to_content=True))):
            start = time.perf_counter()
            for page in pages:
                load(page)
            times.setdefault(f"{name}/page", []).append((time.perf_counter() - start) / len(pages))
        for name, cls in (("prefix_by_prefix", PrefixByPrefix), ("measured_once", VlmCollator)):
            collate = cls(processor, crop_to_content=True)
            for epoch in ("first", "later"):
                start = time.perf_counter()
                for batch in batches:
                    collate(batch)
                times.setdefault(f"{name}/{epoch}", []).append((time.perf_counter() - start) / len(samples))
    median = {k: statistics.median(v) for k, v in times.items()}
    for k, v in median.items():
        print(f"{k:26s} {1000 * v:7.2f} ms per {'page' if k.endswith('/page') else 'conversation'}")
    print(f"page load + crop: load_image / whole_page = {median['load_image/page'] / median['whole_page/page']:.3f}")
    print(f"first epoch: measured_once / prefix_by_prefix = "
          f"{median['measured_once/first'] / median['prefix_by_prefix/first']:.3f}")
    # What measuring the spans adds to a conversation's first collate (image decode, batch processing excluded).
    added = {name: median[f"{name}/first"] - median[f"{name}/later"] for name in ("prefix_by_prefix", "measured_once")}
    print(f"span measure: {1000 * added['prefix_by_prefix']:.2f} -> {1000 * added['measured_once']:.2f} ms per "
          f"conversation")


if __name__ == "__main__":
    main()
