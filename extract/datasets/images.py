"""Images as the model's reference loader sees them, and why a file is not one.

`to_rgb` converts as `transformers.image_utils.load_image` and the processors'
`convert_to_rgb` do (EXIF orientation, transparency onto white; 16-bit and float pixels
scaled, not clipped). `check_image` / `_check_image_bytes` return a one-line reason or None;
`load_image` and `open_sample_image` return RGB or raise ValueError with that reason.
"""

from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np
from fusebench.extract.datasets.embedded import read_image_bytes
from fusebench.extract.datasets.files import _clip, _read_bytes, _shown, _unreadable
from fusebench.extract.datasets.samples import Sample
from PIL import ExifTags, Image, ImageOps

# Leading bytes of the image formats PIL decodes that datasets actually ship.
_IMAGE_MAGIC: tuple[bytes, ...] = (
    b"\xff\xd8\xff",  # JPEG
    b"\x89PNG\r\n\x1a\n",  # PNG
    b"GIF87a",
    b"GIF89a",
    b"BM",  # BMP
    b"II*\x00",  # TIFF, little-endian
    b"MM\x00*",  # TIFF, big-endian
)


def _is_image(head: bytes) -> bool:
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return True
    return any(head.startswith(magic) for magic in _IMAGE_MAGIC)


def _scaled_to_8bit(image: Image.Image) -> Image.Image:
    """A 16-bit, 32-bit integer or float grey image as mode "L", its values SCALED, never
    clipped: I;16* by 255/65535; "I" likewise when its values fit 16 bits (as is when they
    fit 0..255); "F" from 0..1 (as is when it fits 0..255); anything else min-max."""
    pixels = np.asarray(image).astype(np.float64)  # (H, W)
    pixels[~np.isfinite(pixels)] = 0.0
    low, high = (float(pixels.min()), float(pixels.max())) if pixels.size else (0.0, 0.0)
    if image.mode.startswith("I;16") or (image.mode == "I" and low >= 0 and 255 < high <= 65535):
        pixels = pixels * (255 / 65535)
    elif image.mode == "F" and low >= 0 and high <= 1:
        pixels = pixels * 255
    elif low < 0 or high > 255:
        pixels = (pixels - low) * (255 / (high - low))
    return Image.fromarray(np.rint(pixels).astype(np.uint8))  # (H, W) uint8 -> "L"


def _rotated(image: Image.Image) -> bool:
    """Whether the EXIF orientation asks for a transpose (reading it is cheap; transposing
    copies the image, so only then)."""
    return image.getexif().get(ExifTags.Base.Orientation, 1) not in (1, None)


def to_rgb(image: Image.Image) -> Image.Image:
    """An opened image as the model's reference loader sees it, in RGB.

    As `transformers.image_utils.load_image`: the EXIF orientation is applied. As the
    processors' `convert_to_rgb`: transparency (an alpha band, or a palette / grey image
    with a transparent colour) is composited onto WHITE, so a transparent pixel is white
    whatever colour it hides. Unlike a bare `convert("RGB")`, which clips 16-bit and float
    pixels to 255 (a 16-bit PNG comes out almost white), modes I;16, I and F are scaled to
    0..255 first (see `_scaled_to_8bit`).
    """
    image = ImageOps.exif_transpose(image, in_place=False) if _rotated(image) else image
    if image.mode.startswith("I") or image.mode == "F":
        image = _scaled_to_8bit(image)
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def _decode_image(shown: str, data: bytes) -> Image.Image:
    """Fully decode image bytes to RGB (see `to_rgb`); ValueError(one-line reason) if not."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()  # decode now so truncation fails here, not inside a processor
            return to_rgb(img)
    except Exception as err:  # PIL raises OSError, SyntaxError, struct.error, ... on bad files
        raise ValueError(_decode_failure(shown, err)) from err


def _check_image_bytes(shown: str, data: bytes, *, decode: bool) -> str | None:
    fix = "re-export or remove the sample"
    if not data:
        return f"image {shown} is empty (0 bytes); {fix}"
    if not _is_image(data[:16]):
        return f"image {shown} is not an image (starts with {data[:12]!r}); replace it or remove the sample"
    if decode:
        try:
            _decode_image(shown, data)
        except ValueError as err:
            return str(err)
    return None


def _decode_failure(shown: str, err: Exception) -> str:
    message = re.sub(r"\s*<_io\.BytesIO object at 0x[0-9a-fA-F]+>", "", str(err))  # no address
    message = " ".join(message.split()) or type(err).__name__
    what = "is truncated" if "truncated" in message else "cannot be decoded"
    return f"image {shown} {what} (PIL: {_clip(message, 120)}); re-export or remove the sample"


def check_image(path: Path, *, decode: bool) -> str | None:
    """Return why `path` is not a usable image, or None.

    decode=False reads the bytes only (exists, not empty, a known image signature);
    decode=True also decodes every pixel and converts it as `load_image` does, which is what
    catches truncated JPEGs.
    """
    path = Path(path)
    data = _read_bytes(path)
    if not isinstance(data, bytes):
        return _unreadable("image", path, data)
    return _check_image_bytes(_shown(path), data, decode=decode)


def load_image(path: Path) -> Image.Image:
    """Read, fully decode and convert to RGB as the model's reference loader does (`to_rgb`:
    EXIF orientation, transparency onto white, 16-bit / float scaled); ValueError(one-line
    reason) if that fails."""
    path = Path(path)
    data = _read_bytes(path)
    if not isinstance(data, bytes):
        raise ValueError(_unreadable("image", path, data))
    reason = _check_image_bytes(_shown(path), data, decode=False)
    if reason is not None:
        raise ValueError(reason)
    return _decode_image(_shown(path), data)


def open_sample_image(sample: Sample) -> Image.Image:
    """A sample's image, file or embedded bytes, decoded as `load_image` does; ValueError
    (one-line reason) if that fails. What the extraction loop and `cache verify` both use."""
    ref = sample.image_ref
    if ref is None:
        if sample.image_path is None:
            raise ValueError(f"sample {sample.guid} has no image; add one or remove the sample")
        return load_image(sample.image_path)
    data = read_image_bytes(ref)
    reason = _check_image_bytes(str(ref), data, decode=False)
    if reason is not None:
        raise ValueError(reason)
    return _decode_image(str(ref), data)
