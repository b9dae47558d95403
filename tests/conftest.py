"""Shared fixtures: tiny ViT / BERT / CLIP checkpoints built from configs and saved with
save_pretrained (so the real from_pretrained path is what runs), and small lab5 corpora."""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner, Result

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
LAB5_DEV = SHARED_DATA / "lab5-dev"

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no test touches the network
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37)
CHARS = "abcdefghijklmnopqrstuvwxyz0123456789!#.,?'@"
WORDS = [
    "happy",
    "sad",
    "great",
    "awful",
    "cat",
    "dog",
    "sunny",
    "rain",
    "love",
    "hate",
    "the",
    "a",
    "day",
    "night",
    "so",
    "very",
    "meh",
    "okay",
    "#fun",
    "@you",
]


def _save_bert(folder: Path) -> Path:
    import torch
    import transformers as T

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *CHARS, *(f"##{c}" for c in CHARS)]
    tok = T.BertTokenizer(vocab={w: i for i, w in enumerate(vocab)})
    torch.manual_seed(0)
    cfg = T.BertConfig(vocab_size=len(vocab), max_position_embeddings=128, **TINY)
    T.BertModel(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def _save_vit(folder: Path) -> Path:
    import torch
    import transformers as T

    torch.manual_seed(0)
    cfg = T.ViTConfig(image_size=32, patch_size=8, **TINY)  # 16 patches + CLS = 17 tokens
    T.ViTModel(cfg).save_pretrained(folder)
    T.ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def _save_clip(folder: Path) -> Path:
    import torch
    import transformers as T

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in CHARS:  # a tiny byte-level BPE vocabulary: one token per character
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    tok = T.CLIPTokenizer(vocab=vocab, merges=[])
    text = T.CLIPTextConfig(
        vocab_size=len(vocab),
        max_position_embeddings=77,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        projection_dim=16,
        **TINY,
    )
    vision = T.CLIPVisionConfig(image_size=32, patch_size=8, projection_dim=16, **TINY)
    cfg = T.CLIPConfig(
        text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=16
    )
    torch.manual_seed(0)
    T.CLIPModel(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    T.CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    ).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models run faster on one thread than on a contended pool (CI boxes are shared);
    a module opts in with `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """name -> folder of a tiny checkpoint for that encoder."""
    root = tmp_path_factory.mktemp("models")
    return {
        "bert": _save_bert(root / "bert"),
        "vit": _save_vit(root / "vit"),
        "clip": _save_clip(root / "clip"),
    }


def write_image(path: Path, seed: int, size: tuple[int, int] = (40, 36)) -> None:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path, "JPEG")


def make_lab5(root: Path, n_train: int = 24, n_test: int = 6, seed: int = 0) -> Path:
    """A small lab5-layout corpus with texts of varied length (so batches pad differently)."""
    rnd = random.Random(seed)
    labels = ["negative", "neutral", "positive"]
    (root / "data").mkdir(parents=True)
    rows = {"train": [], "test": []}
    for i in range(n_train + n_test):
        guid = str(100 + i)
        n_words = rnd.choice([1, 2, 3, 5, 8, 13, 20])
        (root / "data" / f"{guid}.txt").write_text(" ".join(rnd.choices(WORDS, k=n_words)) + "\n")
        write_image(
            root / "data" / f"{guid}.jpg", seed=i, size=(rnd.randint(30, 60), rnd.randint(30, 60))
        )
        if i < n_train:
            rows["train"].append(f"{guid},{labels[i % 3]}")
        else:
            rows["test"].append(f"{guid},null")
    (root / "train.txt").write_text("guid,tag\n" + "\n".join(rows["train"]) + "\n")
    (root / "test_without_label.txt").write_text("guid,tag\n" + "\n".join(rows["test"]) + "\n")
    return root


@pytest.fixture
def lab5(tmp_path) -> Path:
    return make_lab5(tmp_path / "lab5-mini")


def write_manifest(path: Path, guids: list[str], labels: dict[str, str]) -> Path:
    """A CSV manifest over a lab5 corpus's files, in that corpus's folder (one dataset root);
    `labels[guid]` is the lab5 tag ("null": an unlabelled test row)."""
    rows = ["guid,text_path,image_path,label,split"]
    for g in guids:
        label = labels[g]
        split = "test" if label == "null" else "train"
        rows.append(f"{g},data/{g}.txt,data/{g}.jpg,{'' if label == 'null' else label},{split}")
    path.write_text("\n".join(rows) + "\n")
    return path


def write_noise_cache(path: Path, n: int, dim: int, seed: int = 3) -> None:
    """The leak canaries' cache: random labels on random pooled text and image vectors (no
    tokens), so nothing is learnable and a scored row that leaked into fitting shows."""
    from fusebench.cache import TokenFeatures, write_features

    rng = np.random.default_rng(seed)
    write_features(
        path,
        guid=[f"r{i}" for i in range(n)],
        split=["train"] * n,
        label=rng.integers(0, 3, n),
        classes=("negative", "neutral", "positive"),
        text=TokenFeatures(None, None, {"pooled": rng.normal(size=(n, dim)).astype(np.float16)}),
        image=TokenFeatures(None, None, {"pooled": rng.normal(size=(n, dim)).astype(np.float16)}),
    )


# ---------------------------------------------------------------- the CLI harness
# Every test module runs `fusebench` in process through these (typer's CliRunner: result.stdout
# and result.stderr apart, result.output both as a terminal shows them).


def cli(*args: object) -> Result:
    """`fusebench ARGS`, each argument str()-ed."""
    from fusebench.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


def no_traceback(result: Result) -> Result:
    """`result`, asserting nothing escaped as a traceback (CliRunner keeps an escaped
    exception in result.exception; SystemExit is the command's own exit)."""
    assert "Traceback" not in result.output, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(
        result.exception
    )
    return result


def ok(result: Result) -> str:
    """The stdout of a command that must have succeeded."""
    assert result.exit_code == 0, result.output
    return result.stdout


def error_line(output: str) -> str:
    """The one line of `output`, which must be `error: ...`: no other line, blank or not (a
    progress-bar redraw, \\r, counts as a line of its own)."""
    lines = output.replace("\r", "\n").strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), output
    return lines[0]


def one_line_error(result: Result, code: int | None = None) -> str:
    """The single `error: ...` line a failed command printed, on stderr, and nothing else on
    stdout or stderr; no traceback. code: the exit code it must have (the table in
    fusebench/cli_errors.py)."""
    no_traceback(result)
    assert result.exit_code != 0, result.output
    assert code is None or result.exit_code == code, (result.exit_code, result.output)
    line = error_line(result.output)
    assert error_line(result.stderr) == line, result.output
    return line
