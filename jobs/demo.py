"""The embedded-default demo: the tiny config end to end on CPU, no files needed.

    python jobs/demo.py [--out outputs/demo] [key=value ...]

A seeded random generator plays the pretrained StyleGAN2; the demo fits GANSpace directions on it, inverts a
few synthesised images with the Inverter, applies an edit, and writes a grid
(input | G(w) | G(w+) | G(w+, f) | edited) to ``<out>/grid.png``.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from clcae.config import DirectionConfig, load_config  # noqa: E402
from clcae.data.images import image_grid, tensor_to_pil  # noqa: E402
from clcae.editing import GANSpacePCA, save_ganspace, save_interfacegan  # noqa: E402
from clcae.factory import build_clcae  # noqa: E402
from clcae.inference import Inverter  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
log = logging.getLogger("demo")


@torch.no_grad()
def fit_pca_directions(generator, out_dir: Path, n: int = 4096, seed: int = 0, components: int = 8):
    """GANSpace on the toy generator: PCA of sampled w, written in e4e's formats (PCA dict + a (1, D) vector)."""
    z = torch.randn(n, generator.style_dim, generator=torch.Generator().manual_seed(seed))
    w = generator.mapping(z)
    mean = w.mean(0)
    _, s, v = torch.linalg.svd(w - mean, full_matrices=False)
    comp = v[:components]
    std = s[:components] / (n - 1) ** 0.5
    out_dir.mkdir(parents=True, exist_ok=True)
    save_ganspace(GANSpacePCA(mean=mean, comp=comp, std=std, source="demo"), out_dir / "pca.pt")
    save_interfacegan(comp[0:1], out_dir / "pc0.pt")
    return out_dir / "pca.pt", out_dir / "pc0.pt"


def run(out: Path, overrides: list[str], n_images: int = 4) -> Path:
    t0 = time.perf_counter()
    cfg = load_config(ROOT / "configs" / "tiny.yaml", overrides)
    torch.manual_seed(cfg.seed)
    model = build_clcae(cfg)
    g = model.decoder
    pca_path, pc0_path = fit_pca_directions(g, out / "directions", seed=cfg.seed)
    n = g.n_latent
    cfg.directions = {
        "pc0": DirectionConfig(kind="interfacegan", path=str(pc0_path), max_strength=10.0),
        "pc1_coarse": DirectionConfig(kind="ganspace", path=str(pca_path), component=1, layers=[0, n // 2],
                                      max_strength=10.0),
    }
    from clcae.inference import directions_from_config

    inverter = Inverter(model, directions_from_config(cfg), device=cfg.device, model_id=f"{cfg.name}:demo")

    with torch.no_grad():
        z = torch.randn(n_images, g.style_dim, generator=torch.Generator().manual_seed(cfg.seed + 1))
        images = model.to_input_resolution(g.synthesis(g.mapping(z))).clamp(-1, 1)
    result = inverter.invert(images, extra_outputs=("w", "w_plus"))
    edited = inverter.edit(result, [("pc0", 3.0), ("pc1_coarse", 2.0)])

    columns = [images, result.extra_images["w"], result.extra_images["w_plus"], result.image, edited]
    rows = list(zip(*[tensor_to_pil(c) for c in columns]))
    out.mkdir(parents=True, exist_ok=True)
    grid_path = out / "grid.png"
    image_grid(rows).resize((5 * 128, n_images * 128), 0).save(grid_path)
    log.info("inverted %d images in %.1fs (encoder untrained: reconstructions are the prior's)",
             n_images, time.perf_counter() - t0)
    return grid_path


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "outputs" / "demo"), help="output folder")
    parser.add_argument("overrides", nargs="*", help="config overrides, key=value")
    args = parser.parse_args(argv)
    grid = run(Path(args.out), args.overrides)
    print(f"grid (input | G(w) | G(w+) | G(w+, f) | edited): {grid}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
