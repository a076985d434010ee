"""Long-context retrieval tasks in the style of RULER, generated in-process at the byte level.

Every example is one byte sequence of exactly `context_len` tokens (`np.int32`, vocabulary 256):

    [ haystack of real code with needle lines inserted ][ query ][ answer ]["\\n"]

- **Haystack**: a contiguous window of a corpus array (`np.uint8`, e.g. `load_corpus().val`) taken
  at a seeded random offset and trimmed so that the needles, the query, the answer and the final
  newline fit exactly in `context_len`. The window is nudged (to the nearest line start) so that
  the queried needle lands on a line boundary of the code; the other needles are snapped to line
  starts of the window as well. Needles therefore never split a line of code when the corpus has
  newlines where they are needed (it falls back to the raw offset only when it has none).
- **Depth**: the queried ("primary") needle starts at token `needle_pos = round(depth * span)`, where
  `span = context_len - len(query) - len(answer) - 1 - len(primary needle) - len(needles that must
  follow it)`, i.e. `span` is the last position where it can start. Depth 0 puts it at token 0;
  depth 1 puts it (and whatever must follow it) right before the query.
- **Answer**: `answer` is the answer bytes (digits), `tokens[answer_start:answer_start + len(answer)]`;
  the final token is `"\\n"` (not part of the answer), so `answer_start = context_len - 1 - len(answer)`.

Tasks (`TASKS`; formats exactly as generated, `\\n` marks a newline):

1. `"passkey"`: needle `# the pass key is 48213. remember it.\\n`; query
   `\\n# what is the pass key? the pass key is ` then the answer `48213`.
2. `"multikey"`: `n_keys` (default 4) needles `qxzvbm = 58213\\n` with distinct random 6-letter
   lowercase keys (no Python keywords) and distinct 5-digit values; one of them (the primary) is
   queried, the others are distractors at random other depths, before or after it. Query:
   `\\n# what is the value of qxzvbm? the value of qxzvbm is ` then `58213`.
3. `"variable_tracking"`: a chain of `n_hops` (default 4) assignments with distinct random 5-letter
   uppercase names, `QWERT = 71632\\n`, `ASDFG = QWERT\\n`, `ZXCVB = ASDFG\\n`, ... The first one is the
   primary needle (at `depth`); the later hops follow it in order at random line starts between it
   and the query. Query (the value of the *last* variable of the chain):
   `\\n# what is the value of ZXCVB? the value of ZXCVB is ` then `71632`.

All values are 5-digit numbers in [10000, 99999]. Everything is a deterministic function of the
seed (`rng` may be an int seed or an `np.random.Generator`).

Batches and scoring (next-token alignment):

- `make_batch` returns `tokens int32 [n, context_len]` and `answer_mask bool [n, context_len]` where
  `answer_mask[i, t]` is True iff `tokens[i, t + 1]` is an answer byte, i.e. iff the logits the model
  produces at position `t` must predict an answer byte. `answer_mask[:, -1]` is always False. So with
  the usual split `inputs = tokens[:, :-1]`, `targets = tokens[:, 1:]`, `answer_mask[:, :-1]` aligns
  with `targets`; and with logits computed on the full `tokens`, `answer_mask` aligns with the logits.
- `exact_match(logits_fn, tokens, answer_mask)` runs `logits_fn` on the full `tokens` (`[n, T]`,
  causal, so the last token changes no prediction that is scored) and counts an example correct when
  `argmax logits[i, t] == tokens[i, t + 1]` at every masked `t`: teacher-forced greedy exact match,
  which equals greedy decoding of the answer.
- `answer_accuracy` also gives the share of answer bytes predicted right (partial credit).
- `evaluate` sweeps tasks x context lengths x depths and returns rows for a heatmap, each with the
  95% Wilson interval of its exact match (`wilson_interval`).

Training on the tasks: `training_rows` draws whole examples (task, depth, values, haystack offset)
from one rng; `msa_jax.data.batch_at(..., task_mix=f)` puts them into a share f of the rows of
every training batch (`--task-mix`), with haystacks from the training split only.
`min_context_len` / `check_tasks` say whether a task fits in a context.
"""

from __future__ import annotations

import dataclasses
import hashlib
import keyword
import math
from collections.abc import Callable, Iterable, Sequence

import numpy as np

NEWLINE = 0x0A
ANSWER_LEN = 5  # every value (the answer) is a 5-digit number
_LOWER = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz", dtype=np.uint8)
_UPPER = np.frombuffer(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ", dtype=np.uint8)


@dataclasses.dataclass(frozen=True, eq=False)
class RetrievalExample:
    """One retrieval example.

    tokens: int32 [context_len], the whole sequence prompt + answer + "\\n".
    answer_start: index in `tokens` of the first answer byte.
    answer: the answer bytes (ASCII digits).
    needle_pos: index in `tokens` where the queried needle starts (= round(depth * span)).
    task: task name.
    needle: the queried needle's bytes (`tokens[needle_pos:needle_pos + len(needle)]`).
    needles: every inserted needle as `(position in tokens, bytes)`, in sequence order (primary
      included; for variable tracking the chain in order; for multikey the distractors as well).
    span: the largest possible `needle_pos` for this task and length (`needle_pos = round(depth*span)`).
    haystack_start: offset in the source array of the first haystack byte.
    """

    tokens: np.ndarray
    answer_start: int
    answer: bytes
    needle_pos: int
    task: str
    needle: bytes = b""
    needles: tuple[tuple[int, bytes], ...] = ()
    span: int = 0
    haystack_start: int = 0


# ----------------------------------------------------------------------------------------------
# helpers


def _as_rng(rng) -> np.random.Generator:
    if isinstance(rng, np.random.Generator):
        return rng
    if isinstance(rng, (int, np.integer)) and not isinstance(rng, bool):
        return np.random.default_rng(int(rng))
    raise ValueError(f"rng: expected an int seed or a np.random.Generator, got {rng!r}")


def _check_args(source, context_len, depth) -> np.ndarray:
    src = np.asarray(source)
    if src.ndim != 1 or src.dtype != np.uint8:
        raise ValueError(f"source: expected a 1-D np.uint8 array, got {src.dtype} of shape {src.shape}")
    if not isinstance(context_len, (int, np.integer)) or isinstance(context_len, bool) or context_len < 1:
        raise ValueError(f"context_len: expected an int >= 1, got {context_len!r}")
    if isinstance(depth, bool) or not isinstance(depth, (int, float, np.integer, np.floating)):
        raise ValueError(f"depth: expected a float in [0, 1], got {depth!r}")
    if not 0.0 <= float(depth) <= 1.0:  # also rejects NaN
        raise ValueError(f"depth: expected a float in [0, 1], got {depth!r}")
    return src


def _value(rng: np.random.Generator, exclude: set[bytes] = frozenset()) -> bytes:
    while True:
        v = str(int(rng.integers(10000, 100000))).encode()
        if v not in exclude:
            return v


def _name(rng: np.random.Generator, alphabet: np.ndarray, length: int, exclude: set[bytes]) -> bytes:
    while True:
        name = alphabet[rng.integers(0, alphabet.size, size=length)].tobytes()
        if name not in exclude and not keyword.iskeyword(name.decode()):
            return name


def _line_starts(arr: np.ndarray) -> np.ndarray:
    """Sorted offsets that start a line of `arr`: 0 and every index right after a newline."""
    return np.concatenate([[0], np.flatnonzero(arr == NEWLINE) + 1]).astype(np.int64)


def _snap(x: float, candidates: np.ndarray, lo: int, hi: int) -> int:
    """The candidate in [lo, hi] nearest to x (lo itself when there is none)."""
    c = candidates[(candidates >= lo) & (candidates <= hi)]
    if c.size == 0:
        return lo
    return int(c[np.argmin(np.abs(c - x))])


def _choose_window(src: np.ndarray, H: int, a_p: int, o: int) -> int:
    """Start `s` of an H-byte window near `o` with a line start of `src` at window offset `a_p`.

    The line start nearest to `o + a_p` (ties: the smaller) among those that keep the window inside
    `src`; searched in a growing neighbourhood, so the cost does not grow with the size of `src`
    (training reads haystacks from corpora of hundreds of MB)."""
    lo, hi = a_p, src.size - H + a_p  # line start l -> s = l - a_p must lie in [0, size - H]
    x = o + a_p
    w = 4096
    while True:
        a, b = max(lo, x - w), min(hi, x + w)
        if a <= b:
            seg = src[max(a - 1, 0) : b]  # byte l - 1 decides whether l starts a line
            ok = np.flatnonzero(seg == NEWLINE) + max(a - 1, 0) + 1
            if a == 0:
                ok = np.concatenate([[0], ok])
            ok = ok[(ok >= a) & (ok <= b)]
            if ok.size:  # the nearest one in [x - w, x + w] is the nearest of all
                return int(ok[np.argmin(np.abs(ok - x))]) - a_p  # argmin: the first (smaller) of a tie
        if a <= lo and b >= hi:
            return o  # no line start anywhere: the raw offset
        w *= 4


def _assemble(
    src: np.ndarray,
    context_len: int,
    depth: float,
    rng: np.random.Generator,
    task: str,
    primary: bytes,
    query: bytes,
    answer: bytes,
    free: Sequence[bytes] = (),
    follow: Sequence[bytes] = (),
) -> RetrievalExample:
    """Build one example: the primary needle at round(depth * span), `free` needles (distractors) at
    random depths on either side of it, `follow` needles after it in order, then query + answer + \\n.
    """
    tail = query + answer + b"\n"
    prefix_len = context_len - len(tail)
    n_free = sum(map(len, free))
    n_follow = sum(map(len, follow))
    H = prefix_len - len(primary) - n_free - n_follow  # haystack bytes
    if H < 0:
        need = context_len - H
        raise ValueError(
            f"context_len: {context_len} is too short for task {task!r}: its needles and query need {need} bytes"
        )
    span = prefix_len - len(primary) - n_follow  # = H + n_free: last possible start of the primary
    P = int(round(float(depth) * span))

    # Which distractors go before the primary: a prefix (by drawn depth) of them whose total length
    # B leaves the primary at haystack offset a_p = P - B inside [0, H].
    d = rng.random(len(free))
    order = np.argsort(d, kind="stable")
    lens = np.array([len(free[i]) for i in order], dtype=np.int64)
    cums = np.concatenate([[0], np.cumsum(lens)])
    natural = int(np.sum(d * span < P))
    feasible = [k for k in range(len(free) + 1) if max(0, P - H) <= cums[k] <= P]
    if not feasible:
        raise ValueError(
            f"context_len: {context_len} is too short for task {task!r} at depth {depth}: "
            "no room to place the distractors around the needle"
        )
    k = min(feasible, key=lambda j: (abs(j - natural), j))
    before, after = list(order[:k]), list(order[k:])
    a_p = P - int(cums[k])

    if src.size < H:
        raise ValueError(f"source: expected at least {H} bytes for the haystack, got {src.size}")
    o = int(rng.integers(0, src.size - H + 1))
    s = _choose_window(src, H, a_p, o)
    hay = src[s : s + H]
    ls = _line_starts(hay)
    ls = ls[ls <= H]

    # (haystack offset, group, sequence, bytes): group 0 before the primary, 1 primary, 2 after.
    events = [(a_p, 1, 0, primary)]
    for i in before:
        events.append((_snap(d[i] / max(depth, 1e-12) * a_p, ls, 0, a_p), 0, 0, free[i]))
    for i in after:
        x = a_p + (d[i] - depth) / max(1.0 - depth, 1e-12) * (H - a_p)
        events.append((_snap(x, ls, a_p, H), 2, 0, free[i]))
    if follow:
        xs = np.sort(rng.random(len(follow))) * (H - a_p) + a_p
        for x, b in zip(xs, follow):
            events.append((_snap(x, ls, a_p, H), 2, 0, b))
    # Stable sort keeps the insertion order of equal keys (the chain order for `follow`).
    events.sort(key=lambda e: (e[0], e[1]))

    parts, needles, cur, pos = [], [], 0, 0
    needle_pos = -1
    for off, group, _, b in events:
        parts.append(hay[cur:off].tobytes())
        pos += off - cur
        if group == 1:
            needle_pos = pos
        needles.append((pos, b))
        parts.append(b)
        pos += len(b)
        cur = off
    parts.append(hay[cur:].tobytes())
    parts.append(tail)
    seq = b"".join(parts)
    assert len(seq) == context_len, (len(seq), context_len)
    tokens = np.frombuffer(seq, dtype=np.uint8).astype(np.int32)
    assert needle_pos == P, (needle_pos, P)
    return RetrievalExample(
        tokens=tokens,
        answer_start=context_len - 1 - len(answer),
        answer=answer,
        needle_pos=needle_pos,
        task=task,
        needle=primary,
        needles=tuple(needles),
        span=span,
        haystack_start=s,
    )


# ----------------------------------------------------------------------------------------------
# tasks


# A task is its parts (needles, query, answer: `_assemble`'s arguments), drawn from the rng before
# the haystack, so that the bytes a task needs are known without building an example.


def _passkey_parts(rng: np.random.Generator) -> dict:
    value = _value(rng)
    return dict(primary=b"# the pass key is " + value + b". remember it.\n",
                query=b"\n# what is the pass key? the pass key is ", answer=value)


def _multikey_parts(rng: np.random.Generator, *, n_keys: int = 4) -> dict:
    if not isinstance(n_keys, (int, np.integer)) or isinstance(n_keys, bool) or n_keys < 1:
        raise ValueError(f"n_keys: expected an int >= 1, got {n_keys!r}")
    keys: list[bytes] = []
    values: list[bytes] = []
    for _ in range(n_keys):
        keys.append(_name(rng, _LOWER, 6, set(keys)))
        values.append(_value(rng, set(values)))
    needles = [k + b" = " + v + b"\n" for k, v in zip(keys, values)]
    query = b"\n# what is the value of " + keys[0] + b"? the value of " + keys[0] + b" is "
    return dict(primary=needles[0], query=query, answer=values[0], free=needles[1:])


def _variable_tracking_parts(rng: np.random.Generator, *, n_hops: int = 4) -> dict:
    if not isinstance(n_hops, (int, np.integer)) or isinstance(n_hops, bool) or n_hops < 1:
        raise ValueError(f"n_hops: expected an int >= 1, got {n_hops!r}")
    value = _value(rng)
    names: list[bytes] = []
    for _ in range(n_hops):
        names.append(_name(rng, _UPPER, 5, set(names)))
    chain = [names[0] + b" = " + value + b"\n"]
    chain += [names[i] + b" = " + names[i - 1] + b"\n" for i in range(1, n_hops)]
    last = names[-1]
    query = b"\n# what is the value of " + last + b"? the value of " + last + b" is "
    return dict(primary=chain[0], query=query, answer=value, follow=chain[1:])


_PARTS = {"passkey": _passkey_parts, "multikey": _multikey_parts, "variable_tracking": _variable_tracking_parts}


def _build(task: str, source, context_len: int, depth: float, rng, **task_kwargs) -> RetrievalExample:
    src = _check_args(source, context_len, depth)
    rng = _as_rng(rng)
    return _assemble(src, context_len, depth, rng, task, **_PARTS[task](rng, **task_kwargs))


def passkey(source, context_len: int, depth: float, rng=0) -> RetrievalExample:
    """`# the pass key is NNNNN. remember it.` at `depth`; query `# what is the pass key? ...`."""
    return _build("passkey", source, context_len, depth, rng)


def multikey(source, context_len: int, depth: float, rng=0, *, n_keys: int = 4) -> RetrievalExample:
    """`n_keys` needles `key = value`; the one at `depth` is queried, the others are distractors."""
    return _build("multikey", source, context_len, depth, rng, n_keys=n_keys)


def variable_tracking(source, context_len: int, depth: float, rng=0, *, n_hops: int = 4) -> RetrievalExample:
    """Chain `V1 = NNNNN`, `V2 = V1`, ..., `Vn = V(n-1)` from `depth` on; query the value of `Vn`."""
    return _build("variable_tracking", source, context_len, depth, rng, n_hops=n_hops)


TASKS: dict[str, Callable[..., RetrievalExample]] = {
    "passkey": passkey,
    "multikey": multikey,
    "variable_tracking": variable_tracking,
}


def get_task(task) -> Callable[..., RetrievalExample]:
    """A task function from its name (or the function itself)."""
    if callable(task):
        return task
    if task not in TASKS:
        raise ValueError(f"task: expected one of {sorted(TASKS)}, got {task!r}")
    return TASKS[task]


def min_context_len(task: str, **task_kwargs) -> int:
    """The shortest `context_len` at which `task` can be built at every depth: its needles, query,
    answer and final newline, plus (for distractors) one distractor's length of code, so that the
    distractors always fit around the queried needle. Names and values have fixed lengths, so this
    does not depend on the seed."""
    get_task(task)
    parts = _PARTS[task](np.random.default_rng(0), **task_kwargs)
    free, follow = parts.get("free", ()), parts.get("follow", ())
    need = sum(map(len, (parts["primary"], parts["query"], parts["answer"], *free, *follow))) + 1
    return need + max(map(len, free), default=0)


def check_tasks(tasks, context_len: int | None = None, *, name: str = "tasks") -> tuple[str, ...]:
    """`tasks` (a comma string or a sequence of task names) as a tuple of distinct known names; with
    `context_len`, also that every task fits in it (`min_context_len`). ValueError naming `name`."""
    names = tuple(t.strip() for t in tasks.split(",")) if isinstance(tasks, str) else tuple(tasks)
    if not names or any(not isinstance(t, str) or t not in TASKS for t in names) or len(set(names)) < len(names):
        raise ValueError(f"{name}: expected distinct names among {', '.join(TASKS)}, got {tasks!r}")
    if context_len is not None:
        for t in names:
            if context_len < min_context_len(t):
                raise ValueError(f"{name}: task {t!r} needs a context of at least {min_context_len(t)} bytes, "
                                 f"got {context_len}")
    return names


def answer_targets(seq_len: int) -> tuple[int, int]:
    """[lo, hi): the target indices (of `targets = row[1:]`, seq_len long) that predict the answer of
    a `training_rows` example of `seq_len + 1` tokens: the answer is the ANSWER_LEN bytes before the
    row's final newline."""
    return seq_len - 1 - ANSWER_LEN, seq_len - 1


def training_rows(source, n: int, context_len: int, tasks=tuple(TASKS), rng=0, *,
                  depth_power: float = 1.0) -> np.ndarray:
    """`int32 [n, context_len]` retrieval examples for training: each row a task drawn uniformly from
    `tasks`, its needle at depth u ** depth_power for u uniform in [0, 1) (1: uniform depths; > 1 puts
    more needles far back, depth 0 being the start of the context: mean depth 1 / (depth_power + 1)),
    fresh values and names, a haystack at a random offset of `source`; everything drawn from `rng` in
    order (deterministic in its seed; depth_power 1 gives the rows of uniform depths bit for bit)."""
    out = np.empty((n, context_len), np.int32)
    for i, ex in enumerate(training_examples(source, n, context_len, tasks, rng, depth_power=depth_power)):
        out[i] = ex.tokens
    return out


def training_examples(source, n: int, context_len: int, tasks=tuple(TASKS), rng=0, *,
                      depth_power: float = 1.0) -> list[RetrievalExample]:
    """The `training_rows` examples themselves (same draws, same order), e.g. for where their needles are."""
    names = check_tasks(tasks, context_len)
    depth_power = check_depth_power(depth_power)
    rng = _as_rng(rng)
    out = []
    for _ in range(n):
        task = names[int(rng.integers(len(names)))]
        out.append(_build(task, source, context_len, float(rng.random()) ** depth_power, rng))
    return out


def check_depth_power(depth_power, name: str = "depth_power") -> float:
    """depth_power as a float > 0 (the training depths' exponent, `training_rows`); ValueError otherwise."""
    if (isinstance(depth_power, bool) or not isinstance(depth_power, (int, float, np.integer, np.floating))
            or not 0.0 < float(depth_power) < float("inf")):
        raise ValueError(f"{name}: expected a number > 0, got {depth_power!r}")
    return float(depth_power)


# ----------------------------------------------------------------------------------------------
# batches and scoring


def answer_mask_of(ex: RetrievalExample) -> np.ndarray:
    """bool [context_len]: True at t iff tokens[t + 1] is an answer byte (aligned with logits[t])."""
    T = ex.tokens.size
    mask = np.zeros(T, dtype=bool)
    mask[ex.answer_start - 1 : ex.answer_start - 1 + len(ex.answer)] = True
    return mask


def make_examples(task, source, context_len: int, depth: float, n: int, seed: int = 0, **task_kwargs):
    """`n` examples; example i uses `np.random.default_rng([seed, i])` (same haystack/keys across
    depths for a given (seed, i), up to the line-start nudge of the window)."""
    fn = get_task(task)
    if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 1:
        raise ValueError(f"n: expected an int >= 1, got {n!r}")
    seed = int(seed) & 0xFFFFFFFFFFFFFFFF
    return [fn(source, context_len, depth, np.random.default_rng([seed, i]), **task_kwargs) for i in range(n)]


def make_batch(
    task, source, context_len: int, depth: float, n: int, seed: int = 0, **task_kwargs
) -> tuple[np.ndarray, np.ndarray]:
    """(tokens int32 [n, context_len], answer_mask bool [n, context_len]).

    `answer_mask[i, t]` is True iff `tokens[i, t + 1]` is an answer byte: it aligns with logits
    computed on the full `tokens` (logits[t] predicts tokens[t + 1]), and `answer_mask[:, :-1]`
    aligns with targets `tokens[:, 1:]`. The last column is always False.
    """
    exs = make_examples(task, source, context_len, depth, n, seed, **task_kwargs)
    tokens = np.stack([e.tokens for e in exs])
    mask = np.stack([answer_mask_of(e) for e in exs])
    return tokens, mask


def answer_accuracy(
    logits_fn: Callable, tokens: np.ndarray, answer_mask: np.ndarray, *, batch_size: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(exact bool [n], byte accuracy float [n]) of the teacher-forced greedy answers.

    `logits_fn(int32 [b, T]) -> logits [b, T, V]` is applied to the full `tokens` (in chunks of
    `batch_size` rows if given). At every t with `answer_mask[i, t]` the prediction is
    `argmax logits[i, t]` against `tokens[i, t + 1]`. `exact[i]`: all answer bytes right (empty
    mask: True); `byte accuracy[i]`: the share of answer bytes right (a graded signal for models
    too small to get whole answers; chance is about 1/10 per digit).
    """
    tokens = np.asarray(tokens)
    answer_mask = np.asarray(answer_mask, dtype=bool)
    if tokens.ndim != 2 or answer_mask.shape != tokens.shape:
        raise ValueError(
            f"tokens/answer_mask: expected equal 2-D shapes, got {tokens.shape} and {answer_mask.shape}"
        )
    if answer_mask[:, -1].any():
        raise ValueError("answer_mask: the last column must be False (there is no next token to predict)")
    n = tokens.shape[0]
    bs = n if batch_size is None else int(batch_size)
    if bs < 1:
        raise ValueError(f"batch_size: expected None or an int >= 1, got {batch_size!r}")
    exact = np.zeros(n, dtype=bool)
    byte_acc = np.ones(n, dtype=np.float64)
    targets = np.concatenate([tokens[:, 1:], np.zeros_like(tokens[:, :1])], axis=1)
    for i in range(0, n, bs):
        logits = logits_fn(tokens[i : i + bs].astype(np.int32))
        pred = np.asarray(np.argmax(np.asarray(logits), axis=-1))
        if pred.shape != tokens[i : i + bs].shape:
            raise ValueError(f"logits_fn: expected logits of shape [b, T, V], got {np.shape(logits)}")
        m = answer_mask[i : i + bs]
        hit = pred == targets[i : i + bs]
        exact[i : i + bs] = (hit | ~m).all(axis=1)
        counts = m.sum(axis=1)
        byte_acc[i : i + bs] = np.where(counts > 0, (hit & m).sum(axis=1) / np.maximum(counts, 1), 1.0)
    return exact, byte_acc


def exact_match(
    logits_fn: Callable, tokens: np.ndarray, answer_mask: np.ndarray, *, batch_size: int | None = None
) -> np.ndarray:
    """bool [n]: teacher-forced greedy exact match of the answer (see `answer_accuracy`).

    Example i is correct iff `argmax logits[i, t] == tokens[i, t + 1]` at every t with
    `answer_mask[i, t]`. Examples with an empty mask count as correct.
    """
    return answer_accuracy(logits_fn, tokens, answer_mask, batch_size=batch_size)[0]


def generated_accuracy(generate_fn: Callable, examples, *, batch_size: int | None = None):
    """(exact bool [n], byte accuracy float [n]) of free-running answers: the model sees the prompt
    (`tokens[:answer_start]`) and generates `len(answer)` bytes on its own (its own earlier bytes
    fed back, unlike teacher forcing). `generate_fn(prompts: list[int32 array], n_bytes) ->
    list[bytes]` (e.g. greedy `msa_jax.generate.generate`)."""
    n = len(examples)
    bs = n if batch_size is None else int(batch_size)
    if bs < 1:
        raise ValueError(f"batch_size: expected None or an int >= 1, got {batch_size!r}")
    exact = np.zeros(n, dtype=bool)
    byte_acc = np.zeros(n, dtype=np.float64)
    for i in range(0, n, bs):
        chunk = examples[i : i + bs]
        n_bytes = max(len(e.answer) for e in chunk)
        outs = generate_fn([e.tokens[: e.answer_start] for e in chunk], n_bytes)
        for j, (e, out) in enumerate(zip(chunk, outs)):
            got = bytes(out)[: len(e.answer)]
            exact[i + j] = got == e.answer
            byte_acc[i + j] = sum(a == b for a, b in zip(got, e.answer)) / max(len(e.answer), 1)
    return exact, byte_acc


Z95 = 1.959963984540054  # the standard normal's 97.5% quantile: a two-sided 95% interval


def wilson_interval(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion: `k` successes in `n` trials (95% by default).

    Unlike the normal approximation it stays inside [0, 1] and is not empty at k = 0 or k = n,
    the cells that matter here (0/50 -> [0, 0.071]). n = 0 gives the uninformative (0, 1)."""
    if n < 0 or not 0 <= k <= max(n, 0):
        raise ValueError(f"k, n: expected 0 <= k <= n, got k={k!r}, n={n!r}")
    if n == 0:
        return 0.0, 1.0
    p, z2 = k / n, z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z / (1 + z2 / n) * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    # exact ends at k = 0 and k = n (the formula gives them only up to rounding)
    return (0.0 if k == 0 else centre - half), (1.0 if k == n else centre + half)


def examples_hash(tokens) -> str:
    """A short hash of a cell's example tokens (int32 [n, T]): equal for two evaluations that scored the
    same examples (same seed, task, length, depth, n and haystack corpus), whatever the model."""
    return hashlib.sha1(np.ascontiguousarray(tokens, dtype=np.int32).tobytes()).hexdigest()[:16]


def default_lengths(train_len: int, shortest: int = 4096) -> list[int]:
    """Context lengths to evaluate a model trained at `train_len`: from `min(shortest, train_len)`,
    doubling, up to 2 x train_len (e.g. 16384 -> 4096, 8192, 16384, 32768; 512 -> 512, 1024)."""
    if not isinstance(train_len, (int, np.integer)) or train_len < 1:
        raise ValueError(f"train_len: expected an int >= 1, got {train_len!r}")
    out, T = [], min(shortest, int(train_len))
    while T < 2 * train_len:
        out.append(T)
        T *= 2
    return out + [2 * int(train_len)]


def evaluate(
    logits_fn: Callable | None,
    source,
    tasks: Iterable = ("passkey", "multikey", "variable_tracking"),
    context_lens: Iterable[int] = (1024,),
    depths: Iterable[float] = (0.0, 0.25, 0.5, 0.75, 1.0),
    n: int = 16,
    seed: int = 0,
    *,
    batch_size: int | None = None,
    task_kwargs: dict | None = None,
    generate_fn: Callable | None = None,
    on_row: Callable[[dict], None] | None = None,
) -> list[dict]:
    """Exact-match accuracy per (task, context_len, depth).

    Teacher-forced with `logits_fn` (`answer_accuracy`), or free-running with `generate_fn`
    (`generated_accuracy`; then logits_fn may be None).

    Returns rows `{"task", "context_len", "depth", "accuracy", "correct", "n", "ci_low", "ci_high",
    "byte_accuracy", "outcomes", "examples"}` (exact-match accuracy = correct / n with its 95% Wilson
    interval, and the mean share of answer bytes right, all in [0, 1]; each example's outcome as a
    "0"/"1" string, and `examples_hash` of the cell's tokens: two models scored on the same examples
    compare paired, `msa_jax.differences`) in task-major, then context length, then depth order. `task_kwargs` maps a task name to extra keyword arguments of that task (e.g.
    `{"multikey": {"n_keys": 8}}`). `on_row(row)` is called after each cell (a progress bar).
    """
    task_kwargs = task_kwargs or {}
    rows = []
    for task in tasks:
        fn = get_task(task)
        name = task if isinstance(task, str) else getattr(task, "__name__", str(task))
        kw = task_kwargs.get(name, {})
        for T in context_lens:
            for depth in depths:
                if generate_fn is not None:
                    exs = make_examples(fn, source, T, depth, n, seed, **kw)
                    tokens = np.stack([e.tokens for e in exs])
                    correct, byte_acc = generated_accuracy(generate_fn, exs, batch_size=batch_size)
                else:
                    tokens, mask = make_batch(fn, source, T, depth, n, seed, **kw)
                    correct, byte_acc = answer_accuracy(logits_fn, tokens, mask, batch_size=batch_size)
                k = int(correct.sum())
                lo, hi = wilson_interval(k, int(n))
                rows.append(
                    {
                        "task": name,
                        "context_len": int(T),
                        "depth": float(depth),
                        "accuracy": float(correct.mean()),
                        "correct": k,
                        "n": int(n),
                        "ci_low": lo,
                        "ci_high": hi,
                        "byte_accuracy": float(byte_acc.mean()),
                        # per example, for paired comparisons of two models (msa_jax.differences)
                        "outcomes": "".join("1" if c else "0" for c in correct),
                        "examples": examples_hash(tokens),
                    }
                )
                if on_row is not None:
                    on_row(rows[-1])
    return rows


def needle_mass(mass, needle: tuple[int, int], block_size: int, top_k: int) -> tuple[float, float]:
    """(mass share, in top-k) of the dense attention at a retrieval example's answer rows (`mass`
    float [H_kv, rows, n_blocks] of one sequence, `model.layer_block_mass`): the mean share of each
    (row, group)'s attention on the needle's blocks (tokens [needle[0], needle[1])), and the share of
    (row, group) whose top_k blocks by mass include one of them: whether the teacher an index branch
    learns from points at the needle at all."""
    mass = np.asarray(mass, np.float64)
    first, last = needle[0] // block_size, (needle[1] - 1) // block_size
    share = mass[..., first : last + 1].sum(-1)
    k = min(top_k, mass.shape[-1])
    top = np.argsort(-mass, axis=-1, kind="stable")[..., :k]
    return float(share.mean()), float(((top >= first) & (top <= last)).any(-1).mean())


def needle_selected(block_idx, needle: tuple[int, int], rows: tuple[int, int], block_size: int) -> float:
    """Share of (query row in [rows[0], rows[1]), KV group) whose selected blocks (`block_idx` int
    [T, H_kv, top_k] of one sequence, -1 = none) include a block of the needle's tokens [needle[0],
    needle[1]): 1.0 means every such query can attend to (some of) the needle."""
    ids = np.asarray(block_idx)[rows[0] : rows[1]]
    first, last = needle[0] // block_size, (needle[1] - 1) // block_size
    return float(((ids >= first) & (ids <= last)).any(-1).mean())


def uniform_needle_selected(needle: tuple[int, int], rows: tuple[int, int], block_size: int, top_k: int, *,
                            local_blocks: int = 1, sink_blocks: int = 0) -> float:
    """What `needle_selected` would be for a selection blind to content: per query row in [rows[0],
    rows[1]) the forced blocks (the local ones, then the sinks, as `ops.reference.select_blocks` ranks
    them) and the remaining top_k slots drawn uniformly from the other visible blocks; -> the share of
    rows whose selection includes a block of the needle's tokens [needle[0], needle[1]) (its chance)."""
    first, last = needle[0] // block_size, (needle[1] - 1) // block_size
    shares = []
    for q in range(*rows):
        n = q // block_size + 1  # visible blocks 0 .. q // block_size
        forced = set(range(max(0, n - local_blocks), n))  # the local blocks, then the sinks in the slots left
        forced |= set([b for b in range(min(sink_blocks, n)) if b not in forced][:top_k - len(forced)])
        needles = set(range(first, min(last, n - 1) + 1))
        if not needles or needles & forced:
            shares.append(float(bool(needles)))
            continue
        free, pool = max(0, top_k - len(forced)), n - len(forced)
        miss = math.comb(pool - len(needles), free) / math.comb(pool, free) if free < pool else 0.0
        shares.append(1.0 - miss)
    return float(np.mean(shares))


def selected_beyond(block_idx, rows: tuple[int, int], distance: int, block_size: int) -> tuple[float, float]:
    """How much of the selection for query rows [rows[0], rows[1]) (`block_idx` int [T, H_kv, top_k] of
    one sequence, -1 = none) lies wholly `distance` or more tokens back: every key of the block at a
    query-key distance a model trained at T = `distance` never saw. -> (share of the selected blocks,
    share of those rows' causal blocks), the second being what a uniform choice would give."""
    ids = np.asarray(block_idx)[rows[0] : rows[1]]
    return _share_beyond(ids, np.arange(*rows), distance, block_size), uniform_beyond(rows, distance, block_size)


def _share_beyond(ids, q, distance: int, block_size: int) -> float:
    """Of the blocks ids int [rows, groups, k] (-1 = none) chosen for query positions q [rows], the share
    lying wholly `distance` or more tokens back."""
    far_limit = ((q - distance + 1) // block_size)[:, None, None]  # blocks b < far_limit end that far back
    valid = ids >= 0
    return float((valid & (ids < far_limit)).sum() / max(valid.sum(), 1))


def uniform_beyond(rows: tuple[int, int], distance: int, block_size: int) -> float:
    """The share of query rows [rows[0], rows[1])'s causal blocks lying wholly `distance` or more tokens
    back: what a uniform choice among them would put there (the yardstick of `selected_beyond`)."""
    q = np.arange(rows[0], rows[1])
    far_limit = np.clip((q - distance + 1) // block_size, 0, None)
    return float(np.mean(far_limit / (q // block_size + 1)))  # causal blocks: 0..q // block_size


def selection_by_distance(block_idx, rows: tuple[int, int], block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """How often the selection for query rows [rows[0], rows[1]) (`block_idx` int [T, H_kv, top_k] of one
    sequence, -1 = none) picks the block d blocks back (d = the query's block - the selected block):
    -> (picks [n_blocks], visible [n_blocks]) counts, visible[d] = the (row, group) cases that can see
    distance d. Sum them over examples; picks / visible is the selection rate per distance, flat for a
    choice blind to distance."""
    block_idx = np.asarray(block_idx)
    n_blocks = -(-block_idx.shape[0] // block_size)
    return _picks_by_distance(block_idx[rows[0] : rows[1]], np.arange(*rows), block_size, n_blocks)


def top_k_by_distance(mass, rows: tuple[int, int], block_size: int, top_k: int) -> tuple[np.ndarray, np.ndarray]:
    """`selection_by_distance` for the dense attention's top_k causal blocks by mass at query rows
    [rows[0], rows[1]) (`mass` float [H_kv, rows, n_blocks], `model.layer_block_mass`): what an index
    branch that imitated its teacher exactly would pick, by distance."""
    q = np.arange(*rows)
    top = _causal_top_k(mass, q, block_size, top_k)  # [H_kv, rows, k]
    return _picks_by_distance(np.moveaxis(top, 0, 1), q, block_size, np.shape(mass)[-1])


def _causal_top_k(mass, q, block_size: int, top_k: int) -> np.ndarray:
    """The top_k blocks by mass (`mass` [H_kv, rows, n_blocks] at query positions q [rows]) among each
    row's causal blocks, -1 where a row has fewer: int [H_kv, rows, top_k]."""
    mass = np.asarray(mass, np.float64)
    causal = np.arange(mass.shape[-1]) <= (q // block_size)[:, None]  # [rows, n_blocks]
    top = np.argsort(np.where(causal, -mass, np.inf), axis=-1, kind="stable")[..., :top_k]
    return np.where(np.take_along_axis(np.broadcast_to(causal, mass.shape), top, -1), top, -1)


def _picks_by_distance(ids, q, block_size: int, n_blocks: int) -> tuple[np.ndarray, np.ndarray]:
    """ids int [rows, groups, k] (-1 = none) of query positions q [rows] -> (picks, visible) by distance."""
    qb = q // block_size
    dist = (qb[:, None, None] - ids)[ids >= 0]
    picks = np.bincount(dist, minlength=n_blocks)[:n_blocks]
    visible = np.bincount(qb, minlength=n_blocks)[:n_blocks][::-1].cumsum()[::-1] * ids.shape[1]  # qb >= d
    return picks, visible


def mass_beyond(mass, rows: tuple[int, int], distance: int, block_size: int, top_k: int) -> tuple[float, float]:
    """The dense attention's side of `selected_beyond`: for query rows [rows[0], rows[1]) (`mass` float
    [H_kv, rows, n_blocks] of one sequence, `model.layer_block_mass`), the mean share of each (row,
    group)'s attention on blocks wholly `distance` or more tokens back, and the share of its top_k blocks
    by mass lying there: what an index branch that imitated its teacher exactly would select."""
    mass = np.asarray(mass, np.float64)
    q = np.arange(*rows)
    far = np.arange(mass.shape[-1]) < ((q - distance + 1) // block_size)[:, None]  # [rows, n_blocks], as in `_share_beyond`
    share = (mass * far).sum(-1) / np.maximum(mass.sum(-1), 1e-30)
    top = _causal_top_k(mass, q, block_size, top_k)  # [H_kv, rows, k]
    return float(share.mean()), _share_beyond(np.moveaxis(top, 0, 1), q, distance, block_size)
