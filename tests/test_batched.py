"""Batched training (fuse.batched): the folds × seeds fits of a torch head trained as one
stacked model end exactly where each would alone — same epochs, same early stopping on its
own inner split, same scores — and never see rows that are not theirs."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from fusebench.cache import TokenFeatures, write_features
from fusebench.fuse import StratifiedProtocol, batched, build_head, load_feature_set
from fusebench.fuse.batched import StackedAdamW, _clip_per_member, fit_together
from fusebench.fuse.experiment import evaluate_head
from fusebench.fuse.grid import resolve_settings
from fusebench.fuse.nets import ConcatMLP
from fusebench.fuse.protocol import Fold
from fusebench.fuse.registry import HEADS

from tests.conftest import cli, write_noise_cache

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CLASSES = ("negative", "neutral", "positive")
# dropout 0: batched dropout masks come from another random stream (fuse.batched docstring),
# so exact agreement is only defined without dropout
SMALL = {
    "concat_mlp": {"hidden": 32, "dropout": 0.0},
    "cross_attn": {"dim": 16, "num_heads": 2, "hidden": 16, "dropout": 0.0},
    # token heads too: the masked mean of text tokens (with a mask) and image tokens (without)
    "text_only": {"hidden": 16, "dropout": 0.0, "use_tokens": True},
    "image_only": {"hidden": 16, "dropout": 0.0, "use_tokens": True},
}


def cache(root: Path, *, n: int = 150, signal: float = 0.25, seed: int = 0) -> Path:
    """A weak planted signal (so seeds and folds stop at different epochs), text tokens
    with a mask and image tokens without, written as one cache."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    lengths = rng.integers(2, 7, n)
    mask = np.arange(6)[None, :] < lengths[:, None]  # (n, 6)
    t_tok = (rng.normal(size=(n, 6, 12)) + signal * rng.normal(size=(3, 12))[y][:, None]) * mask[
        ..., None
    ]
    i_tok = rng.normal(size=(n, 4, 10)) + signal * rng.normal(size=(3, 10))[y][:, None]
    write_features(
        root / "syn.h5",
        guid=[f"g{i}" for i in range(n)],
        split=["train"] * n,
        label=y,
        classes=CLASSES,
        text=TokenFeatures(
            t_tok.astype(np.float16),
            mask,
            {"pooled": (t_tok.sum(1) / lengths[:, None]).astype(np.float16)},
            {"pooled": "mean"},
        ),
        image=TokenFeatures(
            i_tok.astype(np.float16), None, {"pooled": i_tok[:, 0].astype(np.float16)}
        ),
        config={"encoder": "syn"},
        attrs={"encoder": "syn"},
    )
    return root


@pytest.fixture(scope="module")
def syn(tmp_path_factory) -> Path:
    return cache(tmp_path_factory.mktemp("batched"))


def numbers(runs):
    return [(r.seed, r.fold, r.metrics["best_iteration"], r.metrics["macro_f1"]) for r in runs]


@pytest.mark.parametrize("head", ["concat_mlp", "cross_attn", "text_only", "image_only"])
def test_batched_fits_match_one_at_a_time(head, syn, capsys, monkeypatch):
    # token heads are stacked on CUDA only by default: the CPU checks that they stack exactly
    monkeypatch.setattr(batched, "BATCH_TOKEN_HEADS", True)
    fs = load_feature_set(syn, text="syn", image="syn", tokens=head != "concat_mlp")
    folds = StratifiedProtocol(folds=3).splits(fs)
    kw = {"overrides": SMALL[head], "epochs": 6, "class_weights": True}
    alone = evaluate_head(head, fs, folds, [1, 2], one_at_a_time=True, **kw)
    together = evaluate_head(head, fs, folds, [1, 2], **kw)
    assert "one at a time" not in capsys.readouterr().err  # it really ran batched
    assert numbers(together) == numbers(alone)  # per fit: best epoch, macro-F1
    assert len({r.metrics["best_iteration"] for r in alone}) > 1  # fits stopped apart
    for a, b in zip(alone, together):
        np.testing.assert_allclose(b.proba, a.proba, atol=1e-4)
        assert [h["epoch"] for h in b.history] == [h["epoch"] for h in a.history]
        np.testing.assert_allclose(
            [h["val_loss"] for h in b.history], [h["val_loss"] for h in a.history], atol=1e-4
        )
        assert b.metrics["n_params"] == a.metrics["n_params"]


def test_each_member_early_stops_on_its_own_inner_split(syn):
    """Three members, three inner splits: none (runs every epoch), one whose labels are
    shifted by one class (its loss rises from the start: best epoch 1, stop after patience),
    one honest. Each member's epochs and weights are those of its one-at-a-time fit."""
    fs = load_feature_set(syn, text="syn", image="syn")
    fold = StratifiedProtocol(val_ratio=0.2).splits(fs)[0]
    train, val = fs.take(fold.fit), fs.take(fold.inner_val)
    shifted = replace(val, label=(val.label + 1) % 3)
    vals = [None, shifted, val]
    over = {**SMALL["concat_mlp"], "train": {"patience": 2, "monitor": "loss", "lr": 3e-3}}

    def heads():
        return [build_head("concat_mlp", seed=s, overrides=over, epochs=12) for s in (5, 5, 6)]

    alone = [h.fit(train, v) for h, v in zip(heads(), vals)]
    together = fit_together(heads(), [train] * 3, vals)
    assert [h.best_iteration_ for h in alone] == [12, 1, alone[2].best_iteration_]
    assert len(alone[1].history_) == 3 and len(alone[0].history_) == 12
    for a, b in zip(alone, together):
        assert b.best_iteration_ == a.best_iteration_
        assert [h["epoch"] for h in b.history_] == [h["epoch"] for h in a.history_]
        sa, sb = a.module_.state_dict(), b.module_.state_dict()
        assert sa.keys() == sb.keys()
        for k in sa:  # its best epoch's weights, not those of the last stacked step
            torch.testing.assert_close(sb[k], sa[k], atol=1e-5, rtol=1e-4)
        assert b.train_time_ > 0 and b.n_params_ == a.n_params_


def test_stacked_adamw_steps_members_apart():
    """Member 0 follows torch.optim.AdamW step for step; member 1, idle at step 2, keeps its
    weights and moments exactly (torch's AdamW would decay and push it)."""
    torch.manual_seed(0)
    w = torch.randn(2, 3, 4)
    stacked = w.clone().requires_grad_()
    ref = w[0].clone().requires_grad_()
    opt = StackedAdamW([stacked], lr=0.1, weight_decay=0.05)
    ref_opt = torch.optim.AdamW([ref], lr=0.1, weight_decay=0.05)
    for active in ([True, True], [True, False], [True, True]):
        g = torch.randn(2, 3, 4)
        stacked.grad, ref.grad = g.clone(), g[0].clone()
        before = stacked.detach()[1].clone()
        opt.step(torch.tensor(active))
        ref_opt.step()
        torch.testing.assert_close(stacked.detach()[0], ref.detach())
        if not active[1]:
            assert torch.equal(stacked.detach()[1], before)
    assert opt.steps.tolist() == [3, 2]


def test_gradient_clipping_is_per_member():
    torch.manual_seed(0)
    a, b = torch.zeros(2, 5, requires_grad=True), torch.zeros(2, 3, requires_grad=True)
    a.grad, b.grad = torch.randn(2, 5), torch.randn(2, 3)
    a.grad[1] *= 100  # member 1's gradient is large, member 0's small
    want = []
    for m in range(2):
        x, y = a.grad[m].clone().requires_grad_(), b.grad[m].clone().requires_grad_()
        x.grad, y.grad = x.detach().clone(), y.detach().clone()
        torch.nn.utils.clip_grad_norm_([x, y], 1.0)
        want.append((x.grad, y.grad))
    _clip_per_member([a, b], 1.0)
    for m in range(2):
        torch.testing.assert_close(a.grad[m], want[m][0])
        torch.testing.assert_close(b.grad[m], want[m][1])


def test_batched_leak_canary(tmp_path):
    """Random labels on random features: a batched MLP that memorizes its fit rows scores
    chance on its scored rows; the same fits with the scored rows leaked in score near 1."""
    write_noise_cache(tmp_path / "noise.h5", n=240, dim=64)
    fs = load_feature_set(tmp_path, text="noise", image="noise")
    none = np.array([], dtype=np.int64)  # no inner split: the last epoch is kept
    folds = [Fold(f.index, f.fit, none, f.scored) for f in StratifiedProtocol(folds=4).splits(fs)]
    leaky = [Fold(f.index, np.concatenate([f.fit, f.scored]), none, f.scored) for f in folds]
    over = {"hidden": 128, "dropout": 0.0, "train": {"lr": 1e-2, "patience": 0}}
    honest = evaluate_head("concat_mlp", fs, folds, [0, 1], overrides=over, epochs=25)
    leaked = evaluate_head("concat_mlp", fs, leaky, [0, 1], overrides=over, epochs=25)
    assert np.mean([r.metrics["accuracy"] for r in honest]) < 0.5
    assert np.mean([r.metrics["accuracy"] for r in leaked]) > 0.9


def test_token_heads_are_fitted_one_at_a_time_by_default(syn, capsys):
    fs = load_feature_set(syn, text="syn", image="syn", tokens=True)
    folds = StratifiedProtocol(folds=2).splits(fs)
    kw = {"overrides": {**SMALL["cross_attn"], "dropout": 0.1}, "epochs": 2}
    runs = evaluate_head("cross_attn", fs, folds, [1], label="cell", **kw)
    assert "note: cell: its 2 fits are trained one at a time (heads that read tokens" in (
        capsys.readouterr().err
    )
    again = evaluate_head("cross_attn", fs, folds, [1], one_at_a_time=True, **kw)
    for a, b in zip(runs, again):  # dropout > 0: equal only if both ran one at a time
        np.testing.assert_array_equal(a.proba, b.proba)


def test_token_heads_stack_on_cuda_only_by_default(monkeypatch):
    assert batched.BATCH_TOKEN_HEADS is None  # the default: decided by the device
    assert not batched.stack_token_heads("cpu")
    monkeypatch.setattr(batched, "resolve_device", lambda d: torch.device("cuda"))
    assert batched.stack_token_heads("auto")  # where torch sees a GPU
    monkeypatch.setattr(batched, "BATCH_TOKEN_HEADS", False)
    assert not batched.stack_token_heads("auto")


def test_bf16_autocast_is_applied_and_batched_still_tracks_one_at_a_time(syn, monkeypatch):
    """train.precision=bf16 (auto picks it on CUDA only) runs the forwards under autocast:
    the probabilities move off the float32 fit's, and the stacked fits run under it too and
    stay near their one-at-a-time fits (on a CPU autocast does not reach vmap's matmuls,
    pytorch/functorch#305, so there the stack stays nearer float32; on CUDA it does)."""
    monkeypatch.setattr(batched, "BATCH_TOKEN_HEADS", True)
    fs = load_feature_set(syn, text="syn", image="syn", tokens=True)
    folds = StratifiedProtocol(folds=2).splits(fs)
    over = {**SMALL["cross_attn"], "train": {"precision": "bf16"}}
    kw = {"epochs": 2}
    fp32 = evaluate_head("cross_attn", fs, folds, [1], overrides=SMALL["cross_attn"], **kw)
    alone = evaluate_head("cross_attn", fs, folds, [1], overrides=over, one_at_a_time=True, **kw)
    together = evaluate_head("cross_attn", fs, folds, [1], overrides=over, **kw)
    assert max(np.abs(a.proba - f.proba).max() for a, f in zip(alone, fp32)) > 1e-4
    for a, b in zip(alone, together):
        np.testing.assert_allclose(b.proba, a.proba, atol=0.05)


def test_precision_is_checked():
    with pytest.raises(ValueError, match="precision"):
        build_head("concat_mlp", overrides={"train": {"precision": "fp16"}})


class ItemHead(ConcatMLP):
    """A head vmap cannot run: .item() on a batched tensor."""

    registry_name = "item_mlp"

    def forward(self, text_tokens, text_mask, image_tokens, image_mask, text_pooled, image_pooled):
        if text_pooled.sum().item() == float("inf"):
            raise AssertionError("never")
        return super().forward(
            text_tokens, text_mask, image_tokens, image_mask, text_pooled, image_pooled
        )


def test_a_head_vmap_refuses_falls_back_to_one_at_a_time(syn, monkeypatch, capsys):
    monkeypatch.setitem(HEADS._items, "item_mlp", ItemHead)
    fs = load_feature_set(syn, text="syn", image="syn")
    folds = StratifiedProtocol(folds=2).splits(fs)
    kw = {"overrides": {"hidden": 16, "dropout": 0.0}, "epochs": 3}
    runs = evaluate_head("item_mlp", fs, folds, [1], label="cell", **kw)
    assert "note: cell: its 2 fits are trained one at a time" in capsys.readouterr().err
    ref = evaluate_head("concat_mlp", fs, folds, [1], one_at_a_time=True, **kw)
    assert numbers(runs) == numbers(ref)


def test_one_at_a_time_is_a_replayed_setting(syn, tmp_path):
    given = {"features": str(syn), "heads": "concat_mlp", "text": "syn", "image": "syn"}
    given |= {"seeds": "1", "device": "cpu", "one_at_a_time": True}
    spec = resolve_settings("compare", given, explicit=given)
    assert spec.one_at_a_time and spec.settings()["one_at_a_time"] is True
    (tmp_path / "config.yaml").write_text("one_at_a_time: true\n")
    replay = resolve_settings("compare", given | {"one_at_a_time": False}, ["features"], tmp_path)
    assert replay.one_at_a_time
    out = cli(
        *["compare", "--features", str(syn), "--heads", "concat_mlp", "--text", "syn"]
        + ["--image", "syn", "--one-at-a-time", "--print-config"],
    )
    assert out.exit_code == 0, out.output
    assert "one_at_a_time: true" in out.output


def test_cpu_heads_fit_beside_cuda_torch_heads_and_in_order_otherwise(monkeypatch):
    """fuse.overlap: with a torch head on CUDA, the other groups fit on a worker thread
    meanwhile (each finished fit named by its own thread's fit); with none, in order here."""
    import threading

    from fusebench.fuse import overlap

    class Progress:
        def __init__(self):
            self._where, self.lines = "", []

        @property
        def where(self):
            return self._where

        def start(self, label, seed, fold):
            self._where = label

        def finish(self, f1, seconds):
            self.lines.append(self._where)

    groups = [["lgbm"], ["cross_attn"], ["logreg"]]
    seen = []
    both_running = threading.Barrier(2, timeout=10)

    def fit(group, progress):
        progress.start(group[0], 1, 0)
        seen.append((group[0], threading.current_thread().name))
        if len(groups_on_gpu) and group[0] in ("lgbm", "cross_attn"):
            both_running.wait()  # deadlocks (timeout) unless the two really overlap
        progress.finish(0.5, 1.0)
        return [group[0]]

    groups_on_gpu = ["cross_attn"]
    monkeypatch.setattr(overlap, "on_cuda", lambda g: g[0] in groups_on_gpu)
    progress = Progress()
    runs = overlap.fit_groups(groups, fit, progress)
    assert sorted(runs) == ["cross_attn", "lgbm", "logreg"]
    threads = dict(seen)
    assert threads["lgbm"].startswith("cpu-heads") and threads["logreg"].startswith("cpu-heads")
    assert threads["cross_attn"] == threading.current_thread().name
    assert sorted(progress.lines) == ["cross_attn", "lgbm", "logreg"]  # each named rightly

    groups_on_gpu, seen[:] = [], []
    assert overlap.fit_groups(groups, fit, Progress()) == ["lgbm", "cross_attn", "logreg"]
    assert {t for _, t in seen} == {threading.current_thread().name}
