"""The embedded-default demo: the whole platform on the tiny config, on CPU, with a local folder as the
object store.  No files or network needed.

    python jobs/demo.py [--out outputs/demo] [--stage1-steps N] [--stage2-steps N] [key=value ...]

1. a seeded random generator plays the pretrained StyleGAN2; it renders a folder of "photos";
2. ``make_shards`` turns the folder into Parquet shards; ``synthesize`` writes the stage-1 (image, w) pairs;
3. stage 1 (contrastive) and stage 2 (inversion) train on Ray Train, checkpointing to the store;
4. the trained encoder inverts held-out images and edits them with directions fitted on the generator;
   the grid ``input | G(w) | G(w+) | G(w+, f) | edited`` is written to ``<out>/grid.png``.

Re-running resumes: shards and pairs already there are kept, finished training runs are not redone
(``--fresh`` starts over).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from clcae.cli_args import add_verbose, default_config, job, parse_with_overrides  # noqa: E402
from clcae.config import DirectionConfig, load_config  # noqa: E402
from clcae.data.images import encode_png, image_grid, tensor_to_pil  # noqa: E402
from clcae.data.synthesis import seed_z  # noqa: E402
from clcae.editing import GANSpacePCA, save_ganspace, save_interfacegan  # noqa: E402
from clcae.factory import build_generator  # noqa: E402
from clcae.models.clcae import crop_and_pool  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
log = logging.getLogger("clcae.demo")  # under "clcae": printed at the default verbosity


@torch.no_grad()
def render(generator, cfg, seeds: range) -> torch.Tensor:
    z = seed_z(seeds, generator.style_dim)
    crop = tuple(cfg.generator.crop) if cfg.generator.crop else None
    return crop_and_pool(generator.synthesis(generator.mapping(z)), crop, tuple(cfg.encoder.input_size)).clamp(-1, 1)


def write_photos(generator, cfg, folder: Path, n: int) -> None:
    """A folder of PNG files standing in for a user's image collection."""
    write_photos_seeds(generator, cfg, folder, range(1_000_000, 1_000_000 + n))


def write_photos_seeds(generator, cfg, folder: Path, seeds: range) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for start in range(0, len(seeds), 32):
        chunk = seeds[start:start + 32]
        for s, im in zip(chunk, tensor_to_pil(render(generator, cfg, chunk))):
            (folder / f"photo_{s}.png").write_bytes(encode_png(im))


@torch.no_grad()
def fit_directions(generator, out_dir: Path, n: int = 4096, seed: int = 0, components: int = 8):
    """GANSpace on the toy generator: PCA of sampled w, written in e4e's formats (PCA dict + a (1, D) vector)."""
    z = torch.randn(n, generator.style_dim, generator=torch.Generator().manual_seed(seed))
    w = generator.mapping(z)
    mean = w.mean(0)
    _, s, v = torch.linalg.svd(w - mean, full_matrices=False)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_ganspace(GANSpacePCA(mean=mean, comp=v[:components], std=s[:components] / (n - 1) ** 0.5, source="demo"),
                  out_dir / "pca.pt")
    save_interfacegan(v[0:1], out_dir / "pc0.pt")
    return out_dir / "pca.pt", out_dir / "pc0.pt"


def serve_and_edit(cfg, checkpoint: str, directions, photo: Path, out: Path, keep_up: bool) -> dict:
    """Serve the trained model, make one edit request over HTTP, save it; shut down unless keep_up."""
    import socket

    import httpx
    from ray import serve

    from clcae.serving import start

    sys.path.insert(0, str(ROOT))
    from serve.app import page

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1] if not keep_up else 8000
    cfg.serve.model, cfg.serve.port, cfg.serve.cpus_per_replica = checkpoint, port, 0.5
    cfg.serve.max_replicas, cfg.directions = 1, directions
    start(cfg, page())
    url = f"http://127.0.0.1:{port}/"
    r = httpx.post(f"{url}v1/edit", files={"image": (photo.name, photo.read_bytes())},
                   data={"edits": json.dumps([{"direction": "pc0", "strength": 3.0}])}, timeout=120)
    r.raise_for_status()
    (out / "served_edit.png").write_bytes(r.content)
    result = {"url": url, "request": "POST /v1/edit pc0=3.0", "status": r.status_code,
              "saved": str(out / "served_edit.png")}
    if keep_up:
        print(f"web editor: {url}  (Ctrl-C to stop)", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
    serve.shutdown()
    return result


def run(out: Path, overrides: list[str], stage1_steps: int, stage2_steps: int, n_photos: int = 64,
        n_pairs: int = 128, fresh: bool = False, keep_up: bool = False) -> dict:
    from clcae.data.ingest import make_shards
    from clcae.data.synthesis import synthesize
    from clcae.inference import Inverter
    from clcae.pretrained import prepare
    from clcae.train.loop import fit, resolve_checkpoint
    from clcae.train.runtime import init_ray

    t0 = time.perf_counter()
    if fresh and out.exists():
        shutil.rmtree(out)
    store = out / "store"                      # the "object store": any URI works here, s3:// included
    base = [f"train.storage_path={store / 'runs'}", *overrides]
    cfg = load_config(default_config("tiny"), base)
    generator, _ = build_generator(cfg)

    log.info("1/5 rendering %d photos and sharding them", n_photos)
    if not (out / "photos").exists():
        write_photos(generator, cfg, out / "photos", n_photos)
    shards = make_shards(str(out / "photos"), str(store / "shards" / "train"), rows_per_shard=32, overwrite=True)
    log.info("2/5 synthesising %d stage-1 pairs", n_pairs)
    init_ray()
    synthesize(cfg, str(store / "shards" / "pairs"), n=n_pairs, rows_per_shard=32)

    log.info("3/5 stage 1: contrastive alignment, %d steps", stage1_steps)
    s1 = load_config(default_config("tiny"), [*base, f"data.pairs=[{store / 'shards' / 'pairs'}]",
                                                      f"train.max_steps={stage1_steps}", "data.batch_size=8",
                                                      f"train.checkpoint_every={stage1_steps}"])
    r1 = fit(s1, "contrastive", "demo-s1")
    log.info("4/5 stage 2: inversion, %d steps", stage2_steps)
    s2 = load_config(default_config("tiny"), [
        *base, f"data.train=[{store / 'shards' / 'train'}]", f"contrastive.checkpoint={store / 'runs' / 'demo-s1'}",
        f"train.max_steps={stage2_steps}", f"train.checkpoint_every={stage2_steps}",
        f"train.sample_every={max(stage2_steps // 4, 1)}"])
    r2 = fit(s2, "inversion", "demo-s2")

    log.info("5/5 inverting held-out images with the trained encoder and editing them")
    checkpoint = resolve_checkpoint(str(store / "runs" / "demo-s2"), s2)
    pca_path, pc0_path = fit_directions(generator, out / "directions", seed=cfg.seed)
    n = generator.n_latent
    cfg.directions = {
        "pc0": DirectionConfig(kind="interfacegan", path=str(pc0_path), max_strength=10.0),
        "pc1_coarse": DirectionConfig(kind="ganspace", path=str(pca_path), component=1, layers=[0, n // 2],
                                      max_strength=10.0),
    }
    source, s2 = prepare(checkpoint, s2)
    s2.directions = cfg.directions
    inverter = Inverter.load(source, s2, device="cpu")
    held_out = render(generator, cfg, range(2_000_000, 2_000_004))
    result = inverter.invert(held_out, extra_outputs=("w", "w_plus"))
    edited = inverter.edit(result, [("pc0", 3.0), ("pc1_coarse", 2.0)])
    columns = [held_out, result.extra_images["w"], result.extra_images["w_plus"], result.image, edited]
    rows = list(zip(*[tensor_to_pil(c) for c in columns]))
    grid_path = out / "grid.png"
    image_grid(rows).resize((5 * 128, len(rows) * 128), 0).save(grid_path)
    log.info("bulk inversion of held-out images into a latent table")
    from clcae.batch import invert_to_table

    held_dir = out / "held_out"
    if not held_dir.exists():
        write_photos_seeds(generator, cfg, held_dir, range(3_000_000, 3_000_016))
    (held_dir / "broken.png").write_bytes(b"not an image: the errors table shows it")
    table = invert_to_table(s2, [str(held_dir)], str(store / "latents"), source)
    served = serve_and_edit(s2, checkpoint, cfg.directions, held_dir / "photo_3000000.png", out, keep_up)
    mse = {k: float((v - held_out).pow(2).mean()) for k, v in
           {"G(w)": columns[1], "G(w+)": columns[2], "G(w+,f)": columns[3]}.items()}
    return {"grid": str(grid_path), "checkpoint": checkpoint, "samples": str(store / "runs" / "demo-s2" / "samples"),
            "shards": {k: shards[k] for k in ("inputs", "written", "errors")},
            "stage1": {k: r1.metrics.get(k) for k in ("step", "loss", "accuracy")},
            "stage2": {k: r2.metrics.get(k) for k in ("step", "total")},
            "held_out_mse": mse,
            "latent_table": {k: table[k] for k in ("output", "inputs", "skipped", "written", "errors")},
            "served_edit": served, "seconds": round(time.perf_counter() - t0, 1)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "outputs" / "demo"), help="output folder")
    parser.add_argument("--stage1-steps", type=int, default=40)
    parser.add_argument("--stage2-steps", type=int, default=60)
    parser.add_argument("--fresh", action="store_true", help="delete the output folder first")
    parser.add_argument("--serve", action="store_true", help="keep the web editor up at the end (port 8000)")
    add_verbose(parser)
    parser.add_argument("overrides", nargs="*", help="config overrides, key=value (anywhere on the line)")
    return parse_with_overrides(parser, argv)


@job  # a user's mistake (a bad override: CLCAEError) is "error: ..." and exit 2
def main(argv: list[str] | None = None) -> int:
    from clcae.train.runtime import configure_output

    args = parse_args(argv)
    configure_output(args.verbose)
    out = Path(args.out).resolve()
    summary = run(out, args.overrides, args.stage1_steps, args.stage2_steps, fresh=args.fresh, keep_up=args.serve)
    # the whole summary as JSON in a file; on the console what a user reads
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    s1, s2, t = summary["stage1"], summary["stage2"], summary["latent_table"]
    mse = ", ".join(f"{k} {v:.4f}" for k, v in summary["held_out_mse"].items())
    print(f"done in {summary['seconds']} s; summary: {out / 'summary.json'}")
    print(f"stage 1: step {s1['step']}, loss {s1['loss']:.4f}, accuracy {s1['accuracy']:.3f}; "
          f"stage 2: step {s2['step']}, total loss {s2['total']:.4f}; checkpoint {summary['checkpoint']}")
    print(f"held-out MSE: {mse}")
    print(f"grid (input | G(w) | G(w+) | G(w+, f) | edited): {summary['grid']}")
    print(f"training samples: {summary['samples']}")
    print(f"served: {summary['served_edit']['url']} (the web editor; `python jobs/demo.py --serve` keeps it up); "
          f"one HTTP edit saved to {summary['served_edit']['saved']}")
    print(f"latent table: {t['output']}/latents ({t['written']} rows; {t['errors']} in {t['output']}/errors; "
          f"{t['skipped']} already there)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
