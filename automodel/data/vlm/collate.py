"""VLM batches: the processor renders each conversation with its chat template, expands the image placeholders
and makes pixel values; labels cover the assistant turns only."""

import weakref
from typing import Any, Sequence

import torch

from automodel.data.vlm.images import load_image
from automodel.data.vlm.rows import IMAGE_PLACEHOLDER, VlmSample
from automodel.loss import IGNORE_INDEX


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
        labels = torch.full_like(ids, IGNORE_INDEX)
        lengths = batch["attention_mask"].sum(1).tolist()  # right padding
        for row, sample in enumerate(samples):
            for start, end in self._answer_spans(sample, texts[row], images[row], lengths[row]):
                labels[row, start:end] = ids[row, start:end]
        labels[batch["attention_mask"] == 0] = IGNORE_INDEX
        labels[torch.isin(ids, torch.tensor(self.image_token_ids))] = IGNORE_INDEX
        batch["labels"] = labels
        batch = self._cast(batch)
        if self.max_length and ids.shape[1] > self.max_length:
            raise ValueError(f"a batch is {ids.shape[1]} tokens long, more than data.seq_len ({self.max_length}); "
                             "raise data.seq_len or use smaller images")
        return batch


__all__ = ["VlmCollator"]
