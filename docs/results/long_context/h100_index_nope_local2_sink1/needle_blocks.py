"""Where the needles sit, in 128-token blocks back from the answer's first row, in this folder's evaluation
examples at 16K (run from the repository root; CPU, seconds):
python docs/results/long_context/h100_index_nope_local2_sink1/needle_blocks.py

The examples are eval_retrieval.py's (same tasks, seed and n) over this machine's validation packages; the
haystack bytes differ from the GPU machine's where its Python installation differs, the geometry does not: the
answer sits at a fixed position in the last block, and at depth 1 the needle (for variable tracking the whole
chain) and the query end right before it. 0 blocks back = the answer's own (local) block, always selected."""
import numpy as np

from msa_jax import data, retrieval

BLOCK, T, N, SEED = 128, 16384, 50, 0
corpus = data.load_corpus(None, sources=("stdlib", "site-packages"))
for task in ("passkey", "multikey", "variable_tracking"):
    for depth in (1.0, 0.75, 0.5):
        back = []
        for ex in retrieval.make_examples(task, corpus.val, T, depth, N, SEED):
            row = (ex.answer_start - 1) // BLOCK  # the row that predicts the first answer byte
            chain = ex.needles if task == "variable_tracking" else ((ex.needle_pos, ex.needle),)
            back.append(max(row - pos // BLOCK for pos, _ in chain))  # the block of the farthest needle's start
        counts = np.bincount(back)
        where = ", ".join(f"{b} back: {c}" for b, c in enumerate(counts) if c)
        print(f"{task:18s} depth {depth:<4}: farthest needle start, blocks back from the answer: {where}")
