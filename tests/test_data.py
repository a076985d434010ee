"""Tests for msa_jax.data: the stdlib byte corpus and the batch iterators."""

import ast
import json
import itertools
import pathlib

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
    assert corpus.n_packages == len(corpus.train_packages) + len(corpus.val_packages) >= 2
    assert str(corpus.n_packages) in corpus.summary() and corpus.fingerprint in corpus.summary()
    assert not corpus.train.flags.writeable  # shared by the cache


def test_load_is_deterministic(corpus):
    data._load_cached.cache_clear()  # really re-read the files
    again = data.load_corpus(SMALL)
    assert again is not corpus
    np.testing.assert_array_equal(again.train, corpus.train)
    np.testing.assert_array_equal(again.val, corpus.val)
    assert again.train_packages == corpus.train_packages and again.val_packages == corpus.val_packages
    assert again.fingerprint == corpus.fingerprint
    assert data.load_corpus(SMALL // 2).fingerprint != corpus.fingerprint


def test_packages_cover_stdlib_and_site_packages():
    pkgs = {p.name: p for p in data.list_packages()}
    assert len([n for n in pkgs if n.startswith("stdlib/")]) > 100
    assert len([n for n in pkgs if n.startswith("site-packages/")]) > 5  # numpy, jax, flax, ... are installed
    for name in ("stdlib/json", "stdlib/os", "site-packages/numpy", "site-packages/jax"):
        assert name in pkgs, name
    assert "json/decoder.py" in pkgs["stdlib/json"].files and pkgs["stdlib/os"].files == ("os.py",)
    assert any(f.startswith("test/") for f in pkgs["stdlib/test"].files)  # stdlib tests are code too
    stdlib_files = {f for n, p in pkgs.items() if n.startswith("stdlib/") for f in p.files}
    assert not any("site-packages" in f or "__pycache__" in f for f in stdlib_files)
    for p in pkgs.values():
        assert list(p.files) == sorted(p.files) and all(f.endswith(".py") for f in p.files)


def test_split_is_by_package_and_disjoint():
    full = data.load_corpus()
    assert not set(full.train_packages) & set(full.val_packages)
    assert all(data.is_val_package(n) for n in full.val_packages)
    assert not any(data.is_val_package(n) for n in full.train_packages)
    assert set(full.train_packages) | set(full.val_packages) == {p.name for p in data.list_packages()}
    share = len(full.val_packages) / full.n_packages
    assert 0.01 < share < 0.12  # ~5% of packages
    # Every file of a val package is in val, and none of it in train.
    val_pkg = data.list_packages()[[p.name for p in data.list_packages()].index(full.val_packages[0])]
    doc = np.frombuffer(val_pkg.document(), np.uint8)
    window = doc[: min(doc.size, 2000)].tobytes()
    assert window in full.val.tobytes() and window not in full.train.tobytes()


def test_split_is_stable():
    # A pure function of the package name: pinned so that machines and versions agree.
    assert data._hash_unit("split:stdlib/os") == int.from_bytes(
        __import__("hashlib").sha256(b"split:stdlib/os").digest()[:8], "big"
    ) / 2.0**64
    assert [data.is_val_package(n) for n in ("stdlib/os", "stdlib/json")] == [
        data._hash_unit("split:stdlib/os") < 0.05,
        data._hash_unit("split:stdlib/json") < 0.05,
    ]


def test_corpus_is_python_source(corpus):
    text = data.decode(corpus.train)
    for needle in ("def ", "import ", "class ", "return", '"""'):
        assert text.count(needle) > 20, needle
    # Whole files (all but the last, which max_bytes may cut) are real Python: most of them parse.
    files = corpus.train.tobytes().replace(bytes([data.DOC_SEP]), b"").split(bytes([data.SEP]))[:-1]
    assert len(files) > 10
    parsed = 0
    for src in files:
        assert src.startswith(b"# ")  # the path header line
        try:
            ast.parse(src)
            parsed += 1
        except (SyntaxError, ValueError):
            pass  # a few stdlib test fixtures are deliberately broken
    assert parsed / len(files) > 0.9
    # The corpus starts with the first chosen package's document, file by file.
    pkgs = {p.name: p for p in data.list_packages()}
    first = pkgs[corpus.train_packages[0]]
    head = b"# " + first.files[0].encode() + b"\n" + (pathlib.Path(first.root) / first.files[0]).read_bytes()
    n = min(len(head), corpus.train.size)
    assert corpus.train[:n].tobytes() == head[:n]


def test_full_corpus_is_large():
    full = data.load_corpus()
    assert full.n_bytes > 20_000_000
    assert full.val.size > 100_000
    assert full.python_version.count(".") == 2
    stdlib = data.load_corpus(sources=("stdlib",))
    assert 5_000_000 < stdlib.n_bytes < full.n_bytes
    assert all(n.startswith("stdlib/") for n in stdlib.train_packages + stdlib.val_packages)


def test_custom_sources_documents_and_shadowing(tmp_path):
    a, b = tmp_path / "a" / "lib", tmp_path / "b" / "lib2"
    for root in (a, b):
        (root / "pkg").mkdir(parents=True)
        (root / "pkg" / "__init__.py").write_text(f"ROOT = {root.name!r}\n")
    (a / "pkg" / "sub").mkdir()
    (a / "pkg" / "sub" / "m.py").write_text("y = 2\n")
    (a / "mod.py").write_text("x = 1\n")
    (a / "__pycache__").mkdir()
    (a / "__pycache__" / "junk.py").write_text("nope\n")
    (a / "notes.txt").write_text("not python\n")
    pkgs = data.list_packages([str(a), str(b)])
    assert [(p.name, p.files) for p in pkgs] == [
        ("lib/mod", ("mod.py",)),
        ("lib/pkg", ("pkg/__init__.py", "pkg/sub/m.py")),
        ("lib2/pkg", ("pkg/__init__.py",)),
    ]
    doc = pkgs[1].document()
    assert doc == b"# pkg/__init__.py\nROOT = \'lib\'\n\x1c# pkg/sub/m.py\ny = 2\n\x1c\x1d"
    assert pkgs[1].size() == len(doc)
    with pytest.raises(ValueError, match="sources"):
        data.list_packages([str(tmp_path / "missing")])
    with pytest.raises(ValueError, match="split"):  # 3 packages cannot fill both splits at 5%
        data.load_corpus(sources=[str(a), str(b)], val_fraction=0.01)


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


def test_iterator_state_resumes_exactly(corpus):
    it = data.BatchIterator(corpus.train, 2, 48, seed=3)
    first = [next(it) for _ in range(5)]
    state = it.state()
    assert state["step"] == 5 and state["seed"] == 3 and json.loads(json.dumps(state)) == state
    after = [next(it) for _ in range(3)]
    resumed = data.BatchIterator.from_state(corpus.train, state)
    for x, y in zip(after, [next(resumed) for _ in range(3)]):
        np.testing.assert_array_equal(x, y)
    np.testing.assert_array_equal(first[0], data.batch_at(corpus.train, 2, 48, seed=3, step=0))
    with pytest.raises(ValueError, match="another corpus"):
        data.BatchIterator.from_state(corpus.val, state)
    with pytest.raises(ValueError, match="step"):
        data.BatchIterator(corpus.train, 2, 48, step=-1)
