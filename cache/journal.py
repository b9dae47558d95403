"""The resume journal: finished batches saved atomically next to the cache being built.

Each batch lands as one `.npz` under `<cache>.parts/`, written to a temporary name and
renamed, so a SIGKILL at any moment leaves only whole batches behind. The plan (which rows
form which batch) is saved once, first; a resumed run reads it back and computes exactly the
batches an uninterrupted run would, so the float16 bits come out the same.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np

from cache.format import TokenFeatures


class Journal:
    def __init__(self, folder: Path, fingerprint: str) -> None:
        self.folder = folder
        self.fingerprint = fingerprint
        plan_file = folder / "plan.json"
        if plan_file.exists():
            try:
                saved = json.loads(plan_file.read_text())
            except ValueError:
                saved = {}
            if saved.get("fingerprint") != fingerprint:
                shutil.rmtree(folder)  # work for other data or settings: useless here
        folder.mkdir(parents=True, exist_ok=True)

    @property
    def plan(self) -> dict | None:
        p = self.folder / "plan.json"
        return json.loads(p.read_text())["plan"] if p.exists() else None

    def save_plan(self, plan: dict) -> None:
        self._atomic_write(
            "plan.json", json.dumps({"fingerprint": self.fingerprint, "plan": plan}).encode()
        )

    def done(self, modality: str) -> set[int]:
        prefix = f"{modality}-"
        return {
            int(p.stem[len(prefix):])
            for p in self.folder.glob(f"{prefix}*.npz")
        }

    def save(
        self,
        modality: str,
        batch: int,
        rows: np.ndarray,
        feats: TokenFeatures | None,
        failures: list[tuple[int, str, str]],
    ) -> None:
        """Rows computed in one batch, and the rows of that batch that failed (row, stage, why)."""
        arrays: dict[str, np.ndarray] = {
            "rows": np.asarray(rows, dtype=np.int64),
            "failures": np.asarray(json.dumps(failures)),
        }
        if feats is not None:
            if feats.tokens is not None:
                arrays["tokens"] = feats.tokens
            if feats.mask is not None:
                arrays["mask"] = feats.mask
            for k, v in feats.pooled.items():
                arrays[f"pooled:{k}"] = v
            arrays["pooling"] = np.asarray(json.dumps(feats.pooling))
        tmp = self.folder / f".{modality}-{batch:06d}.npz.tmp"
        with open(tmp, "wb") as fh:
            np.savez(fh, **arrays)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.folder / f"{modality}-{batch:06d}.npz")

    def load(self, modality: str, batch: int) -> tuple[np.ndarray, TokenFeatures | None, list]:
        with np.load(self.folder / f"{modality}-{batch:06d}.npz") as z:
            rows = z["rows"]
            failures = [tuple(f) for f in json.loads(str(z["failures"]))]
            if "pooling" not in z:
                return rows, None, failures
            feats = TokenFeatures(
                tokens=z.get("tokens", None),
                mask=z.get("mask", None),
                pooled={k.split(":", 1)[1]: z[k] for k in z.files if k.startswith("pooled:")},
                pooling=json.loads(str(z["pooling"])),
            )
            return rows, feats, failures

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)

    def _atomic_write(self, name: str, data: bytes) -> None:
        tmp = self.folder / f".{name}.tmp"
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.folder / name)
