"""One pass for two encoders vs two runs: wall time of `extract --encoder vit,clip` against
`extract --encoder vit` + `extract --encoder clip` on the same data, measured in one run
(docs/architecture.md §2.2, issue 9 item 2). Each side runs from files to finished caches (dataset read,
model load, image decode + preprocess, forward, journal, HDF5 assembly), into fresh folders;
the best of --repeats is kept for each side, the sides alternating so load drifts hit both.

    .venv/bin/python benchmarks/multi_encoder.py [--quick] [--data DIR] [--limit N]

Models, random weights built from transformers configs in a temporary folder (no download,
no checkpoint); their preprocessors are the real ones (ViTImageProcessor: 224x224;
CLIPImageProcessor: shortest edge 224, crop 224), so the loader work is a real extraction's:
  default: real-size ViT-B/16 (ViTConfig()) and CLIP ViT-B/32 (CLIPConfig(): both towers).
           On a CPU the forward dominates, so one decode saved per image is a small share.
  --quick: the same preprocessors in front of tiny towers (hidden 32, 2 layers, patch 32):
           the forward costs next to nothing, as on a GPU, and the loader decides the speed.
CLIP's tokenizer is a character-level BPE vocabulary written here (the text stage is the
same work on both sides). Data: lab5-dev (../shared/data/lab5-dev) or --data.

Both wall time and CPU time (this process + its reaped loader workers) are printed: on a
shared, loaded machine wall time swings with the other processes, CPU time much less; the
ratios, measured in one run, are the numbers to read.
"""

from __future__ import annotations

import argparse
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from fusebench.extract.loop import extract, extract_many  # noqa: E402

LAB5_DEV = REPO.parent / "shared" / "data" / "lab5-dev"
CHARS = "abcdefghijklmnopqrstuvwxyz0123456789!#.,?'@"
TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37)


def build_models(folder: Path, tiny: bool) -> dict[str, Path]:
    """vit and clip save_pretrained folders (config, processor, tokenizer; no weights)."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # "requires torchvision": the PIL processor is meant
    import transformers as T

    vit, clip = folder / "vit", folder / "clip"
    size = dict(TINY, patch_size=32) if tiny else {}
    T.ViTConfig(**size).save_pretrained(vit)
    T.ViTImageProcessor().save_pretrained(vit)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in CHARS:
        vocab[c], vocab[c + "</w>"] = len(vocab), len(vocab) + 1
    text = dict(vocab_size=len(vocab), bos_token_id=0, eos_token_id=1, pad_token_id=1)
    vision = dict(TINY, patch_size=32) if tiny else {}
    T.CLIPConfig(
        text_config=T.CLIPTextConfig(**text, **(TINY if tiny else {})).to_dict(),
        vision_config=T.CLIPVisionConfig(**vision).to_dict(),
    ).save_pretrained(clip)
    T.CLIPTokenizer(vocab=vocab, merges=[]).save_pretrained(clip)
    T.CLIPImageProcessor().save_pretrained(clip)
    return {"vit": vit, "clip": clip}


def timed(fn, *args) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process and its reaped loader workers)."""

    def cpu() -> float:
        own, kids = (
            resource.getrusage(resource.RUSAGE_SELF),
            resource.getrusage(resource.RUSAGE_CHILDREN),
        )
        return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime

    t, c = time.perf_counter(), cpu()
    fn(*args)
    return time.perf_counter() - t, cpu() - c


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny towers, loader-bound (<= 2 min)")
    ap.add_argument("--data", type=Path, default=LAB5_DEV)
    ap.add_argument("--limit", type=int, default=None, help="rows (default 300 quick, 48 real)")
    ap.add_argument("--repeats", type=int, default=None, help="best of N (default 3 quick, 2)")
    ap.add_argument("--workers", type=int, default=1, help="loader workers (both sides)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--verbose", action="store_true", help="the extract stage lines")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the main process")
    args = ap.parse_args()
    if not args.data.is_dir():
        sys.exit(f"{args.data} not found; pass --data a lab5-layout folder")
    torch.set_num_threads(args.threads)  # a shared 2-core box: spinning thread pools add noise
    limit = args.limit or (300 if args.quick else 48)
    repeats = args.repeats or (3 if args.quick else 2)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        models = build_models(root / "models", tiny=args.quick)
        common = dict(
            random_init=True,
            batch_size=args.batch_size,
            device="cpu",
            limit=limit,
            num_workers=args.workers,
            quiet=not args.verbose,
        )

        def separate(out: Path) -> None:
            for name in ("vit", "clip"):
                extract(args.data, name, model=str(models[name]), out=out, **common)

        def one_pass(out: Path) -> None:
            both = f"{models['vit']},{models['clip']}"
            extract_many(args.data, "vit,clip", model=both, out=out, **common)

        sides = {"separate": separate, "one pass": one_pass}
        best = {name: float("inf") for name in sides}
        best_cpu = dict(best)
        for i in range(repeats):
            order = list(sides) if i % 2 == 0 else list(sides)[::-1]
            for name in order:
                out = root / f"out-{name.replace(' ', '-')}-{i}"
                wall, cpu = timed(sides[name], out)
                best[name], best_cpu[name] = min(best[name], wall), min(best_cpu[name], cpu)
                shutil.rmtree(out)
    kind = "tiny towers, real preprocessors" if args.quick else "ViT-B/16 + CLIP ViT-B/32"
    print(f"multi-encoder extraction, vit + clip ({kind}, random weights, cpu, {limit} rows, ")
    print(
        f"  batch {args.batch_size}, {args.workers} loader worker(s), {args.threads} torch "
        f"thread(s), best of {repeats}):"
    )
    for name, label in (
        ("separate", "two separate runs (vit, then clip)"),
        ("one pass", "one pass (--encoder vit,clip)     "),
    ):
        print(f"  {label}: wall {best[name]:.2f} s, CPU {best_cpu[name]:.2f} s")
    print(
        f"  ratio one pass / separate: wall {best['one pass'] / best['separate']:.3f}, "
        f"CPU {best_cpu['one pass'] / best_cpu['separate']:.3f}"
    )


if __name__ == "__main__":
    main()
