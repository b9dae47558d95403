"""Image loading for the compute stage: DataLoader workers read, decode and preprocess while
the model runs.

One encoder: `BatchImages`, item b = its planned batch b, loaded with the encoder's own
`load_image`. Several encoders: `SharedImages`, item i = a chunk of the rows any of them still
needs, in dataset order; each image is read once and decoded once per distinct decode
(`load_once`: two fast paths that ask JPEG draft mode for the same scale, or any encoders on
an image decoded in full, share one decode; an encoder whose draft scale differs gets its own,
since other DCT scaling means other pixels; the device path's full decode is shared like the
processor's, and with a GPU decode its plain JPEGs stay bytes), then preprocessed for every
encoder that needs that row. Either way an encoder sees the same pixels, so its batches hold the same bytes.
Undecodable images come back as failures, not raised, so the rest of the batch goes on.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence

import numpy as np
import torch
from fusebench.extract.datasets import Sample, _decode_failure, to_rgb
from fusebench.extract.encoders import Encoder
from fusebench.extract.fastimage import sample_bytes
from PIL import Image
from torch.utils.data import DataLoader
from torch.utils.data import Dataset as TorchDataset


class BatchImages(TorchDataset):
    """Item b = batch b, loaded and preprocessed in a worker. Undecodable images are
    returned as failures, not raised, so the rest of the batch goes on."""

    def __init__(
        self, batches: list[tuple[int, list[int]]], samples: Sequence[Sample], encoder: Encoder
    ) -> None:
        self.batches = batches
        self.samples = samples  # a file path or an embedded-bytes reference per sample
        self.load = encoder.load_image  # the reference loader, or the fast path's (draft decode)
        self.preprocess = encoder.preprocess

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int):
        b, rows = self.batches[i]
        images, ok, failures = [], [], []
        for r in rows:
            try:
                images.append(self.load(self.samples[r]))
                ok.append(r)
            except (ValueError, OSError) as e:
                failures.append((r, "image-load", str(e).splitlines()[0]))
        pixels = self.preprocess(images) if images else None  # (B, 3, H, W)
        return b, ok, pixels, failures


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)


def loader(images: TorchDataset, num_workers: int | None, device: torch.device) -> DataLoader:
    """Items of `images` in order, made by `num_workers` processes (None: up to 4)."""
    if num_workers is None:
        num_workers = min(4, max(1, (os.cpu_count() or 2) // 2))
    return DataLoader(
        images,
        batch_size=None,
        shuffle=False,
        num_workers=num_workers,
        worker_init_fn=_worker_init if num_workers else None,
        prefetch_factor=2 if num_workers else None,
        pin_memory=device.type == "cuda",
    )


class SharedImages(TorchDataset):
    """Item i = chunk i of the union rows, as a list over the encoders of (ok rows, pixels
    (B_k, 3, H, W) or None, failures): each image read and decoded once (per distinct
    decode, see `load_once`), preprocessed for every encoder that wants its row."""

    def __init__(
        self,
        chunks: list[list[int]],
        samples: Sequence[Sample],
        encoders: list[Encoder],
        wants: list[set[int]],
    ) -> None:
        self.chunks = chunks
        self.samples = samples
        self.encoders = encoders
        self.wants = wants  # per encoder: the rows it still needs

    def __len__(self) -> int:
        return len(self.chunks)

    def __getitem__(self, i: int) -> list[tuple[list[int], np.ndarray | None, list]]:
        k_all = range(len(self.encoders))
        ok: list[list[int]] = [[] for _ in k_all]
        images: list[list[Image.Image]] = [[] for _ in k_all]
        failures: list[list[tuple[int, str, str]]] = [[] for _ in k_all]
        for r in self.chunks[i]:
            needers = [k for k in k_all if r in self.wants[k]]
            loaded = load_once(self.samples[r], [self.encoders[k] for k in needers])
            for k, image in zip(needers, loaded):
                if isinstance(image, Exception):
                    failures[k].append((r, "image-load", str(image).splitlines()[0]))
                else:
                    ok[k].append(r)
                    images[k].append(image)
        return [
            (ok[k], self.encoders[k].preprocess(images[k]) if images[k] else None, failures[k])
            for k in k_all
        ]


def load_once(sample: Sample, encoders: Sequence[Encoder]) -> list[Image.Image | ValueError]:
    """The sample's image as each encoder's own `load_image` returns it (or the ValueError it
    raises), the file read once and decoded once per distinct decode.

    Which decode an encoder's loader makes depends on the image: the reference loader and a
    fast path whose draft does not apply decode in full; a fast path's JPEG draft picks a DCT
    scale from the image's size. So each loader's draft is applied to its own header-only
    open of the bytes (cheap: no pixels), and loaders whose opens agree on size, mode and
    decoder scale share one decode."""
    try:
        data, shown = sample_bytes(sample)
    except ValueError as e:
        return [e] * len(encoders)
    decoded: dict[tuple, Image.Image | ValueError] = {}
    out: list[Image.Image | ValueError] = []
    for enc in encoders:
        device = getattr(enc, "device_image", None)
        if device is not None and device.nvjpeg:
            try:  # a plain JPEG stays bytes for the GPU; others decode as that path does
                out.append(device.from_bytes(data, shown))
            except ValueError as e:
                out.append(e)
            continue
        try:
            img = Image.open(io.BytesIO(data))
            if enc.fast_image is not None:
                enc.fast_image.draft(img)  # the fast path's own rule: same scale, same pixels
            key = (img.size, img.mode, getattr(img, "decoderconfig", ()))
        except Exception as err:  # noqa: BLE001 - PIL raises many types on bad files
            out.append(ValueError(_decode_failure(shown, err)))
            continue
        if key not in decoded:
            decoded[key] = _decode(img, shown)
        img.close()
        out.append(decoded[key])
    return out


def _decode(img: Image.Image, shown: str) -> Image.Image | ValueError:
    """Decode an opened image (its draft, if any, applied) to RGB as the loaders do."""
    try:
        img.load()  # decode now so truncation fails here, as in the loaders
        return to_rgb(img)
    except Exception as err:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ...
        return ValueError(_decode_failure(shown, err))
