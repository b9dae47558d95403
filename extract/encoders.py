"""Encoder registry: frozen pretrained towers that turn a batch into TokenFeatures.

Contract (every encoder):
    modalities                      ("text",), ("image",) or ("text", "image")
    tokenize(texts) -> list[ids]    text only; truncated to max_length, no padding
    encode_text(ids) -> TokenFeatures     pads the batch to its longest, zeroes padding
    preprocess(images) -> (B,3,H,W) array   runs in DataLoader workers; float32, or uint8 from
                                    the fast image path (encode_image normalises it on the device)
    encode_image(pixels) -> TokenFeatures
    config() -> dict                everything that changes the numbers (goes into the fingerprint)

Preprocessing always comes from the model's own AutoTokenizer / AutoImageProcessor.
`transformers` is imported here and only here (stage two never imports this module).
"""

from __future__ import annotations

import contextlib
import importlib.resources
import pickle
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from fusebench.cache import TokenFeatures
from fusebench.configs import bundled_path, config_names, read_config
from fusebench.extract.modelfiles import hash_files

from fusebench.devices import resolve_device
from fusebench.registry import Registry

CONFIG_DIR = bundled_path("encoders")  # configs/encoders/, package data of the install

ENCODERS = Registry("encoder kind")  # kind: in configs/encoders/*.yaml -> Encoder class
register_encoder = ENCODERS.register  # @register_encoder("clip") on an Encoder subclass


def list_encoders() -> list[str]:
    """Names usable with --encoder (one YAML per name), plus the hf:<id-or-path> form.
    FileNotFoundError, naming the folder, when the install lacks its bundled YAML files."""
    names = config_names(CONFIG_DIR)
    if not names:
        raise FileNotFoundError(
            f"no encoder configs in {CONFIG_DIR} (fusebench's bundled configs/encoders/*.yaml); "
            "reinstall fusebench (pip install --force-reinstall fusebench, or pip install . "
            "in a clone)"
        )
    return names


@dataclass
class EncoderSpec:
    """One configs/encoders/<name>.yaml, with command-line overrides applied."""

    name: str
    kind: str  # text | image | clip (a registered kind)
    model: str  # hub id, local save_pretrained folder, or package:<module>/<subdir>
    max_length: int = 128  # text: longest token sequence kept
    pooling: str = "cls"  # text/image: how `pooled` is made (cls | mean)
    extra_pooling: list[str] = field(default_factory=list)  # also stored as pooled_<name>
    layer: int | None = None  # hidden layer to store; None = the model's last output
    random_init: bool = False  # weights from the config with seed 0, not from a checkpoint
    precision: str = "auto"  # auto (fp16 autocast on CUDA, fp32 on CPU) | fp32 | fp16 | bf16


PRECISIONS = ("auto", "fp32", "fp16", "bf16")
POOLINGS = ("cls", "mean")


def load_spec(
    name: str,
    *,
    model: str | None = None,
    layer: int | None = None,
    random_init: bool = False,
    precision: str = "auto",
) -> EncoderSpec:
    """The spec of `name` with command-line overrides; ValueError (one line, naming the YAML
    file and the key) for anything a user can get wrong."""
    if precision not in PRECISIONS:
        raise ValueError(f"--precision must be one of {', '.join(PRECISIONS)}, not '{precision}'")
    if name.startswith("hf:"):
        ident = name[3:]
        if not ident:
            raise ValueError("hf: needs a model id or path, e.g. --encoder hf:bert-base-cased")
        spec = EncoderSpec(name=name, kind=_guess_kind(model or ident), model=model or ident)
    else:
        path = CONFIG_DIR / f"{name}.yaml"
        if name not in list_encoders():  # also keeps "../heads/x" from reading another YAML
            raise ValueError(
                f"unknown encoder '{name}'; choose one of {', '.join(list_encoders())} "
                "or hf:<model-id-or-path>"
            )
        spec = EncoderSpec(name=name, **_read_yaml(path))
        if model:
            spec.model = model
    spec.layer = layer if layer is not None else spec.layer
    spec.random_init = random_init or spec.random_init
    spec.precision = precision if precision != "auto" else spec.precision
    return spec


def _read_yaml(path: Path) -> dict[str, Any]:
    """configs/encoders/<name>.yaml as EncoderSpec fields, checked key by key."""
    checks = {
        "kind": (lambda v: v in ENCODERS, f"one of {', '.join(ENCODERS.names())}"),
        "max_length": (lambda v: type(v) is int and v > 0, "a positive integer"),
        "pooling": (lambda v: v in POOLINGS, f"one of {', '.join(POOLINGS)}"),
        "extra_pooling": (
            lambda v: isinstance(v, list) and all(p in POOLINGS for p in v),
            f"a list of {', '.join(POOLINGS)}",
        ),
        "layer": (lambda v: v is None or type(v) is int, "an integer (or absent for the last)"),
        "random_init": (lambda v: isinstance(v, bool), "true or false"),
        "precision": (lambda v: v in PRECISIONS, f"one of {', '.join(PRECISIONS)}"),
    }
    known = [f.name for f in fields(EncoderSpec) if f.name != "name"]
    return read_config(path, known=known, required=("kind", "model"), checks=checks)


def create_encoder(name: str, *, device: str = "auto", **options: Any) -> Encoder:
    """`vit`, `bert`, `clip`, `minilm` (configs/encoders/) or `hf:<id-or-path>`, loaded on
    `device`; `options` are load_spec's (model, layer, random_init, precision)."""
    return build_encoder(load_spec(name, **options), resolve_device(device))


def build_encoder(spec: EncoderSpec, device: torch.device) -> Encoder:
    """Loads the model a (checked) spec names: the slow step, kept apart so callers can
    validate every option before it."""
    return ENCODERS.get(spec.kind)(spec, device=device)


def modalities_of(spec: EncoderSpec) -> tuple[str, ...]:
    """What an encoder of this spec stores, known before its model loads."""
    return ENCODERS.get(spec.kind).modalities


def resolve_model_path(model: str) -> str:
    """package:<module>/<subdir> -> the folder shipped inside an installed package."""
    if not model.startswith("package:"):
        return model
    module, _, sub = model[len("package:") :].partition("/")
    try:
        root = importlib.resources.files(module)
    except ModuleNotFoundError:
        raise ValueError(
            f"model {model} needs the package '{module}': pip install {module.replace('_', '-')}"
        ) from None
    return str(Path(str(root)) / sub)


def _guess_kind(model: str) -> str:
    from transformers import AutoConfig

    cfg = _hf_call(AutoConfig.from_pretrained, resolve_model_path(model))
    if hasattr(cfg, "text_config") and hasattr(cfg, "vision_config"):
        return "clip"
    if hasattr(cfg, "image_size") and not hasattr(cfg, "vocab_size"):
        return "image"
    return "text"


def _hf_call(fn: Callable[..., Any], path: str, **kw: Any) -> Any:
    """from_pretrained with a one-line error that names the fix: a folder that is missing or
    lacks files, a damaged file in it, or a hub that is out of reach."""
    from safetensors import SafetensorError

    folder = Path(path).expanduser()
    if folder.exists() or path.startswith(("/", ".", "~")):
        if not folder.is_dir():
            raise ValueError(
                f"model folder {path} does not exist; pass --model a folder written by "
                "save_pretrained (or a hub id)"
                if not folder.exists()
                else f"model path {path} is a file; pass the folder that holds its config.json"
            )
        if not (folder / "config.json").is_file():
            raise ValueError(
                f"model folder {path} has no config.json; pass a folder written by save_pretrained "
                "(config.json, the weights, the tokenizer / processor files)"
            )
    try:
        return fn(path, **kw)
    except OSError as e:
        hint = (
            "the folder lacks the files it needs (save_pretrained writes them)"
            if folder.exists()
            else "no network? pass --model /path/to/a/downloaded/snapshot"
        )
        raise ValueError(f"cannot load '{path}': {hint} ({_first_line(e)})") from None
    except (ValueError, RuntimeError, SafetensorError, pickle.UnpicklingError) as e:
        raise ValueError(
            f"cannot load '{path}': a file in it is damaged or does not fit its config.json "
            f"({_first_line(e)}); download or save the model again"
        ) from None


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _image_processor(path: str) -> Any:
    """The model's own image processor, on the PIL backend: the reference implementation,
    the same on every machine whether or not torchvision is installed (a backend switch
    would change the pixels, hence the features)."""
    from transformers import AutoImageProcessor

    return _hf_call(AutoImageProcessor.from_pretrained, path, backend="pil")


# Files in a model folder that AutoModel / AutoTokenizer / AutoProcessor.from_pretrained
def model_identity(model: Any, path: str) -> tuple[str, dict[str, str]]:
    """(revision, file name -> sha256): the hub commit hash when known (and no file hashes),
    else the content hashes of every file from_pretrained can read in the folder
    (extract/modelfiles.py hash_files; "" and {} when there is none)."""
    commit = getattr(model.config, "_commit_hash", None)
    if commit:
        return str(commit), {}
    return hash_files(path)


def weights_revision(model: Any, path: str) -> str:
    """The revision alone (model_identity)."""
    return model_identity(model, path)[0]


class Encoder:
    """Base: loads a frozen model once; subclasses implement the tower(s)."""

    modalities: tuple[str, ...] = ()

    def __init__(self, spec: EncoderSpec, *, device: torch.device) -> None:
        from transformers.utils import logging as hf_logging

        # Our own bar reports progress; the "no torchvision, using the PIL processor" notice
        # and per-weight loading bars are noise on every run.
        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
        self.spec = spec
        self.device = device
        self.path = resolve_model_path(spec.model)
        self.model = self._load_model().to(device).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        # random init: still hashes the folder's config files, which decide the architecture
        self.revision, self.model_files = model_identity(self.model, self.path)
        self._check_layer()

    def _check_layer(self) -> None:
        """--layer K must name a hidden state of every tower; checked before any batch runs."""
        k, cfg = self.spec.layer, self.model.config
        if k is None:
            return
        towers = [getattr(cfg, n) for n in ("text_config", "vision_config") if hasattr(cfg, n)]
        counts = [getattr(c, "num_hidden_layers", None) for c in towers or [cfg]]
        if None in counts:
            return  # an unusual config: _hidden checks on the first batch instead
        n = min(counts) + 1  # hidden states: the embeddings, then one per layer
        if not -n <= k < n:
            raise ValueError(
                f"--layer {k} is out of range: the model has hidden states 0..{n - 1} "
                "(0 = embeddings, -1 = last); pick one of those"
            )

    def _load_tokenizer(self) -> Any:
        """The model's own tokenizer. A folder without tokenizer files still "loads" in
        transformers 5, as a vocabulary of special tokens only that turns every word into
        [UNK] or ids past the vocabulary: refused here, never extracted."""
        from transformers import AutoTokenizer

        tok = _hf_call(AutoTokenizer.from_pretrained, self.path)
        if len(tok) <= len(set(tok.all_special_ids)):
            raise ValueError(
                f"model folder {self.path} has no tokenizer vocabulary (tokenizer.json, vocab.txt, "
                "vocab.json + merges.txt, spiece.model, ...); copy the tokenizer files from the "
                "model's snapshot (tokenizer.save_pretrained writes them)"
            )
        return tok

    def _load_model(self) -> torch.nn.Module:
        from transformers import AutoConfig, AutoModel

        if self.spec.random_init:
            cfg = _hf_call(AutoConfig.from_pretrained, self.path)
            with torch.random.fork_rng():
                torch.manual_seed(0)
                return AutoModel.from_config(cfg)
        return _hf_call(AutoModel.from_pretrained, self.path)

    @property
    def precision(self) -> str:
        """How the forward runs (it changes the numbers, so it goes into the fingerprint)."""
        p = self.spec.precision
        if p == "auto":
            p = "fp16" if self.device.type == "cuda" else "fp32"
        return "fp32" if p == "fp32" else f"{p}-autocast"

    def config(self) -> dict:
        s = self.spec
        return {
            "encoder": s.name,
            "model": s.model,
            "model_revision": self.revision,
            "weights": "random" if s.random_init else "pretrained",
            "layer": s.layer,
            "max_length": s.max_length if "text" in self.modalities else None,
            "pooling": s.pooling,
            "precision": self.precision,
            "kind": s.kind,
        } | self._image_config()

    def _image_config(self) -> dict:
        """Image towers: `preprocess` (absent = the processor itself, so caches made before
        the fast path keep their key; "fast" = the draft rule of before; "fast-draft2x" the
        CPU fast path; "device:pil" / "device:nvjpeg" the device path) and `image_processor`,
        the processor class whose config every path reproduces (always its PIL-backend
        class, `_image_processor`)."""
        if "image" not in self.modalities:
            return {}
        path = self.device_image or self.fast_image
        cls = {"image_processor": type(self.image_processor).__name__}
        return (cls if self.record_processor else {}) | (
            {"preprocess": path.recorded} if path is not None else {}
        )

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.precision.startswith("bf16") else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    def _hidden(self, out: Any) -> torch.Tensor:
        if self.spec.layer is None:
            return out.last_hidden_state
        states = out.hidden_states
        if not -len(states) <= self.spec.layer < len(states):
            raise ValueError(
                f"--layer {self.spec.layer} is out of range: the model has hidden states "
                f"0..{len(states) - 1} (0 = embeddings, -1 = last)"
            )
        return states[self.spec.layer]

    # text ---------------------------------------------------------------
    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        enc = self.tokenizer(list(texts), truncation=True, max_length=self.spec.max_length)
        return enc["input_ids"]

    def _pad(self, ids: Sequence[Sequence[int]]) -> dict[str, torch.Tensor]:
        batch = self.tokenizer.pad({"input_ids": [list(x) for x in ids]}, return_tensors="pt")
        return {k: v.to(self.device) for k, v in batch.items()}

    # image --------------------------------------------------------------
    fast_image: Any = None  # an extract.fastimage.FastImagePath once select_preprocess picks it
    device_image: Any = None  # an extract.devicepath.DevicePath (--decode gpu)
    record_processor: bool = True  # config() names the processor class (select_recorded)

    def select_preprocess(self, *, exact: bool, decode: str = "cpu") -> str | None:
        """How images load and preprocess: the model's processor itself when `exact`; else
        decode "cpu": the fast path (extract/fastimage.py: JPEG draft decode, vectorised
        normalise, the processor's own pixels); "gpu": the device path (extract/devicepath.py:
        full decode, nvJPEG on CUDA with torchvision, torch resize). Returns a line to show
        once when the chosen path is not quite the one asked for. Until this is called an
        encoder uses the reference processor."""
        self.fast_image = self.device_image = None
        if exact or "image" not in self.modalities:
            return None
        from fusebench.extract.fastimage import FastImagePath

        fast = FastImagePath.from_processor(self.image_processor)
        if isinstance(fast, str):
            return (
                f"fast image path not used ({fast}); preprocessing with the model's own processor"
            )
        if decode != "gpu":
            self.fast_image = fast
            return None
        from fusebench.extract.devicepath import DevicePath, gpu_decode_available

        cuda = self.device.type == "cuda"
        gpu = cuda and gpu_decode_available()
        self.device_image = DevicePath(fast, on_device=cuda, nvjpeg=gpu)
        if cuda and not gpu:
            return (
                "torchvision is not installed, so JPEGs decode with PIL in the loader workers "
                "(resized on the GPU); pip install 'fusebench[gpu]' decodes them on the GPU too"
            )
        return None

    def select_recorded(self, stored: dict) -> None:
        """The image path a cache's config records (`preprocess`), for recomputing its rows
        (cache verify): a device path's JPEGs decode with PIL, the JPEG draft keeps the
        margin it was made with. A cache made before the processor class was recorded keeps
        config() without it, so its fingerprint still matches."""
        recorded = stored.get("preprocess")
        self.record_processor = "image_processor" in stored
        self.select_preprocess(exact=recorded is None)
        if recorded is None or "image" not in self.modalities:
            return
        from dataclasses import replace

        from fusebench.extract.fastimage import FastImagePath

        base = self.fast_image or FastImagePath.from_processor(self.image_processor)
        if recorded.startswith("device:") and isinstance(base, FastImagePath):
            from fusebench.extract.devicepath import DevicePath

            self.fast_image, self.device_image = None, DevicePath(base)
        elif recorded == "fast" and isinstance(base, FastImagePath):
            self.fast_image = replace(base, margin=1)

    @property
    def preprocess_path(self) -> str:
        """'fast', 'device' or 'reference': the image path chosen (config() records it)."""
        if self.device_image is not None:
            return "device"
        return "fast" if self.fast_image is not None else "reference"

    def load_image(self, sample: Any) -> Any:
        """A sample's RGB image as the chosen path loads it (`open_sample_image` semantics;
        the device path may leave a plain JPEG's bytes for the GPU); ValueError (one line)
        when it cannot be read."""
        if self.device_image is not None:
            return self.device_image.open(sample)
        if self.fast_image is not None:
            return self.fast_image.open(sample)
        from fusebench.extract.datasets import open_sample_image

        return open_sample_image(sample)

    def device_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) float32 on the device, as encode_image feeds the model (passing the
        result to encode_image changes nothing: it is already there and normalised)."""
        return self._pixel_values(pixels)

    def _pixel_values(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) float32 on the device; uint8 from the fast path is normalised there.
        Pinned pixels (the loader pins them for a GPU) are copied without blocking: the copy
        overlaps the host's work until the forward needs them, on the same stream."""
        from fusebench.extract.devicepath import DeviceBatch

        if isinstance(pixels, DeviceBatch):  # not decoded yet (cache verify, benchmarks)
            pixels, bad = self.device_image.pixels(pixels, self.device)
            if bad:
                raise ValueError(bad[0][1])
        pixels = pixels.to(self.device, non_blocking=pixels.is_pinned())
        path = self.device_image or self.fast_image
        if pixels.dtype == torch.uint8 and path is not None:
            pixels = path.normalize(pixels)
        return pixels

    def preprocess(self, images: Sequence[Any]) -> np.ndarray:
        """(B, 3, H, W) pixels: float32 from the model's own image processor, or uint8 from
        the fast path that reproduces it (select_preprocess), normalised in encode_image."""
        if self.device_image is not None:  # (B, 3, H, W) uint8 tensor, or a DeviceBatch
            return self.device_image.preprocess(list(images))
        if self.fast_image is not None:
            return self.fast_image.preprocess(list(images))
        return np.asarray(
            self.image_processor(images=list(images), return_tensors="np")["pixel_values"],
            dtype=np.float32,
        )

    def encode_text(self, ids: Sequence[Sequence[int]]) -> TokenFeatures:
        raise NotImplementedError(f"encoder '{self.spec.name}' has no text tower")

    def encode_image(self, pixels: torch.Tensor) -> TokenFeatures:
        raise NotImplementedError(f"encoder '{self.spec.name}' has no image tower")


def _pool(tokens: torch.Tensor, mask: torch.Tensor, how: str) -> torch.Tensor:
    if how == "cls":
        return tokens[:, 0]  # (B, D)
    if how == "mean":
        m = mask.unsqueeze(-1).to(tokens.dtype)  # (B, L, 1)
        return (tokens * m).sum(1) / m.sum(1).clamp(min=1)
    raise ValueError(f"pooling '{how}' unknown; use cls or mean")


def _f16(x: torch.Tensor) -> np.ndarray:
    """float16 for storage, converted where x is: from a GPU half the bytes cross to the host
    and the host converts nothing (the loop's main process keeps the GPU fed). torch rounds as
    numpy's astype does (IEEE round to nearest even: the same bits, tests/test_extract.py);
    values beyond ±65504 become inf, which the extraction loop reports as a failed sample."""
    return x.float().to(torch.float16).cpu().numpy()


def _text_features(
    tokens: torch.Tensor,
    mask: torch.Tensor,
    pooled: dict[str, torch.Tensor],
    pooling: dict[str, str],
) -> TokenFeatures:
    tokens = tokens.float().masked_fill(~mask.unsqueeze(-1), 0.0)  # (B, L, D), padding exactly 0
    return TokenFeatures(
        tokens=_f16(tokens),
        mask=mask.cpu().numpy(),
        pooled={k: _f16(v) for k, v in pooled.items()},
        pooling=pooling,
    )


@register_encoder("text")
class TextEncoder(Encoder):
    """A transformers text model (BERT, MiniLM, RoBERTa, ...): tokens + mask, CLS/mean pooled."""

    modalities = ("text",)

    def __init__(self, spec: EncoderSpec, *, device: torch.device) -> None:
        super().__init__(spec, device=device)
        self.tokenizer = self._load_tokenizer()

    def config(self) -> dict:
        return super().config() | {"extra_pooling": list(self.spec.extra_pooling)}

    @torch.inference_mode()
    def encode_text(self, ids: Sequence[Sequence[int]]) -> TokenFeatures:
        batch = self._pad(ids)
        with self._autocast():
            out = self.model(**batch, output_hidden_states=self.spec.layer is not None)
        tokens, mask = self._hidden(out), batch["attention_mask"].bool()  # (B, L, D), (B, L)
        names = {"pooled": self.spec.pooling} | {f"pooled_{p}": p for p in self.spec.extra_pooling}
        pooled = {k: _pool(tokens.float(), mask, how) for k, how in names.items()}
        return _text_features(tokens, mask, pooled, names)


@register_encoder("image")
class ImageEncoder(Encoder):
    """A transformers vision model (ViT, DeiT, ...): all tokens, pooled = CLS (or mean)."""

    modalities = ("image",)

    def __init__(self, spec: EncoderSpec, *, device: torch.device) -> None:
        super().__init__(spec, device=device)
        self.image_processor = _image_processor(self.path)

    @torch.inference_mode()
    def encode_image(self, pixels: torch.Tensor) -> TokenFeatures:
        with self._autocast():
            out = self.model(
                pixel_values=self._pixel_values(pixels),
                output_hidden_states=self.spec.layer is not None,
            )
        tokens = self._hidden(out).float()  # (B, P, D)
        full = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
        return TokenFeatures(
            tokens=_f16(tokens),
            mask=None,
            pooled={"pooled": _f16(_pool(tokens, full, self.spec.pooling))},
            pooling={"pooled": self.spec.pooling},
        )


@register_encoder("clip")
class ClipEncoder(Encoder):
    """CLIP-style dual encoder: both towers' tokens; pooled = the model's own projected,
    normalised text_embeds / image_embeds (what CLIP matches on)."""

    modalities = ("text", "image")

    def __init__(self, spec: EncoderSpec, *, device: torch.device) -> None:
        super().__init__(spec, device=device)
        self.tokenizer = self._load_tokenizer()
        self.image_processor = _image_processor(self.path)
        limit = self.model.config.text_config.max_position_embeddings
        self.spec.max_length = min(self.spec.max_length, limit)

    @torch.inference_mode()
    def encode_text(self, ids: Sequence[Sequence[int]]) -> TokenFeatures:
        batch = self._pad(ids)
        with self._autocast():
            out = self.model.text_model(**batch, output_hidden_states=self.spec.layer is not None)
            embeds = self.model.text_projection(out.pooler_output)  # (B, E)
        embeds = embeds.float() / embeds.float().norm(p=2, dim=-1, keepdim=True)
        mask = batch["attention_mask"].bool()
        return _text_features(
            self._hidden(out), mask, {"pooled": embeds}, {"pooled": "text_embeds"}
        )

    @torch.inference_mode()
    def encode_image(self, pixels: torch.Tensor) -> TokenFeatures:
        with self._autocast():
            out = self.model.vision_model(
                pixel_values=self._pixel_values(pixels),
                output_hidden_states=self.spec.layer is not None,
            )
            embeds = self.model.visual_projection(out.pooler_output)  # (B, E)
        embeds = embeds.float() / embeds.float().norm(p=2, dim=-1, keepdim=True)
        return TokenFeatures(
            tokens=_f16(self._hidden(out)),  # (B, P, D)
            mask=None,
            pooled={"pooled": _f16(embeds)},
            pooling={"pooled": "image_embeds"},
        )
