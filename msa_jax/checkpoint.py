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

`load_dense_into_msa` starts continued pre-training (CPT) of an MSA model from a dense checkpoint:
every non-index weight is copied, the index branches keep the MSA model's fresh initialisation.
`load_run(run_dir)` rebuilds the model of a training run directory (`msa_jax.loop`) from its
checkpoint.
"""

from __future__ import annotations

import json
import pathlib
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from msa_jax.config import RunConfig
from msa_jax.model import MAIN_PARAMS, DecoderLM

_ITEMS = ("model", "optimizer", "meta")
_TMP_SUFFIX = ".orbax-checkpoint-tmp"  # orbax names a step being written `<step>.orbax-checkpoint-tmp-*`


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
        if read_only:
            if not self.directory.is_dir():
                raise FileNotFoundError(f"no checkpoint directory {self.directory}")
        else:
            _remove_unfinished_saves(self.directory)
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

    def save(self, step: int, model: nnx.Module, optimizer: nnx.Optimizer | None, meta: dict | None = None) -> None:
        """Write step `step`: model state, optimizer state (if given) and the JSON-serialisable `meta`.

        Returns once the step is complete on disk. A step that already exists is overwritten.
        """
        meta = dict(meta or {})
        json.dumps(meta)  # a TypeError now, before anything is written
        items = {"model": ocp.args.StandardSave(nnx.state(model)), "meta": ocp.args.JsonSave(meta)}
        if optimizer is not None:
            items["optimizer"] = ocp.args.StandardSave(nnx.state(optimizer))
        self._mngr.save(int(step), args=ocp.args.Composite(**items), force=True)
        self._mngr.wait_until_finished()

    def all_steps(self) -> list[int]:
        return sorted(self._mngr.all_steps())

    def latest_step(self) -> int | None:
        return self._mngr.latest_step()

    def restore(self, model: nnx.Module, optimizer: nnx.Optimizer | None = None, step: int | None = None) -> dict:
        """Load step `step` (default: the latest) into `model` / `optimizer` in place; returns meta."""
        step = self.resolve_step(step)
        items = {
            "model": ocp.args.StandardRestore(_abstract(nnx.state(model))),
            "meta": ocp.args.JsonRestore(),
        }
        if optimizer is not None:
            items["optimizer"] = ocp.args.StandardRestore(_abstract(nnx.state(optimizer)))
        restored = self._mngr.restore(step, args=ocp.args.Composite(**items))
        nnx.update(model, restored["model"])
        if optimizer is not None:
            nnx.update(optimizer, restored["optimizer"])
        return dict(restored["meta"])

    def restore_meta(self, step: int | None = None) -> dict:
        step = self.resolve_step(step)
        return dict(self._mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"])

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


def load_dense_into_msa(directory: str | pathlib.Path, msa_model: nnx.Module, *, step: int | None = None) -> list[str]:
    """Copy every non-index weight of a dense checkpoint into `msa_model` (CPT start, docs/algorithm.md §6.3).

    `directory` is a `Checkpointer` directory; `step` defaults to its latest step. The index branches
    of `msa_model` keep their current (fresh) values. Index weights found in the checkpoint (when it
    is itself an MSA checkpoint) are ignored. Raises ValueError when a non-index weight of the model
    is missing from the checkpoint, has another shape, or the checkpoint holds a non-index weight
    the model lacks: all signs that the two model configs do not match.
    Returns the sorted paths of the weights loaded.
    """
    with Checkpointer(directory, read_only=True) as ckpt:
        step = ckpt.resolve_step(step)
        saved = {k: v for k, v in _flat(ckpt.restore_raw_model(step)).items() if "index" not in k.split("/")}

    target = nnx.state(msa_model, MAIN_PARAMS)
    wanted = _flat(target)
    missing = sorted(set(wanted) - set(saved))
    extra = sorted(set(saved) - set(wanted))
    bad_shape = sorted(
        f"{k}: checkpoint {tuple(np.shape(saved[k]))} vs model {tuple(np.shape(wanted[k]))}"
        for k in set(wanted) & set(saved)
        if np.shape(saved[k]) != np.shape(wanted[k])
    )
    if missing or extra or bad_shape:
        lines = [f"dense checkpoint {directory} (step {step}) does not match the MSA model's non-index weights:"]
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


def checkpoint_dir(path: str | pathlib.Path) -> pathlib.Path:
    """A run directory's `checkpoints/` (or `path` itself when it is already a checkpoint directory)."""
    path = pathlib.Path(path)
    return path / "checkpoints" if (path / "checkpoints").is_dir() else path


def load_run(run_dir: str | pathlib.Path, step: int | None = None, *, impl: str | None = None):
    """(model, run config, step) of a training run directory, weights restored from `step` (default:
    the latest checkpoint). `impl` overrides the ops backend the run was trained with."""
    import dataclasses

    import absl.logging

    absl.logging.set_verbosity(absl.logging.ERROR)  # orbax warns that a read-only manager is read-only
    ckpt_dir = checkpoint_dir(run_dir)
    if not ckpt_dir.is_dir():
        raise FileNotFoundError(f"{run_dir}: no checkpoints/ directory (is it a training run directory?)")
    with Checkpointer(ckpt_dir, read_only=True) as ckpt:
        step = ckpt.resolve_step(step)
        run = RunConfig.from_dict(ckpt.restore_meta(step)["config"])
        if impl:
            run = dataclasses.replace(run, impl=impl)
        model = DecoderLM(run.model_config(), seed=run.seed)
        ckpt.restore(model, step=step)
    return model, run, step
