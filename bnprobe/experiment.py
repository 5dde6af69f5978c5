"""An experiment: one config, its variants, one HDF5 file.

Trains every variant (:func:`bnprobe.trainer.train_variant`) into one store, resumes an
interrupted file, or continues a finished one with more measurements. Every variant's model is
built before the file exists, so a bad model or surgery fails with nothing written. Under torchrun
every process trains its shard and rank 0 writes the file.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, TypeVar

from torch import nn

from . import distributed
from .config import Config, expand_variants
from .data import DataBundle, load_data
from .errors import BnprobeError, ConfigError, ModelError, PeerStopped
from .layers import no_layer_matches, probed_layers
from .store import OutputLock, Status, Store
from .surgery import BnPlan
from .trainer import ProgressFn, VariantResult, check_checkpoint, prepare_model, resolve_device, train_variant

_T = TypeVar("_T")


def check_layer_selection(cfg: Config, bundle: DataBundle, models: list[nn.Module]) -> None:
    """``probes.layers`` / ``kinds`` must match a layer in at least one variant (each may differ:
    ``*_bn`` matches only where BN was inserted)."""
    x, _ = bundle.example_batch(2)
    patterns, kinds = cfg.probes.layers, cfg.probes.kinds or None
    if not any(probed_layers(m, x.to(next(m.parameters(), x).device), patterns, kinds, require=False) for m in models):
        variants = "the variant" if len(models) == 1 else f"any of the {len(models)} variants"
        raise no_layer_matches(patterns, kinds, f" in {variants}; see `bnprobe inspect`")


def run_experiment(cfg: Config, force: bool = False, progress: ProgressFn | None = None) -> tuple[Store, list[VariantResult]]:
    """Train every variant of ``cfg`` into ``cfg.output_path``; returns the closed store and results.
    Under torchrun every process trains its shard and rank 0 writes the file."""
    bundle = load_data(cfg.data, seed=cfg.seed, **dict(cfg.data_options))
    runs = expand_variants(cfg)
    with _process_group(cfg):
        for _, run_cfg in runs:
            if run_cfg.batch_size > len(bundle):
                raise ConfigError(f"batch_size {run_cfg.batch_size} is larger than the data set ({len(bundle)} samples)")
            distributed.check_divisible(run_cfg.batch_size)
        # Build every variant before the file exists: a bad model or surgery fails with nothing written.
        prepared = [prepare_model(run_cfg, bundle, resolve_device(run_cfg.device)) for _, run_cfg in runs]
        check_layer_selection(cfg, bundle, [model for model, _ in prepared])
        default_dir = Path(cfg.output).parent == Path("runs")
        store = _output(lambda: Store.create(cfg.output_path, cfg.to_yaml(), force=force, create_parent=default_dir))
        results = []
        with store:
            for (name, run_cfg), model_plan in zip(runs, prepared):
                writer = store.run(name, {"variant": name})
                results.append(_unless_first(train_variant(run_cfg, name, bundle, writer, progress, model_plan), store))
    return store, results


def _process_group(cfg: Config) -> AbstractContextManager[None]:
    """torchrun's process group for the run (nothing in a plain process)."""
    return distributed.process_group(resolve_device(cfg.device), cfg.dist_backend.value, cfg.dist_timeout)


def _output(open_store: Callable[[], Store]) -> Store:
    """The store rank 0 writes (``open_store()``); the other processes of a torchrun run write to
    memory."""
    return _opened_by_rank0(open_store, Store.scratch)


def _opened_by_rank0(open_: Callable[[], _T], others: Callable[[], _T]) -> _T:
    """``open_()`` on rank 0 (the one process that writes the file), ``others()`` on the other
    processes of a torchrun run, which stop quietly when rank 0 could not open it (rank 0 says why)."""
    if distributed.is_main():
        try:
            opened = open_()
        except BnprobeError as e:
            distributed.broadcast(str(e))
            raise
        distributed.broadcast(None)
        return opened
    problem = distributed.broadcast(None)
    if problem is not None:
        raise PeerStopped(f"rank 0 could not open the output: {problem}")
    return others()


def _unless_first(result: VariantResult, store: Store) -> VariantResult:
    """``result``, unless it failed before the new file holds any record: then the failure is an
    error like one found while building the model, and the file is discarded (nothing written)."""
    if result.status == Status.FAILED and not store.has_records():
        raise ModelError(f"variant {result.name}: {result.error}")
    return result


def resume_experiment(path: Path, progress: ProgressFn | None = None) -> list[VariantResult]:
    """Continue the unfinished variants of ``path`` from their checkpoints (or from the start when
    a run was killed before its first checkpoint), and run variants that never started.

    No other process may write ``path`` meanwhile, and everything (config, data, every model, every
    checkpoint and that it fits its model) is checked before the file is touched."""
    from .config import load_config_text
    from .store import read_file

    existing = read_file(path, load=False)  # every process, before rank 0 opens the file for writing
    cfg = load_config_text(existing.attrs.get("config", ""), str(path))
    bundle = load_data(cfg.data, seed=cfg.seed, **dict(cfg.data_options))
    results = []
    with _process_group(cfg):
        lock = _opened_by_rank0(lambda: OutputLock.acquire(path), lambda: None)
        with lock or contextlib.nullcontext():
            plans = _resume_plans(path, cfg, bundle)
            with _output(lambda: Store.append_to(path, lock)) as store:
                for name, run_cfg, checkpoint, prepared in plans:
                    writer = store.run(name, {"variant": name})
                    if checkpoint is None:
                        writer.truncate(0)
                    results.append(train_variant(run_cfg, name, bundle, writer, progress, prepared, checkpoint))
    return results


_Plan = tuple[str, Config, dict[str, Any] | None, tuple[nn.Module, BnPlan | None]]


def _resume_plans(path: Path, cfg: Config, bundle: DataBundle) -> list[_Plan]:
    """The variants of ``path`` to train, each with its checkpoint (None: from the start) and its
    model, built and loaded from the checkpoint: every check a resume makes, with nothing written."""
    from .store import read_file, saved_checkpoint

    existing = read_file(path, load=False)  # again, now that no other process writes it
    unfinished = {name: run for name, run in existing.runs.items() if run.attrs.get("status") not in (Status.FINISHED, Status.DIVERGED)}
    for name, unfinished_run in unfinished.items():  # before any variant trains: one file, one number of processes
        _check_same_processes(path, name, int(unfinished_run.attrs.get("world_size", 1)))
    plans: list[_Plan] = []
    for name, run_cfg in expand_variants(cfg):
        started = name in existing.runs
        if started and name not in unfinished:
            continue
        distributed.check_divisible(run_cfg.batch_size)
        saved = distributed.broadcast(saved_checkpoint(path, name) if started and distributed.is_main() else None)
        checkpoint = saved[0] if isinstance(saved, tuple) else None
        prepared = prepare_model(run_cfg, bundle, resolve_device(run_cfg.device))
        if checkpoint is not None:
            check_checkpoint(run_cfg, name, prepared[0], checkpoint)
        plans.append((name, run_cfg, checkpoint, prepared))
    return plans


def _check_same_processes(path: Path, name: str, trained_by: int) -> None:
    """A run continues with the number of processes it was trained by: each process's BN batch
    statistics (its shard) and dropout draws depend on that number, so another one would change the
    experiment mid-run and the file would say only the last one."""
    now = distributed.world_size()
    if now != trained_by:
        how = f"torchrun --nproc-per-node {trained_by} -m bnprobe" if trained_by > 1 else "bnprobe (without torchrun)"
        raise ConfigError(
            f"variant {name} of {path} was trained by {trained_by} process(es), not {now}: resume it with {how} train --resume {path}"
        )


def measure_from_run(
    path: Path, overrides: dict[str, Any], output: Path, force: bool = False, progress: ProgressFn | None = None
) -> list[VariantResult]:
    """Continue each finished variant of ``path`` from its checkpoint for ``steps`` more steps
    (default: as many as it ran) with ICS measured, into a new file; ``path`` is only read."""
    from .config import config_for_measure
    from .store import load_checkpoint, read_file

    existing = read_file(path, load=False)
    base, extra = config_for_measure(existing.attrs.get("config", ""), str(path), overrides)
    bundle = load_data(base.data, seed=base.seed, **dict(base.data_options))
    with _process_group(base):
        plans = []
        for name, run_cfg in expand_variants(base):
            if name not in existing.runs:
                continue
            checkpoint, start = load_checkpoint(path, name)
            run_cfg = dataclasses.replace(run_cfg, steps=start + (extra or start))
            distributed.check_divisible(run_cfg.batch_size)
            plans.append((name, run_cfg, checkpoint, prepare_model(run_cfg, bundle, resolve_device(run_cfg.device))))
        if not plans:
            raise ConfigError(f"{path} has no run with a checkpoint to continue from")
        check_layer_selection(base, bundle, [prepared[0] for *_, prepared in plans])
        results = []
        with _output(lambda: Store.create(output, base.to_yaml(), force=force, inputs=[path])) as store:
            for name, run_cfg, checkpoint, prepared in plans:
                writer = store.run(name, {"variant": name, "continued_from": str(path)})
                results.append(_unless_first(train_variant(run_cfg, name, bundle, writer, progress, prepared, checkpoint), store))
    return results
