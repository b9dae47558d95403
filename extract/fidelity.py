"""How close an image path's features are to the model processor's: pooled and TOKEN cosine.

The cache is token-level (cross_attn reads every token), so a path is judged on its tokens,
not only on its pooled vector. Used by benchmarks/image_fidelity.py and the tests.

    processors() -> {"vit": ..., "clip": ...}    the default checkpoints' real PIL processor
                                                 configs (ViT 224x224 bilinear, mean/std 0.5;
                                                 CLIP shortest edge 224 bicubic, crop 224)
    tower(kind, size) -> torch module            a random-init ViT / CLIP vision tower built
                                                 from a config (seed 0, no download)
    features(model, pixels) -> (pooled (B, E), tokens (B, P, D))    float32
    path_pixels(path, proc, samples, device) -> (B, 3, 224, 224) float32 on device
                                                 path: "cpu" (the default CPU fast path),
                                                 "cpu-before" (the draft rule of before),
                                                 "device" (full decode, torch resize), "exact"
    cosines(a, b) -> dict                        pooled / token cosine, mean and min
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from fusebench.extract.datasets import Sample, open_sample_image

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
PATHS = ("cpu", "device", "exact")


def processors() -> dict[str, Any]:
    """The real processor configs of the default ViT and CLIP checkpoints, PIL backend."""
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    from transformers.models.vit.image_processing_pil_vit import ViTImageProcessorPil

    return {
        "vit": ViTImageProcessorPil(
            size={"height": 224, "width": 224},
            resample=2,
            image_mean=[0.5] * 3,
            image_std=[0.5] * 3,
        ),
        "clip": CLIPImageProcessorPil(
            size={"shortest_edge": 224},
            resample=3,
            do_center_crop=True,
            crop_size={"height": 224, "width": 224},
            image_mean=CLIP_MEAN,
            image_std=CLIP_STD,
        ),
    }


def tower(kind: str, size: str = "tiny") -> torch.nn.Module:
    """A random-init vision tower at 224 pixels (seed 0): tiny = 2 layers of width 192,
    base = ViT-B/16 or CLIP ViT-B/32's shape. Eval mode, fp32."""
    import transformers as T

    width = dict(hidden_size=192, num_hidden_layers=2, num_attention_heads=3)
    width |= dict(intermediate_size=768)
    if size == "base":
        width = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12)
        width |= dict(intermediate_size=3072)
    torch.manual_seed(0)
    if kind == "vit":
        return T.ViTModel(T.ViTConfig(image_size=224, patch_size=16, **width)).eval()
    cfg = T.CLIPVisionConfig(image_size=224, patch_size=32, projection_dim=512, **width)
    return T.CLIPVisionModelWithProjection(cfg).eval()


@torch.inference_mode()
def features(model: torch.nn.Module, pixels: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(pooled (B, E), tokens (B, P, D)) float32 as `extract` stores them: ViT's CLS token,
    CLIP's normalised image_embeds; every token of the last hidden state."""
    out = model(pixel_values=pixels)
    tokens = out.last_hidden_state.float()  # (B, P, D)
    pooled = getattr(out, "image_embeds", None)
    pooled = tokens[:, 0] if pooled is None else pooled / pooled.norm(dim=-1, keepdim=True)
    return pooled.float().cpu().numpy(), tokens.cpu().numpy()


def path_pixels(
    path: str, proc: Any, samples: Sequence[Sample], device: torch.device
) -> torch.Tensor:
    """(B, 3, H, W) float32 on `device`: the samples' pixels as `path` prepares them."""
    from fusebench.extract.devicepath import DevicePath, gpu_decode_available
    from fusebench.extract.fastimage import FastImagePath

    if path == "exact":
        images = [open_sample_image(s) for s in samples]
        px = proc(images=images, return_tensors="np")["pixel_values"]
        return torch.as_tensor(np.asarray(px, dtype=np.float32)).to(device)
    fast = FastImagePath.from_processor(proc)
    if isinstance(fast, str):
        raise ValueError(fast)
    if path in ("cpu", "cpu-before"):
        if path == "cpu-before":
            fast = FastImagePath(fast.size, fast.shortest_edge, fast.resample, fast.crop,
                                 fast.lut, margin=1)  # fmt: skip
        px = torch.as_tensor(fast.preprocess([fast.open(s) for s in samples]))
        return fast.normalize(px.to(device))
    cuda = device.type == "cuda"
    dev = DevicePath(fast, on_device=cuda, nvjpeg=cuda and gpu_decode_available())
    batch = dev.preprocess([dev.open(s) for s in samples])
    if isinstance(batch, torch.Tensor):
        return dev.normalize(batch.to(device))
    pixels, bad = dev.pixels(batch, device)
    if bad or pixels is None:
        raise ValueError(f"device path failed on {len(bad)} images: {bad[:1]}")
    return dev.normalize(pixels)


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1) + 1e-12)


def cosines(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray]) -> dict[str, float]:
    """Pooled cosine per image, and token cosine per image (the mean over its tokens of each
    token's cosine with its counterpart): mean and min over the images."""
    pooled = _cos(a[0], b[0])  # (B,)
    tokens = _cos(a[1], b[1]).mean(axis=1)  # (B, P) -> (B,)
    return {
        "pooled_mean": float(pooled.mean()),
        "pooled_min": float(pooled.min()),
        "token_mean": float(tokens.mean()),
        "token_min": float(tokens.min()),
    }
