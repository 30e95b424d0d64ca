"""Square crops of a decoded image: the largest centre square resized (`center`, the default), or
the ADM centre crop (`adm`) that ADM, DiT, SiT and REPA use for ImageNet, so that a model is trained
on the same pixels as theirs."""

from __future__ import annotations

from PIL import Image

CROPS = ("center", "adm")


def check_crop(crop: str) -> str:
    if crop not in CROPS:
        raise ValueError(f"data.dataset.crop={crop!r} is unknown; choose one of {', '.join(CROPS)}")
    return crop


def adm_center_crop(image: Image.Image, size: int) -> Image.Image:
    """Halve with a box filter while the smaller side is >= 2 * size, resize (bicubic) so that the
    smaller side is `size`, then cut the centre `size` x `size` square."""
    while min(image.size) >= 2 * size:
        image = image.resize((image.width // 2, image.height // 2), Image.BOX)
    scale = size / min(image.size)
    image = image.resize((round(image.width * scale), round(image.height * scale)), Image.BICUBIC)
    left, top = (image.width - size) // 2, (image.height - size) // 2
    return image.crop((left, top, left + size, top + size))
