"""Comparing heads on a cache vs training the same heads with the frozen encoders in the loop
(the end-to-end way), both MEASURED in one run on this machine (docs/architecture.md §9 target: >= 40x).

    .venv/bin/python benchmarks/compare_vs_end_to_end.py [--data DIR] [--folds 5]
        [--seeds 42,43] [--heads concat_mlp,late] [--measure 1]

Cache side: extract text (minilm) and image (demo random-weight ViT) features once (timed),
then `compare --heads concat_mlp,late` on the cache through the grid runner (timed: loading,
every fold x seed fit with early stopping, scoring, the run folder and its plots).

End-to-end side: the same heads (same hyperparameters, optimiser, batch size, seeds) trained
on the same folds (fuse.protocol.StratifiedProtocol, checked against the compare's scored
rows) for as many epochs as early stopping chose in the cached run (best_iteration). Every
epoch tokenizes the fit rows' raw text and decodes + preprocesses their raw images, runs both
frozen encoders' forward (no gradients), then the head's forward, backward and step.
`--measure N` fits per head are timed (those whose best_iteration is the head's median);
the grid total is their mean x that head's number of fits: ONLY the number of fits is
extrapolated. The end-to-end side leaves out, in its own disfavour: the per-epoch inner
validation pass, the epochs early stopping ran past the best one, scoring, the input
statistics pass and model loading (done once, untimed). Fine-tuning the encoders would also
pay their backward pass; with the real ViT-B/BERT-B encoders the gap is far wider.
Without --data it generates the synthetic demo dataset (extract.synthetic).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fusebench.extract.datasets import load_dataset  # noqa: E402
from fusebench.extract.encoders import Encoder, create_encoder  # noqa: E402
from fusebench.extract.loop import extract  # noqa: E402
from fusebench.extract.synthetic import make_synthetic_lab5  # noqa: E402
from fusebench.fuse.experiment import run_compare  # noqa: E402
from fusebench.fuse.features import FeatureSet, load_feature_set  # noqa: E402
from fusebench.fuse.protocol import StratifiedProtocol  # noqa: E402
from fusebench.fuse.registry import build_head, get_head, resolve_params  # noqa: E402
from fusebench.fuse.trainer import (  # noqa: E402
    FORWARD_ARGS,
    InputDims,
    Standardized,
    batches,
    input_stats,
    scaled_dims,
)

VIT = str(REPO / "configs/demo/vit-random")


class InTheLoop:
    """The frozen encoders on raw samples: guid -> (text pooled, image pooled), as extract
    computes them (same tokenizer, max_length, image path, pooling, precision)."""

    def __init__(self, data: Path) -> None:
        ds = load_dataset(data)
        self.samples = {s.guid: s for s in ds.samples}
        self.text: Encoder = create_encoder("minilm", device="cpu")
        self.image: Encoder = create_encoder("vit", model=VIT, random_init=True, device="cpu")
        self.image.select_preprocess(exact=False)  # extract's default image path

    def pooled(
        self, guids: np.ndarray, modalities: tuple[str, ...] = ("text", "image")
    ) -> dict[str, torch.Tensor]:
        """The forward of the encoders of `modalities` on the raw rows (tokenize; decode +
        preprocess images): {"text_pooled": (b, Dt), "image_pooled": (b, Di)} float32."""
        samples = [self.samples[str(g)] for g in guids]
        out = {}
        if "text" in modalities:
            ids = self.text.tokenize([s.text or "" for s in samples])
            t = self.text.encode_text(ids).pooled["pooled"]  # (b, Dt) float16, as cached
            out["text_pooled"] = torch.from_numpy(t).float()
        if "image" in modalities:
            pixels = self.image.preprocess([self.image.load_image(s) for s in samples])
            i = self.image.encode_image(torch.from_numpy(pixels)).pooled["pooled"]  # (b, Di)
            out["image_pooled"] = torch.from_numpy(i).float()
        return out


def end_to_end_fit(
    head: str, fit: FeatureSet, epochs: int, seed: int, loop: InTheLoop
) -> tuple[float, float]:
    """Trains `head` for `epochs` with the encoders in the loop on fit's rows, as
    fuse.trainer.SingleFit does on the cache. Returns (seconds, last epoch's train loss)."""
    est = build_head(head, seed=seed, device="cpu")  # its resolved params and train config
    cfg = est.train
    torch.manual_seed(seed)
    dims = InputDims.of(fit)
    module: nn.Module = get_head(head)(dims, fit.n_classes, **est.params)
    modalities = tuple(get_head(head).modalities)
    names = scaled_dims(dims, modalities, False)
    module = Standardized(module, names).set_stats(input_stats(fit, tuple(names)))  # untimed
    opt = torch.optim.AdamW(module.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    loss_fn = nn.CrossEntropyLoss()
    rng = np.random.default_rng(seed)
    y = torch.as_tensor(fit.label, dtype=torch.long)
    start = time.perf_counter()
    for _ in range(epochs):
        module.train()
        total = 0.0
        for rows in batches(len(fit), cfg.batch_size, rng, None):
            inputs = dict.fromkeys(FORWARD_ARGS) | loop.pooled(fit.guid[rows], modalities)
            logits = module(**inputs)  # (b, C)
            loss = loss_fn(logits, y[rows])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip:
                nn.utils.clip_grad_norm_(module.parameters(), cfg.grad_clip)
            opt.step()
            total += loss.item() * len(rows)
    return time.perf_counter() - start, total / len(fit)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=None, help="a lab5 folder (default: synthetic)")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--seeds", default="42,43")
    ap.add_argument("--heads", default="concat_mlp,late", help="pooled torch heads")
    ap.add_argument("--measure", type=int, default=1, help="end-to-end fits timed per head")
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    heads = args.heads.split(",")
    for h in heads:
        cls = get_head(h)
        if not issubclass(cls, nn.Module) or cls.uses_tokens(resolve_params(h)):
            sys.exit(f"--heads: {h} is not a pooled torch head")
    tmp = Path(tempfile.mkdtemp())
    try:
        data = Path(args.data) if args.data else make_synthetic_lab5(tmp / "lab5-synthetic")
        t0 = time.perf_counter()
        reps = [
            extract(data, "minilm", out=tmp / "f", device="cpu", quiet=True),
            extract(data, "vit", model=VIT, random_init=True, out=tmp / "f", device="cpu",
                    quiet=True),
        ]  # fmt: skip
        t_extract = time.perf_counter() - t0
        features = reps[0].path.parent
        protocol = StratifiedProtocol(folds=args.folds)

        t0 = time.perf_counter()
        res = run_compare(
            heads=",".join(heads),
            features=features,
            text="minilm",
            image="vit",
            protocol=protocol,
            seeds=seeds,
            out=tmp / "runs",
            device="cpu",
            quiet=True,
        )
        t_compare = time.perf_counter() - t0

        fs = load_feature_set(features, text="minilm", image="vit")
        folds = protocol.splits(fs)
        by_fold = {f.index: f for f in folds}
        for r in res.runs:  # the same folds as the grid runner's
            if not np.array_equal(
                np.sort(fs.guid[by_fold[r.fold].scored]), np.sort(fs.guid[r.scored])
            ):
                sys.exit(f"fold {r.fold}: the protocol's split differs from the compare's")

        loop = InTheLoop(data)
        probe = np.arange(min(16, len(fs)))  # the loop computes what the cache holds
        got = loop.pooled(fs.guid[probe])
        want = [fs.modality(m).pooled(probe).astype(np.float32) for m in ("text", "image")]
        drift = max(float(np.abs(g.numpy() - w).max()) for g, w in zip(got.values(), want))
        if drift > 0.05:
            sys.exit(f"the encoders in the loop differ from the cache by {drift:.3g}")
        e2e, lines = 0.0, []
        for h in heads:
            runs = [r for r in res.runs if r.head == h]
            its = sorted(int(r.metrics["best_iteration"]) for r in runs)
            median = its[len(its) // 2]
            picked = sorted(runs, key=lambda r: abs(r.metrics["best_iteration"] - median))
            times = []
            for r in picked[: args.measure]:
                ep = int(r.metrics["best_iteration"])
                fit = fs.take(by_fold[r.fold].fit)
                secs, loss = end_to_end_fit(h, fit, ep, r.seed, loop)
                times.append(secs)
                lines.append(
                    f"  {h:<11} seed {r.seed} fold {r.fold + 1}: {len(fit)} fit rows x {ep} "
                    f"epochs (best_iteration; the head's range {its[0]}-{its[-1]}): "
                    f"{secs:.1f}s measured (train loss {loss:.3f})"
                )
            head_total = float(np.mean(times)) * len(runs)
            lines.append(
                f"  {h:<11} {len(runs)} fits x {np.mean(times):.1f}s = {head_total:.1f}s "
                f"(cache: {sum(r.metrics['train_time_s'] for r in runs):.1f}s of fitting)"
            )
            e2e += head_total

        n_rows = sum(len(f.scored) for f in folds)
        n_fits = len(res.runs)
        print(
            f"data {data}: {n_rows} labelled rows, {args.folds} folds x {len(seeds)} seeds, "
            f"heads {', '.join(heads)}: {n_fits} fits; torch threads {torch.get_num_threads()}"
        )
        print(f"one-time extraction (minilm + demo ViT): {t_extract:8.1f}s")
        print(f"compare on the cache (grid runner):      {t_compare:8.1f}s")
        print(
            f"end-to-end, encoders in the loop: {args.measure} fit(s) per head measured, "
            "x the head's number of fits (only the fit count is extrapolated):"
        )
        print("\n".join(lines))
        print(f"  (in-loop pooled features vs the cache's: max |diff| {drift:.2g})")
        print(f"end-to-end total:                        {e2e:8.1f}s")
        print(
            f"ratio end-to-end / (compare + one-time extraction) = "
            f"{e2e / (t_compare + t_extract):.1f}x (target >= 40x); "
            f"without the extraction: {e2e / t_compare:.1f}x"
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
