"""Seconds per inversion-stage training step, images/s, and the share of the step spent in the generator.

    python bench/train_step.py [--cases tiny paper256] [--batch 2] [--steps 3] [--out FILE.json]

Cases: ``tiny`` (configs/tiny.yaml) and ``paper256`` (configs/ffhq.yaml at a 256 generator: IR-SE50, 256x256
input, the official channel table; random weights, LPIPS with a random backbone, no ID network since no
weights are here — ID adds one ArcFace pass per reconstruction on real runs).  The step is the real
``InversionStep`` (Ranger, all losses, L_align through a frozen contrastive module).

Generator share: the same step's generator work (shared prefix + stacked suffix, forward and backward to
the latents and f) timed alone on detached inputs, divided by the step time.  Generator passes per step
are counted by wrapping ``synthesis_prefix`` / ``synthesis_suffix``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from clcae.config import load_config  # noqa: E402
from clcae.factory import build_aligner, build_clcae  # noqa: E402
from clcae.train.steps import InversionStep  # noqa: E402

CASES = {
    "tiny": ("configs/tiny.yaml", []),
    "paper256": ("configs/ffhq.yaml", ["generator.size=256", "generator.checkpoint=null", "encoder.pretrained=null",
                                       "loss.id_network=none", "loss.lpips_pretrained=false", "model.f_ramp_steps=0"]),
}


class PassCounter:
    def __init__(self, generator):
        self.counts = {"prefix": 0, "suffix": 0}
        for name in self.counts:
            original = getattr(generator, f"synthesis_{name}")

            def wrapped(*a, _orig=original, _name=name, **k):
                self.counts[_name] += 1
                return _orig(*a, **k)

            setattr(generator, f"synthesis_{name}", wrapped)


def timed(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def bench_case(name: str, batch: int, steps: int) -> dict:
    path, overrides = CASES[name]
    cfg = load_config(ROOT / path, overrides)
    torch.manual_seed(0)
    model = build_clcae(cfg)
    aligner = build_aligner(cfg, model.x_avg, model.latent_avg)
    step = InversionStep(cfg, model, aligner)
    h, w = cfg.encoder.input_size
    x = torch.rand(batch, 3, h, w) * 2 - 1
    step(x, 1000)  # warm-up (f fully blended in)
    counter = PassCounter(model.decoder)
    step_times = timed(lambda: step(x, 1000), steps)
    passes = {k: v / steps for k, v in counter.counts.items()}

    with torch.no_grad():
        out = model(x)
    wd, wpd, fd = (t.detach().requires_grad_() for t in (out.w, out.w_plus, out.f))

    def generator_only():
        images = model.render(wd, wpd, fd)
        sum(i.square().mean() for i in images.values()).backward()

    generator_only()
    gen_times = timed(generator_only, steps)
    s, g = statistics.median(step_times), statistics.median(gen_times)
    return {"case": name, "config": path, "overrides": overrides, "batch": batch, "steps_timed": steps,
            "input": [h, w], "generator_size": cfg.generator.size,
            "seconds_per_step_median": round(s, 4), "seconds_per_step_all": [round(t, 4) for t in step_times],
            "images_per_s": round(batch / s, 3), "generator_seconds_median": round(g, 4),
            "generator_share": round(g / s, 3), "generator_passes_per_step": passes}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--out", default=None)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    report = {"benchmark": "bench/train_step.py", "device": "cpu", "torch": torch.__version__,
              "threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(),
              "results": [bench_case(c, args.batch, args.steps) for c in args.cases]}
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
