"""A real byte-level text corpus (no downloads) and the batch iterators that feed training.

The corpus is the Python standard library's own source code, read from the running interpreter's
installation (`sysconfig.get_paths()["stdlib"]`): every `*.py` file below it, recursively, tests
included, with `site-packages` / `dist-packages` left out. That is ~30 MB of real, long-range
structured text (classes, functions, docstrings, imports far from their use) on every machine that
has Python, which makes it a good small-scale testbed for long-context attention.

- Tokens are bytes: the vocabulary is the 256 byte values (`VOCAB_SIZE`).
- Files are split train / val **by file**, deterministically: a file goes to val when a SHA-256 hash
  of its relative path (POSIX form) falls in the first `val_fraction` of the hash range. The split
  does not depend on the machine, the file system order or `PYTHONHASHSEED`.
- Inside a split, files are joined in sorted path order, each followed by the separator byte `SEP`
  (ASCII "file separator", 0x1C, which occurs in no stdlib source file).
- `max_bytes` caps the corpus (for tests and quick runs): files are taken in a fixed pseudo-random
  order (by the same hash) until each split has its share of the budget, then joined in sorted order
  and cut to the budget. The byte content depends on the Python version that provides the stdlib;
  `Corpus.python_version` records it.

`batches` yields random training windows `int32 [B, T + 1]` (inputs are `[:, :-1]`, targets
`[:, 1:]`); the windows of step `s` depend only on `(seed, s)`, so a resumed run can start at any
step and see exactly the batches it would have seen. `eval_batches` gives fixed, evenly spaced
validation windows.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import pathlib
import sys
import sysconfig
from collections.abc import Iterator

import numpy as np

VOCAB_SIZE = 256
SEP = 0x1C  # ASCII file separator, put after every file
_EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})


@dataclasses.dataclass(frozen=True, eq=False)
class Corpus:
    """A byte corpus split by file. `train` / `val` are 1-D `np.uint8` arrays."""

    train: np.ndarray
    val: np.ndarray
    train_files: tuple[str, ...]  # relative POSIX paths, sorted; the last one may be cut by max_bytes
    val_files: tuple[str, ...]
    source: str  # directory the files were read from
    python_version: str  # the interpreter whose stdlib this is (the content depends on it)

    @property
    def n_files(self) -> int:
        return len(self.train_files) + len(self.val_files)

    @property
    def n_bytes(self) -> int:
        return int(self.train.size + self.val.size)

    def summary(self) -> str:
        return (
            f"Python {self.python_version} stdlib ({self.source}): {self.n_files} files, "
            f"{self.n_bytes / 1e6:.2f} MB (train {self.train.size / 1e6:.2f} MB / "
            f"{len(self.train_files)} files, val {self.val.size / 1e6:.2f} MB / {len(self.val_files)} files)"
        )


def stdlib_dir() -> pathlib.Path:
    """The running interpreter's standard library directory."""
    return pathlib.Path(sysconfig.get_paths()["stdlib"])


def list_source_files(root: str | pathlib.Path | None = None) -> list[str]:
    """Relative POSIX paths of every `*.py` file under `root` (default: the stdlib), sorted.

    Directories named site-packages, dist-packages or __pycache__ are skipped, as are symlinks.
    """
    root = pathlib.Path(root) if root is not None else stdlib_dir()
    if not root.is_dir():
        raise ValueError(f"root: expected an existing directory, got {str(root)!r}")
    out = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        if _EXCLUDED_DIRS & set(rel.parts[:-1]) or path.is_symlink() or not path.is_file():
            continue
        out.append(rel.as_posix())
    return sorted(out)


def _hash_unit(rel_path: str) -> float:
    """A stable number in [0, 1) from a relative path (SHA-256; independent of PYTHONHASHSEED)."""
    digest = hashlib.sha256(rel_path.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def is_val_file(rel_path: str, val_fraction: float = 0.05) -> bool:
    """Whether a file belongs to the validation split."""
    return _hash_unit("split:" + rel_path) < val_fraction


def _join(root: pathlib.Path, files: list[str], budget: int | None) -> tuple[np.ndarray, tuple[str, ...]]:
    """Read `files` (taken in hash order while under `budget`), join them in sorted order."""
    if budget is not None:
        chosen, total = [], 0
        for rel in sorted(files, key=lambda r: _hash_unit("order:" + r)):
            if total >= budget:
                break
            size = (root / rel).stat().st_size + 1
            chosen.append(rel)
            total += size
        files = chosen
    files = sorted(files)
    parts = []
    for rel in files:
        parts.append((root / rel).read_bytes())
        parts.append(bytes([SEP]))
    data = np.frombuffer(b"".join(parts), dtype=np.uint8)
    if budget is not None:
        data = data[:budget]
    return data.copy(), tuple(files)


@functools.lru_cache(maxsize=8)
def _load_cached(root: str, max_bytes: int | None, val_fraction: float) -> Corpus:
    rootp = pathlib.Path(root)
    files = list_source_files(rootp)
    if not files:
        raise ValueError(f"root: expected a directory with *.py files, found none under {root!r}")
    val = [f for f in files if is_val_file(f, val_fraction)]
    train = [f for f in files if not is_val_file(f, val_fraction)]
    if max_bytes is None:
        train_budget = val_budget = None
    else:
        val_budget = int(round(max_bytes * val_fraction))
        train_budget = max_bytes - val_budget
    train_arr, train_files = _join(rootp, train, train_budget)
    val_arr, val_files = _join(rootp, val, val_budget)
    for arr in (train_arr, val_arr):
        arr.setflags(write=False)  # shared by the cache: keep it immutable
    return Corpus(
        train=train_arr,
        val=val_arr,
        train_files=train_files,
        val_files=val_files,
        source=str(rootp),
        python_version=".".join(map(str, sys.version_info[:3])) if root == str(stdlib_dir()) else "n/a",
    )


def load_corpus(
    max_bytes: int | None = None,
    *,
    val_fraction: float = 0.05,
    root: str | pathlib.Path | None = None,
) -> Corpus:
    """Load the byte corpus (default: this interpreter's stdlib sources; cached per arguments).

    Args:
      max_bytes: cap on train + val bytes (val gets `round(max_bytes * val_fraction)` of it);
        `None` reads everything (~30 MB).
      val_fraction: share of *files* that go to the validation split (by a stable path hash).
      root: read `*.py` files from this directory instead of the stdlib.
    """
    if max_bytes is not None and (not isinstance(max_bytes, int) or isinstance(max_bytes, bool) or max_bytes < 2):
        raise ValueError(f"max_bytes: expected None or an int >= 2, got {max_bytes!r}")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction: expected a float in (0, 1), got {val_fraction!r}")
    root = stdlib_dir() if root is None else pathlib.Path(root)
    return _load_cached(str(root), max_bytes, float(val_fraction))


def _check_window(data: np.ndarray, batch_size: int, seq_len: int) -> None:
    for name, value in (("batch_size", batch_size), ("seq_len", seq_len)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name}: expected an int >= 1, got {value!r}")
    if data.ndim != 1:
        raise ValueError(f"data: expected a 1-D array of bytes, got shape {data.shape}")
    if data.size < seq_len + 1:
        raise ValueError(
            f"data: expected at least seq_len + 1 = {seq_len + 1} tokens for one window, got {data.size}"
            " (use a larger max_bytes or a shorter seq_len)"
        )


def batch_at(data: np.ndarray, batch_size: int, seq_len: int, *, seed: int, step: int) -> np.ndarray:
    """The training batch of step `step`: `int32 [batch_size, seq_len + 1]` random windows.

    A function of `(data, batch_size, seq_len, seed, step)` only.
    """
    _check_window(data, batch_size, seq_len)
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, int(step)])
    starts = rng.integers(0, data.size - seq_len, size=batch_size)  # last valid start: size - seq_len - 1
    idx = starts[:, None] + np.arange(seq_len + 1)[None, :]
    return data[idx].astype(np.int32)


def batches(
    data: np.ndarray, batch_size: int, seq_len: int, *, seed: int = 0, start_step: int = 0
) -> Iterator[np.ndarray]:
    """Infinite iterator of training batches, `int32 [batch_size, seq_len + 1]` each.

    Inputs are `batch[:, :-1]`, next-byte targets `batch[:, 1:]`. Batch `s` (counting from 0) is
    `batch_at(..., step=s)`, so `batches(..., start_step=s)` resumes a run exactly at step `s`.
    """
    _check_window(data, batch_size, seq_len)
    if start_step < 0:
        raise ValueError(f"start_step: expected an int >= 0, got {start_step!r}")
    step = int(start_step)
    while True:
        yield batch_at(data, batch_size, seq_len, seed=seed, step=step)
        step += 1


def eval_batches(data: np.ndarray, batch_size: int, seq_len: int, n: int) -> list[np.ndarray]:
    """`n` fixed validation batches, `int32 [batch_size, seq_len + 1]` each.

    The `n * batch_size` windows start at evenly spaced offsets that cover the data from its first
    to its last byte (they overlap when the data is shorter than `n * batch_size` windows).
    """
    _check_window(data, batch_size, seq_len)
    if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 1:
        raise ValueError(f"n: expected an int >= 1, got {n!r}")
    starts = np.linspace(0, data.size - seq_len - 1, n * batch_size).round().astype(np.int64)
    idx = starts[:, None] + np.arange(seq_len + 1)[None, :]
    windows = data[idx].astype(np.int32)
    return list(windows.reshape(n, batch_size, seq_len + 1))


def decode(tokens) -> str:
    """Bytes -> text (invalid UTF-8 replaced; the file separator shown as a form feed)."""
    arr = np.asarray(tokens, dtype=np.uint8).ravel()
    return arr.tobytes().decode("utf-8", errors="replace").replace(chr(SEP), "\f")
