"""Image + text conversations for vision-language fine-tuning: row forms (rows.py), images (images.py) and the
collator that runs the processor and masks everything but the answers (collate.py)."""

from automodel.data.vlm.collate import VlmCollator
from automodel.data.vlm.images import load_image
from automodel.data.vlm.rows import IMAGE_PLACEHOLDER, VlmSample, load_samples, sample_of

__all__ = ["IMAGE_PLACEHOLDER", "VlmCollator", "VlmSample", "load_image", "load_samples", "sample_of"]
