"""VLM data: the three row forms, RGB/cropped images, and the processor collate with answer-only labels, on real
images (im2latex formula pages, LLaMA-Factory's mllm_demo) and a tiny Llava (SigLIP + Llama) built from config.
Ends with a few functional-step updates on real images: the loss falls."""

import json
from pathlib import Path

import attrs
import pytest
import torch

from automodel.data.formats import BadRow
from automodel.data.vlm import VlmCollator, load_image, sample_of
from tests.helpers import (gemma3_processor, idefics3_processor, im2latex_rows, llava_next_processor, shared_data,
                           tiny_llava, tiny_processor)


def test_three_row_forms_become_the_same_conversation():
    openai = {"messages": [{"role": "user", "content": [{"type": "image", "image": "a.png"},
                                                        {"type": "text", "text": "What is it?"}]},
                           {"role": "assistant", "content": [{"type": "text", "text": "x^2"}]}]}
    factory = {"messages": [{"role": "user", "content": "<image>What is it?"},
                            {"role": "assistant", "content": "x^2"}], "images": ["a.png"]}
    columns = {"img": "a.png", "q": "What is it?", "a": "x^2"}
    base = Path("/data")
    a = sample_of(openai, {}, base)
    assert a == sample_of(factory, {}, base)
    assert a == sample_of(columns, {"image": "img", "question": "q", "answer": "a"}, base)
    assert a.images == ("/data/a.png",)
    assert a.messages[0]["content"] == [{"type": "image"}, {"type": "text", "text": "What is it?"}]

    # As datasets loads them: every part has every key, None where absent; images decoded from an image column.
    from PIL import Image

    photo = Image.new("RGB", (8, 8))
    arrow = {"messages": [{"role": "user", "content": [{"type": "image", "text": None, "image": None, "path": None},
                                                       {"type": "text", "text": "What is it?", "image": None}]},
                          {"role": "assistant", "content": [{"type": "text", "text": "x^2", "image": None}]}],
             "images": [photo]}
    assert sample_of(arrow, {}) == attrs.evolve(a, images=(photo,))

    with pytest.raises(BadRow, match="1 image placeholder.*but 2"):
        sample_of({**factory, "images": ["a.png", "b.png"]}, {})
    with pytest.raises(BadRow, match="needs at least one"):
        sample_of({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}, {})
    with pytest.raises(BadRow, match="URL"):
        sample_of({**factory, "images": ["https://x/a.png"]}, {})
    with pytest.raises(BadRow, match="columns.answer"):
        sample_of({"image": "a.png", "question": "q"}, {})


def test_im2latex_pages_are_rgb_and_cropped_to_the_ink():
    row = im2latex_rows(1)[0]
    from PIL import Image

    page = Image.open(row["image"])
    assert page.mode == "P" and page.size == (1654, 2339)  # palette, transparent background
    full = load_image(row["image"])
    cropped = load_image(row["image"], crop_to_content=True)
    assert full.mode == cropped.mode == "RGB" and full.getpixel((0, 0)) == (255, 255, 255)  # white, not black
    assert cropped.width * cropped.height < full.width * full.height / 50
    assert min(cropped.convert("L").getdata()) < 100  # the ink is in it


def crop_whole_page(image):
    """The reference: the whole page to RGB on white, then cropped to what differs from its corner, 4 px margin."""
    from PIL import Image, ImageChops

    if image.mode in ("P", "LA", "RGBA", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba)
    image = image.convert("RGB")
    box = ImageChops.difference(image, Image.new("RGB", image.size, image.getpixel((0, 0)))).getbbox()
    if box is None:
        return image
    return image.crop((max(0, box[0] - 4), max(0, box[1] - 4), min(image.width, box[2] + 4),
                       min(image.height, box[3] + 4)))


def test_crop_finds_the_content_on_stored_pixels_and_equals_cropping_the_converted_page():
    from PIL import Image

    demo = shared_data("llamafactory-demos/mllm_demo.json").parent / "mllm_demo_data"
    pages = [Image.open(r["image"]) for r in im2latex_rows(8)]
    # Palette pages with a transparent background as stored, the same pages as RGBA, LA and I;16 (no difference
    # of pixels there: converted whole), a photo, an all-white page, and one whose square is stored as another
    # palette index of the same white (nothing to crop to in either).
    twins = Image.new("P", (40, 30), 0)
    twins.putpalette([255] * 6)
    twins.paste(1, (10, 10, 20, 20))
    images = [*pages, pages[0].convert("RGBA"), pages[1].convert("LA"), pages[2].convert("L").convert("I;16"),
              Image.open(demo / "1.jpg"), Image.new("P", (40, 30), 0), twins]
    for image in images:
        got, want = load_image(image, crop_to_content=True), crop_whole_page(image)
        assert got.mode == "RGB" and got.size == want.size and got.tobytes() == want.tobytes(), image.mode


def test_collate_trains_on_answers_only(tmp_path):
    demo = shared_data("llamafactory-demos/mllm_demo.json")
    rows = json.loads(demo.read_text())
    samples = [sample_of(r, {}, demo.parent) for r in rows[:3]]
    texts = [t["content"] for r in rows for t in r["messages"]]
    processor = tiny_processor(tmp_path, texts)
    batch = VlmCollator(processor)(samples)
    tok = processor.tokenizer
    image_id = tok.convert_tokens_to_ids("<image>")
    assert batch["pixel_values"].shape == (sum(len(s.images) for s in samples), 3, 32, 32)
    assert ((batch["input_ids"] == image_id).sum(1) == torch.tensor([16 * len(s.images) for s in samples])).all()
    for row, sample in zip(range(3), samples):
        trained = batch["labels"][row][batch["labels"][row] != -100]
        answers = [m["content"][0]["text"] for m in sample.messages if m["role"] == "assistant"]
        # Every assistant turn and its end-of-turn token, nothing of the prompts, images or padding.
        assert tok.decode(trained) == "".join(a + tok.eos_token for a in answers)
    assert (batch["labels"][batch["attention_mask"] == 0] == -100).all()
    assert (batch["labels"][batch["input_ids"] == image_id] == -100).all()


@pytest.mark.parametrize("build", [tiny_processor, gemma3_processor])
def test_image_tokens_inside_an_answer_are_not_trained(tmp_path, build):
    # Gemma 3 expands <start_of_image> (the processor's image token) into begin, soft and end tokens; the soft ones
    # are what the model replaces with image features, so they are masked too.
    demo = shared_data("llamafactory-demos/mllm_demo.json").parent / "mllm_demo_data"
    row = {"messages": [{"role": "user", "content": "<image>Draw a second one"},
                        {"role": "assistant", "content": "Here it is: <image> done"}],
           "images": [str(demo / "1.jpg"), str(demo / "2.jpg")]}
    processor = build(tmp_path, ["Draw a second one", "Here it is: done"])
    batch = VlmCollator(processor)([sample_of(row, {})])
    tok = processor.tokenizer
    image_ids = {tok.convert_tokens_to_ids(t) for t in ("<image>", "<start_of_image>", "<image_soft_token>")
                 if t in tok.get_vocab()}
    answer = (batch["labels"][0] != -100).nonzero().flatten()
    answer_ids = batch["input_ids"][0, answer[0]:answer[-1] + 1]
    assert any(i in image_ids for i in answer_ids.tolist())  # the answer's span holds image tokens
    trained = set(batch["labels"][0][batch["labels"][0] != -100].tolist())
    assert not trained & image_ids and tok.eos_token_id in trained


def spans_prefix_by_prefix(collate: VlmCollator, sample) -> list[tuple[int, int]]:
    """The reference: every prompt prefix through the processor, with the images it holds."""
    pil = [load_image(ref, collate.crop) for ref in sample.images]
    spans, used = [], 0
    for i, message in enumerate(sample.messages):
        used_before = used
        used += sum(p["type"] == "image" for p in message["content"])
        if message["role"] == "assistant":
            prompt = collate._render(sample.messages[:i], add_generation_prompt=True)
            spans.append((collate._length(prompt, pil[:used_before]),
                          collate._length(collate._render(sample.messages[:i + 1]), pil[:used])))
    return spans


@pytest.mark.parametrize("build", [tiny_processor, llava_next_processor, gemma3_processor, idefics3_processor])
def test_answer_spans_equal_the_processor_run_on_every_prefix(tmp_path, build):
    # mllm_demo: two of the six conversations show their second image in a later turn (a prompt holds some of the
    # images: measured by the processor); im2latex: cropped formulas of many sizes (LLaVA-NeXT and Idefics3 give
    # each size its own token count).
    demo = shared_data("llamafactory-demos/mllm_demo.json")
    rows = json.loads(demo.read_text())
    samples = [sample_of(r, {}, demo.parent) for r in rows] + [sample_of(r, {}) for r in im2latex_rows(6)]
    processor = build(tmp_path, [t["content"] for r in rows for t in r["messages"]])
    collate = VlmCollator(processor, crop_to_content=True)
    batch = collate(samples)  # images nested per conversation: Gemma 3's processor refuses a flat list
    tok = processor.tokenizer
    # What one image adds to its conversation's tokens: fixed, or (any resolution, tiles) by its size.
    added = {int(batch["attention_mask"][row].sum()) - collate._text_length(collate._render(sample.messages))
             for row, sample in enumerate(samples) if len(sample.images) == 1}
    assert (len(added) > 1) == (build in (llava_next_processor, idefics3_processor))
    for row, sample in enumerate(samples):
        assert collate._spans[id(sample)][1] == spans_prefix_by_prefix(collate, sample)
        trained = batch["labels"][row][batch["labels"][row] != -100]
        answers = ["".join(p["text"] for p in m["content"] if p["type"] == "text")
                   for m in sample.messages if m["role"] == "assistant"]
        assert tok.decode(trained) == "".join(a + tok.eos_token for a in answers)


def test_answer_spans_are_found_once_per_sample_and_follow_the_sample(tmp_path):
    demo = shared_data("llamafactory-demos/mllm_demo.json")
    rows = json.loads(demo.read_text())
    processor = tiny_processor(tmp_path, [t["content"] for r in rows for t in r["messages"]])
    samples = [sample_of(r, {}, demo.parent) for r in rows]
    collate = VlmCollator(processor)
    collate(samples[:3])
    measured = []
    collate._measure_spans = lambda sample, *a: measured.append(sample) or VlmCollator._measure_spans(
        collate, sample, *a)
    # The same samples again, reordered and mixed with new ones: only the new ones are measured, and every row is
    # labelled exactly as a fresh collator labels it.
    again = [samples[4], samples[2], samples[0], samples[3]]
    got, want = collate(again), VlmCollator(processor)(again)
    assert measured == [samples[4], samples[3]]
    assert all(torch.equal(got[k], want[k]) for k in want) and set(got) == set(want)
    del samples, again, measured
    import gc

    gc.collect()
    assert collate._spans == {}  # entries go with their samples


def test_tiny_llava_learns_latex_from_real_formula_images(tmp_path):
    from automodel.config import OptimConfig
    from automodel.backends import build_functional

    rows = im2latex_rows(16)
    samples = [sample_of(r, {}) for r in rows]
    processor = tiny_processor(tmp_path, [r["answer"] for r in rows])
    collate = VlmCollator(processor, crop_to_content=True)
    batches = [collate(samples[i:i + 8]) for i in (0, 8)]
    model = tiny_llava(processor)
    backend = build_functional(model, optim=OptimConfig(lr=3e-3), clip_grad_norm=1.0, lr_fn=lambda s: 3e-3,
                               device=torch.device("cpu"), grad_method="autograd", all_reduce=None, rank=0,
                               world_size=1, seed=0, loss_chunk_tokens=64, master_dtype="auto")
    state, losses = backend.state, []
    name = next(n for n in state.params if "vision_tower" in n and n.endswith("patch_embedding.weight"))
    initial = state.params[name].clone()  # the step updates the state in place
    for _ in range(30):
        state, metrics = backend.step(state, batches)
        losses.append(metrics.loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
    # The vision tower learned too: its weights moved.
    assert not torch.equal(state.params[name], initial)


def test_freeze_groups_and_lora_exclusion_on_llava(tmp_path):
    from automodel.config import ConfigError
    from automodel.models.vlm import freeze, lora_exclusions, parameter_groups

    model = tiny_llava(tiny_processor(tmp_path, ["abc"]))
    parts = parameter_groups(model)
    assert parts["vision"] and all(n.startswith("model.vision_tower.") for n in parts["vision"])
    assert parts["embeddings"] == ["model.language_model.embed_tokens.weight"]
    assert "lm_head.weight" in parts["language"] and parts["embeddings"][0] in parts["language"]
    assert not set(parts["vision"]) & set(parts["language"])
    frozen = freeze(model, ["vision", "embeddings"])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert frozen["vision"] == sum(p.numel() for n, p in model.named_parameters() if n in parts["vision"])
    assert trainable == set(dict(model.named_parameters())) - set(parts["vision"]) - set(parts["embeddings"])
    assert any(n.startswith("model.multi_modal_projector.") for n in trainable)  # the projector still trains
    assert lora_exclusions(model) == ["model.vision_tower.*"]
    with pytest.raises(ConfigError, match="unknown group `vison`"):
        freeze(model, ["vison"])


def test_activation_checkpointing_of_a_vlm_changes_no_step(tmp_path):
    """Checkpointing recomputes the language model's layers (and the vision tower's) in the backward: the same
    losses and weights, bit for bit, with the chunked loss."""
    from automodel.backends import build_functional
    from automodel.config import OptimConfig
    from automodel.models import enable_activation_checkpointing

    rows = im2latex_rows(8)
    processor = tiny_processor(tmp_path, [r["answer"] for r in rows])
    collate = VlmCollator(processor, crop_to_content=True)
    batch = collate([sample_of(r, {}) for r in rows])

    def run(checkpointing: bool):
        model = tiny_llava(processor)
        if checkpointing:
            enable_activation_checkpointing(model)
        backend = build_functional(model, optim=OptimConfig(lr=3e-3), clip_grad_norm=1.0, lr_fn=lambda s: 3e-3,
                                   device=torch.device("cpu"), grad_method="autograd", all_reduce=None, rank=0,
                                   world_size=1, seed=0, loss_chunk_tokens=16, master_dtype="auto")
        state, losses = backend.state, []
        for _ in range(2):
            state, metrics = backend.step(state, [batch])
            losses.append(metrics.loss.item())
        return state, losses

    (with_ac, losses_ac), (without, losses) = run(True), run(False)
    assert losses_ac == losses
    assert all(torch.equal(with_ac.params[k], without.params[k]) for k in without.params)
