"""What the training driver settles before any Ray Train worker starts.

Workers run in another working directory (``RAY_CHDIR_TO_TRIAL_DIR``) and every error they raise is retried
``train.max_failures`` times, so two kinds of thing belong here, in the process where the user typed the command:

* paths: every local path a user types for training is made absolute against the driver's working directory
  (:func:`resolve_paths`), so a worker opens the same file the driver checked;
* errors that no retry can fix: a bad config, a missing file, a batch larger than a worker's share of the
  data, a run name that already holds the other stage's checkpoints. Each is raised once, as a
  :class:`TrainSetupError` (or ``ConfigError``/``ShardError``/``StorageError``) naming the setting to change.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
from fsspec.core import split_protocol

from clcae.checkpoints import read_checkpoint
from clcae.config import CLCAEConfig, StorageConfig
from clcae.data.storage import exists, filesystem, join, storage_errors, with_protocol
from clcae.errors import CLCAEError

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "checkpoint.pt"
# Beside each checkpoint.pt: its stage, step and config, so the driver can check a resume without
# downloading the (possibly GB-sized) checkpoint itself.
CHECKPOINT_META = "checkpoint.json"

# Settings whose change makes a saved checkpoint unloadable (state_dict or optimiser shapes), per stage.
ARCHITECTURE_KEYS = (
    "generator.size", "generator.style_dim", "generator.n_mlp", "generator.channel_multiplier",
    "generator.channel_max", "encoder.backbone", "encoder.input_size", "model.variant", "model.w_attention",
    "model.f_attention", "model.attention_heads", "model.attention_ffn", "model.attention_tokens",
)

CONTRASTIVE_KEYS = ("contrastive.layers", "contrastive.heads", "contrastive.ffn", "contrastive.projection_dim",
                    "contrastive.optimizer")


class TrainSetupError(CLCAEError, ValueError):
    """Something is wrong before any worker starts: data, stage-1 checkpoint, storage, files, resume."""


# ---------------------------------------------------------------------------------------------------- paths
def absolute_uri(uri: str) -> str:
    """A plain or ``file://`` path made absolute against the current directory (``~`` expanded); a remote
    URI (``s3://``, ``gs://``, ...) is returned unchanged."""
    proto, path = split_protocol(uri)
    if proto not in (None, "file", "local"):
        return uri
    resolved = str(Path(os.path.expanduser(path)).resolve())
    return resolved if proto is None else f"{proto}://{resolved}"


def resolve_paths(cfg: CLCAEConfig) -> CLCAEConfig:
    """A copy of ``cfg`` whose training paths (storage, shards, stage-1 run, generator, encoder and ID
    weights, the authors' contrastive files, direction files) are absolute. Idempotent."""

    def one(value: str | None) -> str | None:
        return absolute_uri(value) if value else value

    def many(values: Sequence[str]) -> list[str]:
        return [absolute_uri(v) for v in values]

    r = dataclasses.replace
    return r(
        cfg,
        generator=r(cfg.generator, checkpoint=one(cfg.generator.checkpoint)),
        encoder=r(cfg.encoder, pretrained=one(cfg.encoder.pretrained)),
        contrastive=r(cfg.contrastive, checkpoint=one(cfg.contrastive.checkpoint),
                      official_image=one(cfg.contrastive.official_image),
                      official_latent=one(cfg.contrastive.official_latent)),
        loss=r(cfg.loss, id_weights=one(cfg.loss.id_weights)),
        data=r(cfg.data, train=many(cfg.data.train), test=many(cfg.data.test), pairs=many(cfg.data.pairs)),
        train=r(cfg.train, storage_path=absolute_uri(cfg.train.storage_path)),
        directions={name: r(d, path=absolute_uri(d.path)) for name, d in cfg.directions.items()},
    )


# ---------------------------------------------------------------------------------------------------- files
def files_workers_open(cfg: CLCAEConfig, stage: str, resuming: bool) -> list[tuple[str, str]]:
    """(config key, URI) of each file a worker reads while building its stage."""
    files = [("generator.checkpoint", cfg.generator.checkpoint)]
    if not resuming:  # on resume the encoder's weights come from the run's checkpoint
        files.append(("encoder.pretrained", cfg.encoder.pretrained))
    loss = cfg.loss
    if stage == "inversion" and loss.id > 0 and loss.id_network != "none":
        files.append(("loss.id_weights", loss.id_weights))
    c = cfg.contrastive
    if stage == "inversion" and cfg.uses_align and not c.checkpoint:
        files += [("contrastive.official_image", c.official_image), ("contrastive.official_latent", c.official_latent)]
    return [(key, uri) for key, uri in files if uri]


def check_files(cfg: CLCAEConfig, stage: str, resuming: bool) -> None:
    missing = [f"{key} = {uri}" for key, uri in files_workers_open(cfg, stage, resuming)
               if not exists(uri, cfg.storage)]
    if missing:
        raise TrainSetupError("file(s) the workers would open do not exist:\n  " + "\n  ".join(missing)
                              + "\nfix the path, or unset the setting (see README: Weights)")


# ---------------------------------------------------------------------------------------------------- data
def count_rows(files: Sequence[str], storage: StorageConfig) -> int:
    """Rows in Parquet shards, from their footers (one small read per file, in parallel)."""

    def rows(uri: str) -> int:
        fs, path = filesystem(uri, storage)
        with storage_errors(uri, storage), fs.open(path, "rb") as fh:
            return pq.ParquetFile(fh).metadata.num_rows

    with ThreadPoolExecutor(min(16, max(1, len(files)))) as pool:
        return sum(pool.map(rows, files))


def check_batches(cfg: CLCAEConfig, rows: int, key: str) -> None:
    """Every worker must get at least one full batch: Ray splits the dataset into equal shards of
    ``rows // num_workers`` rows, and the loop drops the last partial batch."""
    workers, batch = cfg.train.num_workers, cfg.data.batch_size
    per_worker = rows // workers
    if per_worker < batch:
        raise TrainSetupError(
            f"data.batch_size = {batch} is larger than each worker's share of {key}: {rows} rows over "
            f"train.num_workers = {workers} gives {per_worker} per worker. Lower data.batch_size to at most "
            f"{max(per_worker, 1)}, use fewer workers, or add data.")


# ---------------------------------------------------------------------------------------------------- resume
def newest_checkpoint(run_uri: str, storage: StorageConfig) -> str | None:
    """URI of the newest ``checkpoint_*/`` directory holding a checkpoint.pt in a run, or None."""
    fs, path = filesystem(run_uri, storage)
    with storage_errors(run_uri, storage):
        found = sorted(fs.glob(f"{path.rstrip('/')}/checkpoint_*/{CHECKPOINT_FILE}"))
    return with_protocol(run_uri, found[-1].rsplit("/", 1)[0]) if found else None


def checkpoint_meta(checkpoint_dir: str, storage: StorageConfig) -> dict[str, Any]:
    """{"kind", "step", "config"} of a checkpoint directory: its small sidecar, or (checkpoints written before
    the sidecar existed) the checkpoint itself."""
    meta = join(checkpoint_dir, CHECKPOINT_META)
    fs, path = filesystem(meta, storage)
    with storage_errors(meta, storage):
        if fs.exists(path):
            with fs.open(path, "rb") as fh:
                return json.load(fh)

    ckpt = read_checkpoint(join(checkpoint_dir, CHECKPOINT_FILE))
    return {"kind": ckpt.get("kind"), "step": ckpt.get("step"), "config": ckpt.get("config", {})}


def check_resume(cfg: CLCAEConfig, stage: str, run_name: str, run_uri: str) -> bool:
    """Whether the run resumes; raises when its checkpoints cannot be loaded by this stage and config."""
    newest = newest_checkpoint(run_uri, cfg.storage)
    if newest is None:
        return False
    meta = checkpoint_meta(newest, cfg.storage)
    if meta.get("kind") != stage:
        other = "stage 1" if meta.get("kind") == "contrastive" else "stage 2"
        hint = (f"pass it as contrastive.checkpoint={run_uri}" if meta.get("kind") == "contrastive" else
                "give stage 1 its own run name")
        raise TrainSetupError(
            f"--run-name {run_name!r} already holds {other} ({meta.get('kind')!r}) checkpoints ({newest}), "
            f"so stage={stage} would resume from them and fail: choose another run name for this stage; "
            f"to use that run, {hint}")
    keys = ARCHITECTURE_KEYS + (CONTRASTIVE_KEYS if stage == "contrastive" else ())
    saved, now = meta.get("config") or {}, dataclasses.asdict(cfg)
    changed = [f"{k}: {_get(saved, k)!r} in the run, {_get(now, k)!r} now" for k in keys
               if _get(saved, k) is not None and _get(saved, k) != _get(now, k)]
    if changed:
        raise TrainSetupError(
            f"--run-name {run_name!r} resumes from {newest}, whose model does not fit this config:\n  "
            + "\n  ".join(changed) + "\nuse the run's settings to resume it, or another run name to start anew")
    log.info("%s resumes from %s (step %s)", run_name, newest, meta.get("step"))
    return True


def _get(d: dict[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(d, dict):
            return None
        d = d.get(part)
    return d
