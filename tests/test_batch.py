"""Bulk inversion into Parquet: accounting, idempotent re-runs, S3, readers other than Ray."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import ROOT, forged_png, noise_image, read_output_table
from PIL import Image

from clcae.batch import invert_to_table
from clcae.config import ConfigError, load_config
from clcae.data.shards import ShardWriter

pytestmark = pytest.mark.slow


def png(seed: int, size=(48, 40)) -> bytes:
    return noise_image(size=size, seed=seed)


def encoded(mode: str, fmt: str = "PNG", size=(40, 40)) -> bytes:
    return noise_image(mode, fmt, size, seed=1)


def image_folder(folder: Path, n: int, corrupt: set[int]) -> None:
    (folder / "sub").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        data = png(i)
        if i in corrupt:
            data = data[: len(data) // 3]  # truncated PNG
        (folder / ("sub" if i % 2 else "") / f"img_{i:03d}.png").write_bytes(data)


ZOO_OK = {"cmyk.jpg": ("CMYK", "JPEG"), "gray16.png": ("I;16", "PNG"), "rgba.png": ("RGBA", "PNG"),
          "palette.png": ("P", "PNG"), "la.png": ("LA", "PNG")}


def bad_zoo(folder: Path) -> set[str]:
    """Inputs that must each become one errors-table row."""
    jpeg = encoded("RGB", "JPEG")
    bad = {"truncated.jpg": jpeg[: len(jpeg) // 2], "zero.png": b"", "notes.jpg": b"just some text, not a JPEG",
           "tiny.png": encoded("RGB", size=(1, 1)), "bomb.png": forged_png(20000, 20000)}
    for name, data in bad.items():
        (folder / name).write_bytes(data)
    (folder / "dangling.png").symlink_to(folder / "no-such-file.png")  # an unreadable path
    return {*bad, "dangling.png"}


def cfg(*overrides: str):
    return load_config(ROOT / "configs" / "tiny.yaml", ["infer.batch_size=4", "infer.rows_per_file=8",
                                                          "infer.cpus_per_actor=0.5", *overrides])


def test_exact_accounting_and_idempotent_rerun(ray_cluster, tmp_path):
    image_folder(tmp_path / "in", 40, corrupt={3, 17})  # 5% corrupt
    (tmp_path / "in" / "empty.jpg").write_bytes(b"")
    out = str(tmp_path / "out")
    c = cfg("infer.with_f=true")
    first = invert_to_table(c, [str(tmp_path / "in")], out)
    assert first["inputs"] == 41 and first["written"] == 38 and first["errors"] == 3 and first["skipped"] == 0
    latents, errors = read_output_table(out, c), read_output_table(out, c, "errors")
    assert latents.num_rows == 38 and errors.num_rows == 3
    assert set(errors.column("key").to_pylist()) == {"sub/img_003.png", "sub/img_017.png", "empty.jpg"}
    assert all(e for e in errors.column("error").to_pylist())
    assert len(set(latents.column("key").to_pylist())) == 38
    # a plain pyarrow reader understands every column: fixed-size lists, not Ray extension types
    files = sorted((tmp_path / "out" / "latents").glob("*.parquet"))
    t = pq.read_table(files[0])
    wtype = t.schema.field("w").type
    assert pa.types.is_fixed_size_list(wtype) and wtype.list_size == 64 and wtype.value_type == pa.float32()
    assert t.schema.field("w_plus").type.list_size == 10 * 64
    assert t.schema.field("f").type.value_type.bit_width == 16
    assert 2 <= len(files) <= 6  # coalesced writes, not one file per block
    w = np.stack(t.column("w").to_numpy(zero_copy_only=False))
    assert w.shape == (t.num_rows, 64) and np.isfinite(w).all()
    assert np.isfinite(np.asarray(t.column("psnr"))).all()
    # re-run: nothing to do, nothing duplicated
    again = invert_to_table(c, [str(tmp_path / "in")], out)
    assert again["skipped"] == 41 and again["written"] == 0 and again["errors"] == 0
    assert read_output_table(out, c).num_rows == 38
    # new files arriving later (or an interrupted run): only those are processed
    (tmp_path / "in" / "late.png").write_bytes(png(99))
    third = invert_to_table(c, [str(tmp_path / "in")], out)
    assert third["written"] == 1 and third["skipped"] == 41
    keys = read_output_table(out, c).column("key").to_pylist()
    assert len(keys) == len(set(keys)) == 39


def test_shards_on_s3_round_trip_and_ray_data_reads_the_table(s3_server, ray_cluster, tmp_path):
    import ray

    bucket = s3_server.create_bucket()
    storage = [f"storage.endpoint_url={s3_server.endpoint_url}", "storage.region=us-east-1",
               "storage.key=testing", "storage.secret=testing"]
    c = cfg(*storage)
    with ShardWriter(f"{bucket}/shards", c.storage, rows_per_shard=6) as writer:
        for i in range(12):
            data = b"\x89PNG garbage" if i == 5 else png(i)
            writer.write({"key": f"k{i:02d}", "image": data, "height": 40, "width": 48})
    summary = invert_to_table(c, [f"{bucket}/shards"], f"{bucket}/latents")
    assert (summary["inputs"], summary["written"], summary["errors"]) == (12, 11, 1)
    table = read_output_table(f"{bucket}/latents", c)
    assert sorted(table.column("key").to_pylist()) == [f"k{i:02d}" for i in range(12) if i != 5]
    assert all(s.startswith(f"{bucket}/shards/") for s in table.column("source").to_pylist())
    from clcae.data.storage import filesystem

    fs, path = filesystem(f"{bucket}/latents/latents", c.storage)
    ds = ray.data.read_parquet(path, filesystem=fs)
    assert ds.count() == 11
    row = ds.take(1)[0]
    assert len(row["w"]) == 64 and len(row["w_plus"]) == 640
    assert invert_to_table(c, [f"{bucket}/shards"], f"{bucket}/latents")["skipped"] == 12


def test_bad_input_zoo_each_becomes_an_error_row(ray_cluster, tmp_path):
    folder = tmp_path / "zoo"
    folder.mkdir()
    for name, (mode, fmt) in ZOO_OK.items():
        (folder / name).write_bytes(encoded(mode, fmt))
    bad = bad_zoo(folder)
    c = cfg()
    summary = invert_to_table(c, [str(folder)], str(tmp_path / "out"))
    assert (summary["inputs"], summary["written"], summary["errors"]) == (len(ZOO_OK) + len(bad), len(ZOO_OK), len(bad))
    errors = {r["key"]: r["error"] for r in read_output_table(str(tmp_path / "out"), c, "errors").to_pylist()}
    assert set(errors) == bad
    assert "pixel limit" in errors["bomb.png"] or "bomb" in errors["bomb.png"]
    assert "0 bytes" in errors["zero.png"] and "smaller than" in errors["tiny.png"]
    assert "cannot read file" in errors["dangling.png"]
    assert set(read_output_table(str(tmp_path / "out"), c).column("key").to_pylist()) == set(ZOO_OK)


def test_interrupted_run_resumes_only_missing_rows_of_a_partly_done_shard(ray_cluster, tmp_path):
    c = cfg()
    with ShardWriter(str(tmp_path / "shards"), c.storage, rows_per_shard=20) as writer:
        for i in range(20):
            writer.write({"key": f"k{i:02d}", "image": png(i), "height": 40, "width": 48})
    out = str(tmp_path / "out")
    assert invert_to_table(c, [str(tmp_path / "shards")], out)["written"] == 20
    parts = sorted((tmp_path / "out" / "latents").glob("part-*.parquet"))
    assert len(parts) >= 2  # rows_per_file=8: several parts
    lost = set(pq.read_table(parts[0], columns=["key"]).column("key").to_pylist())
    parts[0].unlink()  # as if the run had died before this part was written
    again = invert_to_table(c, [str(tmp_path / "shards")], out)
    assert again["written"] == len(lost) and again["skipped"] == 20 - len(lost)
    keys = read_output_table(out, c).column("key").to_pylist()
    assert sorted(keys) == [f"k{i:02d}" for i in range(20)]


@pytest.mark.parametrize("overrides,available,message", [
    (["infer.use_gpu=true"], {"CPU": 4.0},
     r"infer.actors=1 actors .* a GPU each \(infer.use_gpu\), .* need 1 GPUs \(the cluster has 0\)\. "
     r"Lower .*drop infer.use_gpu"),
    (["infer.actors=2", "infer.cpus_per_actor=2"], {"CPU": 4.0},
     r"infer.actors=2 actors of infer.cpus_per_actor=2 CPUs, with 0.5 CPUs for decoding beside them, need 4.5 "
     r"CPUs \(the cluster has 4\)\. Lower infer.actors or infer.cpus_per_actor"),
])
def test_a_job_a_fixed_cluster_cannot_hold_is_refused_before_it_starts(tmp_path, monkeypatch, overrides, available,
                                                                       message):
    """Both waited forever on a local Ray (measured before the fix: 90 s, no row, no word of why): Ray Data kept
    the actors, or beside them the decode task, pending."""
    import ray

    from clcae.errors import ClusterCapacityError

    image_folder(tmp_path / "in", 2, corrupt=set())
    monkeypatch.delenv("RAY_ADDRESS", raising=False)  # a local Ray: it cannot grow
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "cluster_resources", lambda: available)
    monkeypatch.setattr(ray.data, "from_items", lambda *a, **k: pytest.fail("the pipeline was built"))
    with pytest.raises(ClusterCapacityError, match=message):
        invert_to_table(cfg(*overrides), [str(tmp_path / "in")], str(tmp_path / "out"))
    fits = cfg("infer.use_gpu=true", "infer.cpus_per_actor=2").infer
    from clcae.batch import check_actor_capacity

    check_actor_capacity(fits, {"CPU": 2.5, "GPU": 1.0}, 0.5)


def test_one_minimum_image_size_for_every_front_door():
    """The batch job and evaluate accept and refuse the same images: one minimum, defined once."""
    from clcae.batch import decode_rows
    from clcae.data.images import MIN_IMAGE_SIZE, InputError, check_min_size, decode_input_image
    from clcae.evaluation import _decoded_batches

    small, ok = png(0, (MIN_IMAGE_SIZE - 1, 40)), png(1, (40, MIN_IMAGE_SIZE))
    with pytest.raises(InputError, match=f"minimum of {MIN_IMAGE_SIZE} pixels"):
        decode_input_image(small)
    assert decode_input_image(ok).size == (40, MIN_IMAGE_SIZE)
    with pytest.raises(InputError):
        check_min_size(Image.new("RGB", (MIN_IMAGE_SIZE, MIN_IMAGE_SIZE - 1)))
    batch = {"key": np.asarray(["small", "ok"], object), "source": np.asarray(["s", "o"], object),
             "image": np.asarray([small, ok], object)}
    rows = decode_rows(batch, (64, 64))
    assert "minimum of" in rows["error"][0] and rows["error"][1] == ""
    errors: list[dict[str, str]] = []
    evaluated = [k for keys, _ in _decoded_batches([("small", small), ("ok", ok)], 8, None, errors) for k in keys]
    assert evaluated == ["ok"] and errors[0]["key"] == "small" and "minimum of" in errors[0]["error"]


def shard_folder(folder: Path, keys: list[str], storage=None) -> None:
    with ShardWriter(str(folder), storage, rows_per_shard=len(keys)) as writer:
        for i, key in enumerate(keys):
            writer.write({"key": key, "image": png(100 + i), "height": 40, "width": 48})


def test_inputs_holding_the_same_names_get_distinct_stable_keys(ray_cluster, tmp_path):
    """--input dirA dirB with the same file names (and two shard sets with the same keys): every input row gets
    its own key, and a re-run (in any input order) finds every one of them done."""
    data = tmp_path / "data"
    for name in ("dirA", "dirB"):
        image_folder(data / name, 4, corrupt=set())
    for name in ("shardsA", "shardsB"):
        shard_folder(data / name, ["k0", "k1", "k2"])
    inputs = [str(data / n) for n in ("dirA", "dirB", "shardsA", "shardsB")]
    out, c = str(tmp_path / "out"), cfg()
    first = invert_to_table(c, inputs, out)
    assert (first["inputs"], first["written"], first["errors"], first["skipped"]) == (14, 14, 0, 0)
    table = read_output_table(out, c)
    keys = table.column("key").to_pylist()
    assert len(set(keys)) == 14
    assert {"dirA/img_000.png", "dirB/img_000.png", "dirA/sub/img_001.png", "shardsA/k0", "shardsB/k0"} <= set(keys)
    by_key = dict(zip(keys, table.column("source").to_pylist()))
    assert by_key["dirB/img_000.png"] == str(data / "dirB" / "img_000.png")
    again = invert_to_table(c, inputs[::-1], out)
    assert (again["inputs"], again["skipped"], again["written"]) == (14, 14, 0)
    # a file arriving in dirB under a name dirA already has is new work, not "skipped"
    (data / "dirB" / "late.png").write_bytes(png(99))
    (data / "dirA" / "late.png").write_bytes(png(98))
    third = invert_to_table(c, inputs[:1], str(tmp_path / "out_a"))  # one input: keys as before, unprefixed
    assert "late.png" in read_output_table(str(tmp_path / "out_a"), c).column("key").to_pylist()
    assert third["written"] == 5
    fourth = invert_to_table(c, inputs, out)
    assert (fourth["written"], fourth["skipped"]) == (2, 14)


def test_planning_refuses_mixed_folders_overlapping_inputs_and_an_input_inside_the_output(tmp_path):
    from clcae.batch import BatchInputError, plan_inputs

    c = cfg()
    mixed = tmp_path / "mixed"
    image_folder(mixed, 3, corrupt=set())
    shard_folder(mixed / "shards", ["k0"])
    with pytest.raises(BatchInputError, match=r"3 image file\(s\).*1 Parquet file\(s\)") as info:
        plan_inputs([str(mixed)], str(tmp_path / "out"), c)
    assert "shard-00000.parquet" in str(info.value) and "--input" in str(info.value)
    data = tmp_path / "data"
    image_folder(data / "a", 2, corrupt=set())
    with pytest.raises(BatchInputError, match="overlap"):
        plan_inputs([str(data), str(data / "a")], str(tmp_path / "out"), c)
    with pytest.raises(BatchInputError, match="overlap"):
        plan_inputs([str(data / "a"), str(data / "a")], str(tmp_path / "out"), c)
    with pytest.raises(BatchInputError, match="inside the output"):
        plan_inputs([str(data / "a")], str(data), c)
    # an output folder inside the input folder (latents written there by an earlier run) is not input
    (data / "a" / "out" / "latents").mkdir(parents=True)
    pq.write_table(pa.table({"key": ["x"]}), data / "a" / "out" / "latents" / "part-0.parquet")
    plan = plan_inputs([str(data / "a")], str(data / "a" / "out"), c)
    assert sorted(k for _, k in plan.image_files) == ["img_000.png", "sub/img_001.png"] and not plan.shard_files


def test_output_folder_inside_the_input_folder_is_not_read_as_input(ray_cluster, tmp_path):
    folder = tmp_path / "in"
    image_folder(folder, 4, corrupt={2})
    out, c = str(folder / "latents_out"), cfg()
    first = invert_to_table(c, [str(folder)], out)
    assert (first["inputs"], first["written"], first["errors"]) == (4, 3, 1)
    again = invert_to_table(c, [str(folder)], out)  # was: ShardError, the job's own output taken for shards
    assert (again["inputs"], again["skipped"], again["written"], again["errors"]) == (4, 4, 0, 0)


def test_transient_failures_are_retried_never_written_as_error_rows(ray_cluster, tmp_path):
    """A storage timeout, an out-of-memory error and a dead inversion actor during one job: each is retried and
    every image ends in the latent table, not in an error row that every re-run would skip."""
    from clcae.batch import BatchFaults

    image_folder(tmp_path / "in", 12, corrupt=set())
    markers = {name: tmp_path / name for name in ("timeout", "oom", "die")}
    faults = BatchFaults(read_timeout_marker=str(markers["timeout"]), oom_marker=str(markers["oom"]),
                         die_marker=str(markers["die"]))
    out, c = str(tmp_path / "out"), cfg()
    summary = invert_to_table(c, [str(tmp_path / "in")], out, faults=faults)
    assert all(m.exists() for m in markers.values())  # every fault really happened
    assert read_output_table(out, c, "errors").num_rows == 0
    assert (summary["inputs"], summary["written"], summary["errors"]) == (12, 12, 0)
    keys = read_output_table(out, c).column("key").to_pylist()
    assert len(keys) == len(set(keys)) == 12


def test_read_failures_split_into_input_errors_and_transient_ones(tmp_path, monkeypatch):
    from clcae import batch
    from clcae.batch import TransientError, _read_files

    (tmp_path / "a.png").write_bytes(png(0))
    (tmp_path / "dangling.png").symlink_to(tmp_path / "no-such-file.png")
    sources = [str(tmp_path / "a.png"), str(tmp_path / "dangling.png")]
    rows = _read_files({"key": np.asarray(["a", "d"], object), "source": np.asarray(sources, object)}, None)
    assert rows["error"][0] == "" and "cannot read file" in rows["error"][1]  # the file's own problem: a row

    class TimingOut:
        def open(self, path, mode="rb"):
            raise TimeoutError(f"read timed out on {path}")

    monkeypatch.setattr(batch.st, "filesystem", lambda uri, storage=None: (TimingOut(), uri))
    with pytest.raises(TransientError, match="read timed out"):  # the storage's problem: retried, not a row
        _read_files({"key": np.asarray(["a"], object), "source": np.asarray(sources[:1], object)}, None)


def test_running_out_of_memory_while_decoding_is_not_the_image_s_fault(monkeypatch):
    import PIL.Image

    from clcae.batch import TransientError, decode_rows

    def no_memory(*args, **kwargs):
        raise MemoryError

    monkeypatch.setattr(PIL.Image, "open", no_memory)
    batch = {"key": np.asarray(["a"], object), "source": np.asarray(["s"], object),
             "image": np.asarray([png(0)], object)}
    with pytest.raises(TransientError, match="out of memory"):
        decode_rows(batch, (64, 64))


def test_out_of_memory_halves_the_batch_and_never_becomes_an_error_row(monkeypatch):
    import torch

    from clcae.batch import InvertActor, TransientError
    from clcae.config import to_dict

    c = cfg()
    actor = InvertActor(to_dict(c), None, "cpu", False, True)
    real, sizes = actor.inverter.invert, []

    def small_memory(x):
        sizes.append(len(x))
        if len(x) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(x)

    monkeypatch.setattr(actor.inverter, "invert", small_memory)
    h, w = c.encoder.input_size
    batch = {"key": np.asarray([f"k{i}" for i in range(5)], object), "source": np.asarray(["s"] * 5, object),
             "error": np.asarray(["", "", "", "", "not a readable image"], object),
             "pixels": np.random.default_rng(0).integers(0, 255, (5, h, w, 3), dtype=np.uint8)}
    out = actor(batch)
    assert list(out["error"]) == ["", "", "", "", "not a readable image"]
    assert np.isfinite(out["w"][:4]).all() and sizes[0] == 4 and max(sizes[1:]) <= 2

    def no_memory(x):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(actor.inverter, "invert", no_memory)
    with pytest.raises(TransientError, match="out of memory"):  # even one image: retried by Ray, not a row
        actor(batch)


def test_a_job_in_which_every_row_fails_exits_non_zero(ray_cluster, tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("invert_cli", ROOT / "jobs" / "invert.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    folder = tmp_path / "thumbs"
    folder.mkdir()
    for i in range(3):
        (folder / f"t{i}.png").write_bytes(encoded("RGB", size=(8, 8)))
    args = ["--config", str(ROOT / "configs" / "tiny.yaml"), "--input", str(folder), "--output",
            str(tmp_path / "out"), "infer.batch_size=4", "infer.cpus_per_actor=0.5"]
    assert cli.main(args) == 1
    captured = capsys.readouterr()
    assert '"errors": 3' in captured.out and '"written": 0' in captured.out  # the summary is printed
    assert "all 3 inputs failed" in captured.err and "smaller than the minimum" in captured.err
    assert cli.main(args) == 1  # and a re-run, which skips them all, does not turn that into success
    (folder / "ok.png").write_bytes(png(5))
    assert cli.main(args) == 0


def test_each_stage_is_timed_and_the_model_loads_once_per_actor(tmp_path):
    """The stages carry their seconds to the sink as columns (the job's ``stages`` summary): read and decode in
    the CPU tasks, which hand the actor uint8 pixels, then the actor, whose model load is reported once."""
    from clcae.batch import InvertActor, _read_files, decode_rows, stage_seconds
    from clcae.config import to_dict

    c = cfg()
    h, w = c.encoder.input_size
    for i in range(3):
        (tmp_path / f"{i}.png").write_bytes(png(i))
    (tmp_path / "bad.png").write_bytes(b"not a png")
    sources = [str(tmp_path / n) for n in ("0.png", "1.png", "bad.png", "2.png")]
    read = _read_files({"key": np.asarray(sources, object), "source": np.asarray(sources, object)}, c.storage)
    decoded = decode_rows(read, (h, w))
    assert decoded["pixels"].dtype == np.uint8 and decoded["pixels"].shape == (4, h, w, 3)
    assert [bool(e) for e in decoded["error"]] == [False, False, True, False]
    for name in ("t_read", "t_decode"):  # a batch's seconds on its first row
        assert decoded[name][0] > 0 and not decoded[name][1:].any()
    actor = InvertActor(to_dict(c), None, "cpu", False, True)
    first, second = actor(decoded), actor(decoded)
    assert first["t_load"][0] > 0 and first["t_ready"][0] > 0 and first["t_first"][0] >= first["t_ready"][0]
    assert not second["t_load"].any() and not second["t_ready"].any()  # the model is loaded once per actor
    assert first["t_invert"][0] > 0 and first["t_invert_cpu"][0] > 0 and first["t_done"][0] >= first["t_first"][0]
    assert first["t_read"].sum() == decoded["t_read"].sum()  # carried through
    started = first["t_ready"][0] - 1.0
    timing = {"t_read": 0.25, "t_decode": 0.5, "t_load": 2.0, "t_invert": 8.0, "t_invert_cpu": 6.0, "t_write": 0.125,
              "t_ready": started + 3.0, "t_first": started + 3.5, "t_done": started + 12.0, "model_loads": 1}
    assert stage_seconds(timing, 0.015, started) == {
        "plan_s": 0.01, "actor_ready_s": 3.0, "first_batch_s": 3.5, "last_batch_s": 12.0, "model_loads": 1,
        "model_load_s": 2.0, "read_s": 0.25, "decode_s": 0.5, "invert_s": 8.0, "invert_cpu_s": 6.0, "write_s": 0.12}


def test_an_actor_inverts_batches_concurrently_on_one_model(tmp_path):
    """``infer.concurrent_batches``: the actor's calls run at once on threads of their own (as Ray Data runs them
    with ``max_concurrent_calls_per_actor``), share one model, give what one call at a time gives, and report the
    model's load once."""
    import threading
    import time

    import torch

    from clcae.batch import InvertActor, concurrent_batches, decode_rows
    from clcae.config import to_dict

    c = cfg("infer.cpus_per_actor=2")
    assert concurrent_batches(c.infer) == 2  # one per whole CPU on a CPU actor
    assert concurrent_batches(cfg("infer.cpus_per_actor=2", "infer.use_gpu=true").infer) == 1
    assert concurrent_batches(cfg("infer.cpus_per_actor=2", "infer.concurrent_batches=1").infer) == 1
    with pytest.raises(ConfigError, match="infer.concurrent_batches = 0: must be >= 1"):
        cfg("infer.concurrent_batches=0")
    h, w = c.encoder.input_size
    batches = [decode_rows({"key": np.asarray([f"{b}-{i}" for i in range(4)], object),
                            "source": np.asarray(["x"] * 4, object),
                            "image": np.asarray([png(4 * b + i) for i in range(4)], object)}, (h, w))
               for b in range(2)]
    threads = torch.get_num_threads()
    try:
        actor = InvertActor(to_dict(c), None, "cpu", False, True)
        assert torch.get_num_threads() == 1  # 2 CPUs shared by 2 batches
        spans: list[tuple[float, float]] = []
        invert = actor.inverter.invert

        def timed(x, *args, **kwargs):
            start = time.perf_counter()
            result = invert(x, *args, **kwargs)
            spans.append((start, time.perf_counter()))
            return result

        actor.inverter.invert = timed
        results: list = [None, None]
        barrier = threading.Barrier(2)

        def call(i: int) -> None:
            barrier.wait()
            results[i] = actor(batches[i])

        workers = [threading.Thread(target=call, args=(i,)) for i in range(2)]
        for t in workers:
            t.start()
        for t in workers:
            t.join()
        (a0, a1), (b0, b1) = spans
        assert a0 < b1 and b0 < a1  # the two model calls overlapped in time
        assert sum(bool(r["t_load"].any()) for r in results) == 1  # the model's load is reported once
        for i in range(2):  # each batch's latents are the ones a call on its own gives
            alone = actor(batches[i])
            np.testing.assert_array_equal(results[i]["w_plus"], alone["w_plus"])
            np.testing.assert_array_equal(results[i]["key"], batches[i]["key"])
    finally:
        torch.set_num_threads(threads)


def test_concurrent_batches_give_the_same_table(ray_cluster, tmp_path):
    """A job whose one actor runs two batches at once writes the latents one batch at a time gives."""
    image_folder(tmp_path / "in", 24, corrupt={5})
    tables = {}
    for k in (1, 2):
        out = str(tmp_path / f"out{k}")
        c = cfg("infer.cpus_per_actor=1", f"infer.concurrent_batches={k}")
        summary = invert_to_table(c, [str(tmp_path / "in")], out)
        assert (summary["written"], summary["errors"]) == (23, 1)
        tables[k] = read_output_table(out, c).sort_by("key")
    assert tables[1].column("key").to_pylist() == tables[2].column("key").to_pylist()
    for name in ("w", "w_plus"):
        a, b = (np.stack(t.column(name).to_numpy(zero_copy_only=False)) for t in tables.values())
        np.testing.assert_allclose(a, b, atol=1e-5)
