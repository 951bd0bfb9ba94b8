"""Stage-1 data: (image, w) pairs synthesised with the generator, as shards.

The unit of work is one shard = one contiguous seed range, written as
``pairs-{first:09d}-{last:09d}.parquet``.  That makes the job

* deterministic: seed s always gives z ~ N(0, I) from ``torch.Generator().manual_seed(s)``, and a shard is
  generated in the same fixed chunks every time, so the same seeds give the same bytes;
* resumable: a re-run lists the shards already present and only generates the missing seed ranges.

Ray Data spreads the shard descriptors over an actor pool (one generator per actor, on a GPU when there is
one); each actor writes its shard straight to storage and returns a one-row summary.
"""

from __future__ import annotations

import io
import logging
import re
from collections.abc import Iterable
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image

from clcae.config import CLCAEConfig, from_dict, to_dict
from clcae.data.images import unit_to_uint8
from clcae.data.shards import shard_schema
from clcae.data.storage import check_access, list_files, write_bytes
from clcae.device import pick_device
from clcae.factory import build_generator
from clcae.models.clcae import crop_and_pool

log = logging.getLogger(__name__)

SHARD_RE = re.compile(r"pairs-(\d{9})-(\d{9})\.parquet$")
CHUNK = 16  # images per generator call inside a shard; fixed so batch composition never changes the bytes


def seed_z(seeds: Iterable[int], style_dim: int) -> torch.Tensor:
    """z ~ N(0, I) for each seed, from its own ``torch.Generator().manual_seed(s)``: (len(seeds), style_dim).
    The one definition of "seed s" for the pairs, the training images and the study's test sets."""
    return torch.stack([torch.randn(style_dim, generator=torch.Generator().manual_seed(int(s))) for s in seeds])


def shard_name(first: int, last: int) -> str:
    return f"pairs-{first:09d}-{last:09d}.parquet"


def plan(start_seed: int, n: int, rows_per_shard: int) -> list[tuple[int, int]]:
    """Inclusive seed ranges of the shards covering [start_seed, start_seed + n)."""
    return [(s, min(s + rows_per_shard, start_seed + n) - 1) for s in range(start_seed, start_seed + n, rows_per_shard)]


def existing(out_uri: str, cfg: CLCAEConfig) -> set[tuple[int, int]]:
    done = set()
    for uri in list_files(out_uri, cfg.storage):
        m = SHARD_RE.search(uri)
        if m:
            done.add((int(m.group(1)), int(m.group(2))))
    return done


class PairGenerator:
    """Ray Data actor: builds the generator once, then turns shard descriptors into shard files."""

    def __init__(self, config: dict[str, Any], out_uri: str, device: str = "auto"):
        self.cfg = from_dict(config)
        self.device = pick_device(device)
        self.generator = build_generator(self.cfg)[0].to(self.device).eval()
        self.out_uri = out_uri.rstrip("/")

    @torch.inference_mode()
    def render(self, seeds: list[int]) -> tuple[np.ndarray, list[bytes], tuple[int, int]]:
        g = self.generator
        w = g.mapping(seed_z(seeds, g.style_dim).to(self.device))
        crop = tuple(self.cfg.generator.crop) if self.cfg.generator.crop else None
        images = crop_and_pool(g.synthesis(w), crop, tuple(self.cfg.encoder.input_size)).clamp(-1, 1)
        arr = unit_to_uint8(images)
        pngs = []
        for a in arr:
            buf = io.BytesIO()
            Image.fromarray(a).save(buf, format="PNG")
            pngs.append(buf.getvalue())
        return w.float().cpu().numpy(), pngs, arr.shape[1:3]

    def write_shard(self, first: int, last: int) -> int:
        seeds = list(range(first, last + 1))
        ws, pngs = [], []
        for i in range(0, len(seeds), CHUNK):
            w, p, (h, wd) = self.render(seeds[i:i + CHUNK])
            ws.append(w)
            pngs += p
        w = np.concatenate(ws)
        schema = shard_schema(style_dim=w.shape[1])
        d = w.shape[1]
        table = pa.table({
            "key": pa.array([f"seed{s:09d}" for s in seeds], pa.string()),
            "image": pa.array(pngs, pa.binary()),
            "height": pa.array([h] * len(seeds), pa.int32()),
            "width": pa.array([wd] * len(seeds), pa.int32()),
            "w": pa.FixedSizeListArray.from_arrays(pa.array(w.reshape(-1), pa.float32()), d),
            "seed": pa.array(seeds, pa.int64()),
        }).select(schema.names).cast(schema)
        buf = io.BytesIO()
        pq.write_table(table, buf, compression="zstd")
        # atomic: a crash never leaves a half-written file under the final name
        write_bytes(f"{self.out_uri}/{shard_name(first, last)}", buf.getvalue(), self.cfg.storage)
        return len(seeds)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = [self.write_shard(int(f), int(l)) for f, l in zip(batch["first"], batch["last"])]
        return {"first": batch["first"], "last": batch["last"], "rows": np.asarray(rows, np.int64)}


def synthesize(cfg: CLCAEConfig, out_uri: str, n: int | None = None, start_seed: int = 0,
               rows_per_shard: int = 1000, actors: int = 1) -> dict[str, Any]:
    """Write the pair shards for seeds [start_seed, start_seed + n) that are not there yet (needs Ray)."""
    import ray

    n = cfg.data.num_synthetic if n is None else n

    check_access(out_uri, cfg.storage, write=True)
    todo = [r for r in plan(start_seed, n, rows_per_shard) if r not in existing(out_uri, cfg)]
    summary = {"seeds": n, "shards_total": len(plan(start_seed, n, rows_per_shard)), "shards_written": len(todo),
               "rows_written": 0, "output": out_uri}
    if not todo:
        log.info("all %d shards already present in %s", summary["shards_total"], out_uri)
        return summary
    use_gpu = cfg.train.use_gpu and torch.cuda.is_available()
    ds = ray.data.from_items([{"first": f, "last": l} for f, l in todo], override_num_blocks=min(len(todo), actors * 4))
    out = ds.map_batches(
        PairGenerator, fn_constructor_kwargs={"config": to_dict(cfg), "out_uri": out_uri,
                                              "device": "cuda" if use_gpu else "cpu"},
        batch_size=1, num_gpus=1 if use_gpu else 0, num_cpus=1,
        compute=ray.data.ActorPoolStrategy(size=actors))
    summary["rows_written"] = int(sum(r["rows"] for r in out.iter_rows()))
    return summary
