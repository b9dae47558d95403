"""The one trainer of every torch head: its data (gather, batches, Standardized inputs) and
its one epoch loop (`train_epochs`), which a fit alone (`SingleFit.run`) and the
stacked fits of fuse.batched both run.

AdamW on minibatches of the fit rows; after each epoch the inner validation rows are scored
(macro-F1 or loss) and the best epoch's weights are kept; training stops after `patience`
epochs without improvement and the best weights are restored. Only the rows passed as
`val` are ever used for that choice. The estimator around it is fuse.nets.TorchClassifier.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from fusebench.cache import TokenFeatures
from fusebench.fuse.features import FeatureSet, Modality
from fusebench.fuse.params import NON_NEGATIVE, POSITIVE, POSITIVE_INT, check_values
from fusebench.fuse.streaming import BUFFER_BLOCKS, block_order, resident
from sklearn.metrics import f1_score
from torch import nn
from tqdm.auto import tqdm

from fusebench.devices import resolve_device  # noqa: F401  (re-exported: fuse.nets, fuse.batched)

FORWARD_ARGS = (
    "text_tokens",
    "text_mask",
    "image_tokens",
    "image_mask",
    "text_pooled",
    "image_pooled",
)


@dataclass(frozen=True)
class InputDims:
    """Feature widths a head is built for (None = that input is absent)."""

    text_pooled: int | None = None
    image_pooled: int | None = None
    text_tokens: int | None = None
    image_tokens: int | None = None

    @classmethod
    def of(cls, fs: FeatureSet) -> InputDims:
        t, i = fs.text, fs.image
        return cls(
            text_pooled=None if t is None else t.pooled_dim,
            image_pooled=None if i is None else i.pooled_dim,
            text_tokens=None if t is None else t.token_dim,
            image_tokens=None if i is None else i.token_dim,
        )


@dataclass(frozen=True)
class TrainConfig:
    """How a torch head is trained: the `train:` block of configs/heads/<name>.yaml."""

    epochs: int = 10  # upper bound; early stopping usually ends sooner
    batch_size: int = 64
    lr: float = 1e-3  # AdamW
    weight_decay: float = 0.01
    patience: int = (
        3  # epochs without a better inner-val score before stopping; 0 = never stop early
    )
    monitor: str = (
        "macro_f1"  # "macro_f1" (inner-val, higher is better) or "loss" (inner-val cross-entropy)
    )
    class_weights: bool = False  # weight the loss by inverse class frequency of the fit rows
    grad_clip: float = 1.0  # max gradient norm; 0 = off
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    eval_batch_size: int = 256
    standardize: bool = True  # scale every input feature by the fit rows' mean / std (Standardized)
    # auto: bf16 autocast on CUDA, float32 elsewhere; bf16: autocast on any device (on a CPU
    # it is slower, and does not reach the matmuls of stacked fits under vmap); fp32: never.
    # Weights, optimizer state and the loss stay float32 throughout.
    precision: str = "auto"

    @classmethod
    def from_dict(cls, values: Any, *, head: str = "") -> TrainConfig:
        if not isinstance(values, dict):
            raise ValueError(
                f"head '{head}': train must be a mapping of training options "
                f"(e.g. --set train.lr=3e-4), not {values!r}"
            )
        valid = [f.name for f in dataclasses.fields(cls)]
        unknown = [k for k in values if k not in valid]
        if unknown:
            raise ValueError(
                f"unknown training option 'train.{unknown[0]}' for head '{head}'; valid: {', '.join(valid)}"
            )
        defaults = {f.name: f.default for f in dataclasses.fields(cls)}
        prefix = f"head '{head}': train."
        return cls(
            **check_values(values, defaults, prefix, bounds=TRAIN_BOUNDS, choices=TRAIN_CHOICES)
        )


TRAIN_BOUNDS = {
    "epochs": POSITIVE_INT,
    "batch_size": POSITIVE_INT,
    "eval_batch_size": POSITIVE_INT,
    "lr": POSITIVE,
    "weight_decay": NON_NEGATIVE,
    "patience": NON_NEGATIVE,
    "grad_clip": NON_NEGATIVE,
}
TRAIN_CHOICES = {"monitor": ("macro_f1", "loss"), "precision": ("auto", "fp32", "bf16")}


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """The forward passes' context for TrainConfig.precision on `device`: bf16 autocast
    (matmuls and attention in bfloat16, reductions and the loss in float32), or nothing.
    auto is bf16 on CUDA only: on a CPU autocast is slower, and there the numbers of every
    existing run must stay what they were."""
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


_warm: set[str] = set()


def warm_up(device: torch.device) -> None:
    """One tiny AdamW step, untimed: torch's one-off lazy initialisation (optimizer imports,
    kernels) would otherwise land in the train time of whichever head runs first."""
    if str(device) in _warm:
        return
    layer = nn.Linear(4, 2).to(device)
    opt = torch.optim.AdamW(layer.parameters())
    layer(torch.zeros(1, 4, device=device)).sum().backward()
    opt.step()
    _warm.add(str(device))


def gather(
    fs: FeatureSet,
    rows: np.ndarray,
    *,
    modalities: tuple[str, ...],
    tokens: bool,
    device: torch.device,
) -> dict[str, torch.Tensor | None]:
    """The forward() inputs for `rows` of fs: with `tokens`, each modality's tokens and mask,
    else its pooled vector (what the head reads); every other input stays None.

    On a GPU the arrays are indexed where they are when they were moved there (they are, on
    first use, if they fit: fuse/streaming.py `resident`); else the batch is cut on the host
    (from RAM, or read from the file for streamed tokens) and copied over."""
    batch: dict[str, torch.Tensor | None] = dict.fromkeys(FORWARD_ARGS)
    for m in modalities:
        mod = fs.modality(m)
        held = resident(mod.held, mod.feats, device, tokens)
        if held is not None and (held.tokens is not None or not tokens):
            batch.update(_gather_resident(mod, held, rows, m, tokens, device))
            continue
        if not tokens:
            batch[f"{m}_pooled"] = _tensor(mod.pooled(rows), device)  # (b, D')
            continue
        tok, mask = mod.tokens(rows)
        batch[f"{m}_tokens"] = _tensor(tok, device)  # (b, L, D)
        batch[f"{m}_mask"] = None if mask is None else torch.from_numpy(mask).to(device)  # (b, L)
    return batch


def _gather_resident(
    mod: Modality,
    held: TokenFeatures,
    rows: np.ndarray,
    m: str,
    tokens: bool,
    device: torch.device,
) -> dict[str, torch.Tensor | None]:
    """gather's inputs of one modality from its device copy: the same values the host path
    gives (the same rows, cut to the same batch length)."""
    idx = mod.index[rows]  # (b,) cache rows, on the host
    at = torch.from_numpy(idx).to(device, non_blocking=True)
    if not tokens:
        return {f"{m}_pooled": held.pooled["pooled"].index_select(0, at).float()}  # (b, D')
    length = mod.batch_length(idx)  # from the host mask: no device sync
    cut = slice(None) if length is None else slice(0, length)
    return {
        f"{m}_tokens": held.tokens[:, cut].index_select(0, at).float(),  # (b, l, D)
        f"{m}_mask": None if held.mask is None else held.mask[:, cut].index_select(0, at),
    }


def _tensor(a: np.ndarray | torch.Tensor, device: torch.device) -> torch.Tensor:
    # float16 crosses to the device at half the bytes, then becomes float32 there
    if isinstance(a, torch.Tensor):
        return a.to(device, non_blocking=True).float()
    return torch.from_numpy(np.ascontiguousarray(a)).to(device, non_blocking=True).float()


def class_weight_vector(labels: np.ndarray, n_classes: int) -> np.ndarray:
    """(C,) n / (C * count_c), the 'balanced' weights; 0 for a class absent from labels."""
    counts = np.bincount(labels, minlength=n_classes).astype(np.float64)
    return np.where(counts > 0, len(labels) / (n_classes * np.maximum(counts, 1)), 0.0)


def token_lengths(fs: FeatureSet, modalities: tuple[str, ...], tokens: bool) -> np.ndarray | None:
    """(n,) padded-away tokens a row needs (summed over masked modalities); None when batches
    cost the same whatever rows they hold (pooled inputs, or unmasked tokens only)."""
    if not tokens:
        return None
    per = [fs.modality(m).lengths() for m in modalities]
    per = [p for p in per if p is not None]
    return np.sum(per, axis=0) if per else None


def row_blocks(fs: FeatureSet, modalities: tuple[str, ...], tokens: bool) -> np.ndarray | None:
    """(n,) the block of cache rows each row of fs lies in, for heads that read tokens (the
    modality with the widest token rows decides): training draws a block-aware order, which
    lets streamed tokens be read a block at a time and is the same order in RAM, so the
    memory budget never changes the numbers. None for pooled heads."""
    if not tokens:
        return None
    mods = [fs.modality(m) for m in modalities]
    mods = [mod for mod in mods if mod is not None and mod.feats.tokens is not None]
    if not mods:
        return None
    return max(mods, key=lambda mod: mod.token_row_bytes).blocks()


def batches(
    n: int,
    batch_size: int,
    rng: np.random.Generator | None,
    lengths: np.ndarray | None,
    blocks: np.ndarray | None = None,
) -> list[np.ndarray]:
    """Row batches for one pass. rng=None keeps row order (evaluation).

    With lengths, rows are sorted by length inside windows of 16 batches before batching, so
    a batch pads to similar lengths (tweets: median 30 tokens, a cache Lmax of 128); the batch
    order is then shuffled. Without, a plain shuffled (or ordered) split.

    With blocks ((n,) the block of cache rows of each row: `row_blocks`, for token heads), the order
    is block-aware, so a pass reads each block about once: the blocks are shuffled and taken
    BUFFER_BLOCKS at a time, and the rows of those blocks are shuffled among themselves (not
    across the whole set) and cut into batches (a buffer's last batch may be short); with
    lengths, sorted by length within them and their batches shuffled among themselves. Evaluation keeps row order, sorting by length within the same
    buffers. An in-RAM set given blocks draws the same order (the streamed = in-RAM tests)."""
    if blocks is not None:
        return _block_batches(batch_size, rng, lengths, np.asarray(blocks, dtype=np.int64))
    order = np.arange(n) if rng is None else rng.permutation(n)
    if lengths is None:
        return [order[i : i + batch_size] for i in range(0, n, batch_size)]
    window = batch_size * (16 if rng is not None else max(n, 1))
    out = []
    for start in range(0, n, window):
        w = order[start : start + window]
        w = w[np.argsort(lengths[w], kind="stable")]
        out += [w[i : i + batch_size] for i in range(0, len(w), batch_size)]
    return out if rng is None else [out[k] for k in rng.permutation(len(out))]


def _block_batches(
    batch_size: int,
    rng: np.random.Generator | None,
    lengths: np.ndarray | None,
    blocks: np.ndarray,
) -> list[np.ndarray]:
    if rng is None:
        buffer = blocks // BUFFER_BLOCKS
        cuts = np.flatnonzero(np.diff(buffer)) + 1
        groups = np.split(np.arange(len(blocks)), cuts)
    else:
        groups = block_order(blocks, rng, BUFFER_BLOCKS)
    out = []
    for g in groups:  # batches never straddle buffers: a buffer's blocks are read once
        if lengths is not None:
            g = g[np.argsort(lengths[g], kind="stable")]
        cut = [g[i : i + batch_size] for i in range(0, len(g), batch_size)]
        shuffle = rng is not None and lengths is not None  # else already in random order
        out += [cut[k] for k in rng.permutation(len(cut))] if shuffle else cut
    return out


SCALED_INPUTS = ("text_pooled", "image_pooled", "text_tokens", "image_tokens")


class Standardized(nn.Module):
    """A head behind per-feature standardisation of its inputs, (x - mean) / std, with
    statistics of the fit rows only (buffers, saved with the weights; tokens: over real tokens).

    Why: encoders' features differ in scale by orders of magnitude, and within one vector a few
    outlier dimensions can dwarf the rest (MiniLM at --layer 3: max |x| 9.7 against a typical
    0.06). An MLP fed such inputs as they are collapsed to the majority class (lab5-dev,
    text_only: macro-F1 0.249 raw, 0.453 standardised), which would rank a layer as useless
    when the head is what failed. Padded token positions stay exactly 0.
    """

    def __init__(self, head: nn.Module, dims: dict[str, int]) -> None:
        super().__init__()
        self.head = head
        self.scaled = tuple(dims)
        for name, dim in dims.items():
            self.register_buffer(f"{name}_mean", torch.zeros(dim))
            self.register_buffer(f"{name}_std", torch.ones(dim))

    def set_stats(self, stats: dict[str, tuple[np.ndarray, np.ndarray]]) -> Standardized:
        for name, (mean, std) in stats.items():
            getattr(self, f"{name}_mean").copy_(torch.as_tensor(mean, dtype=torch.float32))
            getattr(self, f"{name}_std").copy_(torch.as_tensor(std, dtype=torch.float32))
        return self

    def forward(self, **inputs: torch.Tensor | None) -> torch.Tensor:
        out = dict(inputs)
        for name in self.scaled:
            x = inputs.get(name)
            if x is None:
                continue
            x = (x - getattr(self, f"{name}_mean")) / getattr(self, f"{name}_std")
            mask = inputs.get(name.replace("tokens", "mask")) if name.endswith("tokens") else None
            out[name] = x if mask is None else x * mask.unsqueeze(-1)  # (b, L, D): padding 0
        return self.head(**out)


def scaled_dims(dims: InputDims, modalities: tuple[str, ...], tokens: bool) -> dict[str, int]:
    """The inputs a head reads (tokens, or else pooled vectors), with their widths: what
    Standardized keeps statistics of."""
    wanted = [f"{m}_{'tokens' if tokens else 'pooled'}" for m in modalities]
    return {k: getattr(dims, k) for k in SCALED_INPUTS if k in wanted and getattr(dims, k)}


STATS_BLOCK_BYTES = 32 << 20  # float64 values input_stats holds at once (and as much again for x*x)


def input_stats(
    fs: FeatureSet, names: tuple[str, ...], block_bytes: int = STATS_BLOCK_BYTES
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """name -> (mean, std) per feature over the rows of fs (tokens: real tokens only), streamed
    in blocks of rows of about block_bytes as float64 (so a streamed set stays within its
    memory budget: 256 ViT token rows were 0.6 GB), with float64 sums. A (near-)constant
    feature gets std 1 (left as it is)."""
    stats = {}
    for name in names:
        modality, kind = name.split("_")
        mod = fs.modality(modality)
        if kind == "pooled":
            width = mod.pooled_dim
        else:  # values in one row of tokens
            width = mod.token_row_bytes // np.dtype(mod.feats.tokens.dtype).itemsize
        block = max(1, block_bytes // (8 * max(1, width)))
        total, total_sq, count = 0.0, 0.0, 0
        for start in range(0, len(fs), block):
            rows = np.arange(start, min(start + block, len(fs)))
            if kind == "pooled":
                x = mod.pooled(rows).astype(np.float64)  # (b, D)
            else:
                tok, mask = mod.tokens(rows)  # (b, L, D), (b, L)
                x = tok.astype(np.float64).reshape(-1, tok.shape[-1])
                if mask is not None:
                    x = x[mask.reshape(-1)]
            total = total + x.sum(axis=0)
            total_sq = total_sq + (x * x).sum(axis=0)
            count += len(x)
        mean = total / max(count, 1)
        std = np.sqrt(np.maximum(total_sq / max(count, 1) - mean * mean, 0.0))
        stats[name] = (mean, np.where(std > 1e-6, std, 1.0))
    return stats


@torch.inference_mode()
def predict_logits(
    module: nn.Module,
    fs: FeatureSet,
    *,
    modalities: tuple[str, ...],
    tokens: bool,
    device: torch.device,
    batch_size: int = 256,
    precision: str = "fp32",
) -> torch.Tensor:
    """(n, C) float32 logits on the CPU for every row of fs, in fs's order; filled on the
    device and copied over once (no host synchronisation per batch)."""
    module.eval()
    out = torch.zeros((len(fs), fs.n_classes), device=device)
    for rows in batches(len(fs), batch_size, None, token_lengths(fs, modalities, tokens)):
        batch = gather(fs, rows, modalities=modalities, tokens=tokens, device=device)
        with autocast(device, precision):
            logits = module(**batch)  # (b, C)
        out[torch.from_numpy(rows).to(device, non_blocking=True)] = logits.float()
    return out.cpu()


@dataclass
class TrainResult:
    best_epoch: int  # 1-based; the weights left in the module are this epoch's
    history: list[dict[str, float]]  # per epoch: train_loss, val_loss, val_macro_f1


class Members(Protocol):
    """What the epoch loop (train_epochs) trains: one fit (SingleFit) or several stacked as
    one (fuse.batched). A slot is the position of a member among those still training."""

    def train_epoch(self) -> list[float]:
        """One pass over each live member's fit rows; each one's mean training loss."""
        ...

    def val_logits(self) -> dict[int, torch.Tensor]:
        """slot -> (n_val, C) float32 CPU logits on its inner-val rows (no rows: absent)."""
        ...

    def state(self, slot: int) -> dict[str, torch.Tensor]:
        """A copy of the member's current state_dict."""
        ...

    def drop(self, slots: list[int]) -> None:
        """The members at `slots` stop training (the others keep their order)."""
        ...

    def epoch_done(self, epoch: int, records: list[dict[str, float]]) -> None:
        """Progress: the epoch's record of each live member."""
        ...


def train_epochs(
    members: Members,
    cfg: TrainConfig,
    vals: Sequence[FeatureSet | None],
    weights: Sequence[torch.Tensor | None],
    n_classes: int,
) -> tuple[list[TrainResult], list[dict[str, torch.Tensor]]]:
    """The one epoch loop of every torch fit, alone or stacked: per epoch, a training pass,
    each member's inner-val scores (weighted by its own class weights, as its loss), its
    early stopping (EarlyStopping), its best state kept; a member that stops leaves the loop.
    Returns per member its TrainResult and the state to load: its best epoch's (its last
    epoch's when it never improved, e.g. NaN scores)."""
    n = len(vals)
    stoppers = [EarlyStopping(cfg.patience) for _ in range(n)]
    histories: list[list[dict[str, float]]] = [[] for _ in range(n)]
    best: list[dict | None] = [None] * n
    y_val = [
        None if v is None or not len(v) else torch.as_tensor(v.label, dtype=torch.long)
        for v in vals
    ]
    alive = list(range(n))  # the member in each slot
    for epoch in range(1, cfg.epochs + 1):
        losses, logits, stopped = members.train_epoch(), members.val_logits(), []
        for slot, m in enumerate(alive):
            record = {"epoch": epoch, "train_loss": losses[slot]}
            record.update(val_scores(logits.get(slot), y_val[m], weights[m], n_classes))
            histories[m].append(record)
            improved, stop = stoppers[m].update(record, cfg.monitor)
            if improved:
                best[m] = members.state(slot)
            if stop or epoch == cfg.epochs:
                stopped.append(slot)
        members.epoch_done(epoch, [histories[m][-1] for m in alive])
        for slot in stopped:
            if best[alive[slot]] is None:  # never improved: its last weights
                best[alive[slot]] = members.state(slot)
        if len(stopped) == len(alive):
            break
        if stopped:
            members.drop(stopped)
            alive = [m for slot, m in enumerate(alive) if slot not in stopped]
    results = [TrainResult(s.best_epoch, h) for s, h in zip(stoppers, histories)]
    return results, best


class SingleFit:
    """One fit for train_epochs: a module (on `device`), AdamW over its trainable weights,
    its own data order (default_rng(seed)) and dropout stream (torch.manual_seed(seed))."""

    def __init__(
        self,
        module: nn.Module,
        train: FeatureSet,
        val: FeatureSet | None,
        cfg: TrainConfig,
        *,
        seed: int,
        modalities: tuple[str, ...],
        tokens: bool,
        device: torch.device,
        quiet: bool = True,
        desc: str = "",
    ) -> None:
        self.rng = np.random.default_rng(seed)
        torch.manual_seed(seed)
        self.module = module.to(device)
        self.weight = None  # (C,) class weights of the loss, on the device
        if cfg.class_weights:
            counts = class_weight_vector(train.label, train.n_classes)
            self.weight = torch.tensor(counts, dtype=torch.float32, device=device)
        self.loss_fn = nn.CrossEntropyLoss(weight=self.weight)
        self.opt = torch.optim.AdamW(
            [p for p in module.parameters() if p.requires_grad],
            lr=cfg.lr,
            weight_decay=cfg.weight_decay,
        )
        self.y = torch.as_tensor(train.label, dtype=torch.long, device=device)
        self.train, self.val, self.cfg = train, val, cfg
        self.bar = tqdm(
            total=cfg.epochs * len(train),
            unit="sample",
            unit_scale=True,
            desc=desc,
            leave=False,
            disable=quiet,
        )
        self.inputs = {"modalities": modalities, "tokens": tokens, "device": device}
        self.lengths = token_lengths(train, modalities, tokens)
        self.blocks = row_blocks(train, modalities, tokens)  # token heads: block-aware order

    def train_epoch(self) -> list[float]:
        self.module.train()
        device = self.inputs["device"]
        # on a GPU the loss is summed where it is (float64, the same sums as the host's):
        # .item() per batch would wait for every step to finish before queueing the next
        total: float | torch.Tensor = 0.0
        on_host = device.type != "cuda"
        n = len(self.train)
        for rows in batches(n, self.cfg.batch_size, self.rng, self.lengths, self.blocks):
            at = torch.from_numpy(rows).to(device, non_blocking=True)  # (b,)
            with autocast(device, self.cfg.precision):
                logits = self.module(**gather(self.train, rows, **self.inputs))  # (b, C)
            loss = self.loss_fn(logits.float(), self.y[at])
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            if self.cfg.grad_clip:
                nn.utils.clip_grad_norm_(self.module.parameters(), self.cfg.grad_clip)
            self.opt.step()
            if on_host:
                total += loss.item() * len(rows)
            else:
                total = total + loss.detach().double() * len(rows)
            self.bar.update(len(rows))
        return [float(total) / max(n, 1)]

    def val_logits(self) -> dict[int, torch.Tensor]:
        if self.val is None or not len(self.val):
            return {}
        batch, precision = self.cfg.eval_batch_size, self.cfg.precision
        return {
            0: predict_logits(
                self.module, self.val, **self.inputs, batch_size=batch, precision=precision
            )
        }

    def state(self, slot: int) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.module.state_dict().items()}

    def drop(self, slots: list[int]) -> None:  # one member: the loop ends when it stops
        pass

    def epoch_done(self, epoch: int, records: list[dict[str, float]]) -> None:
        shown = {k: round(v, 3) for k, v in records[0].items() if k.startswith("val")}
        self.bar.set_postfix(epoch=epoch, **shown)

    def run(self) -> TrainResult:
        """Trains the module in place; `val` (inner validation rows only) picks the epoch,
        whose weights the module ends with."""
        (result,), (best,) = train_epochs(
            self, self.cfg, [self.val], [self.weight], self.train.n_classes
        )
        self.bar.close()
        self.module.load_state_dict(best)
        return result


def val_scores(
    logits: torch.Tensor | None,
    y_val: torch.Tensor | None,
    weight: torch.Tensor | None,
    n_classes: int,
) -> dict[str, float]:
    """val_loss and val_macro_f1 of (n_val, C) inner-validation logits ({} without rows);
    the loss weighted by the training loss's class weights, as early stopping sees it."""
    if logits is None:
        return {}
    loss = nn.functional.cross_entropy(
        logits, y_val, weight=None if weight is None else weight.cpu()
    )
    f1 = f1_score(
        y_val.numpy(),
        logits.argmax(1).numpy(),
        labels=range(n_classes),
        average="macro",
        zero_division=0,
    )
    return {"val_loss": float(loss), "val_macro_f1": float(f1)}


class EarlyStopping:
    """The epoch choice of one fit: the best monitored inner-val score so far, and stop after
    `patience` epochs without a better one (0 = never). One object per fit, so fits trained
    together (fuse.batched) stop exactly where each would alone."""

    def __init__(self, patience: int) -> None:
        self.patience = patience
        self.best_score, self.best_epoch, self.since = -np.inf, 0, 0

    def update(self, record: dict[str, float], monitor: str) -> tuple[bool, bool]:
        """(improved, stop) after the epoch of `record` (a fit's history entry)."""
        if "val_macro_f1" not in record:
            score = float(record["epoch"])  # no validation rows: the last epoch is the best
        else:
            score = record["val_macro_f1"] if monitor == "macro_f1" else -record["val_loss"]
        if score > self.best_score:
            self.best_score, self.best_epoch, self.since = score, record["epoch"], 0
            return True, False
        self.since += 1
        return False, bool(self.patience and self.since >= self.patience)
