"""A real byte-level code corpus (no downloads) and the resumable batch iterator that feeds training.

The corpus is the Python source code installed on the machine: the running interpreter's standard
library and its site-packages (every `*.py` file, tests included, symlinks skipped). That is tens to
hundreds of MB of real code with long-range structure (classes, imports far from their use, modules
that call each other), present on every machine that has Python.

- **Documents are packages** (repository-scale context): every top-level directory of a source root
  is one package (`stdlib/asyncio`, `site-packages/jax`), every top-level module file is one too
  (`stdlib/os`). A package's document is its files in sorted path order, each introduced by a
  header line `# <path relative to the root>\\n` and closed by the byte `SEP` (0x1C, ASCII "file
  separator"); the document is closed by `DOC_SEP` (0x1D, "group separator"). Neither byte occurs
  in Python sources. A package found under two site-packages roots is taken from the first one.
- **Tokens are bytes**: the vocabulary is the 256 byte values (`VOCAB_SIZE`).
- **Split by package**, deterministically: a package goes to val when a SHA-256 hash of its name
  falls in the first `val_fraction` of the hash range. No package has files on both sides, so val
  measures generalisation to unseen code bases. The split does not depend on the machine, the file
  system order or `PYTHONHASHSEED`; *which* packages exist does (see `Corpus.summary()`).
- Inside a split, documents are joined in a fixed pseudo-random order (another hash of the name);
  `max_bytes` takes packages in that order until each split has its share, then cuts to the budget.

`BatchIterator` yields random training windows `int32 [B, T + 1]` (inputs are `[:, :-1]`, targets
`[:, 1:]`). With `task_mix` = f > 0 a share f of the rows are long-context retrieval examples
instead (`msa_jax.retrieval`: passkey, multi-key, variable tracking; fresh needles, values and
uniformly random depths every batch, haystacks from the same array, i.e. the training split);
the loss stays the plain LM loss over every row, of which the 5 answer bytes are a tiny part
(1% of a 512-byte row, 0.03% at 16K; the rest is haystack code and unpredictable needle values).
The windows of step `s` depend only on `(seed, s)` (and the task mix), so the iterator's whole
state is `{seed, step}` (plus shape, the task mix and a fingerprint of the data, checked on
restore): `state()` goes into the checkpoint and `BatchIterator.from_state` resumes exactly.
Every process of a multi-host run computes the same global batch and keeps its own shard.
`eval_batches` gives fixed, evenly spaced validation windows.
"""

from __future__ import annotations

import dataclasses
import fractions
import functools
import hashlib
import math
import pathlib
import site
import sys
import sysconfig
from collections.abc import Iterable, Sequence

import numpy as np

from msa_jax import retrieval

VOCAB_SIZE = 256
SEP = 0x1C  # ASCII file separator: closes every file
DOC_SEP = 0x1D  # ASCII group separator: closes every package document
SOURCES = ("stdlib", "site-packages")
_SKIP_DIRS = frozenset({"__pycache__", "site-packages", "dist-packages"})


# ------------------------------------------------------------------------------------ packages


def stdlib_dir() -> pathlib.Path:
    """The running interpreter's standard library directory."""
    return pathlib.Path(sysconfig.get_paths()["stdlib"])


def site_packages_dirs() -> list[pathlib.Path]:
    """Existing site-packages / dist-packages directories of this interpreter, in import order."""
    paths = [sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]
    paths += site.getsitepackages() if hasattr(site, "getsitepackages") else []
    if site.ENABLE_USER_SITE:
        paths.append(site.getusersitepackages())
    out: list[pathlib.Path] = []
    for p in map(pathlib.Path, paths):
        if p.is_dir() and p.resolve() not in {q.resolve() for q in out}:
            out.append(p)
    return out


def _roots(sources: Sequence[str]) -> list[tuple[str, pathlib.Path]]:
    """[(label, directory)] for "stdlib", "site-packages" or explicit directories (label = name)."""
    out = []
    for src in sources:
        if src == "stdlib":
            out.append(("stdlib", stdlib_dir()))
        elif src == "site-packages":
            out += [("site-packages", p) for p in site_packages_dirs()]
        else:
            path = pathlib.Path(src)
            if not path.is_dir():
                raise ValueError(f"sources: {src!r} is neither 'stdlib', 'site-packages' nor an existing directory")
            out.append((path.name, path))
    return out


@dataclasses.dataclass(frozen=True)
class Package:
    """One document of the corpus: `files` (POSIX paths relative to `root`), sorted."""

    name: str  # "<source label>/<top-level directory or module>", e.g. "stdlib/asyncio"
    root: str
    files: tuple[str, ...]

    def document(self) -> bytes:
        parts = []
        for rel in self.files:
            parts += [b"# ", rel.encode("utf-8"), b"\n", (pathlib.Path(self.root) / rel).read_bytes(), bytes([SEP])]
        parts.append(bytes([DOC_SEP]))
        return b"".join(parts)

    def size(self) -> int:
        """Bytes of `document()` without reading the files."""
        root = pathlib.Path(self.root)
        return 1 + sum(len(rel.encode("utf-8")) + 4 + (root / rel).stat().st_size for rel in self.files)


def _source_files(root: pathlib.Path) -> list[str]:
    out = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        if _SKIP_DIRS & set(rel.parts[:-1]) or path.is_symlink() or not path.is_file():
            continue
        if any(part.endswith((".dist-info", ".egg-info")) for part in rel.parts[:-1]):
            continue
        out.append(rel.as_posix())
    return sorted(out)


def list_packages(sources: Sequence[str] = SOURCES) -> list[Package]:
    """Every package of `sources`, sorted by name. See the module docstring for what a package is.

    `sources` items: "stdlib", "site-packages" or paths of directories (labelled by their name).
    """
    if isinstance(sources, str) or not sources:
        raise ValueError(f"sources: expected a non-empty sequence like {SOURCES}, got {sources!r}")
    groups: dict[str, tuple[str, list[str]]] = {}
    for label, root in _roots(sources):
        seen_here: set[str] = set()
        for rel in _source_files(root):
            top = rel.split("/")[0]
            name = f"{label}/{top[:-3] if top.endswith('.py') else top}"
            if name in groups and name not in seen_here:
                continue  # shadowed: the same package under an earlier root wins
            seen_here.add(name)
            groups.setdefault(name, (str(root), []))[1].append(rel)
    return [Package(name, root, tuple(sorted(files))) for name, (root, files) in sorted(groups.items())]


def _hash_unit(key: str) -> float:
    """A stable number in [0, 1) from a string (SHA-256; independent of PYTHONHASHSEED)."""
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def is_val_package(name: str, val_fraction: float = 0.05) -> bool:
    """Whether package `name` (e.g. "stdlib/json") belongs to the validation split."""
    return _hash_unit("split:" + name) < val_fraction


# -------------------------------------------------------------------------------------- corpus


@dataclasses.dataclass(frozen=True, eq=False)
class Corpus:
    """A byte corpus split by package. `train` / `val` are read-only 1-D `np.uint8` arrays."""

    train: np.ndarray
    val: np.ndarray
    train_packages: tuple[str, ...]  # in corpus order; the last one may be cut by max_bytes
    val_packages: tuple[str, ...]
    n_files: int
    sources: tuple[tuple[str, str], ...]  # (label, directory) read
    python_version: str  # the interpreter whose stdlib / site-packages these are
    fingerprint: str  # hash of the bytes: tells whether two machines / runs saw the same corpus

    @property
    def n_bytes(self) -> int:
        return int(self.train.size + self.val.size)

    @property
    def n_packages(self) -> int:
        return len(self.train_packages) + len(self.val_packages)

    def summary(self) -> str:
        labels = ", ".join(dict.fromkeys(label for label, _ in self.sources))
        return (
            f"Python {self.python_version} code ({labels}): {self.n_packages} packages, {self.n_files} files, "
            f"{self.n_bytes / 1e6:.1f} MB (train {self.train.size / 1e6:.1f} MB / {len(self.train_packages)} "
            f"packages, val {self.val.size / 1e6:.2f} MB / {len(self.val_packages)} packages) [{self.fingerprint}]"
        )


def _join(packages: list[Package], budget: int | None) -> tuple[np.ndarray, tuple[str, ...], int]:
    """Documents of `packages` in hash order (while under `budget`), cut to `budget`."""
    chosen, total = [], 0
    for pkg in sorted(packages, key=lambda p: _hash_unit("order:" + p.name)):
        if budget is not None and total >= budget:
            break
        chosen.append(pkg)
        total += pkg.size()
    data = np.frombuffer(b"".join(p.document() for p in chosen), dtype=np.uint8)
    if budget is not None:
        data = data[:budget]
    data = data.copy()
    data.setflags(write=False)  # shared by the cache: keep it immutable
    return data, tuple(p.name for p in chosen), sum(len(p.files) for p in chosen)


@functools.lru_cache(maxsize=8)
def _load_cached(sources: tuple[str, ...], max_bytes: int | None, val_fraction: float) -> Corpus:
    packages = list_packages(sources)
    if not packages:
        raise ValueError(f"sources: found no *.py files in {sources}")
    val = [p for p in packages if is_val_package(p.name, val_fraction)]
    train = [p for p in packages if not is_val_package(p.name, val_fraction)]
    if not val or not train:
        raise ValueError(
            f"sources {sources}: {len(packages)} packages give an empty {'val' if not val else 'train'} split "
            f"at val_fraction={val_fraction}; add sources or change val_fraction"
        )
    val_budget = None if max_bytes is None else int(round(max_bytes * val_fraction))
    train_budget = None if max_bytes is None else max_bytes - val_budget
    train_arr, train_names, n_train_files = _join(train, train_budget)
    val_arr, val_names, n_val_files = _join(val, val_budget)
    fp = hashlib.blake2b(train_arr.tobytes(), digest_size=8)
    fp.update(val_arr.tobytes())
    return Corpus(
        train=train_arr,
        val=val_arr,
        train_packages=train_names,
        val_packages=val_names,
        n_files=n_train_files + n_val_files,
        sources=tuple((label, str(path)) for label, path in _roots(sources)),
        python_version=".".join(map(str, sys.version_info[:3])),
        fingerprint=fp.hexdigest(),
    )


def load_corpus(
    max_bytes: int | None = None,
    *,
    val_fraction: float = 0.05,
    sources: Iterable[str] = SOURCES,
) -> Corpus:
    """Load the byte corpus (cached per arguments).

    Args:
      max_bytes: cap on train + val bytes (val gets `round(max_bytes * val_fraction)` of it);
        `None` reads everything.
      val_fraction: share of *packages* that go to the validation split (by a stable name hash).
      sources: "stdlib", "site-packages" and/or directories to read `*.py` files from.
    """
    if max_bytes is not None and (not isinstance(max_bytes, int) or isinstance(max_bytes, bool) or max_bytes < 2):
        raise ValueError(f"max_bytes: expected None or an int >= 2, got {max_bytes!r}")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction: expected a float in (0, 1), got {val_fraction!r}")
    sources = (sources,) if isinstance(sources, (str, pathlib.Path)) else tuple(sources)
    return _load_cached(tuple(map(str, sources)), max_bytes, float(val_fraction))


# ------------------------------------------------------------------------------------- batches


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


def task_rows_at(batch_size: int, task_mix: float, step: int) -> int:
    """How many of step `step`'s `batch_size` rows are retrieval examples at `task_mix`: the
    cumulative count floor(s * task_mix * batch_size) over steps, differenced, so every batch gets
    the floor or the ceiling of task_mix * batch_size rows and the first s batches exactly
    floor(s * task_mix * batch_size) (also when task_mix * batch_size < 1). Exact rational
    arithmetic: no float rounding at whole numbers."""
    f = fractions.Fraction(task_mix) * int(batch_size)
    return math.floor((int(step) + 1) * f) - math.floor(int(step) * f)


def check_task_mix(task_mix, tasks, seq_len: int) -> tuple[str, ...]:
    """The task names of a valid (task_mix, tasks) for rows of seq_len + 1 tokens; ValueError otherwise."""
    if isinstance(task_mix, bool) or not isinstance(task_mix, (int, float)) or not 0.0 <= task_mix <= 1.0:
        raise ValueError(f"task_mix: expected a fraction in [0, 1], got {task_mix!r}")
    # the rows hold seq_len + 1 tokens (inputs and the last target): the examples are that long
    return retrieval.check_tasks(tasks, int(seq_len) + 1 if task_mix > 0 else None, name="task_mix_tasks")


def batch_at(data: np.ndarray, batch_size: int, seq_len: int, *, seed: int, step: int, task_mix: float = 0.0,
             tasks=tuple(retrieval.TASKS), depth_power: float = 1.0) -> np.ndarray:
    """The training batch of step `step`: `int32 [batch_size, seq_len + 1]` random windows.

    With `task_mix` > 0, `task_rows_at(batch_size, task_mix, step)` rows (at random places) are
    replaced by retrieval examples of `tasks` exactly `seq_len + 1` long whose haystacks come from
    `data` (`retrieval.training_rows`, needle depths u ** depth_power); the other rows are the windows
    of task_mix = 0. A function of `(data, batch_size, seq_len, seed, step, task_mix, tasks, depth_power)`
    only.
    """
    _check_window(data, batch_size, seq_len)
    tasks = check_task_mix(task_mix, tasks, seq_len)
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, int(step)])
    starts = rng.integers(0, data.size - seq_len, size=batch_size)  # last valid start: size - seq_len - 1
    idx = starts[:, None] + np.arange(seq_len + 1)[None, :]
    batch = data[idx].astype(np.int32)
    rows, trng = _task_rows(batch_size, task_mix, seed, step)
    if rows.size:
        batch[rows] = retrieval.training_rows(data, rows.size, seq_len + 1, tasks, trng, depth_power=depth_power)
    return batch


def _task_rows(batch_size: int, task_mix: float, seed: int, step: int) -> tuple[np.ndarray, np.random.Generator]:
    """(sorted ids of step's retrieval rows, the rng their examples are then drawn from): a stream of
    its own, so the code windows are exactly those of task_mix = 0."""
    n = task_rows_at(batch_size, task_mix, step) if task_mix else 0
    trng = np.random.default_rng([int(seed) & 0xFFFFFFFF, int(step), 1])
    return (np.sort(trng.choice(batch_size, size=n, replace=False)) if n else np.zeros(0, np.int64)), trng


def task_row_mask(batch_size: int, task_mix: float, *, seed: int, step: int) -> np.ndarray:
    """bool [batch_size]: which rows of `batch_at(..., seed=seed, step=step, task_mix=task_mix)` are
    retrieval examples (their answers end each row: `retrieval.answer_positions`)."""
    mask = np.zeros(int(batch_size), bool)
    mask[_task_rows(batch_size, task_mix, seed, step)[0]] = True
    return mask


def _data_fingerprint(data: np.ndarray) -> str:
    return hashlib.blake2b(np.ascontiguousarray(data).tobytes(), digest_size=8).hexdigest()


class BatchIterator:
    """Infinite, resumable iterator of training batches `int32 [batch_size, seq_len + 1]`.

    Batch `s` (counting from 0) is `batch_at(data, ..., seed=seed, step=s, task_mix=..., tasks=...)`;
    `step` is the number of batches taken so far. `state()` is a small JSON-able dict for the
    checkpoint (the task mix included), and `BatchIterator.from_state(data, state)` continues
    exactly where it stopped; it raises ValueError when `data` is not the array the state was taken
    on (fingerprint mismatch).
    """

    def __init__(self, data: np.ndarray, batch_size: int, seq_len: int, *, seed: int = 0, step: int = 0,
                 task_mix: float = 0.0, tasks=tuple(retrieval.TASKS), depth_power: float = 1.0):
        _check_window(data, batch_size, seq_len)
        if not isinstance(step, (int, np.integer)) or isinstance(step, bool) or step < 0:
            raise ValueError(f"step: expected an int >= 0, got {step!r}")
        self.tasks = check_task_mix(task_mix, tasks, seq_len)
        self.data, self.batch_size, self.seq_len = data, int(batch_size), int(seq_len)
        self.seed, self.step, self.task_mix = int(seed), int(step), float(task_mix)
        self.depth_power = retrieval.check_depth_power(depth_power)

    def __iter__(self):
        return self

    def __next__(self) -> np.ndarray:
        batch = batch_at(self.data, self.batch_size, self.seq_len, seed=self.seed, step=self.step,
                         task_mix=self.task_mix, tasks=self.tasks, depth_power=self.depth_power)
        self.step += 1
        return batch

    def task_rows(self, step: int) -> np.ndarray:
        """bool [batch_size]: the retrieval rows of batch `step` (`task_row_mask`)."""
        return task_row_mask(self.batch_size, self.task_mix, seed=self.seed, step=step)

    @functools.cached_property
    def fingerprint(self) -> str:
        return _data_fingerprint(self.data)

    def state(self) -> dict:
        return dict(seed=self.seed, step=self.step, batch_size=self.batch_size, seq_len=self.seq_len,
                    n_tokens=int(self.data.size), fingerprint=self.fingerprint, task_mix=self.task_mix,
                    tasks=list(self.tasks), depth_power=self.depth_power)

    @classmethod
    def from_state(cls, data: np.ndarray, state: dict) -> BatchIterator:
        # states saved before task mixing existed have neither key: task_mix 0; before depth_power: 1
        it = cls(data, state["batch_size"], state["seq_len"], seed=state["seed"], step=state["step"],
                 task_mix=state.get("task_mix", 0.0), tasks=tuple(state.get("tasks", retrieval.TASKS)),
                 depth_power=state.get("depth_power", 1.0))
        if int(state["n_tokens"]) != data.size or state["fingerprint"] != it.fingerprint:
            raise ValueError(
                f"data: the iterator state was saved on another corpus ({state['n_tokens']} tokens, fingerprint "
                f"{state['fingerprint']}; now {data.size} tokens, {it.fingerprint}). Different Python "
                "packages installed, or another --max-bytes?"
            )
        return it


def batches(data: np.ndarray, batch_size: int, seq_len: int, *, seed: int = 0, start_step: int = 0,
            task_mix: float = 0.0, tasks=tuple(retrieval.TASKS), depth_power: float = 1.0) -> BatchIterator:
    """`BatchIterator(data, batch_size, seq_len, seed=seed, step=start_step, task_mix=..., tasks=...,
    depth_power=...)`."""
    if not isinstance(start_step, (int, np.integer)) or start_step < 0:
        raise ValueError(f"start_step: expected an int >= 0, got {start_step!r}")
    return BatchIterator(data, batch_size, seq_len, seed=seed, step=start_step, task_mix=task_mix, tasks=tasks,
                         depth_power=depth_power)


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
    """Bytes -> text (invalid UTF-8 replaced; file / package separators shown as form feeds)."""
    arr = np.asarray(tokens, dtype=np.uint8).ravel()
    text = arr.tobytes().decode("utf-8", errors="replace")
    return text.replace(chr(SEP), "\f").replace(chr(DOC_SEP), "\f")
