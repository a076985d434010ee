"""Orbax checkpoints of a model + optimizer + JSON metadata, and dense -> MSA conversion (docs/algorithm.md §6.3).

A checkpoint is one step directory `<directory>/<step>/` with three items:
  - "model": `nnx.state(model)` (every variable of the model),
  - "optimizer": `nnx.state(optimizer)` (step count and AdamW moments),
  - "meta": a JSON dict chosen by the caller (data iterator state, seeds, configs as dicts, ...).

Orbax writes a step into `<step>.orbax-checkpoint-tmp-*` and renames it to `<step>` only once every
item is on disk, so an interrupted save leaves the previous checkpoints intact, and unfinished
temporary directories are never listed as steps. A writable Checkpointer deletes them when it opens
the directory, so only one writing process may use a directory at a time. `save` waits for the
write to finish: once it returns, the step is a complete checkpoint.

Restoring is in place: build the model and optimizer from the same configs, then `restore` copies the
saved values into them (their current state is the target that gives shapes and dtypes).

Damage: every save records a 32-bit fingerprint of the model's and the optimizer's bits in the
meta, and `restore` checks it, so a truncated, partly copied or bit-flipped step fails loudly
instead of loading wrong weights. `restore_latest` (what a resuming run uses) tries the steps newest
first and skips a step that fails to load, with a warning; a writable Checkpointer also renames it
to `<step>.damaged` so that it is kept for inspection but never listed as a step again.

`load_dense_into_msa` starts continued pre-training (CPT) of an MSA model from a dense checkpoint:
every non-index weight is copied, the index branches keep the MSA model's fresh initialisation.
`load_run(run_dir)` rebuilds the model of a training run directory (`msa_jax.loop`) from its
checkpoint.
"""

from __future__ import annotations

import json
import pathlib
import shutil
import warnings

import absl.logging
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from msa_jax.config import RunConfig
from msa_jax.model import MAIN_PARAMS, DecoderLM

_ITEMS = ("model", "optimizer", "meta")
_TMP_SUFFIX = ".orbax-checkpoint-tmp"  # orbax names a step being written `<step>.orbax-checkpoint-tmp-*`
_CHECKSUMS = "_checksums"  # meta key of the saved states' fingerprints (removed from the meta returned)


class DamagedCheckpoint(Exception):
    """A step's files do not load, or load to other bits than were saved."""


@jax.jit
def _fingerprint(leaves: list[jax.Array]) -> jax.Array:
    """uint32 position-weighted sum of every element's bits: changes with any flipped, lost or moved value."""
    total = jnp.uint32(0)
    for i, x in enumerate(leaves):
        if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            x = jax.random.key_data(x)
        if x.dtype == jnp.bool_:
            bits = x.astype(jnp.uint32)
        else:
            bits = jax.lax.bitcast_convert_type(x, jnp.dtype(f"uint{8 * x.dtype.itemsize}")).astype(jnp.uint32)
        bits = bits.reshape(-1)
        weights = jnp.arange(bits.size, dtype=jnp.uint32) * jnp.uint32(2654435761) + jnp.uint32(2 * i + 1)
        total = total + jnp.sum(bits * weights, dtype=jnp.uint32)
    return total


def fingerprint(state) -> int:
    """The 32-bit fingerprint of a state's arrays (what `save` records and `restore` checks)."""
    return int(_fingerprint(jax.tree.leaves(state)))


def _abstract(state: nnx.State):
    """Shape/dtype/sharding target for orbax from a concrete state."""
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, state)


def _remove_unfinished_saves(directory: pathlib.Path) -> None:
    """Delete `<step>.orbax-checkpoint-tmp*` directories: saves that never reached their rename."""
    if directory.is_dir():
        for path in directory.glob(f"*{_TMP_SUFFIX}*"):
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)


class Checkpointer:
    """`Checkpointer(directory, keep=3)`: save / restore (model, optimizer, meta) at integer steps.

    Keeps the `keep` most recent steps (older ones are deleted after each save). `read_only=True`
    opens an existing directory for restoring only: nothing is created or deleted (safe while
    another process trains into it). Use as a context manager or call `close()` when done.
    """

    def __init__(self, directory: str | pathlib.Path, *, keep: int = 3, read_only: bool = False):
        if not isinstance(keep, int) or isinstance(keep, bool) or keep < 1:
            raise ValueError(f"keep: expected an int >= 1, got {keep!r}")
        self.directory = pathlib.Path(directory).absolute()
        self._read_only = read_only
        if read_only:
            if not self.directory.is_dir():
                raise FileNotFoundError(f"no checkpoint directory {self.directory}")
        else:
            _remove_unfinished_saves(self.directory)
        verbosity = absl.logging.get_verbosity()
        if read_only:  # orbax warns about a read-only manager's settings (no saves, read-only directory): not news
            absl.logging.set_verbosity(absl.logging.ERROR)
        try:
            options = ocp.CheckpointManagerOptions(
                max_to_keep=None if read_only else keep,
                read_only=read_only,
                create=not read_only,
                # Done above instead: orbax's own cleanup runs in the background and can delete the
                # temporary directory of a save of the same step started right after opening.
                cleanup_tmp_directories=False,
                enable_async_checkpointing=False,  # save returns only once the step is finalised
            )
            self._mngr = ocp.CheckpointManager(self.directory, item_names=_ITEMS, options=options)
        finally:
            absl.logging.set_verbosity(verbosity)

    def save(self, step: int, model: nnx.Module, optimizer: nnx.Optimizer | None, meta: dict | None = None) -> None:
        """Write step `step`: model state, optimizer state (if given) and the JSON-serialisable `meta`.

        Returns once the step is complete on disk. A step that already exists is overwritten.
        """
        meta = dict(meta or {})
        json.dumps(meta)  # a TypeError now, before anything is written
        states = {"model": nnx.state(model)}
        if optimizer is not None:
            states["optimizer"] = nnx.state(optimizer)
        meta[_CHECKSUMS] = {name: fingerprint(state) for name, state in states.items()}
        items = {name: ocp.args.StandardSave(state) for name, state in states.items()}
        items["meta"] = ocp.args.JsonSave(meta)
        self._mngr.save(int(step), args=ocp.args.Composite(**items), force=True)
        self._mngr.wait_until_finished()

    def all_steps(self) -> list[int]:
        return sorted(self._mngr.all_steps())

    def latest_step(self) -> int | None:
        return self._mngr.latest_step()

    def restore(self, model: nnx.Module, optimizer: nnx.Optimizer | None = None, step: int | None = None) -> dict:
        """Load step `step` (default: the latest) into `model` / `optimizer` in place; returns meta.

        Raises DamagedCheckpoint (and changes nothing) when the step's files do not load or their
        bits differ from the fingerprints recorded at save time."""
        step = self.resolve_step(step)
        targets = {"model": nnx.state(model)}
        if optimizer is not None:
            targets["optimizer"] = nnx.state(optimizer)
        items = {name: ocp.args.StandardRestore(_abstract(state)) for name, state in targets.items()}
        items["meta"] = ocp.args.JsonRestore()
        try:
            restored = self._mngr.restore(step, args=ocp.args.Composite(**items))
        except Exception as e:  # orbax / tensorstore raise many types for missing or truncated files
            raise DamagedCheckpoint(f"step {step}: {_first_line(e)}") from e
        meta = dict(restored["meta"])
        saved = meta.pop(_CHECKSUMS, {})  # absent in checkpoints from before fingerprints
        for name in targets:
            if name in saved and fingerprint(restored[name]) != saved[name]:
                raise DamagedCheckpoint(f"step {step}: the {name} state's bits differ from those saved "
                                        f"(fingerprint {fingerprint(restored[name])} != {saved[name]})")
        for name, node in (("model", model), ("optimizer", optimizer)):
            if name in targets:
                nnx.update(node, restored[name])
        return meta

    def restore_latest(self, model: nnx.Module, optimizer: nnx.Optimizer | None = None, *,
                       check_meta=None) -> tuple[int, dict]:
        """Restore the newest step that loads intact; returns (step, meta).

        A damaged step is skipped with a warning (a writable Checkpointer also renames it to
        `<step>.damaged`) in favour of the one before. `check_meta(meta)` runs on each candidate's
        meta before its arrays are read; what it raises propagates (e.g. a config mismatch, which
        no older step would fix). FileNotFoundError when no step loads."""
        errors = []
        for step in reversed(self.all_steps()):
            try:
                try:
                    meta = self.restore_meta(step)
                except Exception as e:
                    raise DamagedCheckpoint(f"step {step}: its meta does not load: {_first_line(e)}") from e
                if check_meta is not None:
                    check_meta(meta)
                return step, self.restore(model, optimizer, step=step)
            except DamagedCheckpoint as e:
                errors.append(str(e))
                self._set_aside(step, e)
        raise FileNotFoundError(f"no usable checkpoint in {self.directory}"
                                + "".join(f"\n  {line}" for line in errors))

    def _set_aside(self, step: int, error: Exception) -> None:
        where = "left in place (read-only)"
        if not self._read_only and jax.process_index() == 0:
            src = self.directory / str(step)
            dst = self.directory / f"{step}.damaged"
            n = 1
            while dst.exists():
                n += 1
                dst = self.directory / f"{step}.damaged{n}"
            src.rename(dst)
            self._mngr.reload()
            where = f"renamed to {dst.name}"
        warnings.warn(f"skipping damaged checkpoint {self.directory / str(step)} ({where}): {error}",
                      stacklevel=3)

    def restore_meta(self, step: int | None = None) -> dict:
        step = self.resolve_step(step)
        meta = dict(self._mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"])
        meta.pop(_CHECKSUMS, None)
        return meta

    def restore_raw_model(self, step: int | None = None) -> dict:
        """The saved model state of `step` as a nested dict of arrays (no target model needed)."""
        step = self.resolve_step(step)
        return self._mngr.restore(step, args=ocp.args.Composite(model=ocp.args.StandardRestore()))["model"]

    def resolve_step(self, step: int | None) -> int:
        if step is None:
            step = self.latest_step()
            if step is None:
                raise FileNotFoundError(f"no complete checkpoint in {self.directory}")
        elif step not in self._mngr.all_steps():
            raise FileNotFoundError(f"no checkpoint for step {step} in {self.directory}: have {self.all_steps()}")
        return int(step)

    def close(self) -> None:
        self._mngr.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _first_line(e: BaseException) -> str:
    """The root cause's type and first line (orbax wraps tensorstore's precise error in long ones)."""
    while e.__cause__ is not None:
        e = e.__cause__
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:300] if text else ''}"


def _key_name(entry) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def _path_name(path) -> str:
    """"blocks/0/attn/wq/kernel" for a leaf path of an nnx.State or of the nested dict orbax restores."""
    names = [_key_name(p) for p in path]
    if names and names[-1] == "value":  # the Variable payload: ".value" in a State, "value" in a dict
        names = names[:-1]
    return "/".join(names)


def _flat(tree) -> dict[str, object]:
    return {_path_name(path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def load_dense_into_msa(directory: str | pathlib.Path, msa_model: nnx.Module, *, step: int | None = None,
                       index: bool | None = False) -> list[str]:
    """Copy every non-index weight of a dense checkpoint into `msa_model` (CPT start, docs/algorithm.md §6.3).
    The same works for any checkpoint into any model of the same sizes (a dense target has no index
    branches): `--init-from` uses it for a next stage at another sequence length too.

    `directory` is a `Checkpointer` directory; `step` defaults to its latest step. index: False (the
    CPT start) keeps the index branches of `msa_model` at their current (fresh) values and ignores any
    in the checkpoint; True loads them too (the checkpoint must be an MSA one with the same index
    shapes: an MSA run continued as the same MSA model, e.g. at a longer --seq-len); None loads them
    when the checkpoint has index weights and keeps them fresh when it has none. Raises ValueError
    when a loaded weight of the model is missing from the checkpoint, has another shape, or the
    checkpoint holds a non-index weight the model lacks: all signs that the two model configs do not
    match. Returns the sorted paths of the weights loaded.
    """
    with Checkpointer(directory, read_only=True) as ckpt:
        step = ckpt.resolve_step(step)
        raw = _flat(ckpt.restore_raw_model(step))
    is_index = lambda k: "index" in k.split("/")  # noqa: E731
    saved = {k: v for k, v in raw.items() if not is_index(k)}
    saved_index = {k: v for k, v in raw.items() if is_index(k)}
    if index is None:
        index = bool(saved_index)
    if index and not saved_index:
        raise ValueError(f"checkpoint {directory} (step {step}) holds no index weights to load (a dense run?)")
    if index:
        saved.update(saved_index)

    target = nnx.state(msa_model, nnx.Param if index else MAIN_PARAMS)
    wanted = _flat(target)
    missing = sorted(set(wanted) - set(saved))
    extra = sorted(set(saved) - set(wanted))
    bad_shape = sorted(
        f"{k}: checkpoint {tuple(np.shape(saved[k]))} vs model {tuple(np.shape(wanted[k]))}"
        for k in set(wanted) & set(saved)
        if np.shape(saved[k]) != np.shape(wanted[k])
    )
    if missing or extra or bad_shape:
        what = "weights" if index else "non-index weights"
        lines = [f"checkpoint {directory} (step {step}) does not match the model's {what}:"]
        if missing:
            lines.append(f"  missing from the checkpoint: {missing}")
        if extra:
            lines.append(f"  in the checkpoint but not in the model: {extra}")
        if bad_shape:
            lines.append(f"  shape mismatch: {bad_shape}")
        lines.append("  (were both models built from the same ModelConfig apart from `attention`?)")
        raise ValueError("\n".join(lines))

    def load(path, current):
        return jax.numpy.asarray(saved[_path_name(path)], dtype=current.dtype)

    nnx.update(msa_model, jax.tree_util.tree_map_with_path(load, target))
    return sorted(wanted)


def _newest_meta(ckpt: Checkpointer, steps: list[int]) -> dict:
    for step in reversed(steps):
        try:
            return ckpt.restore_meta(step)
        except Exception:  # a damaged step: restore_latest will say so
            continue
    return ckpt.restore_meta(steps[-1])  # raises the error of the newest


def checkpoint_dir(path: str | pathlib.Path) -> pathlib.Path:
    """A run directory's `checkpoints/` (or `path` itself when it is already a checkpoint directory)."""
    path = pathlib.Path(path)
    return path / "checkpoints" if (path / "checkpoints").is_dir() else path


ROUTING_FIELDS = ("top_k", "sink_blocks", "local_blocks")  # MSA fields that change the selection, not the weights


def load_run(run_dir: str | pathlib.Path, step: int | None = None, *, impl: str | None = None,
             routing: dict | None = None):
    """(model, run config, step) of a training run directory, weights restored from `step` (default:
    the latest checkpoint). `impl` overrides the ops backend the run was trained with; `routing` the
    top-k selection's fields of ROUTING_FIELDS, e.g. {"sink_blocks": 1}: an inference-time ablation of
    an MSA model trained with other routing (the returned config holds them; a dense run ignores them)."""
    import dataclasses

    routing = dict(routing or {})
    if set(routing) - set(ROUTING_FIELDS):
        raise ValueError(f"routing: expected fields among {ROUTING_FIELDS}, got {sorted(routing)}")

    ckpt_dir = checkpoint_dir(run_dir)
    if not ckpt_dir.is_dir():
        raise FileNotFoundError(f"{run_dir}: no checkpoints/ directory (is it a training run directory?)")
    with Checkpointer(ckpt_dir, read_only=True) as ckpt:
        steps = [ckpt.resolve_step(step)] if step is not None else ckpt.all_steps()
        if not steps:
            raise FileNotFoundError(f"no complete checkpoint in {ckpt_dir}")
        run = RunConfig.from_dict(_newest_meta(ckpt, steps)["config"])  # the same model at every step
        if impl:
            run = dataclasses.replace(run, impl=impl)
        if routing and run.attention == "msa":
            run = dataclasses.replace(run, **routing)  # validated with the rest of the config
        model = DecoderLM(run.model_config(), seed=run.seed)
        if step is None:
            step, _ = ckpt.restore_latest(model)  # skips damaged steps with a warning
        else:
            ckpt.restore(model, step=step)
    return model, run, step
