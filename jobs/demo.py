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
from clcae.config import DirectionConfig, load_config, to_dict  # noqa: E402
from clcae.data.images import decode_image, image_grid, pil_to_tensor, tensor_to_pil  # noqa: E402
from clcae.data.synthesis import PairGenerator  # noqa: E402
from clcae.directions import fit_ganspace_to_file  # noqa: E402
from clcae.editing import load_ganspace, save_interfacegan  # noqa: E402
from clcae.factory import build_generator  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
log = logging.getLogger("clcae.demo")  # under "clcae": printed at the default verbosity


def write_photos(cfg, folder: Path, seeds: range) -> list[Path]:
    """PNG files rendered by the seeded generator (the pair synthesiser's renderer), standing in for a user's
    image collection."""
    folder.mkdir(parents=True, exist_ok=True)
    renderer = PairGenerator(to_dict(cfg), out_uri="", device="cpu")
    paths = []
    for start in range(0, len(seeds), 32):
        chunk = list(seeds[start:start + 32])
        for seed, png in zip(chunk, renderer.render(chunk)[1]):
            paths.append(folder / f"photo_{seed}.png")
            paths[-1].write_bytes(png)
    return paths


def fit_directions(cfg, out_dir: Path) -> dict[str, DirectionConfig]:
    """GANSpace on the toy generator (the library's fit, 4,096 samples) in e4e's PCA format, and its first
    component as an InterFaceGAN-style W direction."""
    generator, _ = build_generator(cfg)
    out_dir.mkdir(parents=True, exist_ok=True)
    fit_ganspace_to_file(generator, str(out_dir / "pca.pt"), n_samples=4096, components=8, seed=cfg.seed)
    pca = load_ganspace(out_dir / "pca.pt", style_dim=cfg.generator.style_dim)
    save_interfacegan(pca.comp[0:1], out_dir / "pc0.pt")
    n = generator.n_latent
    return {"pc0": DirectionConfig(kind="interfacegan", path=str(out_dir / "pc0.pt"), max_strength=10.0),
            "pc1_coarse": DirectionConfig(kind="ganspace", path=str(out_dir / "pca.pt"), component=1,
                                          layers=[0, n // 2], max_strength=10.0)}


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


def prepare_data(cfg, out: Path, store: Path, n_photos: int, n_pairs: int) -> dict:
    """Steps 1-2: a folder of photos -> image shards; the stage-1 (image, w) pairs."""
    from clcae.data.ingest import make_shards
    from clcae.data.synthesis import synthesize
    from clcae.train.runtime import init_ray

    log.info("1/5 rendering %d photos and sharding them", n_photos)
    if not (out / "photos").exists():
        write_photos(cfg, out / "photos", range(1_000_000, 1_000_000 + n_photos))
    shards = make_shards(str(out / "photos"), str(store / "shards" / "train"), rows_per_shard=32, overwrite=True)
    log.info("2/5 synthesising %d stage-1 pairs", n_pairs)
    init_ray()
    synthesize(cfg, str(store / "shards" / "pairs"), n=n_pairs, rows_per_shard=32)
    return shards


def train_both_stages(base: list[str], store: Path, stage1_steps: int, stage2_steps: int):
    """Steps 3-4 on Ray Train; returns (stage-1 result, stage-2 result, stage-2 config)."""
    from clcae.train.loop import fit

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
    return r1, fit(s2, "inversion", "demo-s2"), s2


def invert_and_edit(inverter, cfg, out: Path) -> tuple[str, dict[str, float]]:
    """The grid ``input | G(w) | G(w+) | G(w+, f) | edited`` of four held-out images, and each path's MSE."""
    photos = write_photos(cfg, out / "held_out_grid", range(2_000_000, 2_000_004))
    size = tuple(cfg.encoder.input_size)
    held_out = torch.stack([pil_to_tensor(decode_image(p.read_bytes()), size) for p in photos])
    result = inverter.invert(held_out, extra_outputs=("w", "w_plus"))
    edited = inverter.edit(result, [("pc0", 3.0), ("pc1_coarse", 2.0)])
    paths = {"G(w)": result.extra_images["w"], "G(w+)": result.extra_images["w_plus"], "G(w+,f)": result.image}
    rows = list(zip(*[tensor_to_pil(c) for c in (held_out, *paths.values(), edited)]))
    grid_path = out / "grid.png"
    image_grid(rows).resize((5 * 128, len(rows) * 128), 0).save(grid_path)
    return str(grid_path), {k: float((v - held_out).pow(2).mean()) for k, v in paths.items()}


def run(out: Path, overrides: list[str], stage1_steps: int, stage2_steps: int, n_photos: int = 64,
        n_pairs: int = 128, fresh: bool = False, keep_up: bool = False) -> dict:
    from clcae.batch import invert_to_table
    from clcae.inference import Inverter
    from clcae.pretrained import prepare
    from clcae.train.loop import resolve_checkpoint

    t0 = time.perf_counter()
    if fresh and out.exists():
        shutil.rmtree(out)
    store = out / "store"                      # the "object store": any URI works here, s3:// included
    base = [f"train.storage_path={store / 'runs'}", *overrides]
    cfg = load_config(default_config("tiny"), base)
    shards = prepare_data(cfg, out, store, n_photos, n_pairs)
    r1, r2, s2 = train_both_stages(base, store, stage1_steps, stage2_steps)

    log.info("5/5 inverting held-out images with the trained encoder and editing them")
    checkpoint = resolve_checkpoint(str(store / "runs" / "demo-s2"), s2)
    source, s2 = prepare(checkpoint, s2)
    s2.directions = fit_directions(cfg, out / "directions")
    grid, mse = invert_and_edit(Inverter.load(source, s2, device="cpu"), cfg, out)
    log.info("bulk inversion of held-out images into a latent table")
    held_dir = out / "held_out"
    if not held_dir.exists():
        write_photos(cfg, held_dir, range(3_000_000, 3_000_016))
    (held_dir / "broken.png").write_bytes(b"not an image: the errors table shows it")
    table = invert_to_table(s2, [str(held_dir)], str(store / "latents"), source)
    served = serve_and_edit(s2, checkpoint, s2.directions, held_dir / "photo_3000000.png", out, keep_up)
    return {"grid": grid, "checkpoint": checkpoint, "samples": str(store / "runs" / "demo-s2" / "samples"),
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
