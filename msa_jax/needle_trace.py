"""The needle trace: where a trained model's attention and (MSA) index branch send the rows that
answer a pass-key example, against where the needle is (docs/long_context.md, "the needle trace").

Per layer: the dense attention's mass on the needle's block and whether it is among that attention's
top-k blocks (the teacher the index branch's KL learns from; in an MSA layer its main branch's own q
and k), and for MSA whether the index branch selected it. Past the training length, also how much of
the attention's and of the index's choice lies at distances the model never trained on, and the
selection rate against distance. The statistics are `retrieval`'s; this module runs the model.
"""

from __future__ import annotations

import functools
import pathlib

import numpy as np

from msa_jax import plots, retrieval


@functools.cache
def _jitted():
    """The model functions the trace runs, jitted once (imported late: this module loads without jax)."""
    from flax import nnx

    from msa_jax.model import layer_block_mass, layer_selections

    forward = nnx.jit(lambda model, tokens: model(tokens, sparse=True)[0])  # top-k routing for MSA
    return (forward, nnx.jit(layer_selections, static_argnames="with_recall"),
            nnx.jit(layer_block_mass, static_argnames="n_rows"))


@functools.cache
def _probe_hits():
    """The batched needle selection of `probe_needle_selected`, jitted once."""
    import jax.numpy as jnp
    from flax import nnx

    from msa_jax.model import layer_selections

    @nnx.jit(static_argnames="sparse")
    def hits(model, rows, first, last, *, sparse):
        lo, hi = retrieval.answer_targets(rows.shape[1] - 1)  # the input rows predicting the answer
        out = []
        for s in layer_selections(model, rows[:, :-1], sparse=sparse):
            if s is not None:
                ids = s["block_idx"][:, lo:hi]  # [B, answer rows, H_kv, top_k], -1 = none
                hit = (ids >= first[:, None, None, None]) & (ids <= last[:, None, None, None])
                out.append(hit.any(-1).mean(axis=1, dtype=jnp.float32))  # [B, H_kv]
        return jnp.stack(out)

    return hits


def probe_needle_selected(model, rows: np.ndarray, needles: np.ndarray, block_size: int, *, sparse: bool = True,
                          mesh=None) -> np.ndarray:
    """Whether the index routes a retrieval row's answer to its needle, for a batch of training rows
    (`retrieval.training_examples`, int [B, seq_len + 1], the answer at the end) with their queried
    needles `needles` int [B, 2] ([start, end) in the row): float [MSA layers, B, H_kv], per row and KV
    group the share of the query rows predicting an answer byte whose selected blocks include one of
    the needle's (its mean over the groups is `retrieval.needle_selected`; batched, on the device).
    sparse: the forward the layers run in between (False: the dense warmup's). mesh: one without a
    `context` axis; the rows are split over its batch axes (B a multiple of data * fsdp)."""
    import jax

    rows, needles = np.asarray(rows), np.asarray(needles)
    first, last = needles[:, 0] // block_size, (needles[:, 1] - 1) // block_size
    hits = _probe_hits()
    if mesh is None:
        return np.asarray(hits(model, rows, first, last, sparse=sparse))
    from msa_jax import sharding

    if mesh.shape["context"] > 1:
        raise ValueError(f"probe_needle_selected: a mesh with a context axis is not supported ({dict(mesh.shape)})")
    with jax.set_mesh(mesh):
        return np.asarray(jax.device_get(hits(model, sharding.shard_batch(rows, mesh), sharding.shard_rows(first, mesh),
                                              sharding.shard_rows(last, mesh), sparse=sparse)))


def needle_trace(model, cfg, source: np.ndarray, T: int, depth: float, *, examples: int = 8, seed: int = 0,
                 name: str = "", figure_dir: str | pathlib.Path | None = None) -> dict:
    """Trace `examples` pass-key examples of context length T with the needle at `depth` (haystacks from
    `source`, seeds seed, seed + 1, ...) through `model` (a `DecoderLM` trained with RunConfig `cfg`).

    Returns {task, context_len, depth, examples, correct (share answered right, teacher-forced),
    teacher_needle_mass, teacher_needle_in_top_k (per layer), and for MSA needle_selected (per MSA
    layer)}; when T > cfg.seq_len also attention_mass_beyond, attention_top_k_beyond (per layer),
    beyond_uniform, selection_rate_by_distance ({layer: {curve: rate per distance in blocks}}) and for
    MSA selected_beyond (per MSA layer). With `figure_dir`, draws the first example's selection
    (MSA: selection_<name>[_T<T>]_depth<d>.png, the T only off the training length) and past the
    training length the rate by distance (distance_<name>_T<T>_depth<d>.png)."""
    import jax.numpy as jnp

    forward, selections, mass_fn = _jitted()
    is_msa = cfg.attention == "msa"
    msa_layers = [i for i in range(cfg.n_layers) if cfg.model_config().is_msa_layer(i)]
    bs, far = cfg.block_size, T > cfg.seq_len  # only past the training length can a block be that far back
    logits_fn = lambda t: forward(model, jnp.asarray(t))  # noqa: E731
    teacher, teacher_far, hits, beyond, right = [], [], [], [], []
    by_distance = {}  # (layer, curve) -> (picks, visible) per distance, summed over the examples
    past = f"index (rows past {cfg.seq_len})"

    def count(layer, curve, counts):
        old = by_distance.get((layer, curve))
        by_distance[(layer, curve)] = counts if old is None else (old[0] + counts[0], old[1] + counts[1])

    for e in range(examples):
        ex = retrieval.passkey(source, T, depth, seed + e)
        tokens = jnp.asarray(ex.tokens[None])
        needle = (ex.needle_pos, ex.needle_pos + len(ex.needle))
        answer = (ex.answer_start - 1, ex.answer_start - 1 + len(ex.answer))  # the rows predicting it
        right.append(bool(retrieval.exact_match(logits_fn, ex.tokens[None], retrieval.answer_mask_of(ex)[None])[0]))
        masses = [np.asarray(m)[0] for m in mass_fn(model, tokens, answer[0], n_rows=answer[1] - answer[0])]
        teacher.append([retrieval.needle_mass(m, needle, bs, cfg.top_k) for m in masses])
        if far:
            teacher_far.append([retrieval.mass_beyond(m, answer, cfg.seq_len, bs, cfg.top_k) for m in masses])
            for layer, m in enumerate(masses):
                count(layer, "attention's top-k (answer rows)", retrieval.top_k_by_distance(m, answer, bs, cfg.top_k))
        if not is_msa:
            continue
        sel = [np.asarray(s["block_idx"])[0] for s in selections(model, tokens) if s is not None]
        hits.append([retrieval.needle_selected(s, needle, answer, bs) for s in sel])
        if far:
            beyond.append([retrieval.selected_beyond(s, answer, cfg.seq_len, bs)[0] for s in sel])
            for layer, s in zip(msa_layers, sel):
                count(layer, "index (answer rows)", retrieval.selection_by_distance(s, answer, bs))
                count(layer, past, retrieval.selection_by_distance(s, (cfg.seq_len, T), bs))
        if e == 0 and figure_dir is not None:
            fig = plots.needle_selection_figure(
                sel, layers=msa_layers, block_size=bs, needle=needle, answer=answer,
                title=f"{name}: passkey at depth {depth:g}, T={T} ({'right' if right[0] else 'wrong'} answer)")
            if fig is not None:
                at = "" if T == cfg.seq_len else f"_T{T}"
                fig.savefig(pathlib.Path(figure_dir) / f"selection_{name}{at}_depth{depth:g}.png", dpi=110)
                plots.pyplot().close(fig)

    per_layer = lambda layers, values: dict(zip(map(str, layers), np.asarray(values).tolist()))  # noqa: E731
    layers = range(cfg.n_layers)
    teacher = np.mean(np.array(teacher), axis=0)  # [layer, (mass share, in top-k)]
    res = dict(task="passkey", context_len=T, depth=depth, examples=examples, correct=float(np.mean(right)),
               teacher_needle_mass=per_layer(layers, teacher[:, 0]),
               teacher_needle_in_top_k=per_layer(layers, teacher[:, 1]))
    if far:
        teacher_far = np.mean(np.array(teacher_far), axis=0)  # [layer, (mass share, top-k share)]
        res["attention_mass_beyond"] = per_layer(layers, teacher_far[:, 0])
        res["attention_top_k_beyond"] = per_layer(layers, teacher_far[:, 1])
        res["beyond_uniform"] = retrieval.uniform_beyond(answer, cfg.seq_len, bs)
        rates = {}  # per distance in blocks; the MSA layers (dense runs: every layer)
        for (layer, curve), (picks, visible) in sorted(by_distance.items()):
            if not is_msa or layer in msa_layers:
                rates.setdefault(str(layer), {})[curve] = [round(float(p) / v, 6) if v else None
                                                           for p, v in zip(picks, visible)]
        res["selection_rate_by_distance"] = rates
        if figure_dir is not None:
            fig = plots.selection_distance_figure(
                rates, block_size=bs, train_len=cfg.seq_len,
                title=f"{name}: selection rate by distance\npasskey at depth {depth:g}, T={T}, {examples} "
                      "examples; dashed: the training length")
            if fig is not None:
                fig.savefig(pathlib.Path(figure_dir) / f"distance_{name}_T{T}_depth{depth:g}.png", dpi=100)
                plots.pyplot().close(fig)
    if is_msa:
        res["needle_selected"] = per_layer(msa_layers, np.mean(hits, axis=0))
        if far:
            res["selected_beyond"] = per_layer(msa_layers, np.mean(beyond, axis=0))
    return res


INDEX, TOP_K = "index", "attention's top-k"  # the curves of `selection_by_distance_on`


def selection_by_distance_on(model, cfg, windows, *, rows: int = 256, max_distance: int = 16) -> dict:
    """Which blocks each MSA layer chooses on ordinary text, by distance: for `windows` int [N, T] (e.g.
    validation code, T <= the model's length) and the last `rows` query rows of each (the ones that see
    the most blocks), per distance d < max_distance in blocks (0: the query's own block) the share of
    (row, KV group) cases whose selection holds the block d back (INDEX), and the same for the top_k
    blocks of the layer's own dense attention by mass (TOP_K: what the KL teaches;
    `retrieval.top_k_by_distance`). -> {layer: {INDEX: [rate per d], TOP_K: [...]}} (MSA layers only).
    A position-blind index shows as an INDEX curve flatter than TOP_K."""
    import jax.numpy as jnp

    _, selections, mass_fn = _jitted()
    windows = np.asarray(windows)
    T, bs, k = windows.shape[1], cfg.block_size, cfg.top_k
    rows = min(rows, T)
    span = (T - rows, T)
    counts = {}  # (layer, curve) -> [picks, visible]
    for w in windows:
        tokens = jnp.asarray(w[None].astype(np.int32))
        masses = mass_fn(model, tokens, span[0], n_rows=rows)
        for layer, s in enumerate(selections(model, tokens)):
            if s is None:
                continue
            for curve, (picks, visible) in (
                    (INDEX, retrieval.selection_by_distance(np.asarray(s["block_idx"])[0], span, bs)),
                    (TOP_K, retrieval.top_k_by_distance(np.asarray(masses[layer])[0], span, bs, k))):
                c = counts.setdefault((layer, curve), [0, 0])
                c[0], c[1] = c[0] + picks[:max_distance], c[1] + visible[:max_distance]
    out = {}
    for (layer, curve), (picks, visible) in sorted(counts.items()):
        out.setdefault(str(layer), {})[curve] = [round(float(p) / v, 6) if v else None for p, v in zip(picks, visible)]
    return out
