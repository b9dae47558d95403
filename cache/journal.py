"""The resume journal: finished batches saved atomically next to the cache being built.

Each batch lands as one `.npz` under `<cache>.parts/`, written to a temporary name and
renamed, so a SIGKILL at any moment leaves only whole batches behind. The plan (which rows
form which batch) is saved once, first; a resumed run reads it back and computes exactly the
batches an uninterrupted run would, so the float16 bits come out the same.

Damage is never fatal: a part that does not load (truncated, corrupted, not matching the
plan) is discarded and its batch computed again; a plan.json that does not load discards the
journal (its parts cannot be trusted without it). Each such event adds a line to `notes`.
A failed write (disk full, ...) leaves no partial part, only nothing: the temporary file is
removed and a CacheWriteError (an OSError) names the path and the fix.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO

import numpy as np
from fusebench.cache.format import CacheError, TokenFeatures, write_error

KEPT = " (finished batches are kept)"


class Journal:
    def __init__(self, folder: Path, fingerprint: str) -> None:
        self.folder = folder
        self.fingerprint = fingerprint
        self.notes: list[str] = []  # damaged parts or plan discarded: one line each
        self._plan: dict | None = None
        plan_file = folder / "plan.json"
        if plan_file.exists():
            saved = _load_plan(plan_file)
            if saved is None:
                n = len(list(folder.glob("*.npz")))
                self.notes.append(
                    f"discarded the journal in {folder}: its plan.json is damaged, so its "
                    f"{n} finished batches cannot be trusted; computing them again"
                )
                shutil.rmtree(folder, ignore_errors=True)
            elif saved["fingerprint"] != fingerprint:
                shutil.rmtree(folder, ignore_errors=True)  # work for other data or settings
            else:
                self._plan = saved["plan"]
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise write_error(folder, e, KEPT) from None

    @property
    def plan(self) -> dict | None:
        return self._plan

    def save_plan(self, plan: dict) -> None:
        data = json.dumps({"fingerprint": self.fingerprint, "plan": plan}).encode()
        self._atomic_write("plan.json", lambda fh: fh.write(data))
        self._plan = plan

    def done(self, modality: str) -> set[int]:
        """Batches of `modality` whose part loads completely and matches the plan. Any other
        part is removed (with a note), so its batch is computed again."""
        prefix = f"{modality}-"
        out = set()
        for p in sorted(self.folder.glob(f"{prefix}*.npz")):
            try:
                batch = int(p.stem[len(prefix) :])
            except ValueError:
                continue
            if self._check(p, modality, batch):
                out.add(batch)
        return out

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
        self._atomic_write(f"{modality}-{batch:06d}.npz", lambda fh: np.savez(fh, **arrays))

    @contextlib.contextmanager
    def background(self, depth: int = 2) -> Iterator[Callable[..., None]]:
        """`save` on one writer thread, so the next batch's forward runs while this one is
        written (the GPU is not left idle for the disk). At most `depth` batches wait, their
        features held in memory. A failed save is raised by a later call or at the end, as
        `save` would have raised it; it left no part, so a rerun computes that batch again.
        Leaving on an exception (Ctrl-C, a bad sample with --on-error fail) first finishes the
        saves under way, so every batch computed so far is kept."""
        pool = ThreadPoolExecutor(1, thread_name_prefix="journal")
        pending: deque[Future] = deque()

        def save(*args: object) -> None:
            while pending and (len(pending) >= depth or pending[0].done()):
                pending.popleft().result()  # raises that save's error here
            pending.append(pool.submit(self.save, *args))

        try:
            yield save
        except BaseException:
            for f in pending:
                f.exception()  # wait; the exception already under way is the one to report
            raise
        finally:
            pool.shutdown(wait=True)
        while pending:
            pending.popleft().result()

    def load(self, modality: str, batch: int) -> tuple[np.ndarray, TokenFeatures | None, list]:
        """A part `done` accepted. Should it fail now (damaged since), it is removed and one
        CacheError line says to rerun, which computes that batch again."""
        path = self.folder / f"{modality}-{batch:06d}.npz"
        try:
            return _read_part(path)
        except Exception as e:  # noqa: BLE001 - any damage: discard, never crash forever
            with contextlib.suppress(OSError):
                path.unlink(missing_ok=True)
            raise CacheError(
                f"journal part {path} is damaged ({_why(e)}) and was removed; rerun the same "
                "command: it computes that batch again and keeps every other one"
            ) from None

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)

    def _check(self, path: Path, modality: str, batch: int) -> bool:
        try:
            rows, feats, failures = _read_part(path)
            if feats is not None:
                for a in (feats.tokens, feats.mask, *feats.pooled.values()):
                    if a is not None and len(a) != len(rows):
                        raise ValueError(f"{len(a)} feature rows for {len(rows)} rows")
            planned = self._planned(modality, batch)
            if planned is not None:
                got = sorted([*map(int, rows), *(int(f[0]) for f in failures)])
                if got != sorted(planned):
                    raise ValueError("its rows are not the planned batch")
        except Exception as e:  # noqa: BLE001 - any damage: discard and recompute
            with contextlib.suppress(OSError):
                path.unlink(missing_ok=True)
            self.notes.append(
                f"discarded damaged journal part {path.name} ({_why(e)}); computing that batch again"
            )
            return False
        return True

    def _planned(self, modality: str, batch: int) -> list[int] | None:
        batches = (self._plan or {}).get(f"{modality}_batches")
        if not isinstance(batches, list):
            return None
        return batches[batch] if 0 <= batch < len(batches) else []

    def _atomic_write(self, name: str, write: Callable[[BinaryIO], object]) -> None:
        """write(fh) fills `.name.tmp`, which is fsynced and renamed to `name`: a kill at any
        moment leaves the whole file or none. A fault (disk full) removes the tmp."""
        tmp = self.folder / f".{name}.tmp"
        try:
            with open(tmp, "wb") as fh:
                write(fh)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.folder / name)
        except OSError as e:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            raise write_error(self.folder / name, e, KEPT) from None


def _read_part(path: Path) -> tuple[np.ndarray, TokenFeatures | None, list]:
    """Every array of a part, fully read (zip CRCs checked)."""
    with np.load(path, allow_pickle=False) as z:
        rows = np.asarray(z["rows"], dtype=np.int64).reshape(-1)
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


def _load_plan(path: Path) -> dict | None:
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    ok = isinstance(saved, dict) and isinstance(saved.get("plan"), dict) and "fingerprint" in saved
    return saved if ok else None


def _why(e: Exception) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text}"[:160] if text else type(e).__name__
