"""Training on Ray Train: both stages end to end, fault tolerance (SIGKILL of a worker, a killed driver),
resubmission, S3 for shards and checkpoints, and errors raised before any worker starts."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import kill_session

from clcae.config import ConfigError, load_config
from clcae.data.shards import ShardError
from clcae.data.synthesis import synthesize
from clcae.errors import ClusterCapacityError
from clcae.inference import Inverter
from clcae.train.loop import Faults, TrainSetupError, fit

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def cfg_for(tmp: Path, *overrides: str):
    return load_config(ROOT / "configs" / "tiny.yaml", [
        f"train.storage_path={tmp / 'runs'}", "data.batch_size=2", "train.log_every=1", "train.cpus_per_worker=0.5",
        "train.max_failures=0", *overrides])


@pytest.fixture(scope="module")
def pairs(ray_cluster, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pairs")
    synthesize(load_config(ROOT / "configs" / "tiny.yaml"), str(out), n=24, rows_per_shard=12)
    return out


@pytest.fixture(scope="module")
def stage1(ray_cluster, pairs, tmp_path_factory) -> Path:
    """A finished 3-step stage-1 run; returns its storage root (the run is ``runs/s1`` under it)."""
    root = tmp_path_factory.mktemp("stage1")
    fit(cfg_for(root, f"data.pairs=[{pairs}]", "train.max_steps=3", "train.checkpoint_every=3"), "contrastive", "s1")
    return root


def read_steps(path: Path) -> list[int]:
    return [int(x) for x in path.read_text().split()] if path.exists() else []


def test_synthesis_is_deterministic_and_resumable(ray_cluster, pairs, tmp_path):
    cfg = load_config(ROOT / "configs" / "tiny.yaml")
    files = sorted(p.name for p in pairs.glob("*.parquet"))
    assert files == ["pairs-000000000-000000011.parquet", "pairs-000000012-000000023.parquet"]
    again = synthesize(cfg, str(tmp_path), n=12, start_seed=12, rows_per_shard=12)
    assert again["shards_written"] == 1
    assert (tmp_path / files[1]).read_bytes() == (pairs / files[1]).read_bytes()  # same seeds, same bytes
    assert synthesize(cfg, str(tmp_path), n=12, start_seed=12, rows_per_shard=12)["shards_written"] == 0


def test_both_stages_train_checkpoint_and_feed_the_inverter(ray_cluster, pairs, tmp_path):
    s1 = cfg_for(tmp_path, f"data.pairs=[{pairs}]", "train.max_steps=3", "train.checkpoint_every=3")
    r1 = fit(s1, "contrastive", "s1")
    assert r1.metrics["step"] == 3 and r1.checkpoint is not None
    assert (tmp_path / "runs" / "s1" / "checkpoint_000003" / "checkpoint.pt").exists()

    s2 = cfg_for(tmp_path, f"data.train=[{pairs}]", f"contrastive.checkpoint={tmp_path / 'runs' / 's1'}",
                 "train.max_steps=4", "train.checkpoint_every=2", "train.sample_every=2")
    r2 = fit(s2, "inversion", "s2")
    assert r2.metrics["step"] == 4 and "align" in r2.metrics and "lpips/f" in r2.metrics
    run = tmp_path / "runs" / "s2"
    assert (run / "samples" / "step_000002.png").exists() and (run / "samples" / "step_000004.png").exists()
    inv = Inverter.from_pretrained(str(run / "checkpoint_000004" / "checkpoint.pt"), device="cpu")
    assert inv.model_id == "s2@4"
    assert inv.invert(torch.zeros(1, 3, 64, 64)).image.shape == (1, 3, 64, 64)


def test_worker_sigkill_resumes_from_last_checkpoint(ray_cluster, pairs, tmp_path):
    log = tmp_path / "steps.log"
    cfg = cfg_for(tmp_path, f"data.train=[{pairs}]", "model.use_align=false", "train.num_workers=2",
                  "train.max_steps=8", "train.checkpoint_every=3", "train.sample_every=100", "train.max_failures=2")
    faults = Faults(rank=1, step=5, marker=str(tmp_path / "killed"), step_log=str(log))
    result = fit(cfg, "inversion", "ft", faults=faults)
    assert (tmp_path / "killed").exists()  # the worker really died
    assert result.metrics["step"] == 8
    steps = read_steps(log)
    assert steps[-1] == 8 and set(steps) == set(range(1, 9))
    repeated = len(steps) - len(set(steps))
    assert 1 <= repeated <= cfg.train.checkpoint_every  # resumed from step 3: at most one interval redone
    assert steps[steps.index(5) + 1] == 4  # after the kill at step 5 the run restarted at step 4


def test_resubmitting_the_same_run_name_resumes(ray_cluster, pairs, tmp_path):
    log = tmp_path / "steps.log"
    base = [f"data.train=[{pairs}]", "model.use_align=false", "train.checkpoint_every=2", "train.sample_every=100"]
    fit(cfg_for(tmp_path, *base, "train.max_steps=2"), "inversion", "again", Faults(step_log=str(log)))
    fit(cfg_for(tmp_path, *base, "train.max_steps=4"), "inversion", "again", Faults(step_log=str(log)))
    assert read_steps(log) == [1, 2, 3, 4]


def test_killed_driver_then_resubmitted_job_resumes(ray_cluster, pairs, tmp_path):
    """A driver killed mid-run (as when a job's driver dies) leaves checkpoints; the same command resumes."""
    args = [sys.executable, str(ROOT / "jobs" / "train.py"), "stage=inversion", "--config",
            str(ROOT / "configs" / "tiny.yaml"), "--run-name", "driver", "--num-cpus", "4",
            f"train.storage_path={tmp_path / 'runs'}", f"data.train=[{pairs}]", "model.use_align=false",
            "data.batch_size=2", "train.cpus_per_worker=0.5", "train.checkpoint_every=2", "train.max_steps=400",
            "train.sample_every=1000"]
    env = {**os.environ, "RAY_ADDRESS": ""}
    log_file = open(tmp_path / "driver.log", "wb")  # noqa: SIM115 - closed below, after the process is gone
    proc = subprocess.Popen(args, env=env, start_new_session=True, stdout=log_file, stderr=subprocess.STDOUT)
    # wait for the second checkpoint: by then the first is registered in Ray's run snapshot (a directory can
    # exist a moment before its registration, and a kill in between leaves nothing to resume from)
    first = tmp_path / "runs" / "driver" / "checkpoint_000004"
    try:
        deadline = time.time() + 240  # a whole Ray cluster starts in the subprocess: generous under load
        while not first.exists() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.5)
    finally:
        kill_session(proc.pid)  # the driver and the whole local Ray cluster it started
        proc.wait()
        log_file.close()
    assert first.exists(), "no checkpoint from the first driver:\n" + (tmp_path / "driver.log").read_text()[-3000:]
    saved = sorted(int(p.name.split("_")[1]) for p in (tmp_path / "runs" / "driver").glob("checkpoint_0*"))
    log = tmp_path / "steps.log"
    cfg = cfg_for(tmp_path, f"data.train=[{pairs}]", "model.use_align=false", "train.checkpoint_every=2",
                  "train.sample_every=1000", f"train.max_steps={saved[-1] + 4}")
    result = fit(cfg, "inversion", "driver", Faults(step_log=str(log)))
    steps = read_steps(log)
    # resumed from a checkpoint the killed driver left (not from scratch), and finished the run
    assert steps[0] > 1 and steps[0] - 1 in saved
    assert steps == list(range(steps[0], saved[-1] + 5)) and result.metrics["step"] == saved[-1] + 4


def test_training_reads_shards_from_and_checkpoints_to_s3(s3_server, ray_cluster, tmp_path):
    bucket = s3_server.create_bucket()
    storage = [f"storage.endpoint_url={s3_server.storage.endpoint_url}", f"storage.region={s3_server.storage.region}",
               "storage.key=testing", "storage.secret=testing"]
    cfg = cfg_for(tmp_path, *storage, f"train.storage_path={bucket}/runs")
    synthesize(cfg, f"{bucket}/pairs", n=8, rows_per_shard=8)
    cfg = cfg_for(tmp_path, *storage, f"train.storage_path={bucket}/runs", f"data.pairs=[{bucket}/pairs]",
                  "train.max_steps=2", "train.checkpoint_every=2")
    result = fit(cfg, "contrastive", "s3run")
    assert result.metrics["step"] == 2
    from clcae.data.storage import filesystem

    fs, path = filesystem(f"{bucket}/runs/s3run", cfg.storage)
    assert fs.exists(f"{path}/checkpoint_000002/checkpoint.pt")
    # TensorBoard events are uploaded beside the checkpoints
    events = fs.glob(f"{path}/**/events.out.tfevents.*")
    assert events, fs.find(path)
    local = tmp_path / "tb"
    for e in events:
        fs.get(e, str(local / e[len(path) + 1:]))
    from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer

    mux = EventMultiplexer(size_guidance={"scalars": 0}).AddRunsFromDirectory(str(local)).Reload()
    ((run, tags),) = mux.Runs().items()
    assert "loss" in tags["scalars"] and [e.step for e in mux.Scalars(run, "loss")] == [1, 2]


def test_setup_errors_come_before_any_worker_starts(ray_cluster, pairs, tmp_path, monkeypatch):
    with pytest.raises(TrainSetupError, match="contrastive.checkpoint"):
        fit(cfg_for(tmp_path, f"data.train=[{pairs}]"), "inversion", "x")
    with pytest.raises(TrainSetupError, match="not found"):
        fit(cfg_for(tmp_path, f"data.train=[{pairs}]", f"contrastive.checkpoint={tmp_path / 'nope'}"), "inversion", "x")
    with pytest.raises(TrainSetupError, match="data.pairs is empty"):
        fit(cfg_for(tmp_path), "contrastive", "x")
    with pytest.raises(ShardError, match="missing"):
        fit(cfg_for(tmp_path, f"data.pairs=[{tmp_path / 'missing'}]"), "contrastive", "x")
    import pyarrow as pa
    import pyarrow.parquet as pq

    bad = tmp_path / "bad"
    bad.mkdir()
    pq.write_table(pa.table({"key": ["a"], "img": [b"x"]}), bad / "shard-00000.parquet")
    with pytest.raises(ShardError, match="shard-00000.parquet"):
        fit(cfg_for(tmp_path, f"data.train=[{bad}]", "model.use_align=false"), "inversion", "x")
    # Ray Train waited for a GPU this local Ray will never have, without a word (measured: 100 s, then killed)
    import ray.train.torch

    monkeypatch.setattr(ray.train.torch, "TorchTrainer", lambda *a, **k: pytest.fail("a trainer was started"))
    with pytest.raises(ClusterCapacityError, match=r"1 worker\(s\) of .* need 1 GPUs \(the cluster has 0\)"):
        fit(cfg_for(tmp_path, f"data.pairs=[{pairs}]", "train.use_gpu=true"), "contrastive", "x")
    with pytest.raises(ClusterCapacityError, match=r"need 500 CPUs \(the cluster has 4\)"):
        fit(cfg_for(tmp_path, f"data.pairs=[{pairs}]", "train.cpus_per_worker=500"), "contrastive", "x")


def test_relative_paths_are_resolved_in_the_driver(ray_cluster, pairs, stage1, tmp_path, monkeypatch):
    """The README's own example: contrastive.checkpoint=runs/tiny-s1, relative to where the command runs
    (the workers chdir elsewhere), as are the shards and the storage path."""
    monkeypatch.chdir(stage1)
    cfg = load_config(ROOT / "configs" / "tiny.yaml", [
        "train.storage_path=runs", f"data.train=[{os.path.relpath(pairs, stage1)}]", "contrastive.checkpoint=runs/s1",
        "data.batch_size=2", "train.cpus_per_worker=0.5", "train.max_failures=0", "train.max_steps=2",
        "train.checkpoint_every=2", "train.sample_every=100"])
    result = fit(cfg, "inversion", "relative")
    assert result.metrics["step"] == 2 and "align" in result.metrics
    assert (stage1 / "runs" / "relative" / "checkpoint_000002" / "checkpoint.pt").exists()


def test_errors_that_cannot_succeed_on_retry_fail_once_in_the_driver(ray_cluster, pairs, stage1, tmp_path):
    """Each of these used to start the workers and fail in all of them, max_failures + 1 times."""
    def fails(cfg, stage: str, name: str, error: type[Exception], match: str) -> None:
        run = Path(cfg.train.storage_path) / name
        before = sorted(run.rglob("*")) if run.exists() else []
        with pytest.raises(error, match=match):
            fit(cfg, stage, name)
        assert (sorted(run.rglob("*")) if run.exists() else []) == before, "a trainer started"

    retried = "train.max_failures=3"
    # 24 rows split over 2 workers: 12 each, no full batch of 13
    fails(cfg_for(tmp_path, f"data.pairs=[{pairs}]", "data.batch_size=13", "train.num_workers=2", retried),
          "contrastive", "big", TrainSetupError, "data.batch_size")
    # a stage-1 run name given to stage 2: it would resume the contrastive checkpoint as an inversion model
    fails(cfg_for(stage1, f"data.train=[{pairs}]", "model.use_align=false", retried), "inversion", "s1",
          TrainSetupError, "contrastive")
    # files the workers would open
    fails(cfg_for(tmp_path, f"data.pairs=[{pairs}]", f"generator.checkpoint={tmp_path / 'g.pt'}", retried),
          "contrastive", "nogen", TrainSetupError, "generator.checkpoint")
    fails(cfg_for(tmp_path, f"data.train=[{pairs}]", "model.use_align=false", "loss.id_network=arcface",
                  f"loss.id_weights={tmp_path / 'id.pth'}", retried), "inversion", "noid", TrainSetupError,
          "loss.id_weights")
    # a config changed after loading (as bench/ and notebooks do) is validated again
    cfg = cfg_for(tmp_path, f"data.pairs=[{pairs}]", retried)
    cfg.data.batch_size = 0
    fails(cfg, "contrastive", "badcfg", ConfigError, "data.batch_size")


def test_each_rank_draws_its_own_random_numbers_and_resumes_its_own_stream(ray_cluster, pairs, tmp_path):
    draws = tmp_path / "draws"
    cfg = cfg_for(tmp_path, f"data.train=[{pairs}]", "model.use_align=false", "train.num_workers=2",
                  "train.max_steps=6", "train.checkpoint_every=3", "train.sample_every=100", "train.max_failures=1")
    faults = Faults(rank=1, step=5, marker=str(tmp_path / "killed"), rng_log=str(draws))
    fit(cfg, "inversion", "rng", faults=faults)
    assert (tmp_path / "killed").exists()

    def logged(rank: int) -> list[tuple[int, float]]:
        lines = (draws / f"rank{rank}.log").read_text().split("\n")
        return [(int(s), float(v)) for s, v in (line.split() for line in lines if line)]

    per_rank = [logged(0), logged(1)]
    first = [dict(log[:3]) for log in per_rank]  # steps 1-3, before the kill
    assert all(first[0][s] != first[1][s] for s in (1, 2, 3)), "both ranks draw the same random numbers"
    for rank, log in enumerate(per_rank):
        steps = [s for s, _ in log]
        assert steps.count(4) == 2, f"rank {rank} did not redo step 4 after the resume: {steps}"
        by_step: dict[int, set[float]] = {}
        for s, v in log:
            by_step.setdefault(s, set()).add(v)
        # after the resume from step 3 each rank continues exactly the stream it had drawn from before
        assert all(len(v) == 1 for v in by_step.values()), f"rank {rank} changed its stream on resume: {log}"


def test_tensorboard_events_for_both_stages(ray_cluster, pairs, stage1, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    def events(run: Path) -> EventAccumulator:
        files = list(run.rglob("events.out.tfevents.*"))
        assert files, f"no TensorBoard event files under {run}"
        acc = EventAccumulator(str(files[0].parent), size_guidance={"scalars": 0, "images": 0})
        return acc.Reload()

    s1 = events(stage1 / "runs" / "s1")
    for tag in ("loss", "logit_scale", "accuracy", "lr", "images_per_s"):
        assert [e.step for e in s1.Scalars(tag)] == [1, 2, 3], tag

    cfg = cfg_for(tmp_path, f"data.train=[{pairs}]", "model.use_align=false", "train.max_steps=2",
                  "train.checkpoint_every=2", "train.sample_every=2")
    fit(cfg, "inversion", "tb")
    s2 = events(tmp_path / "runs" / "tb")
    for tag in ("total", "l2/w", "lpips/f", "lr", "images_per_s"):
        assert [e.step for e in s2.Scalars(tag)] == [1, 2], tag
    assert s2.Scalars("lr")[-1].value == pytest.approx(cfg.optim.lr)
    (image,) = s2.Images("samples")
    assert image.step == 2 and image.encoded_image_string.startswith(b"\x89PNG")
    assert (image.width, image.height) == (4 * 64, 2 * 64)  # input | G(w) | G(w+) | G(w+, f), one row per image
