"""The device image path (`extract --decode gpu`): full-size decode, then resize + crop +
normalise with torch, so on a GPU the whole image work runs on the card.

Contract:
    DevicePath(fast, on_device, nvjpeg)   `fast`: the processor config (extract/fastimage.py's
                                      FastImagePath, its constants and lookup table);
                                      on_device: resize on the model's device (CUDA), not in
                                      the worker; nvjpeg: plain JPEGs decode there too
    path.open(sample) -> PIL RGB | JpegBytes      in a loader worker. PIL: a full decode with
                                      `open_sample_image` semantics (the per-sample CPU
                                      fallback). JpegBytes: a plain JPEG left for the device
                                      (only with nvjpeg: torchvision present, CUDA device)
    path.preprocess(images) -> (B, 3, H, W) uint8 tensor   resized in the worker (CPU device)
                            -> DeviceBatch        on_device: full-size rows, resized later
    path.pixels(batch, device) -> ((B', 3, H, W) uint8 on device, bad)    decodes a DeviceBatch
                                      in one batched nvJPEG call, per sample on failure; `bad`:
                                      (index, one-line reason) of items no decoder could read
    path.recorded -> "device:pil" | "device:nvjpeg"          the fingerprint's `preprocess`

Resize: `torch.nn.functional.interpolate` with antialias=True, whose bilinear / bicubic
kernels are PIL's (support widened by the scale, bicubic a = -0.5), rounded to uint8 as PIL
rounds; the processor's output size and center crop. Then the processor's own lookup table
normalises (FastImagePath.normalize). The same code runs on CPU tensors (tests, CPU-only
machines) and on the GPU.

Which JPEGs go to the device: baseline, RGB or grey, no EXIF rotation, ending in the EOI
marker (so a truncated file never reaches nvJPEG, which may decode garbage where PIL fails).
Everything else (PNG, CMYK, progressive, rotated, truncated) is decoded by PIL in the worker
and fails there per sample exactly as the CPU path does.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from fusebench.extract.datasets import Sample, _decode_failure, _rotated, to_rgb
from fusebench.extract.fastimage import FastImagePath, sample_bytes
from PIL import Image

# PIL filter number -> the closest antialiased torch mode (LANCZOS, HAMMING have none)
_MODES = {0: "nearest-exact", 1: "bicubic", 2: "bilinear", 3: "bicubic", 4: "area", 5: "bilinear"}


@dataclass(frozen=True)
class JpegBytes:
    """A plain JPEG's bytes, decoded later on the device; `shown` names it in messages."""

    data: bytes
    shown: str


class DeviceBatch(list):
    """A batch of the device path before decode: per row, JpegBytes or a (3, H, W) uint8
    tensor (a CPU fallback decode at full size)."""


def gpu_decode_available() -> bool:
    """Whether torchvision (the `gpu` extra) can decode JPEGs on CUDA here."""
    try:
        import torchvision.io  # noqa: F401
    except Exception:  # noqa: BLE001 - absent, or a build whose ops fail to load
        return False
    return torch.cuda.is_available()


@dataclass(frozen=True)
class DevicePath:
    """Full decode + torch resize; on_device: the resize runs on the model's device (the
    workers only decode); nvjpeg: plain JPEGs decode there too (torchvision)."""

    fast: FastImagePath
    on_device: bool = False
    nvjpeg: bool = False

    @property
    def recorded(self) -> str:
        return "device:nvjpeg" if self.nvjpeg else "device:pil"

    # load (a loader worker) -------------------------------------------------------------
    def open(self, sample: Sample) -> Image.Image | JpegBytes:
        data, shown = sample_bytes(sample)
        return self.from_bytes(data, shown)

    def from_bytes(self, data: bytes, shown: str) -> Image.Image | JpegBytes:
        """JpegBytes for a plain JPEG when decoding on the device, else the full RGB decode
        (ValueError with the reference loader's line when that fails)."""
        try:
            img = Image.open(io.BytesIO(data))
            if self.nvjpeg and plain_jpeg(img, data):
                return JpegBytes(data, shown)
            img.load()  # decode now so truncation fails here, as in the reference loader
        except Exception as err:  # PIL raises OSError, SyntaxError, ... on bad files
            raise ValueError(_decode_failure(shown, err)) from err
        return to_rgb(img)

    def preprocess(self, images: Sequence[Image.Image | JpegBytes]) -> Any:
        """(B, 3, H, W) uint8, resized here; on_device: a DeviceBatch whose decoded rows are
        full-size (3, H, W) uint8, resized on the device later (`pixels`)."""
        items = [im if isinstance(im, JpegBytes) else _chw(im) for im in images]
        if self.on_device:
            return DeviceBatch(items)
        return torch.stack([self.resize(t) for t in items])  # (B, 3, H, W)

    # resize (any device) ----------------------------------------------------------------
    def resize(self, image: torch.Tensor) -> torch.Tensor:
        """(3, H, W) or (N, 3, H, W) uint8 -> (3, h, w) or (N, 3, h, w) uint8: the processor's
        output size and crop, torch's antialiased filter, rounded and clipped as PIL does.
        N images of one size resize in one call (each image is filtered on its own)."""
        if image.dim() == 3:
            return self.resize(image[None])[0]
        h, w = image.shape[-2:]
        new_h, new_w = self.fast.output_size(h, w)
        x = image.float()  # (N, 3, H, W)
        if (new_h, new_w) != (h, w):
            mode = _MODES[self.fast.resample]
            smooth = mode in ("bilinear", "bicubic")
            x = torch.nn.functional.interpolate(
                x,
                size=(new_h, new_w),
                mode=mode,
                antialias=smooth,
                align_corners=False if smooth else None,
            )
        x = x.round_().clamp_(0, 255).to(torch.uint8)  # (N, 3, h, w)
        if self.fast.crop is not None:
            ch, cw = self.fast.crop
            top, left = (new_h - ch) // 2, (new_w - cw) // 2
            x = x[..., top : top + ch, left : left + cw]
        return x

    def pixels(
        self, batch: DeviceBatch, device: torch.device
    ) -> tuple[torch.Tensor | None, list[tuple[int, str]]]:
        """A DeviceBatch decoded and resized on `device`: ((B', 3, H, W) uint8 of the rows
        that decoded, [(row index, one-line reason)] of those that did not)."""
        jpegs = [i for i, it in enumerate(batch) if isinstance(it, JpegBytes)]
        decoded = dict(zip(jpegs, self._decode_jpegs([batch[i] for i in jpegs], device)))
        images = [decoded.get(i, it) for i, it in enumerate(batch)]
        bad = [(i, t) for i, t in enumerate(images) if isinstance(t, str)]
        good = [i for i, t in enumerate(images) if not isinstance(t, str)]
        if not good:
            return None, bad
        by_size: dict[tuple, list[int]] = {}
        for i in good:  # one resize call per input size (a dataset of one size: one call)
            by_size.setdefault(tuple(images[i].shape), []).append(i)
        out: dict[int, torch.Tensor] = {}
        for rows in by_size.values():
            group = [images[i].to(device, non_blocking=images[i].is_pinned()) for i in rows]
            out.update(zip(rows, self.resize(torch.stack(group))))  # (N, 3, h, w)
        return torch.stack([out[i] for i in good]), bad  # (B', 3, h, w), batch order

    def _decode_jpegs(self, items: list[JpegBytes], device: torch.device) -> list:
        """(3, H, W) uint8 per JPEG, on `device`: one batched decode, then one at a time
        for a batch that fails, then PIL for a file nvJPEG refuses (a reason if PIL too)."""
        if not items:
            return []
        try:
            return list(gpu_decode_jpeg([it.data for it in items], device))
        except RuntimeError:
            pass
        out: list = []
        for it in items:
            try:
                out.append(gpu_decode_jpeg([it.data], device)[0])
            except RuntimeError:
                try:
                    out.append(_chw(self.from_bytes_cpu(it)))
                except ValueError as err:
                    out.append(str(err).splitlines()[0])
        return out

    def from_bytes_cpu(self, item: JpegBytes) -> Image.Image:
        return DevicePath(self.fast).from_bytes(item.data, item.shown)  # type: ignore[return-value]

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) uint8 -> the processor's float32 values (its lookup table)."""
        return self.fast.normalize(pixels)


def gpu_decode_jpeg(datas: list[bytes], device: torch.device) -> list[torch.Tensor]:
    """torchvision's batched nvJPEG decode: (3, H, W) uint8 RGB per JPEG, on `device`.
    Replaced in the CPU tests by a PIL decode (torchvision's CPU build is not installable
    here); RuntimeError when the batch cannot be decoded."""
    from torchvision.io import ImageReadMode, decode_jpeg

    raw = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in datas]  # (N,) each
    try:
        return list(decode_jpeg(raw, mode=ImageReadMode.RGB, device=device))
    except TypeError:  # torchvision < 0.19 decodes one tensor per call
        return [decode_jpeg(r, mode=ImageReadMode.RGB, device=device) for r in raw]


def plain_jpeg(img: Image.Image, data: bytes) -> bool:
    """A JPEG nvJPEG decodes to the reference loader's pixels: baseline (not progressive),
    RGB or grey, upright, complete (ends in EOI). Reads the header only."""
    return (
        img.format == "JPEG"
        and img.mode in ("RGB", "L")
        and not img.info.get("progressive")
        and not img.info.get("progression")
        and data.rstrip(b"\0").endswith(b"\xff\xd9")
        and not _rotated(img)
    )


def _chw(image: Image.Image) -> torch.Tensor:
    """An RGB PIL image as a (3, H, W) uint8 tensor (contiguous planes)."""
    return torch.from_numpy(np.asarray(image).transpose(2, 0, 1).copy())  # (3, H, W)
