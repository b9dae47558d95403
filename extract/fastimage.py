"""The fast image path: load + preprocess with the pixels of the model's own image processor.

Contract:
    FastImagePath.from_processor(proc) -> FastImagePath | str   (str: why the config is not
                                            supported; the caller then keeps the processor)
    path.open(sample) -> PIL RGB image      `open_sample_image` semantics (EXIF orientation,
                                            16-bit scaled, alpha on white: datasets.to_rgb),
                                            JPEGs decoded at reduced size (draft) when that
                                            stays >= DRAFT_MARGIN x the target
    path.preprocess(images) -> (B, 3, H, W) uint8     resized and cropped, not yet normalised
    path.normalize(pixels) -> (B, 3, H, W) float32     torch, on the pixels' device (the GPU
                                            in `extract`: a quarter of the bytes cross from the
                                            loader workers, and the CPU skips the float work)

Why it is faster, and why the pixels stay the processor's:
- JPEG draft mode lets libjpeg scale by 1/2, 1/4 or 1/8 inside the IDCT, always to a size
  at least DRAFT_MARGIN (2) times the resize target (PIL's draft never goes below the
  requested size); the resize that follows is the processor's own (PIL, same filter, same
  output size) and does the last factor of two or more, so only the anti-aliasing of the
  first factors differs, and the tokens stay within cosine 0.99 of the processor's. Non-JPEG images and small JPEGs are
  decoded in full and come out bit-identical to the processor.
- Rescale + normalise is a per-channel lookup table over the 256 uint8 values, built by
  running the processor's own `rescale` / `normalize` on them: the same float32 bits as the
  processor, on any device, for the whole batch at once instead of per image in float64.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from fusebench.extract.datasets import (
    Sample,
    _check_image_bytes,
    _decode_failure,
    _read_bytes,
    _rotated,
    _shown,
    _unreadable,
    read_image_bytes,
    to_rgb,
)
from PIL import ExifTags, Image

_TRANSPOSED = (5, 6, 7, 8)  # EXIF orientations that swap width and height
DRAFT_MIN_FACTOR = 2  # draft only when the image is at least this many times margin x target
# a draft decode stays at least this many times the resize target, so the processor's own
# antialiased resize does the last factor of two or more: per-token cosine with the processor
# >= 0.996 where a draft straight to the target gave 0.97 (an EXIF-rotated 2001x1337 JPEG,
# tests/test_image_fidelity.py); 1 = the rule of caches recorded as "fast"
DRAFT_MARGIN = 2


@dataclass(frozen=True)
class FastImagePath:
    """A processor config the fast path reproduces; built by `from_processor`."""

    size: tuple[int, int] | None  # (height, width) of a fixed resize; None with shortest_edge
    shortest_edge: int | None  # resize the shorter side to this, keeping the aspect ratio
    resample: int  # PIL filter, the processor's `resample`
    crop: tuple[int, int] | None  # (height, width) of the center crop, None = no crop
    lut: np.ndarray  # (3, 256) float32: rescale + normalise of every uint8 value per channel
    margin: int = DRAFT_MARGIN  # a draft decode never goes below margin x the resize target

    @classmethod
    def from_processor(cls, proc: Any) -> FastImagePath | str:
        """The fast path for `proc` (a transformers PIL-backend image processor), or a
        one-line reason why its config is not one the fast path reproduces."""
        from transformers.image_processing_backends import PilBackend

        if not isinstance(proc, PilBackend):
            return f"{type(proc).__name__} is not a PIL-backend image processor"
        for method in (
            "_preprocess",
            "process_image",
            "resize",
            "center_crop",
            "rescale",
            "normalize",
        ):
            if getattr(type(proc), method) is not getattr(PilBackend, method):
                return f"{type(proc).__name__} overrides {method}"
        if getattr(proc, "do_pad", None):
            return "do_pad is set"
        if not getattr(proc, "do_resize", False):
            return "do_resize is off (images would keep their own sizes)"
        resample = _pil_filter(getattr(proc, "resample", None))
        if resample is None:
            return f"resample {proc.resample!r} is not a PIL filter"
        size = _size(proc.size)
        keys = {k for k, v in size.items() if v}
        if keys == {"height", "width"}:
            fixed, shortest = (int(size["height"]), int(size["width"])), None
        elif keys == {"shortest_edge"}:
            fixed, shortest = None, int(size["shortest_edge"])
        else:
            return f"size {size} is neither {{height, width}} nor {{shortest_edge}}"
        crop = None
        if getattr(proc, "do_center_crop", False):
            c = _size(proc.crop_size)
            crop = (int(c["height"]), int(c["width"]))
            smallest = fixed or (shortest, shortest)
            if crop[0] > smallest[0] or crop[1] > smallest[1]:
                return f"crop_size {crop} is larger than the resized image (the processor pads)"
        return cls(fixed, shortest, resample, crop, _lookup_table(proc))

    @property
    def recorded(self) -> str:
        """The fingerprint's `preprocess` value: "fast" for the draft rule of caches made
        before the margin existed (margin 1), "fast-draft<N>x" otherwise."""
        return "fast" if self.margin == 1 else f"fast-draft{self.margin}x"

    # load -------------------------------------------------------------------------------
    def open(self, sample: Sample) -> Image.Image:
        """A sample's image as `datasets.open_sample_image` returns it, decoded at reduced
        size when that is safe; ValueError (one-line reason) if it cannot be read."""
        data, shown = sample_bytes(sample)
        try:
            # no `with`: closing an image drops its pixels, so to_rgb would have to copy them
            # (the bytes are in memory, there is no file to close)
            img = Image.open(io.BytesIO(data))
            self.draft(img)
            img.load()  # decode now so truncation fails here, as in the reference loader
        except Exception as err:  # PIL raises OSError, SyntaxError, ... on bad files
            raise ValueError(_decode_failure(shown, err)) from err
        if img.mode == "RGB" and img.info.get("transparency") is None and not _rotated(img):
            return img  # already what to_rgb makes of it
        return to_rgb(img)

    def draft(self, img: Image.Image) -> None:
        """Sets an opened (not yet loaded) JPEG to decode at the reduced size this path uses
        for it, if any: the one rule every loader of the fast path decodes by."""
        if img.format not in ("JPEG", "MPO"):  # MPO: a camera's JPEG with extra frames
            return
        if self.size is not None:
            h, w = self.size
            if img.getexif().get(ExifTags.Base.Orientation, 1) in _TRANSPOSED:
                h, w = w, h  # the file is stored sideways: the target in its own axes
        else:
            h = w = self.shortest_edge  # both sides >= s keeps the shorter one >= s
        w, h = self.margin * w, self.margin * h
        if img.width >= DRAFT_MIN_FACTOR * w and img.height >= DRAFT_MIN_FACTOR * h:
            img.draft("RGB", (w, h))  # scale 1/2..1/8, never below margin x the target

    # preprocess -------------------------------------------------------------------------
    def output_size(self, h: int, w: int) -> tuple[int, int]:
        """(height, width) the processor resizes an h x w image to, before any crop."""
        if self.size is not None:
            return self.size
        # transformers' get_resize_output_image_size(default_to_square=False)
        s = self.shortest_edge
        short, long = (w, h) if w <= h else (h, w)
        new_long = int(s * long / short)
        return (new_long, s) if w <= h else (s, new_long)

    def resized(self, image: Image.Image) -> Image.Image:
        """The processor's resize (PIL, same filter) and center crop, as a PIL image."""
        new_h, new_w = self.output_size(image.height, image.width)
        if image.size != (new_w, new_h):
            image = image.resize((new_w, new_h), resample=self.resample, reducing_gap=None)
        if self.crop is not None:
            ch, cw = self.crop
            top, left = (new_h - ch) // 2, (new_w - cw) // 2
            image = image.crop((left, top, left + cw, top + ch))
        return image

    def preprocess(self, images: list[Image.Image]) -> np.ndarray:
        """(B, 3, H, W) uint8 for RGB images (as `open` returns them): resized and cropped;
        `normalize` turns it into the processor's float32 pixel values. Each band is copied
        straight into its plane (3x cheaper than stacking (H, W, 3) arrays and transposing)."""
        sized = [self.resized(im) for im in images]
        w, h = sized[0].size if sized else (0, 0)
        out = np.empty((len(sized), 3, h, w), dtype=np.uint8)  # (B, 3, H, W)
        for i, im in enumerate(sized):
            if im.size != (w, h):  # shortest_edge without a crop: sizes differ by image
                raise ValueError(
                    f"images of one batch resize to {w}x{h} and {im.size[0]}x{im.size[1]}; "
                    "use --exact-preprocess for this processor"
                )
            for c, band in enumerate(im.split()):
                out[i, c] = np.asarray(band)  # (H, W)
        return out

    def normalize(self, pixels: Any) -> Any:
        """(B, 3, H, W) uint8 torch tensor -> the processor's float32 values, on its device."""
        import torch

        if pixels.device.type == "cpu":  # numpy's take beats torch's int64-indexed gather here
            x = pixels.numpy()
            out = np.empty(x.shape, dtype=np.float32)
            for c in range(3):
                np.take(self.lut[c], x[:, c], out=out[:, c])  # (B, H, W)
            return torch.from_numpy(out)
        return self._gather(pixels)

    def _gather(self, pixels: Any) -> Any:
        """The lookup as one torch gather on the pixels' device (GPU)."""
        import torch

        lut = torch.from_numpy(self.lut).to(pixels.device).flatten()  # (3 * 256,)
        offset = torch.arange(3, device=pixels.device).view(1, 3, 1, 1) * 256
        return lut[pixels.long() + offset]  # (B, 3, H, W) float32


def sample_bytes(sample: Sample) -> tuple[bytes, str]:
    """A sample's image bytes, not decoded, and how messages show their source; ValueError
    (the reference loader's one-line reasons) for a missing, unreadable or non-image file."""
    ref = sample.image_ref
    if ref is not None:
        data, shown = read_image_bytes(ref), str(ref)
    elif sample.image_path is None:
        raise ValueError(f"sample {sample.guid} has no image; add one or remove the sample")
    else:
        path = Path(sample.image_path)
        data, shown = _read_bytes(path), _shown(path)
        if not isinstance(data, bytes):
            raise ValueError(_unreadable("image", path, data))
    if (reason := _check_image_bytes(shown, data, decode=False)) is not None:
        raise ValueError(reason)
    return data, shown


def _size(size: Any) -> dict:
    """A processor's size / crop_size (dict or SizeDict) as a plain dict."""
    if isinstance(size, dict):
        return dict(size)
    return {
        k: getattr(size, k, None)
        for k in ("height", "width", "shortest_edge", "longest_edge", "max_height", "max_width")
    }


def _pil_filter(resample: Any) -> int | None:
    try:
        value = int(resample)
    except (TypeError, ValueError):
        return None
    return value if value in {int(f) for f in Image.Resampling} else None


def _lookup_table(proc: Any) -> np.ndarray:
    """(3, 256) float32: what the processor's own rescale / normalize make of each uint8
    value in each channel (they work pixel by pixel, so a (3, 1, 256) image suffices)."""
    values = np.broadcast_to(np.arange(256, dtype=np.uint8), (3, 1, 256)).copy()  # (C, 1, 256)
    image: np.ndarray = values
    if proc.do_rescale:
        image = proc.rescale(image, proc.rescale_factor)
    if proc.do_normalize:
        image = proc.normalize(image, proc.image_mean, proc.image_std)
    return np.asarray(image, dtype=np.float32)[:, 0, :]  # (3, 256)
