"""The folds × seeds fits of one torch head, trained together as one stacked model.

A compare is many small fits of the same head (5 folds × 2 seeds = 10 per cell); one at a
time, each step of each fit pays Python, optimizer and kernel-launch overhead for a few
small matmuls. Here the members' weights are stacked (torch.func.stack_module_state) and one
vmapped functional_call runs every member's step at once (batched matmuls).

Each member is exactly one fit of the one-at-a-time path (TorchClassifier.fit):
- its own initial weights (torch.manual_seed(seed) right before building) and its own
  Standardized statistics (its fold's fit rows);
- its own data order: its own rng = default_rng(seed) over its own fit rows
  (fuse.trainer.batches), so the k-th step of a member is its k-th batch alone. Batches are
  padded to the largest member's batch with the member's own rows at loss weight 0, so no
  member ever sees another's rows (nor its own twice in its loss);
- its own class weights, loss (the weighted mean over its real rows), gradient clipping
  (its own gradient norm) and AdamW state (StackedAdamW: a step count per member);
- its own early stopping (fuse.trainer.EarlyStopping) on its own inner-validation rows; a
  member that stops is dropped from the stack (weights and optimizer state), its best
  epoch's weights kept.

What differs: dropout masks come from vmap's randomness="different" stream, not from the
member's own torch seed, so with dropout > 0 members match their one-at-a-time fit in
distribution, not bit for bit; with dropout 0 (and the same epochs) logits agree within
float32 rounding (tests/test_batched.py: 1e-4). train_time_ of each member is the group's
wall time divided by the number of members.

What it buys: the per-step costs of a fit (Python, optimizer and kernel launches, scoring
each epoch), not its arithmetic. On the 2-core CPU here, lab5-dev's pooled heads ran 1.5-2.1x
faster stacked (benchmarks/batched_heads.py); heads that read tokens (cross_attn, text_only /
image_only with use_tokens) ran slower there, so they are stacked on a GPU only
(stack_token_heads).

On a GPU nothing in a step waits for the host: losses are summed on the device, the step
decides "every member has a batch" from the host's own plan, and inner-val logits are
copied over once per epoch. TrainConfig.precision (auto: bf16 on CUDA) puts each forward
under autocast (fuse.trainer.autocast); weights, AdamW state and the loss stay float32.
"""

from __future__ import annotations

import copy
import time
import warnings
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import torch
from fusebench.fuse.features import FeatureSet
from fusebench.fuse.trainer import (
    FORWARD_ARGS,
    autocast,
    batches,
    class_weight_vector,
    gather,
    resolve_device,
    row_blocks,
    token_lengths,
    train_epochs,
    warm_up,
)
from torch import nn
from torch.func import functional_call, stack_module_state, vmap
from tqdm.auto import tqdm

__all__ = [
    "BATCH_TOKEN_HEADS",
    "NotBatchable",
    "StackedAdamW",
    "can_batch",
    "fit_together",
    "stack_token_heads",
]

# Heads that read tokens (cross_attn; text_only / image_only with use_tokens) run under vmap
# and match their one-at-a-time fits (tests/test_batched.py). Why a CPU fits them one at a
# time: on lab5-dev's caches on the 2-core CPU, 10 stacked cross_attn fits took 576 s against
# 186 s one after another (benchmarks/batched_heads.py). Not memory, and not the masks: every
# member's batch is cut to the longest real length among the members' k-th batches and its
# padded tokens are masked, which changes no number, only adds padded work. The causes: vmap
# runs the CPU's attention kernel (_scaled_dot_product_flash_attention_for_cpu, no batching
# rule) member by member, and a step's arithmetic, not its launches, is a CPU's cost. On CUDA
# the attention kernels have batching rules and a step is launch-bound, so there they are
# stacked (benchmarks/gpu.sh measures it). None: that rule; True / False: always / never.
BATCH_TOKEN_HEADS: bool | None = None
TOKEN_HEADS_NOTE = "heads that read tokens are stacked on a GPU only: on a CPU measured slower"


def stack_token_heads(device: str) -> bool:
    """Whether heads that read tokens train stacked on `device` (a TrainConfig.device):
    BATCH_TOKEN_HEADS when set, else on CUDA only."""
    if BATCH_TOKEN_HEADS is not None:
        return BATCH_TOKEN_HEADS
    return resolve_device(device).type == "cuda"


class NotBatchable(Exception):
    """These fits cannot be trained as one stack (the caller fits them one at a time)."""


def can_batch(heads: Sequence[Any]) -> bool:
    """Whether `heads` (torch heads) are two or more of one head and settings, differing only
    in seed."""
    if len(heads) < 2:
        return False
    first = heads[0].get_config()
    return all({**h.get_config(), "seed": first["seed"]} == first for h in heads[1:])


class StackedAdamW:
    """AdamW (torch.optim.AdamW's update, decoupled weight decay) over stacked parameters
    (M, ...), where member m steps only when `active[m]`.

    Why not torch.optim.AdamW over the stack: it keeps one step count per tensor (bias
    correction would be shared by members that took different numbers of steps), and it moves
    a parameter whose gradient is zero (weight decay, momentum), so a member without a batch
    at this step would still be changed. Here the step count is (M,) and an inactive member's
    weights and moments are left exactly as they were."""

    def __init__(
        self,
        params: Sequence[torch.Tensor],
        *,
        lr: float,
        weight_decay: float,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
    ) -> None:
        self.params = list(params)
        self.lr, self.weight_decay, self.betas, self.eps = lr, weight_decay, betas, eps
        self.exp_avg = [torch.zeros_like(p) for p in self.params]
        self.exp_avg_sq = [torch.zeros_like(p) for p in self.params]
        self.steps = torch.zeros(len(self.params[0]), device=self.params[0].device)  # (M,)

    @torch.no_grad()
    def step(self, active: torch.Tensor, everyone: bool | None = None) -> None:
        """One AdamW step of the members where active (M,) bool is True. everyone: whether
        all are (the caller's host-side answer; None reads `active`, a device sync on a GPU)."""
        b1, b2 = self.betas
        self.steps += active.to(self.steps.dtype)
        steps = self.steps.clamp(min=1)  # (M,): inactive members at 0 steps are masked anyway
        bc1, bc2_sqrt = 1 - b1**steps, (1 - b2**steps).sqrt()
        if everyone is None:
            everyone = bool(active.all())  # the usual step: in place, as torch's AdamW does it
        for p, m, v in zip(self.params, self.exp_avg, self.exp_avg_sq):
            if p.grad is None:
                continue
            shape = (-1,) + (1,) * (p.dim() - 1)
            g = p.grad
            if everyone:
                p.mul_(1 - self.lr * self.weight_decay)
                m.lerp_(g, 1 - b1)
                v.mul_(b2).addcmul_(g, g, value=1 - b2)
                denom = v.sqrt().div_(bc2_sqrt.view(shape)).add_(self.eps)
                p.addcdiv_(m, denom.mul_((bc1 / self.lr).view(shape)), value=-1.0)
                continue
            on = active.view(shape)  # a member without a batch this step keeps everything
            m.copy_(torch.where(on, m.lerp(g, 1 - b1), m))
            v.copy_(torch.where(on, v * b2 + (1 - b2) * g * g, v))
            denom = v.sqrt() / bc2_sqrt.view(shape) + self.eps
            new = p * (1 - self.lr * self.weight_decay) - (self.lr / bc1).view(shape) * m / denom
            p.copy_(torch.where(on, new, p))

    def keep(self, members: torch.Tensor, params: Sequence[torch.Tensor]) -> None:
        """Only `members` (indices into the stack) go on; `params` are the new stacked leaves."""
        self.params = list(params)
        self.exp_avg = [m[members] for m in self.exp_avg]
        self.exp_avg_sq = [v[members] for v in self.exp_avg_sq]
        self.steps = self.steps[members]


def _joined(sets: Sequence[FeatureSet]) -> tuple[FeatureSet, np.ndarray]:
    """One FeatureSet holding every member's rows, member after member, and (M,) offsets:
    member m's local row r is row offsets[m] + r, so one gather() serves every member."""
    first = sets[0]
    for fs in sets[1:]:
        for name in first.modalities:
            if (
                fs.modality(name) is None
                or fs.modality(name).feats is not first.modality(name).feats
            ):
                raise NotBatchable("the members' rows come from different caches")
    mods = {
        name: replace(
            first.modality(name), index=np.concatenate([fs.modality(name).index for fs in sets])
        )
        for name in first.modalities
    }
    joined = replace(
        first,
        guid=np.concatenate([fs.guid for fs in sets]),
        split=np.concatenate([fs.split for fs in sets]),
        label=np.concatenate([fs.label for fs in sets]),
        text=mods.get("text"),
        image=mods.get("image"),
    )
    offsets = np.cumsum([0] + [len(fs) for fs in sets[:-1]])
    return joined, offsets


def _padded(rows: Sequence[np.ndarray | None], width: int) -> tuple[np.ndarray, np.ndarray]:
    """(M, width) local rows per member (short batches repeat their first row; a member
    without a batch takes its row 0) and the (M, width) bool mask of real rows."""
    out = np.zeros((len(rows), width), dtype=np.int64)
    real = np.zeros((len(rows), width), dtype=bool)
    for m, r in enumerate(rows):
        if r is None or not len(r):
            continue
        out[m, : len(r)] = r
        out[m, len(r) :] = r[0]
        real[m, : len(r)] = True
    return out, real


class _Stack:
    """The members still training: stacked weights (M, ...), buffers, and a stateless copy of
    the module to call them through.

    Matrices (Linear weights, (M, out, in)) are stored transposed, as (M, in, out) leaves the
    module sees through a transposed view: vmap's linear computes x @ W^T as a bmm whose
    weight gradient comes out (M, in, out), and a leaf laid out (M, out, in) would have
    autograd copy every gradient into its layout at every step (on a CPU the largest single
    cost of a pooled head's step)."""

    def __init__(self, modules: Sequence[nn.Module], device: torch.device) -> None:
        self.base = copy.deepcopy(modules[0]).to("meta")
        params, self.buffers = stack_module_state(list(modules))
        self.flipped = {k for k, v in params.items() if v.dim() == 3}
        self.params = {
            k: (v.transpose(1, 2).contiguous() if k in self.flipped else v)
            .to(device)
            .detach()
            .requires_grad_()
            for k, v in params.items()
        }
        self.buffers = {k: v.to(device) for k, v in self.buffers.items()}

        def one(p: dict, b: dict, inputs: dict) -> torch.Tensor:
            p = {k: (v.T if k in self.flipped else v) for k, v in p.items()}
            return functional_call(self.base, (p, b), (), {**dict.fromkeys(FORWARD_ARGS), **inputs})

        self.train_fn = vmap(one, randomness="different")
        self.eval_fn = vmap(one)

    def __call__(self, inputs: dict[str, torch.Tensor], *, train: bool) -> torch.Tensor:
        """inputs: name -> (M, B, ...) (absent inputs left out) -> (M, B, C) logits."""
        self.base.train(train)
        with warnings.catch_warnings():
            # attention on the CPU (scaled_dot_product_attention) has no vmap rule: vmap runs
            # it member by member, correct but slower, and says so at every step
            warnings.filterwarnings("ignore", "There is a performance drop", UserWarning)
            return (self.train_fn if train else self.eval_fn)(self.params, self.buffers, inputs)

    def state(self, i: int) -> dict[str, torch.Tensor]:
        """Member i's state_dict (a copy, in the module's own layout)."""
        out = {
            k: (v[i].T if k in self.flipped else v[i]).detach().contiguous().clone()
            for k, v in self.params.items()
        }
        out.update({k: v[i].clone() for k, v in self.buffers.items()})
        return out

    def keep(self, members: torch.Tensor) -> None:
        self.params = {k: v[members].detach().requires_grad_() for k, v in self.params.items()}
        self.buffers = {k: v[members] for k, v in self.buffers.items()}


def _stacked(
    joined: FeatureSet,
    rows: np.ndarray,
    *,
    modalities: tuple[str, ...],
    tokens: bool,
    device: torch.device,
) -> dict[str, torch.Tensor]:
    """gather() of the (M, B) joined rows, reshaped to (M, B, ...); absent inputs left out."""
    m, b = rows.shape
    flat = gather(joined, rows.reshape(-1), modalities=modalities, tokens=tokens, device=device)
    return {k: v.reshape(m, b, *v.shape[1:]) for k, v in flat.items() if v is not None}


def fit_together(
    heads: Sequence[Any],
    trains: Sequence[FeatureSet],
    vals: Sequence[FeatureSet | None],
    *,
    quiet: bool = True,
    desc: str = "",
) -> list[Any]:
    """Fits heads[m] (fuse.nets.TorchClassifier) on trains[m], early-stopped on vals[m], all
    as one stack; each head ends fitted as its own fit() would leave it (see the module
    docstring). Raises NotBatchable when the heads differ in more than their seed, or the
    head's module cannot run under vmap (nothing is fitted then)."""
    if not can_batch(heads):
        raise NotBatchable("only torch heads of one kind and settings are trained together")
    cfg = heads[0].train
    device = resolve_device(cfg.device)
    prepared = [h.initial_module(t) for h, t in zip(heads, trains)]
    modalities, dims = prepared[0][0], prepared[0][1]
    warm_up(device)
    start = time.perf_counter()
    modules = [
        h.standardized(module, t, modalities, dims).to(device)
        for h, t, (_, _, module) in zip(heads, trains, prepared)
    ]
    bar = tqdm(
        total=cfg.epochs * len(heads), unit="fit-epoch", desc=desc, leave=False, disable=quiet
    )
    members = _Members(
        modules,
        heads,
        trains,
        vals,
        device=device,
        modalities=modalities,
        tokens=heads[0].needs_tokens,
        bar=bar,
    )
    weights = [members.weights[m] if cfg.class_weights else None for m in range(len(heads))]
    results, best = train_epochs(members, cfg, vals, weights, trains[0].n_classes)
    bar.close()
    seconds = (time.perf_counter() - start) / len(heads)
    for head, module, result, state, train in zip(heads, modules, results, best, trains):
        module.load_state_dict(state)
        head.fitted(module, result, train_time=seconds, device=device, train=train)
    return list(heads)


class _Members:
    """The stacked fits for fuse.trainer.train_epochs: every live member's k-th batch in one
    vmapped step (batches padded to the largest with the member's own rows at loss weight 0),
    its own data order, class weights, gradient clipping and AdamW state (StackedAdamW)."""

    def __init__(
        self,
        modules: Sequence[nn.Module],
        heads: Sequence[Any],
        trains: Sequence[FeatureSet],
        vals: Sequence[FeatureSet | None],
        *,
        device: torch.device,
        modalities: tuple[str, ...],
        tokens: bool,
        bar: tqdm,
    ) -> None:
        self.cfg, self.trains, self.bar = heads[0].train, trains, bar
        self.inputs = {"modalities": modalities, "tokens": tokens, "device": device}
        self.precision = self.cfg.precision
        self.joined, self.offsets = _joined(trains)
        has_val = [v is not None and len(v) > 0 for v in vals]
        self.vals = {m: v for m, (v, ok) in enumerate(zip(vals, has_val)) if ok}
        # a member without inner-val rows evaluates its own fit rows, and ignores the result
        self.val_joined, self.val_offsets = _joined(
            [v if ok else t for v, t, ok in zip(vals, trains, has_val)]
        )
        self.stack = _Stack(modules, device)
        _probe(self.stack, self.joined, self.offsets, **self.inputs, precision=self.precision)
        self.rngs = [np.random.default_rng(h.seed) for h in heads]
        torch.manual_seed(heads[0].seed)  # dropout: one stream for the stack (module docstring)
        self.lengths = [token_lengths(t, modalities, tokens) for t in trains]
        self.blocks = [row_blocks(t, modalities, tokens) for t in trains]  # token heads
        self.val_lengths = [
            token_lengths(v, modalities, tokens) if ok else None for v, ok in zip(vals, has_val)
        ]
        n_classes = trains[0].n_classes
        self.weights = torch.stack(
            [
                torch.as_tensor(class_weight_vector(t.label, n_classes), dtype=torch.float32)
                if self.cfg.class_weights
                else torch.ones(n_classes)
                for t in trains
            ]
        ).to(device)  # (M, C)
        self.y = torch.as_tensor(self.joined.label, dtype=torch.long, device=device)
        self.opt = StackedAdamW(
            list(self.stack.params.values()), lr=self.cfg.lr, weight_decay=self.cfg.weight_decay
        )
        self.alive = list(range(len(heads)))  # member of each stack slot

    def train_epoch(self) -> list[float]:
        cfg, alive, device = self.cfg, self.alive, self.inputs["device"]
        plans = [
            batches(len(t), cfg.batch_size, self.rngs[m], self.lengths[m], self.blocks[m])
            for m, t in ((m, self.trains[m]) for m in alive)
        ]
        total = torch.zeros(len(alive), device=device)  # (S,) summed loss x rows
        for k in range(max(len(p) for p in plans)):
            local = [p[k] if k < len(p) else None for p in plans]  # slot -> its k-th batch
            rows, real = _padded(local, max(len(r) for r in local if r is not None))  # (S, B)
            rows = rows + self.offsets[alive][:, None]
            inputs = _stacked(self.joined, rows, **self.inputs)
            real_t = torch.from_numpy(real).to(device, non_blocking=True)
            with autocast(device, self.precision):
                logits = self.stack(inputs, train=True)  # (S, B, C)
            loss = _member_losses(
                logits.float(),
                self.y[torch.from_numpy(rows).to(device, non_blocking=True)],
                real_t,
                self.weights[alive],
            )  # (S,)
            for p in self.stack.params.values():
                p.grad = None
            loss.sum().backward()  # members share no weight: each gets its own loss's gradient
            if cfg.grad_clip:
                _clip_per_member(list(self.stack.params.values()), cfg.grad_clip)
            self.opt.step(real_t.any(dim=1), everyone=bool(real.any(axis=1).all()))
            total += loss.detach() * real_t.sum(dim=1)
        return [float(total[s]) / max(len(self.trains[m]), 1) for s, m in enumerate(alive)]

    def val_logits(self) -> dict[int, torch.Tensor]:
        return _val_logits(
            self.stack,
            self.val_joined,
            self.val_offsets,
            {slot: self.vals[m] for slot, m in enumerate(self.alive) if m in self.vals},
            {slot: self.val_lengths[m] for slot, m in enumerate(self.alive)},
            batch_size=self.cfg.eval_batch_size,
            alive=self.alive,
            precision=self.precision,
            **self.inputs,
        )

    def state(self, slot: int) -> dict[str, torch.Tensor]:
        return self.stack.state(slot)

    def drop(self, slots: list[int]) -> None:
        keep = [s for s in range(len(self.alive)) if s not in slots]
        self.alive = [self.alive[s] for s in keep]
        kept = torch.tensor(keep, device=self.inputs["device"])
        self.stack.keep(kept)
        self.opt.keep(kept, list(self.stack.params.values()))

    def epoch_done(self, epoch: int, records: list[dict[str, float]]) -> None:
        self.bar.update(len(records))


def _member_losses(
    logits: torch.Tensor, y: torch.Tensor, real: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """(S,) each member's loss: cross-entropy over its real rows, weighted by its own class
    weights, as nn.CrossEntropyLoss(weight)'s mean (sum w_y * l / sum w_y).
    logits (S, B, C), y (S, B), real (S, B) bool, weights (S, C)."""
    w = torch.gather(weights, 1, y) * real  # (S, B): padding rows weigh 0
    per_row = nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none")
    return (w * per_row.view_as(w)).sum(1) / w.sum(1).clamp(min=torch.finfo(w.dtype).tiny)


def _clip_per_member(params: Sequence[torch.Tensor], max_norm: float) -> None:
    """clip_grad_norm_ of each member on its own: a norm over the whole stack would scale
    every member by the largest one's gradient."""
    grads = [p.grad for p in params if p.grad is not None]
    norms = torch.linalg.vector_norm(
        torch.stack([torch.linalg.vector_norm(g.flatten(1), dim=1) for g in grads]), dim=0
    )  # (M,): as clip_grad_norm_, the norm of the per-tensor norms
    coef = (max_norm / (norms + 1e-6)).clamp(max=1.0)  # as torch.nn.utils.clip_grad_norm_
    for g in grads:
        g.mul_(coef.view((-1,) + (1,) * (g.dim() - 1)))


@torch.no_grad()
def _val_logits(
    stack: _Stack,
    joined: FeatureSet,
    offsets: np.ndarray,
    vals: dict[int, FeatureSet],
    lengths: dict[int, np.ndarray | None],
    *,
    batch_size: int,
    modalities: tuple[str, ...],
    tokens: bool,
    device: torch.device,
    alive: list[int],
    precision: str = "fp32",
) -> dict[int, torch.Tensor]:
    """stack slot -> (n_val, C) float32 CPU logits of that member on its inner-val rows, in
    their order, batched as predict_logits batches them (slots without val rows: absent);
    filled on the device, copied to the host once."""
    if not vals:
        return {}
    plans = {s: batches(len(v), batch_size, None, lengths[s]) for s, v in vals.items()}
    out = {s: torch.zeros((len(v), v.n_classes), device=device) for s, v in vals.items()}
    for k in range(max(len(p) for p in plans.values())):
        local = [
            plans[s][k] if s in plans and k < len(plans[s]) else None for s in range(len(alive))
        ]
        width = max(len(r) for r in local if r is not None)
        rows, real = _padded(local, width)  # (S, B)
        rows = rows + offsets[alive][:, None]
        inputs = _stacked(joined, rows, modalities=modalities, tokens=tokens, device=device)
        with autocast(device, precision):
            logits = stack(inputs, train=False).float()  # (S, B, C)
        for s, r in enumerate(local):
            if r is not None and s in out:
                out[s][torch.from_numpy(r).to(device, non_blocking=True)] = logits[s, : len(r)]
    return {s: o.cpu() for s, o in out.items()}


def _probe(
    stack: _Stack,
    joined: FeatureSet,
    offsets: np.ndarray,
    modalities: tuple[str, ...],
    tokens: bool,
    device: torch.device,
    precision: str,
) -> None:
    """One forward (under the fit's autocast) and backward pass of each member's first row
    (twice): a module that vmap cannot run is NotBatchable before any step is taken."""
    rows = np.repeat(offsets[:, None], 2, axis=1)  # (M, 2)
    try:
        inputs = _stacked(joined, rows, modalities=modalities, tokens=tokens, device=device)
        with autocast(device, precision):
            logits = stack(inputs, train=True)  # (M, 2, C)
        logits.float().sum().backward()
    except Exception as e:  # vmap raises RuntimeError / NotImplementedError, by op
        what = " ".join(str(e).split())[:160]
        raise NotBatchable(f"{type(e).__name__}: {what}") from None
    finally:
        for p in stack.params.values():
            p.grad = None
