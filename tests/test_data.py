"""Tests for msa_jax.data: the stdlib byte corpus and the batch iterators."""

import ast
import itertools

import numpy as np
import pytest

from msa_jax import data

SMALL = 400_000  # bytes: keeps every test here fast


@pytest.fixture(scope="module")
def corpus():
    return data.load_corpus(SMALL)


def test_corpus_shapes_and_sizes(corpus):
    assert corpus.train.dtype == np.uint8 and corpus.val.dtype == np.uint8
    assert corpus.train.ndim == 1 and corpus.val.ndim == 1
    assert corpus.n_bytes == SMALL == corpus.train.size + corpus.val.size
    assert corpus.val.size == round(SMALL * 0.05)
    assert corpus.n_files == len(corpus.train_files) + len(corpus.val_files) > 10
    assert "stdlib" in corpus.summary() or corpus.source in corpus.summary()


def test_load_is_deterministic(corpus):
    data._load_cached.cache_clear()  # really re-read the files
    again = data.load_corpus(SMALL)
    assert again is not corpus
    np.testing.assert_array_equal(again.train, corpus.train)
    np.testing.assert_array_equal(again.val, corpus.val)
    assert again.train_files == corpus.train_files and again.val_files == corpus.val_files


def test_files_are_sorted_and_from_the_stdlib(corpus):
    assert list(corpus.train_files) == sorted(corpus.train_files)
    assert list(corpus.val_files) == sorted(corpus.val_files)
    all_files = data.list_source_files()
    assert len(all_files) > 500  # the whole stdlib, tests included
    assert any(f.startswith("test/") for f in all_files)
    assert not any("site-packages" in f for f in all_files)
    assert set(corpus.train_files) <= set(all_files) and set(corpus.val_files) <= set(all_files)


def test_split_is_by_file_and_disjoint(corpus):
    assert not set(corpus.train_files) & set(corpus.val_files)
    assert all(data.is_val_file(f) for f in corpus.val_files)
    assert not any(data.is_val_file(f) for f in corpus.train_files)
    all_files = data.list_source_files()
    share = sum(data.is_val_file(f) for f in all_files) / len(all_files)
    assert 0.02 < share < 0.09  # ~5% of files


def test_split_is_stable():
    # A pure function of the relative path: pinned so that machines and versions agree.
    assert data._hash_unit("split:os.py") == data._hash_unit("split:os.py")
    assert [data.is_val_file(f) for f in ("os.py", "json/decoder.py")] == [
        data._hash_unit("split:os.py") < 0.05,
        data._hash_unit("split:json/decoder.py") < 0.05,
    ]


def test_corpus_is_python_source(corpus):
    text = data.decode(corpus.train)
    for needle in ("def ", "import ", "class ", "return", '"""'):
        assert text.count(needle) > 20, needle
    # Whole files (all but the last, which max_bytes may cut) are real Python: most of them parse.
    files = corpus.train.tobytes().split(bytes([data.SEP]))[:-1]
    assert len(files) > 10
    parsed = 0
    for src in files:
        try:
            ast.parse(src)
            parsed += 1
        except (SyntaxError, ValueError):
            pass  # a few stdlib test fixtures are deliberately broken
    assert parsed / len(files) > 0.9
    # Files start where the separators say: the first file is the first sorted train file.
    first = (data.stdlib_dir() / corpus.train_files[0]).read_bytes()
    assert corpus.train[: len(first)].tobytes() == first[: corpus.train.size]


def test_full_corpus_is_large():
    full = data.load_corpus()
    assert full.n_bytes > 5_000_000
    assert full.val.size > 100_000
    assert full.python_version.count(".") == 2


def test_batches_shape_dtype_and_targets(corpus):
    it = data.batches(corpus.train, 4, 64, seed=0)
    for batch in itertools.islice(it, 3):
        assert batch.shape == (4, 65) and batch.dtype == np.int32
        assert batch.min() >= 0 and batch.max() < data.VOCAB_SIZE
        inputs, targets = batch[:, :-1], batch[:, 1:]
        # Every row is a contiguous window of the data: targets are the next bytes.
        for row_in, row_tgt in zip(inputs, targets):
            hits = np.flatnonzero(corpus.train[: corpus.train.size - 64] == row_in[0])
            assert any(
                np.array_equal(corpus.train[s : s + 64], row_in) and np.array_equal(corpus.train[s + 1 : s + 65], row_tgt)
                for s in hits
            )


def test_batches_deterministic_and_restartable(corpus):
    a = list(itertools.islice(data.batches(corpus.train, 3, 32, seed=7), 6))
    b = list(itertools.islice(data.batches(corpus.train, 3, 32, seed=7), 6))
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    resumed = list(itertools.islice(data.batches(corpus.train, 3, 32, seed=7, start_step=4), 2))
    np.testing.assert_array_equal(resumed[0], a[4])
    np.testing.assert_array_equal(resumed[1], a[5])
    np.testing.assert_array_equal(data.batch_at(corpus.train, 3, 32, seed=7, step=2), a[2])
    other = next(data.batches(corpus.train, 3, 32, seed=8))
    assert not np.array_equal(other, a[0])
    assert not np.array_equal(a[0], a[1])


def test_batches_cover_the_last_window():
    arr = np.arange(10, dtype=np.uint8)
    seen = {int(b[0, 0]) for b in itertools.islice(data.batches(arr, 1, 4, seed=0), 200)}
    assert seen == set(range(6))  # starts 0..5; window 5..9 is the last one
    (only,) = list(itertools.islice(data.batches(np.arange(5, dtype=np.uint8), 2, 4, seed=0), 1))
    np.testing.assert_array_equal(only, np.tile(np.arange(5), (2, 1)))


def test_eval_batches(corpus):
    ev = data.eval_batches(corpus.val, 2, 128, 5)
    assert len(ev) == 5 and all(b.shape == (2, 129) and b.dtype == np.int32 for b in ev)
    np.testing.assert_array_equal(ev[0][0], corpus.val[:129])
    np.testing.assert_array_equal(ev[-1][-1], corpus.val[-129:])
    again = data.eval_batches(corpus.val, 2, 128, 5)
    assert all(np.array_equal(x, y) for x, y in zip(ev, again))


def test_short_data_raises_clear_error():
    with pytest.raises(ValueError, match="seq_len"):
        next(data.batches(np.zeros(10, np.uint8), 2, 10, seed=0))
    with pytest.raises(ValueError, match="seq_len"):
        data.eval_batches(np.zeros(10, np.uint8), 2, 10, 1)
    with pytest.raises(ValueError, match="batch_size"):
        next(data.batches(np.zeros(100, np.uint8), 0, 10, seed=0))
    with pytest.raises(ValueError, match="max_bytes"):
        data.load_corpus(1)
    with pytest.raises(ValueError, match="val_fraction"):
        data.load_corpus(1000, val_fraction=0.0)


def test_custom_root(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "a.py").write_text("x = 1\n")
    (tmp_path / "pkg" / "b.py").write_text("y = 2\n")
    (tmp_path / "site-packages").mkdir()
    (tmp_path / "site-packages" / "c.py").write_text("z = 3\n")
    (tmp_path / "notes.txt").write_text("not python\n")
    assert data.list_source_files(tmp_path) == ["a.py", "pkg/b.py"]
    c = data.load_corpus(root=tmp_path, val_fraction=0.5)
    assert sorted(c.train_files + c.val_files) == ["a.py", "pkg/b.py"]
    assert c.n_bytes == 2 * (6 + 1)
    assert data.decode(c.train).count("\f") == len(c.train_files)
