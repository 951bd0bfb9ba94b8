"""Plain helpers the test modules share (fixtures live in conftest.py): ports, images, the tiny config with
a direction, and a Serve app on a free port.  Import as ``from helpers import ...`` (pytest puts tests/ on
sys.path)."""

from __future__ import annotations

import contextlib
import io
import socket
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image

from clcae.config import CLCAEConfig, load_config
from clcae.editing import save_interfacegan

ROOT = Path(__file__).resolve().parents[1]
# Every Pillow mode the front doors must convert, with a format that stores it.
MODE_ZOO = [("L", "JPEG"), ("LA", "PNG"), ("RGBA", "PNG"), ("P", "PNG"), ("CMYK", "JPEG"), ("I;16", "PNG")]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny(*overrides: str) -> CLCAEConfig:
    """configs/tiny.yaml with ``key=value`` overrides."""
    return load_config(ROOT / "configs" / "tiny.yaml", list(overrides))


def encode(im: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def noise_image(mode: str = "RGB", fmt: str = "PNG", size: tuple[int, int] = (72, 64), seed: int = 0) -> bytes:
    """Seeded noise (width, height) = ``size`` encoded in ``fmt``; ``I;16`` is a 16-bit ramp of the noise."""
    arr = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    if mode == "I;16":
        im = Image.new("I;16", size)
        im.frombytes((arr[..., 0].astype("<u2") * 257).tobytes(), "raw", "I;16")
    else:
        im = Image.fromarray(arr).convert(mode)
    return encode(im, fmt)


def forged_png(width: int, height: int) -> bytes:
    """A tiny PNG whose IHDR claims width x height: a decompression bomb's header without the memory."""
    data = bytearray(noise_image(size=(8, 8)))
    i = data.index(b"IHDR")
    data[i + 4:i + 12] = struct.pack(">II", width, height)
    data[i + 17:i + 21] = struct.pack(">I", zlib.crc32(bytes(data[i:i + 17])))
    return bytes(data)


def smile_direction(folder: Path) -> list[str]:
    """Save a seeded random unit W direction (style_dim 64, the tiny config's) as ``folder/smile.pt`` and return
    the overrides that register it as ``smile`` with max strength 5."""
    torch.manual_seed(0)
    save_interfacegan(torch.nn.functional.normalize(torch.randn(1, 64), dim=1), folder / "smile.pt")
    return ["directions.smile.kind=interfacegan", f"directions.smile.path={folder / 'smile.pt'}",
            "directions.smile.max_strength=5"]


def serve_config(folder: Path, *overrides: str) -> CLCAEConfig:
    """The tiny model's config for Serve on a free loopback port, one replica, with the ``smile`` direction."""
    return tiny(f"serve.port={free_port()}", "serve.cpus_per_replica=0.5", "serve.max_replicas=1",
                *smile_direction(folder), *overrides)


@contextlib.contextmanager
def serve_app(cfg: CLCAEConfig, html: str = "<html><body>editor</body></html>") -> Iterator[str]:
    """The app of ``cfg`` served (needs a Ray cluster); yields the base URL and shuts Serve down after."""
    from ray import serve

    from clcae.serving import start

    start(cfg, html)
    try:
        yield f"http://127.0.0.1:{cfg.serve.port}"
    finally:
        serve.shutdown()


def read_output_table(uri: str, cfg: CLCAEConfig, sub: str = "latents") -> pa.Table:
    """A bulk job's whole latent (or ``errors``) table as one pyarrow Table (small tables, for asserts)."""
    from clcae.data import storage as st

    tables = []
    for f in st.list_files(st.join(uri, sub), cfg.storage):
        fs, path = st.filesystem(f, cfg.storage)
        with fs.open(path, "rb") as fh:
            tables.append(pq.read_table(fh))
    return pa.concat_tables(tables) if tables else pa.table({})
