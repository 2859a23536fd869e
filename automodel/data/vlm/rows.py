"""VLM rows: three row forms -> one `VlmSample` (messages with image parts, and the images they refer to).

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
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import attrs

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


__all__ = ["IMAGE_PLACEHOLDER", "ImageRef", "VlmSample", "load_samples", "sample_of"]
