"""A synthetic image+text sentiment dataset in the lab5 layout, for the offline demo.

It is NOT real data. It exists so a fresh clone, with no dataset and no hub access, can run
the whole pipeline and show what the output looks like. The signal is planted on purpose:
  - text: sentiment phrases (MiniLM reads them), but about a third of the texts are
    neutral-worded captions, so text alone cannot get everything;
  - image: a colour scene whose palette follows the label (warm/bright, grey, dark/cold) with
    random shapes and noise — except for about a third of the pictures, which are grey
    whatever the label. Each modality misses what the other shows: fusion should win;
  - 8% of labels are flipped, as in any crowd-labelled set.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

LABELS = ("negative", "neutral", "positive")

_PHRASES = {
    "positive": [
        "what a wonderful day",
        "I love this so much",
        "best moment ever",
        "so happy right now",
        "absolutely beautiful",
        "this made my day",
        "feeling grateful and excited",
        "great vibes with great people",
    ],
    "neutral": [
        "here is the schedule for tomorrow",
        "the meeting is at noon",
        "photo taken at the station",
        "new post on the blog",
        "the store opens at nine",
        "traffic update for the city centre",
    ],
    "negative": [
        "this is terrible",
        "worst service I have ever had",
        "so angry and tired",
        "I hate waiting like this",
        "what a disappointing mess",
        "feeling awful today",
        "broken again, unbelievable",
    ],
}
_SUBJECTS = [
    "the beach",
    "our team",
    "the new phone",
    "this city",
    "the concert",
    "my dog",
    "the train",
    "the weekend",
    "dinner",
    "the game",
]
_TAGS = ["#life", "#today", "#photo", "#news", "#weekend", "#mood", "@friend", "#city"]
# (base RGB, brightness spread): warm and bright / grey / dark and cold
_PALETTE = {
    "positive": ((235, 170, 60), 40),
    "neutral": ((140, 140, 140), 25),
    "negative": ((40, 60, 110), 30),
}


def _text(rnd: random.Random, label: str, hide: bool) -> str:
    phrase = rnd.choice(_PHRASES["neutral" if hide else label])
    parts = [rnd.choice(_SUBJECTS) + ":", phrase, *rnd.sample(_TAGS, k=rnd.randint(0, 3))]
    return " ".join(parts)


def _image(rnd: random.Random, label: str, size: int = 96) -> Image.Image:
    (r, g, b), spread = _PALETTE[label]  # label = "neutral" for a picture that tells nothing
    rng = np.random.default_rng(rnd.randrange(2**32))
    base = np.array([r, g, b], dtype=np.float32) + rng.normal(0, spread, 3)
    pixels = base + rng.normal(0, 30, (size, size, 3))  # (H, W, 3)
    img = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(rnd.randint(2, 6)):
        x, y = rnd.randrange(size), rnd.randrange(size)
        w = rnd.randint(8, size // 2)
        tint = tuple(int(np.clip(c + rng.normal(0, 60), 0, 255)) for c in base)
        (draw.ellipse if rnd.random() < 0.5 else draw.rectangle)([x, y, x + w, y + w], fill=tint)
    return img


def make_synthetic_lab5(
    root: str | Path, *, n_train: int = 540, n_test: int = 60, seed: int = 0
) -> Path:
    """Writes train.txt, test_without_label.txt and data/<guid>.{txt,jpg} under `root`.
    Class balance follows lab5 (about 30% negative, 10% neutral, 60% positive).
    Refuses (ValueError) a folder that holds anything but an earlier synthetic dataset, so a
    mistyped --out never overwrites real data."""
    root = Path(root)
    readme = root / "README.txt"
    if root.exists() and any(root.iterdir()) and _MARK not in _read(readme):
        raise ValueError(
            f"{root} exists and is not an earlier synthetic dataset; pass --out a new or empty folder"
        )
    (root / "data").mkdir(parents=True, exist_ok=True)
    rnd = random.Random(seed)
    train, test = ["guid,tag"], ["guid,tag"]
    for i in range(n_train + n_test):
        guid = str(i + 1)
        label = rnd.choices(LABELS, weights=(0.3, 0.1, 0.6))[0]
        # which modality hides the label (the other one still shows it)
        hidden = rnd.choices(["none", "text", "image"], weights=(0.3, 0.35, 0.35))[0]
        text = _text(rnd, label, hide=label != "neutral" and hidden == "text")
        (root / "data" / f"{guid}.txt").write_text(text + "\n", encoding="utf-8")
        picture = "neutral" if hidden == "image" else label
        _image(rnd, picture).save(root / "data" / f"{guid}.jpg", "JPEG", quality=90)
        shown = rnd.choice(LABELS) if rnd.random() < 0.08 else label
        if i < n_train:
            train.append(f"{guid},{shown}")
        else:
            test.append(f"{guid},null")
    (root / "train.txt").write_text("\n".join(train) + "\n")
    (root / "test_without_label.txt").write_text("\n".join(test) + "\n")
    readme.write_text(f"{_MARK} for the offline demo. Not real.\n")
    return root


_MARK = "Synthetic data made by fusebench (extract/synthetic.py)"


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""
