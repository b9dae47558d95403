"""Torch heads: the estimator every one of them is trained as (`TorchClassifier`), the base
of their networks (`FusionHead`), and the networks. Every network has the same forward:

    forward(text_tokens, text_mask, image_tokens, image_mask, text_pooled, image_pooled) -> (B, C)

    text_tokens  (B, Lt, Dt) float32     text_mask  (B, Lt) bool, True = real token, or None
    image_tokens (B, Li, Di) float32     image_mask (B, Li) bool or None (every patch is real)
    text_pooled  (B, Dt')    float32     image_pooled (B, Di') float32

A head reads token arrays (tokens=True, or uses_tokens(params)) or pooled vectors, never both;
the inputs it does not read arrive as None. Constructors take the input dims and class count,
then keyword-only hyperparameters, which come from configs/heads/<name>.yaml. The registry
holds the network classes (`@register_head`): their `from_config` (the head contract,
fuse/head.py) returns a TorchClassifier around them, trained by fuse.trainer (alone) or
fuse.batched (the folds × seeds of a cell stacked).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, ClassVar

import fusebench.fuse.batched as batched
import numpy as np
import torch
import torch.nn.functional as F
from fusebench.fuse._util import DamagedModelError, note, torch_save
from fusebench.fuse.features import FeatureSet, check_inputs
from fusebench.fuse.head import current_fit_label, describe, register_head
from fusebench.fuse.params import DROPOUT, POSITIVE_INT, check_params
from fusebench.fuse.trainer import (
    InputDims,
    SingleFit,
    Standardized,
    TrainConfig,
    TrainResult,
    input_stats,
    predict_logits,
    resolve_device,
    scaled_dims,
    warm_up,
)
from torch import nn


def mlp(d_in: int, hidden: int, n_out: int, dropout: float) -> nn.Sequential:
    """Linear -> GELU -> Dropout -> Linear: the classifier on top of every fused vector."""
    return nn.Sequential(
        nn.Linear(d_in, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, n_out)
    )


def masked_mean(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """(B, L, D), (B, L) bool -> (B, D): mean over real tokens (a row with none gives 0)."""
    if mask is None:
        return x.mean(dim=1)
    m = mask.unsqueeze(-1).to(x.dtype)  # (B, L, 1)
    return (x * m).sum(dim=1) / m.sum(dim=1).clamp(min=1.0)


class TorchClassifier:
    """The estimator of every torch head (the contract of fuse/head.py): fit(train, val) /
    predict_proba(rows) / save / load around a network class.

    module: a registered FusionHead class; params: its hyperparameters; train: how it is
    trained (fuse.trainer.TrainConfig). Fitted state ends in `_`; `module_` is the network
    behind its input standardisation (Standardized) holding the best epoch's weights.
    """

    params_meaning: ClassVar[str] = "trainable weights"
    iteration_param: ClassVar[str | None] = "train.epochs"  # best_iteration_: the best epoch

    def __init__(
        self, module: type, *, params: dict[str, Any], train: TrainConfig, seed: int = 42
    ) -> None:
        self.module = module
        self.params = dict(params)
        self.train = train
        self.seed = seed

    @property
    def name(self) -> str:
        return self.module.registry_name

    @property
    def needs_tokens(self) -> bool:
        return bool(self.module.uses_tokens(self.params))

    def __repr__(self) -> str:
        return f"TorchClassifier({self.name}, seed={self.seed})"

    def get_config(self) -> dict[str, Any]:
        params = {**self.params, "train": asdict(self.train)}
        return {"head": self.name, "params": params, "seed": self.seed}

    def fit(
        self,
        train: FeatureSet,
        val: FeatureSet | None = None,
        *,
        quiet: bool = True,
        desc: str | None = None,
    ) -> TorchClassifier:
        """Trains on `train`; `val` (rows disjoint from any scored rows) picks the epoch.
        desc: the label of its epoch bar (default: the runner's fuse.head.fit_label, else
        "<head> seed <seed>")."""
        modalities, dims, module = self.initial_module(train)
        device = resolve_device(self.train.device)
        warm_up(device)
        start = time.perf_counter()
        module = self.standardized(module, train, modalities, dims)
        result = SingleFit(
            module,
            train,
            val,
            self.train,
            seed=self.seed,
            modalities=modalities,
            tokens=self.needs_tokens,
            device=device,
            quiet=quiet,
            desc=desc or current_fit_label() or f"{self.name} seed {self.seed}",
        ).run()
        elapsed = time.perf_counter() - start
        return self.fitted(module, result, train_time=elapsed, device=device, train=train)

    @classmethod
    def fit_together(
        cls,
        heads: Sequence[TorchClassifier],
        trains: Sequence[FeatureSet],
        vals: Sequence[FeatureSet | None],
        *,
        quiet: bool,
        label: str,
    ) -> bool:
        """The FitsTogether capability: `heads` (one head and settings, one per seed × fold)
        trained as one stacked model (fuse.batched); False, with a note, when they are fitted
        one at a time instead: token heads on a CPU (measured slower), or a module vmap
        refuses."""
        if not batched.can_batch(heads):
            return False
        if heads[0].needs_tokens and not batched.stack_token_heads(heads[0].train.device):
            why = batched.TOKEN_HEADS_NOTE
            note(f"{label}: its {len(heads)} fits are trained one at a time ({why})")
            return False
        try:
            batched.fit_together(
                heads, trains, vals, quiet=quiet, desc=f"{label}: {len(heads)} fits together"
            )
        except batched.NotBatchable as e:
            note(f"{label}: its {len(heads)} fits are trained one at a time ({e})")
            return False
        return True

    def initial_module(self, train: FeatureSet) -> tuple[tuple[str, ...], InputDims, nn.Module]:
        """(modalities, dims, the untrained head) for `train`; its initial weights depend on
        the seed only (torch.manual_seed right before building), whoever trains it."""
        modalities = check_inputs(
            train,
            head=self.name,
            modalities=self.module.modalities,
            require=self.module.require,
            tokens=self.needs_tokens,
        )
        torch.manual_seed(self.seed)
        dims = InputDims.of(train)
        return modalities, dims, self.module(dims, train.n_classes, **self.params)

    def standardized(
        self, module: nn.Module, train: FeatureSet, modalities: tuple[str, ...], dims: InputDims
    ) -> nn.Module:
        """module behind Standardized with the statistics of `train` (the fit rows only), or
        module itself when train.standardize is off."""
        if not self.train.standardize:
            return module
        names = scaled_dims(dims, modalities, self.needs_tokens)
        return Standardized(module, names).set_stats(input_stats(train, tuple(names)))

    def fitted(
        self,
        module: nn.Module,
        result: TrainResult,
        *,
        train_time: float,
        device: torch.device,
        train: FeatureSet,
    ) -> TorchClassifier:
        """Sets the fitted state (`module` holds the best epoch's weights); returns self."""
        self.train_time_ = train_time
        self.module_ = module.eval()
        self.device_ = device
        self.modalities_ = tuple(m for m in self.module.modalities if train.modality(m) is not None)
        self.dims_ = InputDims.of(train)
        self.classes_ = tuple(train.classes)
        self.best_iteration_ = result.best_epoch
        self.history_ = result.history
        self.n_params_ = sum(p.numel() for p in module.parameters() if p.requires_grad)
        return self

    def _check_fitted(self) -> None:
        if not hasattr(self, "module_"):
            from sklearn.exceptions import NotFittedError

            raise NotFittedError(f"this {self!r} is not fitted yet; call fit(train, val) first")

    def predict_proba(self, rows: FeatureSet) -> np.ndarray:
        """(n, C) class probabilities for every row of `rows`, in order."""
        self._check_fitted()
        logits = predict_logits(
            self.module_,
            rows,
            modalities=self.modalities_,
            tokens=self.needs_tokens,
            device=self.device_,
            batch_size=self.train.eval_batch_size,
            precision=self.train.precision,
        )
        return torch.softmax(logits, dim=1).numpy()

    def save(self, folder: str | Path) -> None:
        """folder/head.json (what to rebuild) + folder/state.pt (the fitted weights)."""
        self._check_fitted()
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        torch_save({k: v.cpu() for k, v in self.module_.state_dict().items()}, folder / "state.pt")
        meta = {**describe(self), "train": asdict(self.train), "dims": asdict(self.dims_)}
        (folder / "head.json").write_text(json.dumps(meta, indent=2))

    @classmethod
    def load(
        cls, folder: str | Path, *, device: str = "auto", module: type | None = None
    ) -> TorchClassifier:
        """The head saved by save() (module: its network class; default: the one registered
        under head.json's name). A missing or damaged file is a DamagedModelError."""
        from fusebench.fuse.head import HEADS

        folder = Path(folder)
        dev = resolve_device(device)  # a bad --device is the user's flag, not damage
        try:
            meta = json.loads((folder / "head.json").read_text())
            module_cls = module or HEADS.get(meta["head"])
            self = module_cls.from_config(meta["params"], seed=meta["seed"], device=device)
            self.dims_, self.classes_ = InputDims(**meta["dims"]), tuple(meta["classes"])
            self.modalities_ = tuple(meta["modalities"])
            net = module_cls(self.dims_, len(self.classes_), **self.params)
            if self.train.standardize:
                scaled = scaled_dims(self.dims_, self.modalities_, self.needs_tokens)
                net = Standardized(net, scaled)
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise DamagedModelError(
                f"{folder / 'head.json'} is damaged ({type(e).__name__}: {e}); rerun the "
                "`fusebench fuse` or `compare` command that made the run"
            ) from None
        _load_state(net, folder / "state.pt")
        self.device_ = dev
        self.module_ = net.to(dev).eval()
        self.best_iteration_, self.n_params_ = meta.get("best_iteration"), meta.get("n_params")
        self.history_ = []
        return self


def _load_state(module: nn.Module, path: Path) -> None:
    try:
        module.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    except Exception as e:  # torch.load raises many kinds on a truncated or foreign file
        what = " ".join(str(e).split())[:160]
        raise DamagedModelError(
            f"{path} cannot be loaded ({type(e).__name__}: {what}); it is missing or damaged "
            "— rerun the `fusebench fuse` or `compare` command that made the run"
        ) from None


class FusionHead(nn.Module):
    """Base class of the torch networks: the class-level half of the head contract (what it
    reads, from_config, load); its from_config returns the TorchClassifier around it."""

    modalities: tuple[str, ...] = ("text", "image")
    require = "all"  # every modality in `modalities` must be present
    tokens = False  # reads token arrays (not pooled vectors)
    registry_name = ""
    # the valid range of every numeric hyperparameter any head here takes (fuse.params)
    bounds = {
        "hidden": POSITIVE_INT,
        "dim": POSITIVE_INT,
        "num_heads": POSITIVE_INT,
        "layers": POSITIVE_INT,
        "ffn_mult": POSITIVE_INT,
        "dropout": DROPOUT,
    }

    @classmethod
    def uses_tokens(cls, params: dict[str, Any]) -> bool:
        return cls.tokens

    @classmethod
    def check_config(cls, params: dict[str, Any]) -> None:
        """Refuses combinations of (individually valid) hyperparameters; nothing by default."""

    @classmethod
    def from_config(
        cls,
        params: dict[str, Any],
        *,
        seed: int,
        epochs: int | None = None,
        device: str | None = None,
        class_weights: bool | None = None,
    ) -> TorchClassifier:
        """The estimator: params (hyperparameters and a `train:` block) checked, the run-wide
        options put in `train`, and the device checked (a GPU torch cannot see fails here)."""
        params = dict(params)
        train = params.pop("train", None) or {}
        if not isinstance(train, dict):
            raise ValueError(
                f"head '{cls.registry_name}': train must be a mapping of training options "
                f"(e.g. --set train.lr=3e-4), not {train!r}"
            )
        options = {"epochs": epochs, "device": device, "class_weights": class_weights}
        train = {**train, **{k: v for k, v in options.items() if v is not None}}
        params = check_params(cls, params, cls.registry_name)
        cls.check_config(params)
        config = TrainConfig.from_dict(train, head=cls.registry_name)
        resolve_device(config.device)
        return TorchClassifier(cls, params=params, train=config, seed=seed)

    @classmethod
    def load(cls, folder: str | Path, *, device: str = "auto") -> TorchClassifier:
        return TorchClassifier.load(folder, device=device, module=cls)


class CrossBlock(nn.Module):
    """Queries attend to keys/values (multi-head attention), then a feed-forward layer;
    each with a residual connection and LayerNorm."""

    def __init__(self, dim: int, num_heads: int, ffn_mult: int, dropout: float) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, num_heads, dropout=dropout, batch_first=True)
        self.norm1 = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(
            nn.Linear(dim, ffn_mult * dim),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(ffn_mult * dim, dim),
        )
        self.norm2 = nn.LayerNorm(dim)
        self.drop = nn.Dropout(dropout)

    def forward(
        self, q: torch.Tensor, kv: torch.Tensor, kv_mask: torch.Tensor | None
    ) -> torch.Tensor:
        # q (B, Lq, d), kv (B, Lk, d), kv_mask (B, Lk) True = real -> (B, Lq, d)
        pad = None
        if kv_mask is not None:
            pad = ~kv_mask  # (B, Lk) True = ignore
            # a row without any real key (empty text) attends to its first (zero) slot
            # instead of producing NaN from a softmax over nothing
            pad[:, 0] &= kv_mask.any(dim=1)
        a, _ = self.attn(q, kv, kv, key_padding_mask=pad, need_weights=False)  # (B, Lq, d)
        x = self.norm1(q + self.drop(a))
        return self.norm2(x + self.drop(self.ffn(x)))


@register_head("cross_attn")
class CrossAttention(FusionHead):
    """Text tokens query image tokens; the attended text tokens are mean-pooled over the text
    mask and classified. bidirectional=True adds image tokens querying text tokens, and the
    two pooled vectors are concatenated."""

    tokens = True

    @classmethod
    def check_config(cls, params: dict[str, Any]) -> None:
        dim, num_heads = params.get("dim", 256), params.get("num_heads", 4)
        if dim % num_heads:
            raise ValueError(
                f"head 'cross_attn': dim={dim} must be divisible by num_heads={num_heads}"
            )

    def __init__(
        self,
        dims: InputDims,
        n_classes: int,
        *,
        dim: int = 256,
        num_heads: int = 4,
        layers: int = 1,
        ffn_mult: int = 2,
        dropout: float = 0.1,
        bidirectional: bool = False,
        hidden: int = 256,
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"cross_attn: dim={dim} must be divisible by num_heads={num_heads}")
        self.text_in = nn.Sequential(
            nn.LayerNorm(dims.text_tokens), nn.Linear(dims.text_tokens, dim)
        )
        self.image_in = nn.Sequential(
            nn.LayerNorm(dims.image_tokens), nn.Linear(dims.image_tokens, dim)
        )
        self.text_to_image = nn.ModuleList(
            CrossBlock(dim, num_heads, ffn_mult, dropout) for _ in range(layers)
        )
        self.image_to_text = (
            nn.ModuleList(CrossBlock(dim, num_heads, ffn_mult, dropout) for _ in range(layers))
            if bidirectional
            else None
        )
        self.classifier = mlp(dim * (2 if bidirectional else 1), hidden, n_classes, dropout)

    def forward(
        self, text_tokens, text_mask, image_tokens, image_mask, text_pooled=None, image_pooled=None
    ):
        t = self.text_in(text_tokens)  # (B, Lt, d)
        v = self.image_in(image_tokens)  # (B, Li, d)
        x = t
        for block in self.text_to_image:
            x = block(x, v, image_mask)  # (B, Lt, d): text enriched with what it found in the image
        z = masked_mean(x, text_mask)  # (B, d)
        if self.image_to_text is not None:
            y = v
            for block in self.image_to_text:
                y = block(y, t, text_mask)  # (B, Li, d)
            z = torch.cat([z, masked_mean(y, image_mask)], dim=-1)  # (B, 2d)
        return self.classifier(z)  # (B, C)


@register_head("concat_mlp")
class ConcatMLP(FusionHead):
    """Early fusion: [LN(t); LN(i)] -> MLP."""

    def __init__(
        self, dims: InputDims, n_classes: int, *, hidden: int = 512, dropout: float = 0.3
    ) -> None:
        super().__init__()
        self.norm_t = nn.LayerNorm(dims.text_pooled)
        self.norm_i = nn.LayerNorm(dims.image_pooled)
        self.classifier = mlp(dims.text_pooled + dims.image_pooled, hidden, n_classes, dropout)

    def forward(self, text_tokens, text_mask, image_tokens, image_mask, text_pooled, image_pooled):
        z = torch.cat([self.norm_t(text_pooled), self.norm_i(image_pooled)], dim=-1)  # (B, Dt+Di)
        return self.classifier(z)  # (B, C)


@register_head("late")
class LateFusion(FusionHead):
    """One MLP per modality; their logits are averaged, or mixed by a learned weight
    w = sigmoid(a) (starting at 0.5) when learned_weight=True."""

    def __init__(
        self,
        dims: InputDims,
        n_classes: int,
        *,
        hidden: int = 256,
        dropout: float = 0.3,
        learned_weight: bool = False,
    ) -> None:
        super().__init__()
        self.text = nn.Sequential(
            nn.LayerNorm(dims.text_pooled), mlp(dims.text_pooled, hidden, n_classes, dropout)
        )
        self.image = nn.Sequential(
            nn.LayerNorm(dims.image_pooled), mlp(dims.image_pooled, hidden, n_classes, dropout)
        )
        self.mix = nn.Parameter(torch.zeros(())) if learned_weight else None

    def forward(self, text_tokens, text_mask, image_tokens, image_mask, text_pooled, image_pooled):
        lt, li = self.text(text_pooled), self.image(image_pooled)  # (B, C) each
        w = 0.5 if self.mix is None else torch.sigmoid(self.mix)
        return w * lt + (1 - w) * li  # (B, C)


@register_head("gated")
class GatedFusion(FusionHead):
    """Gated multimodal unit (Arevalo et al., 2017): h = z * tanh(W_t t) + (1 - z) * tanh(W_i i)
    with a per-dimension gate z = sigmoid(W_z [t; i]); h -> MLP."""

    def __init__(
        self,
        dims: InputDims,
        n_classes: int,
        *,
        dim: int = 256,
        hidden: int = 256,
        dropout: float = 0.3,
    ) -> None:
        super().__init__()
        self.norm_t = nn.LayerNorm(dims.text_pooled)
        self.norm_i = nn.LayerNorm(dims.image_pooled)
        self.text = nn.Linear(dims.text_pooled, dim)
        self.image = nn.Linear(dims.image_pooled, dim)
        self.gate = nn.Linear(dims.text_pooled + dims.image_pooled, dim)
        self.drop = nn.Dropout(dropout)
        self.classifier = mlp(dim, hidden, n_classes, dropout)

    def forward(self, text_tokens, text_mask, image_tokens, image_mask, text_pooled, image_pooled):
        t, i = self.norm_t(text_pooled), self.norm_i(image_pooled)
        z = torch.sigmoid(self.gate(torch.cat([t, i], dim=-1)))  # (B, dim)
        h = z * torch.tanh(self.text(t)) + (1 - z) * torch.tanh(self.image(i))  # (B, dim)
        return self.classifier(self.drop(h))  # (B, C)


@register_head("clip_match")
class ClipMatch(FusionHead):
    """[t, i, t*i, |t-i|, cos(t, i)] -> MLP, the matching features CLIP-style embeddings are
    made for. Products need one space: when the pooled dims differ (or project=True) both
    are first projected to `dim`. normalize=True L2-normalizes t and i first (as CLIP does)."""

    def __init__(
        self,
        dims: InputDims,
        n_classes: int,
        *,
        dim: int = 256,
        project: bool = False,
        normalize: bool = True,
        hidden: int = 512,
        dropout: float = 0.3,
    ) -> None:
        super().__init__()
        d = dims.text_pooled
        if project or dims.text_pooled != dims.image_pooled:
            self.proj_t, self.proj_i, d = (
                nn.Linear(dims.text_pooled, dim),
                nn.Linear(dims.image_pooled, dim),
                dim,
            )
        else:
            self.proj_t, self.proj_i = nn.Identity(), nn.Identity()
        self.normalize = normalize
        self.norm = nn.LayerNorm(4 * d + 1)  # puts products of unit vectors on a trainable scale
        self.classifier = mlp(4 * d + 1, hidden, n_classes, dropout)

    def forward(self, text_tokens, text_mask, image_tokens, image_mask, text_pooled, image_pooled):
        t, i = self.proj_t(text_pooled), self.proj_i(image_pooled)  # (B, d) each
        if self.normalize:
            t, i = F.normalize(t, dim=-1), F.normalize(i, dim=-1)
        cos = F.cosine_similarity(t, i, dim=-1).unsqueeze(-1)  # (B, 1)
        z = torch.cat([t, i, t * i, (t - i).abs(), cos], dim=-1)  # (B, 4d+1)
        return self.classifier(self.norm(z))  # (B, C)


class Unimodal(FusionHead):
    """A baseline on one modality: its pooled vector (or, with use_tokens=True, the masked
    mean of its tokens) -> MLP. The other modality is never read."""

    modality = "text"

    def __init__(
        self,
        dims: InputDims,
        n_classes: int,
        *,
        hidden: int = 256,
        dropout: float = 0.3,
        use_tokens: bool = False,
    ) -> None:
        super().__init__()
        self.use_tokens = use_tokens
        d = getattr(dims, f"{self.modality}_{'tokens' if use_tokens else 'pooled'}")
        self.classifier = nn.Sequential(nn.LayerNorm(d), mlp(d, hidden, n_classes, dropout))

    @classmethod
    def uses_tokens(cls, params: dict[str, Any]) -> bool:
        return bool(params.get("use_tokens", False))

    def forward(self, text_tokens, text_mask, image_tokens, image_mask, text_pooled, image_pooled):
        if self.modality == "text":
            x = masked_mean(text_tokens, text_mask) if self.use_tokens else text_pooled  # (B, D)
        else:
            x = masked_mean(image_tokens, image_mask) if self.use_tokens else image_pooled
        return self.classifier(x)  # (B, C)


@register_head("text_only")
class TextOnly(Unimodal):
    modalities = ("text",)
    modality = "text"


@register_head("image_only")
class ImageOnly(Unimodal):
    modalities = ("image",)
    modality = "image"
