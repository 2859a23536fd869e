"""Image + text conversations for vision-language fine-tuning: three row forms -> one `VlmSample`, images
loaded as RGB, and a collator that runs the processor's chat template and masks everything but the answers.

Row forms (detected per row):
- OpenAI content lists: `messages` whose contents are lists of parts, `{"type": "text", "text": ...}` and
  `{"type": "image", "image"|"path"|"url": PATH}` (or `{"type": "image_url", "image_url": {"url": PATH}}`);
- LLaMA-Factory: `messages` (or ShareGPT `conversations`) with `<image>` placeholders in string contents and an
  `images` list, one entry per placeholder, in order;
- column-mapped: an image column, a question and an answer (`columns.image`, `columns.question`,
  `columns.answer`), one user turn and one assistant turn.

Every sample must hold at least one image. That is what keeps ZeRO-3 from hanging: each rank's forward then runs
the vision tower on every micro-batch, so all ranks gather the same parameters in the same order.
"""

import os
import weakref
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import attrs
import torch

from automodel.data.formats import SHAREGPT_ROLES, BadRow

IMAGE_PLACEHOLDER = "<image>"
ImageRef = Union[str, Any]  # a path, or an already-decoded PIL image (datasets' Image feature)


@attrs.frozen
class VlmSample:
    messages: tuple[dict, ...]   # {"role", "content": [{"type": "text", "text"} | {"type": "image"}]}
    images: tuple[ImageRef, ...]  # in the order of the image parts


def _resolve(ref: Any, base_dir: Optional[Path], where: str) -> ImageRef:
    if isinstance(ref, Mapping) and "path" in ref:  # datasets' Image feature without decoding
        ref = ref["path"] or ref.get("bytes")
    if isinstance(ref, str):
        if ref.startswith(("http://", "https://")):
            raise BadRow("images", f"{where}: image {ref!r:.80} is a URL; download it and give a local path")
        path = Path(ref)
        if not path.is_absolute() and base_dir is not None:
            path = base_dir / path
        return str(path)
    if hasattr(ref, "convert"):  # a PIL image
        return ref
    raise BadRow("images", f"{where}: an image should be a path or an image, got {type(ref).__name__}")


def _first(part: Mapping[str, Any], *keys: str) -> Any:
    return next((part[k] for k in keys if part.get(k) is not None), None)


def _parts_from_string(text: str) -> list[dict]:
    parts = []
    for i, chunk in enumerate(text.split(IMAGE_PLACEHOLDER)):
        if i:
            parts.append({"type": "image"})
        if chunk:
            parts.append({"type": "text", "text": chunk})
    return parts


def sample_of(row: Mapping[str, Any], columns: Mapping[str, str], base_dir: Optional[Path] = None) -> VlmSample:
    """One row in any of the three forms -> a VlmSample (BadRow names what is wrong)."""
    image_col = columns.get("image", "image")
    if image_col in row and "messages" not in row and "conversations" not in row:
        return _column_mapped(row, columns, base_dir)
    key = columns.get("messages") or ("messages" if "messages" in row else "conversations")
    turns = row.get(key)
    if not isinstance(turns, list) or not turns:
        raise BadRow("messages", f"expected `messages` (or `conversations`) with image parts or `<image>` "
                                 f"placeholders, or an `{image_col}` column; columns here: {', '.join(row)}")
    listed = row.get(columns.get("images", "images")) or []
    if not isinstance(listed, list):
        listed = [listed]
    messages, images, placeholders = [], [], 0
    for i, turn in enumerate(turns):
        role = SHAREGPT_ROLES.get(turn.get("from")) if "from" in turn else turn.get("role")
        if not isinstance(role, str):
            raise BadRow("messages", f"turn {i} has no role")
        content = turn.get("value") if "from" in turn else turn.get("content")
        if isinstance(content, str):
            parts = _parts_from_string(content)
            placeholders += sum(p["type"] == "image" for p in parts)
        elif isinstance(content, list):
            parts = []
            for part in content:
                kind = part.get("type") if isinstance(part, Mapping) else None
                # Arrow-loaded rows carry every key of every part, set to None where a part lacks it.
                if kind == "text":
                    parts.append({"type": "text", "text": str(_first(part, "text", "value") or "")})
                elif kind in ("image", "image_url"):
                    ref = _first(part, "image", "path", "url")
                    if kind == "image_url":
                        url = part.get("image_url")
                        ref = url.get("url") if isinstance(url, Mapping) else url
                    parts.append({"type": "image"})
                    if ref is None:  # a bare {"type": "image"}: the row's `images` list supplies it
                        placeholders += 1
                    else:
                        images.append(_resolve(ref, base_dir, f"turn {i}"))
                else:
                    raise BadRow("messages", f"turn {i}: unsupported content part {part!r:.80}")
        else:
            raise BadRow("messages", f"turn {i}: content should be text or a list of parts")
        messages.append({"role": role, "content": parts})
    if placeholders != len(listed):
        raise BadRow("images", f"{placeholders} image placeholder(s) but {len(listed)} image(s) in `images`")
    images += [_resolve(ref, base_dir, f"images[{j}]") for j, ref in enumerate(listed)]
    return _checked(messages, images)


def _column_mapped(row: Mapping[str, Any], columns: Mapping[str, str], base_dir: Optional[Path]) -> VlmSample:
    image_col = columns.get("image", "image")
    refs = row[image_col] if isinstance(row[image_col], list) else [row[image_col]]
    texts = {}
    for field in ("question", "answer"):
        column = columns.get(field, field)
        if not isinstance(row.get(column), str):
            raise BadRow(field, f"column `{column}` should hold text (columns here: {', '.join(row)}); map it with "
                                f"data.<split>.columns.{field} = \"<your column>\"")
        texts[field] = row[column]
    user = [{"type": "image"} for _ in refs] + [{"type": "text", "text": texts["question"]}]
    messages = [{"role": "user", "content": user},
                {"role": "assistant", "content": [{"type": "text", "text": texts["answer"]}]}]
    return _checked(messages, [_resolve(r, base_dir, image_col) for r in refs])


def _checked(messages: list[dict], images: list) -> VlmSample:
    if not images:
        raise BadRow("images", "no image: every sample of a VLM fine-tune needs at least one (text-only samples "
                               "would run a different forward path on some ranks, which hangs ZeRO-3)")
    if messages[-1]["role"] != "assistant":
        raise BadRow("messages", "the last turn should be the assistant's answer")
    return VlmSample(tuple(messages), tuple(images))


def load_samples(src: Any, on_bad_row: str = "error") -> tuple[list[VlmSample], int]:
    """A [data.train]/[data.validation] source in format "vlm" -> (samples, rows skipped). Relative image paths are
    relative to the data file's directory. A bad row is an error naming the source and row, or (on_bad_row =
    "skip") left out and counted."""
    from automodel.config import ConfigError
    from automodel.data.sources import load_rows

    rows = load_rows(src)
    local = Path(src.source)
    base_dir = local.parent if local.is_file() else local if local.is_dir() else None
    samples, skipped = [], 0
    for i, row in enumerate(rows):
        try:
            sample = sample_of(row, src.columns, base_dir)
            missing = [p for p in sample.images if isinstance(p, str) and not os.path.isfile(p)]
            if missing:
                raise BadRow("images", f"image file not found: {missing[0]}")
        except BadRow as e:
            if on_bad_row == "skip":
                skipped += 1
                continue
            raise ConfigError(f"{src.source} row {i}: {e} (data.on_bad_row = \"skip\" leaves such rows out)") from None
        samples.append(sample)
    if not samples:
        raise ConfigError(f"{src.source}: no usable samples ({skipped} rows skipped)")
    return samples, skipped


def load_image(ref: ImageRef, crop_to_content: bool = False):
    """An RGB PIL image. Palette and transparent images are composited on white first (a transparent page
    would otherwise turn black). crop_to_content trims uniform margins (scanned or rendered pages)."""
    from PIL import Image

    image = ref if hasattr(ref, "convert") else Image.open(ref)
    if not crop_to_content:
        return _rgb(image)
    # The content is found on the stored pixels first and only its region is converted (a formula page is 98%
    # margin: 5 ms instead of 44 per im2latex page). A pixel stored like the corner converts like it, so that
    # region holds all the content; the exact box is then found in it, in RGB.
    rough = _box_unlike_corner(image)
    if rough is None:  # a blank page, or a mode the difference does not handle: convert it all
        return _crop_to_content(_rgb(image))
    region_box = _padded(rough, image.size)
    region = _rgb(image.crop(region_box))
    corner = _rgb(image.crop((0, 0, 1, 1))).getpixel((0, 0))
    box = _box_unlike(region, corner)
    if box is None:  # stored differently, looks the same: nothing to crop to
        return _rgb(image)
    x, y = region_box[:2]
    left, top, right, bottom = _padded((box[0] + x, box[1] + y, box[2] + x, box[3] + y), image.size)
    return region.crop((left - x, top - y, right - x, bottom - y))


_CROP_PAD = 4  # pixels of margin kept around the content


def _rgb(image):
    from PIL import Image

    if image.mode in ("P", "LA", "RGBA", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba)
    return image.convert("RGB")


def _box_unlike(image, color) -> Optional[tuple[int, int, int, int]]:
    """The bounding box of the pixels that differ from `color` (None: there are none)."""
    from PIL import Image, ImageChops

    background = Image.new(image.mode, image.size, color)
    if image.mode == "P":
        background.putpalette(image.getpalette())
    return ImageChops.difference(image, background).getbbox()


def _box_unlike_corner(image) -> Optional[tuple[int, int, int, int]]:
    try:
        return _box_unlike(image, image.getpixel((0, 0)))
    except (ValueError, TypeError):  # modes ImageChops does not take (e.g. I;16)
        return None


def _padded(box: tuple[int, int, int, int], size: tuple[int, int]) -> tuple[int, int, int, int]:
    return (max(0, box[0] - _CROP_PAD), max(0, box[1] - _CROP_PAD), min(size[0], box[2] + _CROP_PAD),
            min(size[1], box[3] + _CROP_PAD))


def _crop_to_content(image):
    box = _box_unlike(image, image.getpixel((0, 0)))
    return image if box is None else image.crop(_padded(box, image.size))


class VlmCollator:
    """Samples -> a model batch: the processor renders each conversation with its chat template, expands the image
    placeholders and makes pixel_values (and whatever else it returns: image sizes, token type ids ...).
    Labels are the input ids on assistant turns only; prompts, padding and image tokens are -100."""

    def __init__(self, processor: Any, crop_to_content: bool = False, max_length: int = 0,
                 dtype: torch.dtype = torch.float32):
        self.processor = processor
        self.dtype = dtype  # pixel values in the model's dtype
        self.crop = crop_to_content
        self.max_length = max_length
        # Where each sample's answers sit: measured once per sample (eval and later epochs meet it again).
        self._spans: dict[int, tuple[weakref.ref, list[tuple[int, int]]]] = {}
        tokenizer = processor.tokenizer
        image_token_id = getattr(processor, "image_token_id", None)
        if image_token_id is None:
            image_token_id = tokenizer.convert_tokens_to_ids(getattr(processor, "image_token", IMAGE_PLACEHOLDER))
        self.image_token_ids = [image_token_id]  # never trained
        model_token = getattr(tokenizer, "image_token", None)  # Gemma 3: the soft tokens, not <start_of_image>
        if model_token:
            self.image_token_ids.append(tokenizer.convert_tokens_to_ids(model_token))

    def _render(self, messages: Sequence[dict], add_generation_prompt: bool = False) -> str:
        return self.processor.apply_chat_template(list(messages), tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    def _length(self, text: str, images: list) -> int:
        enc = self.processor(text=[text], images=images or None, return_tensors="pt")
        return int(enc["input_ids"].shape[1])

    def _text_length(self, text: str) -> int:
        return len(self.processor.tokenizer(text)["input_ids"])

    def _answer_spans(self, sample: VlmSample, text: str, pil: list, length: int) -> list[tuple[int, int]]:
        """Each assistant turn's tokens: from the end of the prompt before it to the end of the prefix through it.
        `text`, `length`: the whole conversation rendered, and the processor's token count of it with its images."""
        key = id(sample)
        cached = self._spans.get(key)
        if cached is not None and cached[0]() is sample:
            return cached[1]
        trained = self._measure_spans(sample, text, pil, length)
        # The entry goes with its sample, so a later object given the same id is never mistaken for it.
        self._spans[key] = (weakref.ref(sample, lambda _: self._spans.pop(key, None)), trained)
        return trained

    def _measure_spans(self, sample: VlmSample, text: str, pil: list, length: int) -> list[tuple[int, int]]:
        # A prefix that holds every image is its text's tokens plus what the images add, as in the whole conversation
        # (an image expands the same wherever the text after it is cut): the tokenizer alone counts it. Only a prefix
        # that holds some of the images but not all is run through the processor, images and all.
        image_tokens = length - self._text_length(text)

        def prefix_length(prefix: str, images: int) -> int:
            if images == len(pil):
                return self._text_length(prefix) + image_tokens
            return self._length(prefix, pil[:images])

        trained, used = [], 0
        for i, message in enumerate(sample.messages):
            used_before = used
            used += sum(p["type"] == "image" for p in message["content"])
            if message["role"] != "assistant":
                continue
            start = prefix_length(self._render(sample.messages[:i], add_generation_prompt=True), used_before)
            end = prefix_length(self._render(sample.messages[:i + 1]), used)
            trained.append((start, end))
        return trained

    def prompt(self, sample: VlmSample) -> tuple[dict[str, torch.Tensor], str]:
        """(the conversation before its last answer, with the generation prompt and its images, as a one-row batch
        for `generate`; that answer's text)."""
        last = len(sample.messages) - 1  # the last turn is the assistant's (load_samples checks it)
        used = sum(p["type"] == "image" for m in sample.messages[:last] for p in m["content"])
        pil = [load_image(ref, self.crop) for ref in sample.images[:used]]
        text = self._render(sample.messages[:last], add_generation_prompt=True)
        batch = dict(self.processor(text=[text], images=pil or None, return_tensors="pt"))
        reference = "".join(p["text"] for p in sample.messages[last]["content"] if p["type"] == "text")
        return self._cast(batch), reference

    def _cast(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.dtype) if v.is_floating_point() else v for k, v in batch.items()}

    def __call__(self, samples: Sequence[VlmSample]) -> dict[str, torch.Tensor]:
        texts, images = [], []
        for sample in samples:
            pil = [load_image(ref, self.crop) for ref in sample.images]
            texts.append(self._render(sample.messages))
            images.append(pil)
        # Images nested per sample: Gemma 3's processor counts them per prompt (others flatten them).
        batch = dict(self.processor(text=texts, images=images, padding=True, return_tensors="pt"))
        ids = batch["input_ids"]
        labels = torch.full_like(ids, -100)
        lengths = batch["attention_mask"].sum(1).tolist()  # right padding
        for row, sample in enumerate(samples):
            for start, end in self._answer_spans(sample, texts[row], images[row], lengths[row]):
                labels[row, start:end] = ids[row, start:end]
        labels[batch["attention_mask"] == 0] = -100
        labels[torch.isin(ids, torch.tensor(self.image_token_ids))] = -100
        batch["labels"] = labels
        batch = self._cast(batch)
        if self.max_length and ids.shape[1] > self.max_length:
            raise ValueError(f"a batch is {ids.shape[1]} tokens long, more than data.seq_len ({self.max_length}); "
                             "raise data.seq_len or use smaller images")
        return batch


__all__ = ["IMAGE_PLACEHOLDER", "VlmCollator", "VlmSample", "load_image", "load_samples", "sample_of"]
