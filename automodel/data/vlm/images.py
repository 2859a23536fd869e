"""Images for VLM samples: RGB (transparent pages composited on white), optionally cropped to their content."""

from typing import Optional

from automodel.data.vlm.rows import ImageRef


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


__all__ = ["load_image"]
