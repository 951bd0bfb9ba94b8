"""Exported model vs training checkpoint: file size, load time, peak memory, and that outputs are identical.

    python bench/export.py --out outputs/export.json                 # the FFHQ config (1024, IR-SE50), ~10 GB disk
    python bench/export.py --config configs/tiny.yaml --out x.json   # seconds, for a smoke run

Random weights at the config's sizes (``generator.checkpoint=null``, ``encoder.pretrained=null``).  The training
checkpoint is what ``jobs/train.py`` writes (model, Ranger state after one step, step, RNG, config); the exports
are ``clcae export`` of it in fp32 and fp16.  Each load runs ``Inverter.from_pretrained`` in a fresh process (the
way a batch actor or Serve replica starts), timed inside it, with its peak RSS; rounds are interleaved and the
first round warms the page cache.  Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.report import emit  # noqa: E402
from clcae.cli_args import config_file, default_config  # noqa: E402


def load_once(model: str, out: str) -> None:
    """Child process: load, invert one fixed image, save the image; print seconds and peak RSS as JSON."""
    import torch

    from clcae.inference import Inverter

    t0 = time.perf_counter()
    inv = Inverter.from_pretrained(model, device="cpu")
    seconds = time.perf_counter() - t0
    x = torch.rand(1, 3, *inv.input_size, generator=torch.Generator().manual_seed(0)) * 2 - 1
    torch.save(inv.invert(x).image, out)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    print(json.dumps({"seconds": seconds, "peak_rss_gib": rss}))


def make_checkpoint(config: str, folder: Path) -> Path:
    import torch

    from clcae.checkpoints import save_checkpoint
    from clcae.config import load_config, to_dict
    from clcae.factory import build_clcae
    from clcae.train.steps import ranger

    cfg = load_config(config, ["generator.checkpoint=null", "encoder.pretrained=null", "directions={}"])
    model = build_clcae(cfg)
    opt = ranger(model.encoder.parameters(), cfg)
    for p in model.encoder.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()  # materialise the optimiser state a real training checkpoint carries
    path = folder / "run" / "checkpoint_000001" / "checkpoint.pt"
    path.parent.mkdir(parents=True)
    save_checkpoint(path, "inversion", model, to_dict(cfg), optimizer=opt.state_dict(), step=1,
                    rng={"torch": torch.get_rng_state()}, model_id="bench@1")
    return path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", type=config_file, default=default_config("ffhq"))
    p.add_argument("--rounds", type=int, default=3, help="interleaved load rounds (the first warms the cache)")
    p.add_argument("--out", default=None, help="write the JSON here too")
    p.add_argument("--load", nargs=2, metavar=("MODEL", "IMAGE_OUT"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.load:
        load_once(*args.load)
        return 0
    import torch

    from clcae.pretrained import export

    with tempfile.TemporaryDirectory(dir=ROOT) as tmp:
        folder = Path(tmp)
        t0 = time.perf_counter()
        ckpt = make_checkpoint(args.config, folder)
        files = {"training checkpoint": ckpt}
        for dtype in ("fp32", "fp16"):
            files[f"export {dtype}"] = folder / f"model_{dtype}.safetensors"
            export(str(ckpt), str(files[f"export {dtype}"]), dtype=dtype)
        prepared_s = time.perf_counter() - t0
        runs: dict[str, list[dict]] = {k: [] for k in files}
        for r in range(args.rounds):
            for name, path in files.items():
                image = folder / f"{name.replace(' ', '_')}.pt"
                done = subprocess.run([sys.executable, __file__, "--load", str(path), str(image)], check=True,
                                      capture_output=True, text=True)
                runs[name].append({**json.loads(done.stdout.strip().splitlines()[-1]), "round": r})
        images = {name: torch.load(folder / f"{name.replace(' ', '_')}.pt") for name in files}
        ref = images["training checkpoint"]
        result = {
            "config": args.config, "machine_threads": torch.get_num_threads(), "setup_s": round(prepared_s, 1),
            "files": {name: {
                "bytes": path.stat().st_size,
                "size_vs_checkpoint": round(path.stat().st_size / ckpt.stat().st_size, 4),
                "load_s_median_warm": round(statistics.median(x["seconds"] for x in runs[name][1:] or runs[name]), 2),
                "load_s_first": round(runs[name][0]["seconds"], 2),
                "peak_rss_gib_median": round(statistics.median(x["peak_rss_gib"] for x in runs[name]), 2),
                "output_identical_to_checkpoint": bool(torch.equal(images[name], ref)),
                "output_max_abs_diff": float((images[name] - ref).abs().max()),
            } for name, path in files.items()},
        }
    emit(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
