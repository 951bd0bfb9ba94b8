"""Node failures on a local multi-node Ray cluster (issue 15, items 1 and 2) and the bulk job under object-store
pressure (item 6).

The cluster (``ray.cluster_utils.Cluster``) is a head with no CPUs (drivers and Ray Train's controller, as in
cluster.yaml) and two worker nodes, each offering one ``slot``: a Train worker or an inversion actor asks for one,
so there is exactly one per node. A node is killed as a machine dies: every process on it (its raylet, object
store, agents and workers) gets SIGKILL at once. Checkpoints and shards live on S3 (the moto server): a dead
node's disk is gone with it. Failure detection is tuned for a test (GCS health check every second, dead after 3
missed): node death is noticed in about 3 s instead of Ray's default of about 15 s.
"""

from __future__ import annotations

import contextlib
import io
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from helpers import ROOT, read_output_table, tiny
from PIL import Image

sys.path.insert(0, str(ROOT))  # bench/ is not an installed package
from bench.memory import PeakMemory, descendants  # noqa: E402

pytestmark = pytest.mark.slow

TEMP_DIR = "/tmp/ray_mn"  # short: Unix socket paths
STORE = 80 * 2**20  # per node; Ray's minimum is 75 MiB
SYSTEM_CONFIG = {"enable_worker_prestart": False, "prestart_worker_first_driver": False,
                 # a dead raylet refuses the health check at once: 3 misses 1 s apart (default: 5 x 3 s)
                 "health_check_initial_delay_ms": 1000, "health_check_period_ms": 1000,
                 "health_check_timeout_ms": 2000, "health_check_failure_threshold": 3}
WORKER_NODE = {"num_cpus": 2, "resources": {"slot": 1}, "object_store_memory": STORE}


# --------------------------------------------------------------------------------------------- processes
# --------------------------------------------------------------------------------------------- cluster
@dataclass
class MultiNode:
    cluster: object
    workers: list = field(default_factory=list)

    def kill(self, node) -> float:
        """SIGKILL every process of ``node``, the raylet first (so nothing on the node can tell the GCS it is
        going: the GCS finds out by its health check, as when a machine dies); returns when (time.time())."""
        from ray._private import ray_constants

        raylet = node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid
        others = descendants(raylet)
        t = time.time()
        for pid in [raylet, *others]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.cluster.remove_node(node, allow_graceful=False)  # the node's other processes (agents, log monitor)
        self.workers.remove(node)
        return t

    def add(self):
        node = self.cluster.add_node(**WORKER_NODE)
        self.workers.append(node)
        return node


def node_alive(node_id: str) -> bool:
    import ray

    return any(n["NodeID"] == node_id and n["Alive"] for n in ray.nodes())


def wait_for(condition, timeout: float, what: str, every: float = 0.05) -> float:
    """Poll ``condition`` until true; returns the time (time.time()) it became true."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return time.time()
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


@pytest.fixture(scope="class")
def nodes(s3_server) -> Iterator[MultiNode]:
    """A head (no CPUs) and two worker nodes (2 CPUs and one ``slot`` each), on this host."""
    import ray
    from ray import cluster_utils

    if ray.is_initialized():
        ray.shutdown()
    # Cluster writes its address to /tmp/ray/ray_current_cluster (and deletes it at shutdown): a bare ray.init()
    # in someone else's process on this host would join this cluster. Not here.
    mp = pytest.MonkeyPatch()
    mp.setattr(ray._private.utils, "write_ray_address", lambda *a, **k: None)
    mp.setattr(ray._common.utils, "reset_ray_address", lambda *a, **k: None)
    cluster = cluster_utils.Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "object_store_memory": STORE, "include_dashboard": False, "temp_dir": TEMP_DIR,
        "_system_config": SYSTEM_CONFIG})
    mn = MultiNode(cluster)
    try:
        mn.add()
        mn.add()
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False)
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        yield mn
    finally:
        ray.shutdown()
        cluster.shutdown()
        mp.undo()


def storage_overrides(s3_server) -> list[str]:
    return [f"storage.endpoint_url={s3_server.endpoint_url}", f"storage.region={s3_server.storage.region}",
            "storage.key=testing", "storage.secret=testing"]


def png(seed: int, size: int = 64) -> bytes:
    """A smooth random picture (compresses well: a realistic PNG, not noise)."""
    small = np.random.default_rng(seed).integers(0, 255, (8, 8, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(small).resize((size, size), Image.Resampling.BILINEAR).save(buf, format="PNG")
    return buf.getvalue()


def write_shards(uri: str, storage, n: int, rows_per_shard: int, corrupt: frozenset[int] = frozenset(),
                 size: int = 64, distinct: int | None = None) -> list[str]:
    """``n`` rows keyed k00000...; ``corrupt`` rows hold bytes that are no image; ``distinct``: encode only that
    many pictures and repeat them (fast, for many rows). Returns the keys."""
    from clcae.data.shards import ShardWriter

    pictures = [png(i, size) for i in range(distinct or n)]
    keys = [f"k{i:05d}" for i in range(n)]
    with ShardWriter(uri, storage, rows_per_shard=rows_per_shard) as writer:
        for i, key in enumerate(keys):
            data = b"\x89PNG not really" if i in corrupt else pictures[i % len(pictures)]
            writer.write({"key": key, "image": data, "height": size, "width": size})
    return keys


def read_steps(path: Path) -> list[int]:
    return [int(x) for x in path.read_text().split()] if path.exists() else []


def node_of(pid: int, mn: MultiNode):
    """The worker node whose raylet ``pid`` runs under."""
    from ray._private import ray_constants

    for node in mn.workers:
        if pid in descendants(node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid):
            return node
    raise AssertionError(f"pid {pid} is on no worker node")


# --------------------------------------------------------------------------------------------- settings
def test_elastic_and_resource_settings_are_checked_before_anything_starts():
    from clcae.config import ConfigError

    ok = tiny("train.num_workers=4", "train.min_workers=2", "train.resources_per_worker={slot: 1}")
    assert (ok.train.min_workers, ok.train.resources_per_worker) == (2, {"slot": 1.0})
    for bad, key in ((["train.num_workers=2", "train.min_workers=3"], "train.min_workers"),
                     (["train.min_workers=0"], "train.min_workers"),
                     (["train.resources_per_worker={GPU: 1}"], "train.resources_per_worker"),
                     (["train.resources_per_worker={slot: 0}"], "train.resources_per_worker")):
        with pytest.raises(ConfigError, match=key):
            tiny(*bad)


def test_a_worker_failure_is_one_warning_line_on_the_console(tmp_path, caplog):
    """What the controller's callback writes when a node dies, and the line the driver prints for it."""
    import logging

    from clcae.train.progress import ProgressCallback, follow

    caplog.set_level(logging.INFO, logger="clcae.train")
    with follow(9, "run: ", interval_s=0.05) as callback:
        assert isinstance(callback, ProgressCallback)
        callback.after_report(None, [{"step": 3, "total": 1.5}], None)
        callback.after_exception(None, {1: RuntimeError("A worker health check failed.\nWorker info: ...\n"
                                                        "The actor died because its node has died.")})
    lines = [(r.levelname, r.getMessage()) for r in caplog.records if r.name == "clcae.train"]
    assert lines[0] == ("INFO", "run: step 3/9  total 1.5")
    assert lines[1] == ("WARNING", "run: rank(s) 1 failed (RuntimeError: The actor died because its node has died.); "
                                   "Ray Train restarts the workers from the newest checkpoint (train.max_failures)")


# --------------------------------------------------------------------------------------------- items 1 and 2
class TestNodeDeath:
    """On the multi-node cluster (torn down after the class, before the object-store test starts its own)."""

    def test_training_survives_a_node_death_and_continues_on_fewer_workers(self, nodes, s3_server, tmp_path,
                                                                           caplog, monkeypatch):
        """Two Train workers, one per node, checkpoints on S3; the node of one dies at step 5 (checkpoint 3
        registered). Elastic training (train.min_workers=1) restarts on the surviving node with one worker from
        checkpoint 3 and finishes: every step done, at most one checkpoint interval done twice.

        Ray Train 2.60 first tries to restart at the old size (its view of the cluster is refreshed every 20 s) and
        gives up after RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S (default 60 s): 22 s here."""
        import logging

        import ray

        monkeypatch.setenv("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "22")
        caplog.set_level(logging.INFO, logger="clcae.train")

        from clcae.train.loop import Faults, fit

        bucket = s3_server.create_bucket()
        s3 = storage_overrides(s3_server)
        write_shards(f"{bucket}/images", tiny(*s3).storage, 16, rows_per_shard=8)
        cfg = tiny(*[
            *s3, f"train.storage_path={bucket}/runs", f"data.train=[{bucket}/images]", "model.use_align=false",
            "data.batch_size=2", "train.log_every=1", "train.cpus_per_worker=0.5", "train.num_workers=2",
            "train.min_workers=1", "train.resources_per_worker={slot: 1}", "train.max_steps=9",
            "train.checkpoint_every=3", "train.sample_every=100", "train.max_failures=2"])
        log, hold = tmp_path / "steps.log", tmp_path / "go"
        draws = tmp_path / "draws"  # every rank appends each step it starts to rank{r}.log
        faults = Faults(step_log=str(log), rng_log=str(draws), hold_step=5, hold_marker=str(hold))
        victim = nodes.workers[1]
        timing: dict[str, float] = {}

        def drill() -> None:
            try:
                wait_for(lambda: all(Path(f"{hold}.rank{r}").exists() for r in (0, 1)), 600, "both ranks at step 5")
                timing["kill"] = nodes.kill(victim)
                hold.touch()
                timing["gcs_dead"] = wait_for(lambda: not node_alive(victim.node_id), 60, "GCS to mark the node dead")
                # the restarted run logs step 4 again (rank 0 appends every step it starts)
                timing["resumed"] = wait_for(lambda: read_steps(log).count(4) == 2, 600, "the run to resume")
            except Exception as exc:  # noqa: BLE001 - reported by the test below
                timing["error"] = exc
                hold.touch()

        thread = threading.Thread(target=drill, daemon=True)
        t0 = time.time()
        thread.start()
        try:
            result = fit(cfg, "inversion", "elastic", faults=faults)
        finally:
            hold.touch()
            thread.join(timeout=60)
        timing["done"] = time.time()
        assert "error" not in timing, timing.get("error")
        assert not node_alive(victim.node_id)
        steps = read_steps(log)
        assert result.metrics["step"] == 9 and steps[-1] == 9 and set(steps) == set(range(1, 10))
        repeated = len(steps) - len(set(steps))
        assert 1 <= repeated <= cfg.train.checkpoint_every  # resumed from checkpoint 3: steps 4 and 5 again
        assert steps[steps.index(5) + 1] == 4
        # the final checkpoint is on S3 and says step 9
        from clcae.data.storage import filesystem

        fs, path = filesystem(f"{bucket}/runs/elastic", cfg.storage)
        assert fs.exists(f"{path}/checkpoint_000009/checkpoint.pt")
        # ... and after the restart one worker (rank 0, on the surviving node) did the rest alone
        ranks = {r: [int(line.split()[0]) for line in (draws / f"rank{r}.log").read_text().splitlines()]
                 for r in (0, 1)}
        assert ranks[0] == steps and ranks[1] == list(range(1, 6))
        # the driver said so (clcae.train.progress), within its 0.5 s polling of the controller's reports
        failures = [r for r in caplog.records if r.name == "clcae.train" and "failed" in r.getMessage()]
        assert failures and "restarts the workers from the newest checkpoint" in failures[0].getMessage()
        print(f"\ntraining: GCS marked the node dead {timing['gcs_dead'] - timing['kill']:.1f} s after the kill, "
              f"Train's controller noticed by {failures[0].created - timing['kill']:.1f} s; first step after the "
              f"restart at {timing['resumed'] - timing['kill']:.1f} s; whole fit {timing['done'] - t0:.1f} s; "
              f"nodes alive {sum(n['Alive'] for n in ray.nodes())}")
        print("  " + failures[0].getMessage())
        nodes.add()  # for the next test


    def test_bulk_inversion_survives_a_node_death_with_exact_accounting(self, nodes, s3_server, tmp_path):
        """Two inversion actors, one per node (Ray Data spreads them); a node dies while both hold their second
        batch. The dead actor is restarted on the surviving node and its batches are redone: every input ends in
        exactly one of latents or errors, no key twice, and a re-run finds nothing left to do."""
        from clcae.batch import BatchFaults, invert_to_table

        while len(nodes.workers) < 2:
            nodes.add()
        bucket = s3_server.create_bucket()
        cfg = tiny(*[*storage_overrides(s3_server), "infer.batch_size=4",
                                                             "infer.rows_per_file=8", "infer.cpus_per_actor=0.5",
                                                             "infer.actors=2"])
        # image files (one Ray Data block per batch of them: both actors get work from the start)
        from clcae.data import storage as st

        keys = [f"img_{i:03d}.png" for i in range(48)]
        for i, key in enumerate(keys):
            st.write_bytes(f"{bucket}/images/{key}", b"\x89PNG not really" if i in (7, 30) else png(i), cfg.storage)
        hold = tmp_path / "go"
        faults = BatchFaults(hold_marker=str(hold))
        out = f"{bucket}/latents"
        timing: dict = {}

        def pids(kind: str) -> set[int]:
            return {int(p.name.rsplit(".", 1)[1]) for p in tmp_path.glob(f"go.{kind}.*")}

        def drill() -> None:
            try:
                wait_for(lambda: len(pids("held")) == 2, 600, "both actors to hold a batch")
                held = sorted(pids("held"))
                timing["nodes"] = {node_of(pid, nodes).node_id for pid in held}
                victim = node_of(held[1], nodes)
                before = pids("init")
                timing["kill"] = nodes.kill(victim)
                hold.touch()
                timing["gcs_dead"] = wait_for(lambda: not node_alive(victim.node_id), 60, "GCS to mark the node dead")
                timing["restarted"] = wait_for(lambda: pids("init") - before, 600, "the lost actor to restart")
                timing["victim"] = victim.node_id
            except Exception as exc:  # noqa: BLE001 - reported by the test below
                timing["error"] = exc
                hold.touch()

        thread = threading.Thread(target=drill, daemon=True)
        thread.start()
        t0 = time.time()
        try:
            summary = invert_to_table(cfg, [f"{bucket}/images"], out, faults=faults)
        finally:
            hold.touch()
            thread.join(timeout=60)
        timing["done"] = time.time()
        assert "error" not in timing, timing.get("error")
        assert len(timing["nodes"]) == 2  # the two actors ran on two nodes
        assert not node_alive(timing["victim"])
        latents, errors = read_output_table(out, cfg), read_output_table(out, cfg, "errors")
        written, failed = latents.column("key").to_pylist(), errors.column("key").to_pylist()
        assert len(written) == len(set(written)) and len(failed) == len(set(failed))  # no key twice
        assert sorted(written + failed) == keys  # every input exactly once
        assert sorted(failed) == ["img_007.png", "img_030.png"]
        assert (summary["inputs"], summary["written"], summary["errors"]) == (48, 46, 2)
        again = invert_to_table(cfg, [f"{bucket}/images"], out)
        assert (again["skipped"], again["written"], again["errors"]) == (48, 0, 0)
        print(f"\nbulk job: GCS marked the node dead {timing['gcs_dead'] - timing['kill']:.1f} s after the kill; the "
              f"lost actor restarted on the survivor at {timing['restarted'] - timing['kill']:.1f} s; job done at "
              f"{timing['done'] - timing['kill']:.1f} s (whole job {timing['done'] - t0:.1f} s)")


# --------------------------------------------------------------------------------------------- item 6
SMALL_STORE = 75 * 2**20  # Ray's minimum


@pytest.fixture
def small_store() -> Iterator[int]:
    """A one-node cluster with the smallest object store Ray allows."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=4, object_store_memory=SMALL_STORE, include_dashboard=False, _temp_dir=TEMP_DIR,
             log_to_driver=False,
             _system_config={"enable_worker_prestart": False, "prestart_worker_first_driver": False})
    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        yield SMALL_STORE
    finally:
        ray.shutdown()


def spilled_bytes() -> int | None:
    """Bytes the object store spilled to disk so far (None if Ray does not say)."""
    try:
        import ray
        from ray._private.internal_api import get_memory_info_reply, get_state_from_address

        reply = get_memory_info_reply(get_state_from_address(ray.get_runtime_context().gcs_address))
        return int(reply.store_stats.spilled_bytes_total)
    except Exception:  # noqa: BLE001 - a figure for the report, not a condition of the test
        return None


def test_bulk_job_streams_far_more_pixels_than_the_object_store_holds(small_store, tmp_path):
    """3x the object store in decoded pixels goes through the bulk job: exact accounting, and the memory of every
    process (driver and cluster) stays under a stated bound instead of growing with the input."""
    from clcae.batch import invert_to_table

    size = 128
    per_image = size * size * 3  # decoded uint8 pixels at the input size
    n = -(-3 * small_store // per_image)  # 3x the store
    cfg = tiny(*[f"encoder.input_size=[{size},{size}]", "infer.batch_size=16",
                                                         "infer.rows_per_file=1000", "infer.cpus_per_actor=0.5",
                                                         "infer.actors=2", "infer.psnr=false"])
    # The pixels must travel from the decode tasks to the inversion actors through the object store, as on a GPU
    # cluster: Ray Data fuses decoding into the actors when both ask for the same resources (1 CPU), not here.
    write_shards(str(tmp_path / "shards"), None, n, rows_per_shard=1200, size=size, distinct=32)
    out = str(tmp_path / "out")
    with PeakMemory() as mem:
        baseline = mem.sample()
        t = time.time()
        summary = invert_to_table(cfg, [str(tmp_path / "shards")], out)
        seconds = time.time() - t
    assert (summary["inputs"], summary["written"], summary["errors"]) == (n, n, 0)
    keys = read_output_table(out, cfg).column("key").to_pylist()
    assert len(keys) == len(set(keys)) == n
    assert n * per_image >= 3 * small_store
    limit = 6 * 2**30  # generous: measured 3.8 GiB (idle cluster 1.0 GiB) on a 2-core box under heavy load
    spilled = spilled_bytes()
    print(f"\nobject store {small_store / 2**20:.0f} MiB, decoded pixels {n * per_image / 2**20:.0f} MiB ({n} images) "
          f"in {seconds:.1f} s; peak PSS {mem.peak / 2**30:.2f} GiB (idle cluster {baseline / 2**30:.2f} GiB); "
          f"spilled {spilled if spilled is None else f'{spilled / 2**20:.1f} MiB'}")
    assert mem.peak < limit, f"peak memory {mem.peak / 2**30:.2f} GiB over {limit / 2**30:.0f} GiB"
