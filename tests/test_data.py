"""Storage URIs, image shards, make_shards: local folders and S3 (moto over real HTTP), read by Ray Data."""

from __future__ import annotations

import importlib.util
import io
import json
import math
import re
import time
import urllib.request
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import torch
from helpers import ROOT, forged_png, free_port
from PIL import Image, features

from clcae.config import StorageConfig
from clcae.data import storage as st
from clcae.data.images import InputError, to_pixels, uint8_to_unit, unit_to_uint8
from clcae.data.ingest import make_shards
from clcae.data.shards import (
    ShardError,
    ShardWriter,
    decode_batch,
    read_errors,
    read_shards,
    shard_schema,
    validate_shards,
)
from clcae.data.storage import StorageError

# ---------------------------------------------------------------------------------------------------
# The input zoo: good images in every mode, and every kind of bad file


def _noise(h: int, w: int, channels: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, channels), dtype=np.uint8)


def _encode(im: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    return buf.getvalue()


def _good_images() -> dict[str, bytes]:
    rgba = _noise(70, 66, 4, 4)
    rgba[0, 0, 3] = 0  # fully transparent corner -> white after conversion
    i16 = (np.random.default_rng(6).integers(0, 65536, (64, 70))).astype(np.uint16)
    good = {
        "a/rgb.png": _encode(Image.fromarray(_noise(72, 80, 3, 1)), "PNG"),
        "a/rgb.jpg": _encode(Image.fromarray(_noise(64, 96, 3, 2)), "JPEG"),
        "b/gray.png": _encode(Image.fromarray(_noise(64, 64, 1, 3)[..., 0]), "PNG"),
        "b/la.png": _encode(Image.fromarray(_noise(65, 64, 2, 7)), "PNG"),
        "b/rgba.png": _encode(Image.fromarray(rgba), "PNG"),
        "b/pal.png": _encode(Image.fromarray(_noise(64, 67, 3, 5)).quantize(16), "PNG"),
        "b/cmyk.jpg": _encode(Image.fromarray(_noise(68, 64, 3, 8)).convert("CMYK"), "JPEG"),
        "b/i16.png": _encode(Image.fromarray(i16), "PNG"),
        "c/img.tif": _encode(Image.fromarray(_noise(64, 64, 3, 9)), "TIFF"),
        "c/img.bmp": _encode(Image.fromarray(_noise(64, 64, 3, 10)), "BMP"),
    }
    if features.check("webp"):
        good["c/img.webp"] = _encode(Image.fromarray(_noise(64, 64, 3, 11)), "WEBP")
    return good


def _bad_images(good: dict[str, bytes]) -> dict[str, tuple[bytes, str]]:
    """key -> (bytes, a piece of the reason make_shards must give)."""
    png, jpg = good["a/rgb.png"], good["a/rgb.jpg"]
    return {
        "bad/corrupt.png": (png[:40] + bytes(range(256)) * 4, "not a readable image"),
        "bad/truncated.png": (png[: len(png) // 2], "not a readable image"),
        "bad/truncated.jpg": (jpg[: len(jpg) // 2], "not a readable image"),
        "bad/empty.jpg": (b"", "empty file"),
        "bad/text.jpg": (b"this is a text file, not a JPEG\n", "not a readable image"),
        "bad/tiny.png": (_encode(Image.new("RGB", (1, 1)), "PNG"), "smaller than the minimum of 64"),
        "bad/bomb.png": (forged_png(20000, 20000), "decompression bomb"),
        "bad/big.png": (forged_png(9000, 9000), "over the 64,000,000-pixel limit"),
        "notes.txt": (b"README: photos of faces\n", "not a readable image"),
    }


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("zoo")
    good = _good_images()
    bad = _bad_images(good)
    files = {**good, **{k: v for k, (v, _) in bad.items()}, ".DS_Store": b"\0\0\0\1Bud1"}
    folder = root / "images"
    for key, data in files.items():
        (folder / key).parent.mkdir(parents=True, exist_ok=True)
        (folder / key).write_bytes(data)
    archive = root / "images.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("a/", b"")  # a directory entry and macOS metadata: not inputs
        zf.writestr("__MACOSX/a/._rgb.png", b"resource fork")
        for key in sorted(files, reverse=True):  # zip order must not matter
            zf.writestr(key, files[key])
    return {"folder": folder, "zip": archive, "good": good, "bad": bad}


def _table(shard_uris: list[str], storage: StorageConfig | None = None) -> pa.Table:
    tables = []
    for uri in shard_uris:
        fs, path = st.filesystem(uri, storage)
        with fs.open(path, "rb") as fh:
            tables.append(pq.read_table(fh))
    return pa.concat_tables(tables)


# ---------------------------------------------------------------------------------------------------
# Storage


def test_filesystem_resolves_every_uri_kind(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fs, path = st.filesystem("rel/x.parquet")
    assert fs.protocol[0] == "file" and path == f"{tmp_path}/rel/x.parquet"
    fs, path = st.filesystem(f"file://{tmp_path}/y")
    assert fs.protocol[0] == "file" and path == f"{tmp_path}/y"
    pa_fs, path = st.pyarrow_filesystem(f"file://{tmp_path}/y")
    assert isinstance(pa_fs, pafs.LocalFileSystem) and path == f"{tmp_path}/y"

    cfg = StorageConfig(endpoint_url="http://127.0.0.1:9", region="eu-west-1", key="k", secret="s")
    fs, path = st.filesystem("s3://bucket/a/b.parquet", cfg)
    assert type(fs).__name__ == "S3FileSystem" and path == "bucket/a/b.parquet"
    assert (fs.endpoint_url, fs.key, fs.secret) == ("http://127.0.0.1:9", "k", "s")
    assert fs.client_kwargs["region_name"] == "eu-west-1"
    assert fs.config_kwargs["retries"] == {"max_attempts": 2} and fs.config_kwargs["connect_timeout"] <= 5
    pa_fs, path = st.pyarrow_filesystem("s3://bucket/runs", cfg)
    assert isinstance(pa_fs, pafs.PyFileSystem) and path == "bucket/runs"  # Ray Train wants no s3:// here

    # Unset config keys fall back to the standard AWS variables; set ones win.
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://minio:9000")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-west-2")
    opts = st.s3_options(StorageConfig())
    assert opts["endpoint_url"] == "http://minio:9000"
    assert opts["client_kwargs"] == {"region_name": "us-west-2"}
    assert "key" not in opts  # botocore reads AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY itself
    assert st.s3_options(cfg)["endpoint_url"] == "http://127.0.0.1:9"

    assert st.join("s3://b/runs/", "x", "/y.pt") == "s3://b/runs/x/y.pt"
    assert st.join("/data", "shards") == "/data/shards" and st.join("file:///d", "a") == "file:///d/a"
    with pytest.raises(StorageError, match="nope://x"):
        st.filesystem("nope://x/y")
    if importlib.util.find_spec("gcsfs") is None:
        with pytest.raises(StorageError, match="gs://b/x.*pip install gcsfs"):
            st.filesystem("gs://b/x")


def test_list_write_exists_keep_the_protocol(s3_server, s3_bucket, tmp_path):
    for base in (f"{s3_bucket}/data", f"file://{tmp_path}/data", str(tmp_path / "plain")):
        for name in ("b.parquet", "a.parquet", "sub/c.parquet", "notes.txt", "_tmp/x.parquet", ".x.parquet"):
            st.write_bytes(st.join(base, name), b"123", s3_server.storage)
        found = st.list_files(base, s3_server.storage)
        assert found == [st.join(base, n) for n in ("a.parquet", "b.parquet", "sub/c.parquet")], base
        assert st.list_files(st.join(base, "notes.txt"), s3_server.storage) == [st.join(base, "notes.txt")]
        assert st.list_files(st.join(base, "missing"), s3_server.storage) == []
        assert st.exists(st.join(base, "a.parquet"), s3_server.storage)
        assert not st.exists(st.join(base, "missing"), s3_server.storage)
        st.check_access(base, s3_server.storage)  # an existing folder is readable
        with pytest.raises(StorageError, match="no such file or folder"):
            st.check_access(st.join(base, "missing"), s3_server.storage)


def test_unreachable_endpoint_fails_fast_and_says_so():
    cfg = StorageConfig(endpoint_url=f"http://127.0.0.1:{free_port()}", region="us-east-1",
                        key="testing", secret="testing")
    for call in (lambda: st.check_access("s3://bucket/shards", cfg, write=True),
                 lambda: st.list_files("s3://bucket/shards", cfg),
                 lambda: validate_shards("s3://bucket/shards", cfg)):
        t0 = time.monotonic()
        with pytest.raises(StorageError) as info:
            call()
        assert time.monotonic() - t0 < 20  # a refused connection, not the retry loop of a dead endpoint
        assert "s3://bucket/shards" in str(info.value)
        assert "cannot reach" in str(info.value) and "storage.endpoint_url" in str(info.value)


def test_missing_bucket_is_named(s3_server, s3_bucket):
    for write in (False, True):
        with pytest.raises(StorageError, match="bucket 'no-such-bucket' does not exist"):
            st.check_access("s3://no-such-bucket/shards", s3_server.storage, write=write)
    with pytest.raises(StorageError, match="bucket 'no-such-bucket' does not exist"):
        st.list_files("s3://no-such-bucket/shards", s3_server.storage)
    st.check_access(f"{s3_bucket}/new/prefix", s3_server.storage, write=True)
    listing = s3_server.boto3_client().list_objects_v2(Bucket=s3_bucket.removeprefix("s3://"))
    assert listing["KeyCount"] == 0  # the write probe cleaned up after itself


def test_bad_credentials_are_explained(s3_server, s3_bucket):
    """moto checks credentials once its IAM auth is switched on: unknown key, wrong secret, no permission."""
    import boto3

    iam = boto3.client("iam", endpoint_url=s3_server.endpoint_url, region_name="us-east-1",
                       aws_access_key_id="testing", aws_secret_access_key="testing")
    iam.create_user(UserName="reader")
    key = iam.create_access_key(UserName="reader")["AccessKey"]

    def set_auth(count: str) -> None:
        urllib.request.urlopen(urllib.request.Request(
            f"{s3_server.endpoint_url}/moto-api/reset-auth", data=count.encode(), method="POST",
            headers={"Content-Type": "text/plain"}))

    cases = [("AKIAUNKNOWNKEY000000", "x", "access key is not known"),
             (key["AccessKeyId"], "wrong-secret", "secret key does not match"),
             (key["AccessKeyId"], key["SecretAccessKey"], "access denied")]  # valid user, no policy
    set_auth("0")
    try:
        for k, s, words in cases:
            cfg = StorageConfig(endpoint_url=s3_server.endpoint_url, region="us-east-1", key=k, secret=s)
            with pytest.raises(StorageError, match=words) as info:
                st.check_access(f"{s3_bucket}/x", cfg)
            assert f"{s3_bucket}/x" in str(info.value)
            assert re.search(r"storage\.(key|secret)", str(info.value))
    finally:
        set_auth("inf")


# ---------------------------------------------------------------------------------------------------
# make_shards


def test_make_shards_accounts_for_every_file(zoo, tmp_path):
    good, bad = zoo["good"], zoo["bad"]
    summary = make_shards(str(zoo["folder"]), str(tmp_path / "out"), rows_per_shard=4, workers=2)
    assert summary["inputs"] == len(good) + len(bad) == summary["written"] + summary["errors"]
    assert (summary["written"], summary["errors"], summary["ignored"]) == (len(good), len(bad), 1)
    assert summary["shards"] == [str(tmp_path / "out" / f"shard-{i:05d}.parquet")
                                 for i in range(math.ceil(len(good) / 4))]

    errors = {e["key"]: e for e in read_errors(str(tmp_path / "out"))}
    assert set(errors) == set(bad)
    for key, (_, reason) in bad.items():
        assert reason in errors[key]["error"], (key, errors[key]["error"])
        assert errors[key]["source"] == str(zoo["folder"] / key)

    table = _table(summary["shards"])
    assert table.schema.equals(shard_schema())
    rows = {r["key"]: r for r in table.to_pylist()}
    assert list(rows) == sorted(good)
    for key, data in good.items():
        original = Image.open(io.BytesIO(data))
        stored = Image.open(io.BytesIO(rows[key]["image"]))
        assert (rows[key]["width"], rows[key]["height"]) == original.size == stored.size
        if key in ("a/rgb.png", "a/rgb.jpg"):  # RGB PNG/JPEG: the original bytes
            assert rows[key]["image"] == data
        else:  # other modes and formats: PNG of the RGB conversion
            assert stored.format == "PNG" and stored.mode == "RGB"
    assert Image.open(io.BytesIO(rows["b/rgba.png"]["image"])).getpixel((0, 0)) == (255, 255, 255)
    assert validate_shards(str(tmp_path / "out")) == summary["shards"]


def test_make_shards_is_deterministic_and_zip_matches_folder(zoo, tmp_path):
    runs = [make_shards(str(src), str(tmp_path / name), rows_per_shard=5, workers=w)
            for src, name, w in ((zoo["folder"], "a", 1), (zoo["folder"], "b", 3), (zoo["zip"], "z", 2))]
    contents = [[Path(u).read_bytes() for u in r["shards"]] for r in runs]
    assert contents[0] == contents[1] == contents[2]  # same bytes: same keys, same order, same images
    assert runs[2]["ignored"] == 2  # __MACOSX entry and .DS_Store
    zip_errors = read_errors(str(tmp_path / "z"))
    assert [e["key"] for e in zip_errors] == [e["key"] for e in read_errors(str(tmp_path / "a"))]
    assert zip_errors[0]["source"] == f"zip://{zip_errors[0]['key']}::{zoo['zip']}"

    with pytest.raises(ShardError, match="overwrite"):
        make_shards(str(zoo["folder"]), str(tmp_path / "a"))
    again = make_shards(str(zoo["folder"]), str(tmp_path / "a"), rows_per_shard=1000, overwrite=True)
    assert st.list_files(str(tmp_path / "a")) == again["shards"] == [str(tmp_path / "a/shard-00000.parquet")]


def test_make_shards_refuses_bad_sources(tmp_path):
    (tmp_path / "photo.jpg").write_bytes(b"x")
    (tmp_path / "broken.zip").write_bytes(b"PK\3\4 not really")
    for src, words in ((tmp_path / "missing", "no such folder"),
                       (tmp_path / "photo.jpg", "not a folder or a .zip"),
                       (tmp_path / "broken.zip", "not a valid zip")):
        with pytest.raises(ShardError, match=words) as info:
            make_shards(str(src), str(tmp_path / "out"))
        assert str(src) in str(info.value)


def test_make_shards_cli_writes_to_s3(zoo, s3_server, s3_bucket, tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("make_shards_cli", ROOT / "jobs" / "make_shards.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    dst = f"{s3_bucket}/ffhq"
    overrides = [f"storage.endpoint_url={s3_server.endpoint_url}", "storage.region=us-east-1",
                 "storage.key=testing", "storage.secret=testing"]
    args = [str(zoo["folder"]), dst, "--rows-per-shard", "4", "--progress-every", "5", *overrides]
    assert cli.main(args) == 0
    out, err = capsys.readouterr()
    summary = json.loads(out)
    assert "make_shards: 5/" in err  # periodic progress line
    assert summary["inputs"] == summary["written"] + summary["errors"]
    assert summary["errors"] == len(zoo["bad"])
    assert summary["shards"][0] == f"{dst}/shard-00000.parquet"
    assert st.list_files(dst, s3_server.storage) == summary["shards"]
    assert {e["key"] for e in read_errors(dst, s3_server.storage)} == set(zoo["bad"])

    local = make_shards(str(zoo["folder"]), str(tmp_path / "local"), rows_per_shard=4)
    assert _table(summary["shards"], s3_server.storage).equals(_table(local["shards"]))

    # Unreachable destination: a clear message and a non-zero status, within seconds.
    bad = [f"storage.endpoint_url=http://127.0.0.1:{free_port()}", *overrides[1:]]
    assert cli.main([str(zoo["folder"]), dst + "2", *bad]) == 1
    assert "cannot reach" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------
# ShardWriter, validate_shards, decode_batch


def _row(i: int, dim: int = 4, **extra) -> dict:
    png = _encode(Image.fromarray(_noise(20, 24, 3, i)), "PNG")
    return {"key": f"k{i}", "image": png, "height": 20, "width": 24,
            "w": np.arange(dim, dtype=np.float32) + i, "seed": i, **extra}


def test_shard_writer_checks_rows_and_never_leaves_half_files(tmp_path):
    schema = shard_schema(style_dim=4, labels={"age": "int", "name": "string"})
    with pytest.raises(ShardError, match="prefix"):
        ShardWriter(str(tmp_path), prefix="../x")
    writer = ShardWriter(str(tmp_path), rows_per_shard=3, schema=schema)
    with pytest.raises(RuntimeError, match="boom"), writer as w:
        for i in range(5):
            w.write(_row(i, age=30 + i))
        for bad, words in (({**_row(9), "w": np.zeros(3, np.float32)}, "'k9'.*expected 4"),
                           (_row(1), "duplicate key 'k1'"),
                           ({**_row(9), "image": "not bytes"}, "encoded PNG/JPEG bytes"),
                           ({**_row(9), "mood": "happy"}, r"\['mood'\] are not in the shard schema"),
                           ({**_row(9), "height": None}, r"required column\(s\) \['height'\]")):
            with pytest.raises(ShardError, match=words):
                w.write(bad)
        raise RuntimeError("boom")  # rows 3-4 are in the buffer: they must not become a shard
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shard-00000.parquet"]  # and no temp file
    table = pq.read_table(tmp_path / "shard-00000.parquet")
    assert table.schema.field("w").type == pa.list_(pa.float32(), 4)  # plain Arrow, no Ray extension type
    assert table.column("key").to_pylist() == ["k0", "k1", "k2"]
    assert table.column("age").to_pylist() == [30, 31, 32]

    with ShardWriter(str(tmp_path / "two"), rows_per_shard=2, prefix="pairs", schema=schema) as w:
        for i in range(3):
            w.write(_row(i))
    assert w.close() == ([str(tmp_path / "two" / f"pairs-0000{i}.parquet") for i in range(2)], 3)


def test_validate_shards_names_the_bad_file(tmp_path):
    good = tmp_path / "good"
    with ShardWriter(str(good), schema=shard_schema(style_dim=4)) as w:
        w.write(_row(0))
    plain = tmp_path / "plain"
    with ShardWriter(str(plain)) as w:
        w.write({k: v for k, v in _row(0).items() if k not in ("w", "seed")})
    assert validate_shards([str(good), str(plain)]) == [str(good / "shard-00000.parquet"),
                                                        str(plain / "shard-00000.parquet")]
    assert validate_shards(str(good), need_w=True, style_dim=4) == [str(good / "shard-00000.parquet")]

    def write(name: str, table: pa.Table) -> str:
        (tmp_path / "bad").mkdir(exist_ok=True)
        pq.write_table(table, tmp_path / "bad" / name)
        return str(tmp_path / "bad" / name)

    one = pa.array([1], pa.int32())
    base = {"key": ["a"], "image": [b"x"], "height": one, "width": one}
    cases = [
        (write("noimage.parquet", pa.table({k: v for k, v in base.items() if k != "image"})), {},
         "missing column 'image'"),
        (write("strheight.parquet", pa.table({**base, "height": ["tall"]})), {}, "column 'height' is string"),
        (write("varw.parquet", pa.table({**base, "w": pa.array([[1.0, 2.0]], pa.list_(pa.float32()))})), {},
         r"column 'w' is list<\w+: float>"),
        (str(plain), {"need_w": True}, "no 'w' column"),
        (str(good), {"need_w": True, "style_dim": 512},
         "'w' has 4 values per row, but generator.style_dim is 512"),
    ]
    (tmp_path / "fake.parquet").write_bytes(b"not parquet at all")
    data = (good / "shard-00000.parquet").read_bytes()
    (tmp_path / "cut.parquet").write_bytes(data[:-40] + data[-8:])  # footer damaged
    cases += [(str(tmp_path / "fake.parquet"), {}, "not a readable Parquet file"),
              (str(tmp_path / "cut.parquet"), {}, "not a readable Parquet file")]
    for uri, kwargs, words in cases:
        with pytest.raises(ShardError, match=words) as info:
            validate_shards(uri, **kwargs)
        assert uri in str(info.value) or Path(uri).is_dir()
        assert "shard-00000.parquet" in str(info.value) or uri in str(info.value)

    (tmp_path / "empty").mkdir()
    for uri, words in ((str(tmp_path / "missing"), "no such file or folder"),
                       (str(tmp_path / "empty"), "no .parquet files found")):
        with pytest.raises(ShardError, match=words) as info:
            validate_shards([str(good), uri])
        assert uri in str(info.value)


def test_decode_batch_gives_training_arrays():
    rows = [_row(i, dim=6) for i in range(3)]
    batch = {"key": np.array([r["key"] for r in rows], dtype=object),
             "image": np.array([r["image"] for r in rows], dtype=object),
             "w": np.array([r["w"] for r in rows] + [None], dtype=object)[:3],  # Ray: object array of arrays
             "seed": np.array([r["seed"] for r in rows])}
    out = decode_batch(batch, size=(16, 8), keep=["seed"])
    # uint8 HWC through Ray Data; the consumer's uint8_to_unit gives the float (B, 3, H, W) in [-1, 1] that
    # decode_batch returned before, bit for bit (resize, then v / 127.5 - 1 in float32)
    assert out["image"].shape == (3, 16, 8, 3) and out["image"].dtype == np.uint8
    resized = [np.asarray(Image.open(io.BytesIO(r["image"])).convert("RGB").resize((8, 16), Image.Resampling.BICUBIC))
               for r in rows]
    before = np.stack([torch.from_numpy(a.copy()).permute(2, 0, 1).float().numpy() / np.float32(127.5) - 1
                       for a in resized]).astype(np.float32)
    unit = uint8_to_unit(out["image"])
    assert unit.shape == (3, 3, 16, 8) and unit.dtype == torch.float32 and unit.is_contiguous()
    assert np.array_equal(unit.numpy(), before) and -1.0 <= unit.min() < unit.max() <= 1.0
    assert out["w"].shape == (3, 6) and out["w"].dtype == np.float32 and out["w"][2, 0] == 2.0
    assert out["seed"].tolist() == [0, 1, 2]
    batch["image"][1] = b"garbage"
    with pytest.raises(InputError, match="'k1'"):
        decode_batch(batch, size=(16, 8))


def test_pixel_conversions_are_the_one_arithmetic_and_round_trip_exactly():
    every = np.arange(256, dtype=np.uint8)
    pixels = np.stack([np.roll(every, i) for i in range(6)]).reshape(2, 16, 16, 3)  # every value, NHWC
    unit = uint8_to_unit(pixels)
    assert unit.shape == (2, 3, 16, 16) and unit.dtype == torch.float32 and unit.is_contiguous()
    # the arithmetic every copy used: float32 v / 127.5 - 1, channels first
    assert torch.equal(unit, torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1)
    assert unit.min() == -1.0 and unit.max() == 1.0
    back = unit_to_uint8(unit)
    assert back.dtype == np.uint8 and back.shape == pixels.shape and np.array_equal(back, pixels)  # exact
    assert np.array_equal(unit_to_uint8(uint8_to_unit(pixels[0])), pixels[0])  # one (H, W, 3) image too
    assert uint8_to_unit(torch.from_numpy(pixels), "cpu").equal(unit)  # a tensor, moved to a device
    # read-only arrays (PIL's, Ray's zero-copy blocks) are accepted without torch's warning
    frozen = pixels.copy()
    frozen.flags.writeable = False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert uint8_to_unit(frozen).equal(unit)
    # floats out of range clamp, and round to the nearest level as tensor_to_pil always did
    x = torch.linspace(-1.5, 1.5, 3 * 8 * 8).reshape(1, 3, 8, 8)
    assert np.array_equal(unit_to_uint8(x),
                          ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy())
    for bad in (pixels.astype(np.float32), pixels[..., :2]):
        with pytest.raises(InputError, match="uint8 pixels"):
            uint8_to_unit(bad)
    assert np.array_equal(to_pixels(Image.fromarray(pixels[0]), (16, 16)), pixels[0])  # right size: untouched
    assert to_pixels(pixels[0], (8, 4)).shape == (8, 4, 3)


# ---------------------------------------------------------------------------------------------------
# Ray Data


def test_read_shards_from_s3_with_ray(s3_server, s3_bucket, ray_cluster):
    uri = f"{s3_bucket}/pairs"
    with ShardWriter(uri, s3_server.storage, rows_per_shard=3, schema=shard_schema(style_dim=4)) as w:
        for i in range(7):
            w.write(_row(i))
    ds = read_shards(uri, s3_server.storage, columns=["key", "image", "w"]).materialize()
    rows = ds.take_all()
    assert [r["key"] for r in rows] == [f"k{i}" for i in range(7)] and set(rows[0]) == {"key", "image", "w"}
    assert rows[6]["image"] == _row(6)["image"] and list(rows[6]["w"]) == [6.0, 7.0, 8.0, 9.0]

    batches = list(ds.map_batches(decode_batch, fn_kwargs={"size": (16, 16)}, batch_size=4)
                   .iter_torch_batches(batch_size=7))
    assert len(batches) == 1
    assert tuple(batches[0]["image"].shape) == (7, 16, 16, 3) and batches[0]["image"].dtype == torch.uint8
    assert tuple(uint8_to_unit(batches[0]["image"]).shape) == (7, 3, 16, 16) and tuple(batches[0]["w"].shape) == (7, 4)
    assert batches[0]["w"][:, 0].tolist() == [float(i) for i in range(7)]
    with pytest.raises(ShardError, match=r"no column\(s\) \['label'\]"):
        read_shards(uri, s3_server.storage, columns=["key", "label"])


def test_training_dataset_carries_uint8_pixels(ray_cluster, tmp_path):
    """What Ray Data moves through the object store for training is uint8 (B, H, W, 3) at the input size (a
    quarter of float32); the train loop's uint8_to_unit turns it into the same float input as before."""
    import ray
    from ray.data.block import BlockAccessor

    from clcae.config import load_config
    from clcae.train.loop import build_dataset

    with ShardWriter(str(tmp_path / "pairs"), rows_per_shard=4, schema=shard_schema(style_dim=64)) as w:
        for i in range(8):
            w.write(_row(i, dim=64))
    cfg = load_config(ROOT / "configs" / "tiny.yaml", [f"data.pairs=[{tmp_path / 'pairs'}]", "data.batch_size=4"])
    ds = build_dataset(cfg, "contrastive").materialize()
    assert ds.count() == 8
    for bundle in ds.iter_internal_ref_bundles():
        for block_ref in bundle.block_refs:
            image = BlockAccessor.for_block(ray.get(block_ref)).to_batch_format("numpy")["image"]
            assert image.dtype == np.uint8 and image.shape[1:] == (64, 64, 3)
    batch = next(iter(ds.iter_torch_batches(batch_size=4)))
    assert batch["image"].dtype == torch.uint8 and tuple(batch["image"].shape) == (4, 64, 64, 3)
    before = np.stack([torch.from_numpy(np.asarray(Image.open(io.BytesIO(_row(i)["image"])).resize(
        (64, 64), Image.Resampling.BICUBIC)).copy()).permute(2, 0, 1).float().numpy() / np.float32(127.5) - 1
        for i in range(4)])
    assert np.array_equal(uint8_to_unit(batch["image"]).numpy(), before)


def test_errors_table_does_not_break_reading_the_shard_folder(zoo, tmp_path):
    summary = make_shards(str(zoo["folder"]), str(tmp_path / "o"))
    assert summary["errors_file"] == str(tmp_path / "o" / "_errors" / "errors.parquet")
    errors = pq.read_table(summary["errors_file"])
    assert errors.column_names == ["key", "source", "error"] and errors.num_rows == len(zoo["bad"])
    # the folder reads as the shards alone: "_" keeps the errors out (pyarrow, Ray Data, Spark, read_shards)
    assert pq.read_table(tmp_path / "o").schema.equals(shard_schema())
    assert pq.read_table(tmp_path / "o").num_rows == summary["written"]

    # no errors: the table is still there, empty
    good = tmp_path / "good"
    good.mkdir()
    (good / "a.png").write_bytes(zoo["good"]["a/rgb.png"])
    clean = make_shards(str(good), str(tmp_path / "c"))
    assert pq.read_table(clean["errors_file"]).num_rows == 0 and read_errors(str(tmp_path / "c")) == []

    # a folder written before (errors.csv beside the shards) still has its errors read; --overwrite removes it
    (tmp_path / "c" / "errors.csv").write_text("key,source,error\nx.png,/x.png,broken\n")
    (tmp_path / "c" / "_errors" / "errors.parquet").unlink()
    assert read_errors(str(tmp_path / "c")) == [{"key": "x.png", "source": "/x.png", "error": "broken"}]
    make_shards(str(good), str(tmp_path / "c"), overwrite=True)
    assert not (tmp_path / "c" / "errors.csv").exists() and read_errors(str(tmp_path / "c")) == []
