"""The folds × seeds of each torch head trained together (fuse.batched) vs one at a time
(docs/architecture.md §9 target: >= 3x for the pooled heads on a CPU), measured in one run.

    .venv/bin/python benchmarks/batched_heads.py [--quick] [--device cpu|cuda] [--heads ...]
    .venv/bin/python benchmarks/batched_heads.py --features features/lab5-dev --text minilm --image vit

Per head (cross_attn included: on a CPU compare fits token heads one at a time, because
stacked they measured slower here, and on CUDA stacks them; this script stacks them anyway;
--token-heads: text_only / image_only read tokens too, use_tokens=true): the wall time of a compare cell (5 folds × 2 seeds = 10 fits, fuse.experiment.
evaluate_head, scoring included) with --one-at-a-time and batched, the ratio, and each
path's mean macro-F1 (they differ only by dropout's random masks; with dropout 0 they agree
to 1e-4, tests/test_batched.py). The two paths alternate head by head, one-at-a-time first.

Without --features it writes a synthetic cache shaped like lab5-dev (1,200 labelled rows;
text: MiniLM-like 384-d, 64 token slots with 8-60 real; image: --image-dim pooled and
--image-tokens tokens, default 768-d and 50, ViT-B/32-like). --quick is a smoke run of the
script (300 rows, 3 epochs, 192-d image, a small cross_attn; under 2 minutes): its fits are
so small that per-step overhead dominates, so its ratios flatter batching — the full run
(or --features on a real cache) is the measurement. Timings on a shared, loaded machine are
noisy: rerun before trusting a ratio to better than ~20%.

Why the ratio depends on the widths: batching removes the per-step costs of a fit (Python,
optimizer and kernel launches, per-epoch scoring), not its arithmetic. On a CPU a pooled head
at lab5-dev widths (384 + 768 inputs, hidden 512, batch 64) is mostly matmul already, so
stacking gains little there; on a GPU, where such a step is launch-bound, it gains most.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fusebench.cache import TokenFeatures, write_features  # noqa: E402
from fusebench.fuse import StratifiedProtocol, batched, build_head, list_heads, load_feature_set  # noqa: E402
from fusebench.fuse.experiment import evaluate_head  # noqa: E402
from fusebench.fuse.head import FitsTogether  # noqa: E402
from fusebench.fuse.registry import head_needs_tokens  # noqa: E402

CLASSES = ("negative", "neutral", "positive")


def synthetic(folder: Path, *, n: int, text_slots: int, image_tokens: int, image_dim: int) -> Path:
    """A lab5-dev-shaped cache with a weak planted class signal (so early stopping varies)."""
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, n)
    lengths = rng.integers(text_slots // 8, text_slots - 3, n)
    mask = np.arange(text_slots)[None, :] < lengths[:, None]  # (n, slots)

    def feats(shape: tuple[int, ...], d: int) -> np.ndarray:
        centre = 0.05 * rng.standard_normal((3, d), dtype=np.float32)[y]  # (n, d)
        x = rng.standard_normal((n, *shape, d), dtype=np.float32)
        return x + centre.reshape(n, *([1] * len(shape)), d)

    t_tok = feats((text_slots,), 384) * mask[..., None]
    i_tok = feats((image_tokens,), image_dim)
    write_features(
        folder / "syn.h5",
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
            i_tok.astype(np.float16),
            None,
            {"pooled": feats((), image_dim).astype(np.float16)},
            {"pooled": "cls"},
        ),
        config={"encoder": "syn"},
        attrs={"encoder": "syn"},
    )
    return folder


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small cache, 3 epochs (< 2 min)")
    ap.add_argument("--device", default="cpu", help="cpu | cuda | auto")
    ap.add_argument("--heads", default="", help="comma list (default: every torch head)")
    ap.add_argument("--features", type=Path, help="a cache folder (default: synthetic)")
    ap.add_argument("--text", default="syn")
    ap.add_argument("--image", default="syn")
    ap.add_argument("--epochs", type=int, help="default: 3 with --quick, else the configs'")
    ap.add_argument("--image-tokens", type=int, help="synthetic image tokens (default 50)")
    ap.add_argument("--image-dim", type=int, help="synthetic image token width (default 768)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's)")
    ap.add_argument(
        "--token-heads", action="store_true", help="text_only / image_only with use_tokens=true"
    )
    args = ap.parse_args()
    # on a CPU compare fits token heads one at a time (fuse.batched.stack_token_heads): stack
    # them here anyway, to measure what they would get
    batched.BATCH_TOKEN_HEADS = True
    if args.threads:
        torch.set_num_threads(args.threads)
    epochs = args.epochs or (3 if args.quick else None)
    tmp = tempfile.TemporaryDirectory()
    features = args.features
    if features is None:
        features = synthetic(
            Path(tmp.name),
            n=300 if args.quick else 1200,
            text_slots=32 if args.quick else 64,
            image_tokens=args.image_tokens or (16 if args.quick else 50),
            image_dim=args.image_dim or (192 if args.quick else 768),
        )
    torch_heads = [h for h in list_heads() if isinstance(build_head(h), FitsTogether)]
    heads = args.heads.split(",") if args.heads else torch_heads
    # cross_attn at full size: one fit takes ~20 s here, so the quick run shrinks it
    shrink = {"cross_attn": {"dim": 32, "hidden": 32}} if args.quick else {}
    if args.token_heads:
        shrink |= {h: {"use_tokens": True} for h in ("text_only", "image_only")}
    seeds = (42, 43)
    loaded: dict[bool, object] = {}
    print(
        f"device {args.device}, torch threads {torch.get_num_threads()}, epochs "
        f"{epochs or 'per config'}, 5 folds x {len(seeds)} seeds = 10 fits per head"
    )
    print(
        f"{'head':<12} {'one-at-a-time':>14} {'batched':>9} {'ratio':>6}   macro-F1 one / batched"
    )
    warm = True  # one untimed epoch of each path first: one-off imports and allocations
    for head in heads:
        tokens = head_needs_tokens(head, shrink.get(head))
        if tokens not in loaded:
            loaded[tokens] = load_feature_set(
                features, text=args.text, image=args.image, tokens=tokens
            )
        fs = loaded[tokens]
        folds = StratifiedProtocol(folds=5).splits(fs)
        kw = dict(overrides=shrink.get(head), epochs=epochs, device=args.device)
        if warm:
            for one in (True, False):
                evaluate_head(head, fs, folds[:2], seeds, one_at_a_time=one, **{**kw, "epochs": 1})
            warm = False
        times, f1 = {}, {}
        for one in (True, False):
            start = time.perf_counter()
            runs = evaluate_head(head, fs, folds, seeds, one_at_a_time=one, **kw)
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            times[one] = time.perf_counter() - start
            f1[one] = float(np.mean([r.metrics["macro_f1"] for r in runs]))
        print(
            f"{head:<12} {times[True]:>13.1f}s {times[False]:>8.1f}s {times[True] / times[False]:>5.1f}x"
            f"   {f1[True]:.3f} / {f1[False]:.3f}",
            flush=True,
        )
    tmp.cleanup()


if __name__ == "__main__":
    main()
