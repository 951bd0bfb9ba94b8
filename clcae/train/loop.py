"""The Ray Train side of both stages: one ``train_loop_per_worker`` (the stage picks the step function), the
checkpoint/resume code, and ``fit`` that wires datasets, storage and fault tolerance into a TorchTrainer.

Checkpoints are our platform format (``clcae.checkpoints.save_checkpoint``) with the optimiser, step and RNG
state added, one ``checkpoint.pt`` per ``checkpoint_{step:06d}`` directory under
``{train.storage_path}/{run_name}/``.  The same file feeds ``Inverter.from_checkpoint`` and stage 2.

Random numbers: models are built from the config's seeds without touching the global generator, then each rank
draws from its own stream (``seed + rank``: hflip, dropout). Every rank's stream is saved in the checkpoint
(``rng["ranks"][r]``) and rank r resumes its own.

Everything a retry cannot fix (config, paths, files, data size, a run name holding the other stage) is checked
in the driver first (:mod:`clcae.train.preflight`); TensorBoard events go beside the checkpoints
(:mod:`clcae.train.events`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from clcae.checkpoints import read_checkpoint, save_checkpoint
from clcae.config import CLCAEConfig, from_dict, to_dict, validate
from clcae.data.images import image_grid, tensor_to_pil, uint8_to_unit
from clcae.data.shards import decode_batch, open_shards, validate_shards
from clcae.data.storage import check_access, filesystem, pyarrow_filesystem
from clcae.device import keep_freed_memory
from clcae.factory import build_aligner, build_clcae, build_generator
from clcae.pretrained import load, prepare
from clcae.train.events import EventLog
from clcae.train.preflight import (
    CHECKPOINT_FILE,
    CHECKPOINT_META,
    TrainSetupError,
    absolute_uri,
    check_batches,
    check_files,
    check_resume,
    count_rows,
    resolve_paths,
)
from clcae.train.progress import follow
from clcae.train.runtime import fixed_size_cluster, require_resources
from clcae.train.steps import ContrastiveStep, InversionStep
from clcae.weights import init_encoder_from_contrastive, load_into, load_irse_into_encoder, load_official_contrastive

log = logging.getLogger(__name__)

STAGES = ("contrastive", "inversion")


# ---------------------------------------------------------------------------------------- building a stage
def build_stage(cfg: CLCAEConfig, stage: str, stage1: str | None, resuming: bool,
                init_from: dict[str, Any] | None = None):
    """The step object of a stage, with its models built (generator, encoder, frozen stage-1 module).
    ``init_from``: ``{"source", "config"}`` from :func:`init_source` (stage 2 fine-tuning a trained model).

    Everything is built from ``cfg.seed`` in a forked random stream: every rank builds the same modules (a
    random LPIPS trunk or ID network must be one instrument on all ranks), and the caller's stream, which
    the loop seeded per rank, is left as it was.
    """
    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(cfg.seed)
        return _build_stage(cfg, stage, stage1, resuming, init_from)


def _build_stage(cfg: CLCAEConfig, stage: str, stage1: str | None, resuming: bool,
                 init_from: dict[str, Any] | None = None):
    generator, latent_avg = build_generator(cfg)
    model = build_clcae(cfg, generator, latent_avg, load_pretrained=not resuming)
    x_avg = model.x_avg
    if stage == "contrastive":
        aligner = build_aligner(cfg, x_avg, latent_avg)
        if not resuming and cfg.encoder.pretrained:
            load_irse_into_encoder(cfg.encoder.pretrained, aligner.image_encoder.encoder)
        return ContrastiveStep(cfg, aligner)
    aligner = None
    if stage1 is not None:
        aligner = load_stage1(cfg, stage1, x_avg, latent_avg)
    elif cfg.uses_align and cfg.contrastive.official_image:
        # the authors' released stage-1 pair (best_model_image.pt + best_model_latent.pt)
        aligner = build_aligner(cfg, x_avg, latent_avg)
        load_official_contrastive(cfg.contrastive.official_image, cfg.contrastive.official_latent, aligner)
    if aligner is not None and not resuming:
        init_encoder_from_contrastive(aligner, model)
    if init_from is not None and not resuming:
        trained = load(init_from["source"], from_dict(init_from["config"]))
        model.encoder.load_state_dict(trained.encoder.state_dict())
    return InversionStep(cfg, model, aligner)


# what must agree between a run's config and the model it fine-tunes (``train.init_from``)
_ARCHITECTURE_KEYS = {
    "generator": ("size", "style_dim", "n_mlp", "channel_multiplier", "channel_max", "crop"),
    "encoder": ("backbone", "input_size"),
    "model": ("variant", "w_attention", "f_attention", "feature", "center_input", "attention_heads",
              "attention_ffn", "attention_tokens"),
}


def init_source(cfg: CLCAEConfig) -> dict[str, Any] | None:
    """Driver side of ``train.init_from``: resolve the model once (a missing file or an architecture that does
    not match this run fails here, before any worker starts) and hand the workers what they need to load it."""
    if not cfg.train.init_from:
        return None

    source, model_cfg = prepare(cfg.train.init_from, cfg)
    differ = [f"{sec}.{k}: model {getattr(getattr(model_cfg, sec), k)!r}, run {getattr(getattr(cfg, sec), k)!r}"
              for sec, keys in _ARCHITECTURE_KEYS.items() for k in keys
              if getattr(getattr(model_cfg, sec), k) != getattr(getattr(cfg, sec), k)]
    if differ:
        raise TrainSetupError(f"train.init_from = {cfg.train.init_from}: its architecture differs from this run's "
                              "config; set these in the config to the model's values:\n  " + "\n  ".join(differ))
    return {"source": source, "config": to_dict(model_cfg)}


def load_stage1(cfg: CLCAEConfig, uri: str, x_avg: torch.Tensor, latent_avg: torch.Tensor):
    aligner = build_aligner(cfg, x_avg, latent_avg)
    ckpt = read_checkpoint(uri, kind="contrastive")
    load_into(aligner, ckpt["state_dict"], uri, "contrastive module")
    return aligner


def stage1_source(cfg: CLCAEConfig) -> str | None:
    """The stage-1 checkpoint file stage 2 needs (None when L_align is off); a run directory means its newest."""
    if not cfg.uses_align:
        return None
    uri = cfg.contrastive.checkpoint
    if not uri and cfg.contrastive.official_image:
        return None  # the authors' pair, loaded by build_stage
    if not uri:
        raise TrainSetupError("stage 2 needs the stage-1 contrastive module for L_align: set contrastive.checkpoint "
                              "to a stage-1 checkpoint (a checkpoint.pt or its run directory), or turn L_align off "
                              "with model.use_align=false")
    return resolve_checkpoint(uri, cfg)


def resolve_checkpoint(uri: str, cfg: CLCAEConfig) -> str:
    """A checkpoint file URI, or a run directory -> its newest ``checkpoint_*/checkpoint.pt``."""
    fs, path = filesystem(uri, cfg.storage)
    if fs.isfile(path):
        return uri
    if fs.isdir(path):
        found = sorted(p for p in fs.glob(f"{path.rstrip('/')}/checkpoint_*/{CHECKPOINT_FILE}"))
        if found:
            return uri.rstrip("/") + "/" + found[-1][len(path.rstrip("/")) + 1:]
        raise TrainSetupError(f"no checkpoint_*/{CHECKPOINT_FILE} under {uri}: "
                              "has its stage-1 run written a checkpoint?")
    raise TrainSetupError(f"stage-1 checkpoint not found: {uri}")


# ---------------------------------------------------------------------------------------- the worker loop
@dataclass
class Faults:
    """Fault injection for tests and drills: rank ``rank`` SIGKILLs itself at ``step`` on the first attempt
    (``marker`` records that it happened); every executed step is appended to ``step_log`` by rank 0; with
    ``rng_log`` (a folder) every rank appends ``step value`` to ``rank{r}.log``, where value is the next number
    its random stream would draw (peeked, not consumed).

    ``hold_step``/``hold_marker``: every rank stops before ``hold_step`` until the file ``hold_marker`` exists
    (at most ``hold_s`` seconds), after the checkpoints reported so far are registered, and touches
    ``{hold_marker}.rank{r}`` when it stops there: a drill kills a node at a known step, then creates the file.
    Once the file exists nobody stops (a restarted run goes through)."""

    rank: int = -1
    step: int = -1
    marker: str | None = None
    step_log: str | None = None
    rng_log: str | None = None
    hold_step: int = -1
    hold_marker: str | None = None
    hold_s: float = 300.0


def _rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":  # dropout on a GPU draws from the device's generator
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _all_rng_states(device: torch.device, world: int) -> list[dict[str, torch.Tensor]]:
    """Every rank's random state, indexed by rank (a collective: every rank calls it at the same step)."""
    mine = _rng_state(device)
    if world == 1:
        return [mine]
    import torch.distributed as dist

    states: list[dict[str, torch.Tensor] | None] = [None] * world
    dist.all_gather_object(states, mine)
    return [{k: v.cpu() for k, v in s.items()} for s in states]


def _restore_rng(rng: dict, rank: int, device: torch.device) -> None:
    """Rank ``rank`` continues its own saved stream. A checkpoint from before per-rank states (one CPU state,
    rank 0's) or from fewer workers leaves the other ranks on their fresh ``seed + rank`` streams."""
    states = rng.get("ranks", [rng])
    if rank >= len(states):
        log.warning("rank %d: the checkpoint holds random states for %d rank(s); this rank keeps a fresh stream",
                    rank, len(states))
        return
    torch.set_rng_state(states[rank]["torch"].cpu())
    if "cuda" in states[rank] and device.type == "cuda":
        torch.cuda.set_rng_state(states[rank]["cuda"].cpu(), device)


def _restore(step_obj, ckpt, device: torch.device, rank: int) -> int:
    with ckpt.as_directory() as d:
        state = torch.load(Path(d) / CHECKPOINT_FILE, map_location=device, weights_only=True)
    step_obj.model.load_state_dict(state["state_dict"])
    step_obj.load_training_state(state, device)
    _restore_rng(state["rng"], rank, device)
    return int(state["step"])


def _save(step_obj, cfg: CLCAEConfig, stage: str, step: int, directory: str, run_name: str,
          rng: list[dict[str, torch.Tensor]]) -> None:
    save_checkpoint(Path(directory) / CHECKPOINT_FILE, stage, step_obj.model, to_dict(cfg),
                    **step_obj.training_state(), step=step, rng={"ranks": rng},
                    model_id=f"{run_name}@{step}")
    # the driver checks a resume against this instead of downloading the checkpoint
    (Path(directory) / CHECKPOINT_META).write_text(json.dumps({"kind": stage, "step": step, "config": to_dict(cfg)}))


def _write_samples(columns: list[torch.Tensor], uri: str, cfg: CLCAEConfig) -> Image.Image:
    """Write the sample grid PNG to ``uri``; returns the grid (a PIL image) for TensorBoard."""
    rows = list(zip(*[tensor_to_pil(c) for c in columns]))
    grid = image_grid(rows)
    fs, path = filesystem(uri, cfg.storage)
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    with fs.open(path, "wb") as fh:
        grid.save(fh, format="PNG")
    return grid


def _inject(faults: Faults, rank: int, step: int) -> None:
    if faults.step_log and rank == 0:
        with open(faults.step_log, "a") as fh:
            fh.write(f"{step}\n")
    if faults.rng_log:
        with torch.random.fork_rng(devices=[]):
            peek = torch.rand(()).item()
        os.makedirs(faults.rng_log, exist_ok=True)
        with open(Path(faults.rng_log) / f"rank{rank}.log", "a") as fh:
            fh.write(f"{step} {peek!r}\n")
    if step == faults.hold_step and faults.hold_marker and not os.path.exists(faults.hold_marker):
        import ray.train

        ray.train.get_all_reported_checkpoints()  # what a drill kills here resumes from a registered checkpoint
        Path(f"{faults.hold_marker}.rank{rank}").touch()
        deadline = time.monotonic() + faults.hold_s
        while not os.path.exists(faults.hold_marker) and time.monotonic() < deadline:
            time.sleep(0.05)
    if rank == faults.rank and step == faults.step and faults.marker and not os.path.exists(faults.marker):
        import ray.train

        ray.train.get_all_reported_checkpoints()  # make sure the controller has registered what we reported
        Path(faults.marker).touch()
        os.kill(os.getpid(), signal.SIGKILL)


def random_hflip(images: torch.Tensor) -> torch.Tensor:
    """Flip a random half of the batch left-right (the pSp/CLCAE training augmentation)."""
    flip = torch.rand(images.shape[0], device=images.device) < 0.5
    return torch.where(flip[:, None, None, None], images.flip(-1), images)


def train_loop_per_worker(loop_config: dict[str, Any]) -> dict[str, float]:
    import ray.train
    import ray.train.torch

    cfg = from_dict(loop_config["config"])
    stage, run_name = loop_config["stage"], loop_config["run_name"]
    faults = Faults(**loop_config.get("faults", {}))
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        keep_freed_memory()
    torch.manual_seed(cfg.seed + rank)  # this rank's own stream (hflip, dropout); building leaves it alone

    ckpt = ray.train.get_checkpoint()
    step_obj = build_stage(cfg, stage, loop_config.get("stage1"), resuming=ckpt is not None,
                           init_from=loop_config.get("init_from")).to(device)
    step = _restore(step_obj, ckpt, device, rank) if ckpt is not None else 0
    if ckpt is not None:
        log.info("rank %d resumed %s at step %d", rank, run_name, step)
    if world > 1:
        step_obj.distribute(device)

    shard = ray.train.get_dataset_shard("train")
    metrics: dict[str, float] = {}
    events: EventLog | None = None
    if rank == 0:  # one writer per run: TensorBoard beside the checkpoints

        events = EventLog(loop_config["run_uri"], cfg.storage, resumed_step=step if ckpt is not None else None)
    after = _AfterStep(cfg, stage, run_name, loop_config["run_uri"], rank, world, device, step_obj, events)
    with events if events is not None else contextlib.nullcontext():
        while step < cfg.train.max_steps:
            batches = 0
            for batch in shard.iter_torch_batches(batch_size=cfg.data.batch_size, drop_last=True, device=device):
                batches += 1
                images = uint8_to_unit(batch["image"])  # uint8 (B, H, W, 3) on the device -> float (B, 3, H, W)
                if stage == "inversion" and cfg.data.hflip:
                    images = random_hflip(images)
                step += 1
                _inject(faults, rank, step)
                metrics = step_obj(images, batch["w"], step) if stage == "contrastive" else step_obj(images, step)
                metrics = after(step, metrics, images)
                if step >= cfg.train.max_steps:
                    break
            if batches == 0:
                raise RuntimeError(f"rank {rank} got no full batch of {cfg.data.batch_size} from its data shard: "
                                   "add data or lower data.batch_size")
    return {k: float(v) for k, v in metrics.items()}


class _AfterStep:
    """What follows a training step on every rank: the checkpoint (every rank's random state, written by rank 0),
    the sample grid, TensorBoard, and ``ray.train.report`` at ``log_every`` / ``checkpoint_every`` /
    ``sample_every``."""

    def __init__(self, cfg: CLCAEConfig, stage: str, run_name: str, uri: str, rank: int, world: int,
                 device: torch.device, step_obj: Any, events: EventLog | None):
        self.cfg, self.stage, self.run_name, self.uri = cfg, stage, run_name, uri
        self.rank, self.world, self.device, self.step_obj, self.events = rank, world, device, step_obj, events
        self.t0, self.images_seen = time.perf_counter(), 0
        self.sample_batch: torch.Tensor | None = None  # the first batch this worker saw: the grid's inputs

    def __call__(self, step: int, metrics: dict[str, float], images: torch.Tensor) -> dict[str, float]:
        import ray.train

        t = self.cfg.train
        if self.sample_batch is None:
            self.sample_batch = images[:8].clone()
        self.images_seen += images.shape[0] * self.world
        report, checkpoint_dir = step % t.log_every == 0, None
        checkpointing = step % t.checkpoint_every == 0 or step == t.max_steps
        sampling = self.stage == "inversion" and (step % t.sample_every == 0 or step == t.max_steps)
        with tempfile.TemporaryDirectory() as tmp:
            if checkpointing:
                report = True
                rng = _all_rng_states(self.device, self.world)  # every rank's stream goes into rank 0's file
                if self.rank == 0:
                    _save(self.step_obj, self.cfg, self.stage, step, tmp, self.run_name, rng)
                    checkpoint_dir = tmp
            if self.events is not None and sampling:
                grid = _write_samples(self.step_obj.samples(self.sample_batch),
                                      f"{self.uri}/samples/step_{step:06d}.png", self.cfg)
                self.events.image("samples", grid, step)
            if not report:
                return metrics
            elapsed = time.perf_counter() - self.t0
            metrics = {**metrics, "step": step, "images_per_s": self.images_seen / max(elapsed, 1e-9)}
            if self.events is not None:
                lr = self.step_obj.optimizer.param_groups[0]["lr"]
                self.events.scalars({**{k: v for k, v in metrics.items() if k != "step"}, "lr": lr}, step)
                self.events.sync(force=checkpointing or sampling)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(checkpoint_dir)
                             if checkpoint_dir else None, checkpoint_dir_name=f"checkpoint_{step:06d}"
                             if checkpoint_dir else None)
        return metrics


# ---------------------------------------------------------------------------------------- driver side
def run_uri(cfg: CLCAEConfig, run_name: str) -> str:
    base = absolute_uri(cfg.train.storage_path)  # workers chdir elsewhere (RAY_CHDIR_TO_TRIAL_DIR)
    return f"{base.rstrip('/')}/{run_name}"


def build_dataset(cfg: CLCAEConfig, stage: str):
    """Validate the shards and check that every worker gets a full batch (clear errors before any worker
    starts), then a decoding Ray Dataset."""
    uris = cfg.data.pairs if stage == "contrastive" else cfg.data.train
    key = "data.pairs" if stage == "contrastive" else "data.train"
    if not uris:
        what, job = ("synthetic pair", "synthesize") if stage == "contrastive" else ("image", "make_shards")
        raise TrainSetupError(f"{key} is empty: point it at the {what} shards (jobs/{job}.py writes them)")
    files = validate_shards(list(uris), cfg.storage, need_w=stage == "contrastive")
    check_batches(cfg, count_rows(files, cfg.storage), key)
    columns = ["image", "w"] if stage == "contrastive" else ["image"]
    ds = open_shards(files, cfg.storage, columns=columns)
    size = tuple(cfg.encoder.input_size)
    return ds.map_batches(decode_batch, fn_kwargs={"size": size}, batch_format="numpy",
                          batch_size=cfg.data.batch_size)


def fit(cfg: CLCAEConfig, stage: str, run_name: str, faults: Faults | None = None):
    """Train a stage on the current Ray cluster; re-running with the same run_name resumes.

    Every error that a retry cannot fix is raised here, once, before a worker starts (ConfigError,
    TrainSetupError, ShardError, StorageError, WeightsError); a worker's failure is retried
    ``train.max_failures`` times from the newest checkpoint.
    """
    import ray.train
    from ray.train.torch import TorchTrainer

    if stage not in STAGES:
        raise TrainSetupError(f"stage must be one of {STAGES}, got {stage!r}")
    # Validated again: a config changed after loading (bench/, notebooks) would otherwise fail in the workers.
    # Paths are resolved here, against the directory the user ran the command from.
    cfg = resolve_paths(validate(cfg))
    uri = run_uri(cfg, run_name)
    check_access(cfg.train.storage_path, cfg.storage, write=True)
    resuming = check_resume(cfg, stage, run_name, uri)
    stage1 = stage1_source(cfg) if stage == "inversion" else None
    if stage1 is not None:
        read_checkpoint(stage1, kind="contrastive")  # fail here, not in every worker
    check_files(cfg, stage, resuming)
    init_from = init_source(cfg) if stage == "inversion" else None
    dataset = build_dataset(cfg, stage)
    fs, path = pyarrow_filesystem(cfg.train.storage_path, cfg.storage)
    t = cfg.train
    resources = {"CPU": t.cpus_per_worker, **({"GPU": 1} if t.use_gpu else {}), **t.resources_per_worker}
    # elastic: Ray Train starts and restarts with as many workers as fit, min_workers..num_workers
    workers = (t.min_workers, t.num_workers) if t.min_workers is not None and t.min_workers < t.num_workers \
        else t.num_workers
    if fixed_size_cluster() and ray.is_initialized():  # else Ray Train waits for the workers without end
        fewest = workers[0] if isinstance(workers, tuple) else workers
        require_resources(
            {k: fewest * v for k, v in resources.items()}, ray.cluster_resources(),
            f"training cannot start on this Ray cluster: {fewest} worker(s) of {resources}",
            "Lower train.num_workers (or train.min_workers), train.cpus_per_worker"
            + (", drop train.use_gpu where torch sees no CUDA device" if t.use_gpu else "")
            + ", or run on a cluster that has them (RAY_ADDRESS)")
    log.info("%s %s: %s to step %d on %s worker(s), every %d steps a line; run folder %s", stage, run_name,
             "resuming" if resuming else "training", t.max_steps,
             f"{workers[0]}-{workers[1]}" if isinstance(workers, tuple) else workers, t.log_every, uri)
    # the workers' output stays in Ray's logs: the driver prints rank 0's reports (clcae.train.progress)
    with follow(t.max_steps, f"{run_name}: ") as progress:
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config={"config": to_dict(cfg), "stage": stage, "run_name": run_name, "run_uri": uri,
                               "stage1": stage1, "init_from": init_from, "faults": vars(faults) if faults else {}},
            scaling_config=ray.train.ScalingConfig(num_workers=workers, use_gpu=t.use_gpu,
                                                   resources_per_worker=resources),
            run_config=ray.train.RunConfig(
                name=run_name, storage_path=path, storage_filesystem=fs,
                failure_config=ray.train.FailureConfig(max_failures=t.max_failures),
                checkpoint_config=ray.train.CheckpointConfig(num_to_keep=t.keep_checkpoints),
                callbacks=[progress],
            ),
            datasets={"train": dataset},
        )
        return trainer.fit()
