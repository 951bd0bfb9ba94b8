"""Seconds per inversion-stage training step, images/s, and the share of the step spent in the generator.

    python bench/train_step.py [--cases tiny paper256] [--batch 2] [--steps 3] [--out FILE.json]
    python bench/train_step.py --cases paper256 paper1024 --batch 1 --steps 2 --variants shared three_pass \
        bf16 --out bench/results/train_step_cpu.json          # ours vs the authors' three passes, and AMP

Variants (``--variants``), one step object switched between them (one model in memory), timed interleaved (one
step of each per round, the order rotating) and reported as per-round ratios to ``shared``:
``shared`` (ours: one prefix pass for w and w+, one stacked suffix pass), ``three_pass`` (the authors' step:
G(w), G(w+) and G(w+, f) as three whole generator passes), ``bf16`` / ``fp16`` (ours under
``train.precision``).

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
import os
import platform
import statistics
import sys
import time
import types
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from clcae.config import load_config  # noqa: E402
from clcae.device import keep_freed_memory  # noqa: E402
from clcae.factory import build_aligner, build_clcae  # noqa: E402
from clcae.models.clcae import CLCAE, Rendered  # noqa: E402
from clcae.models.stylegan2 import blend_feature  # noqa: E402
from clcae.train.steps import InversionStep, MixedPrecision  # noqa: E402

PAPER = ["generator.checkpoint=null", "encoder.pretrained=null", "loss.id_network=none",
         "loss.lpips_pretrained=false", "model.f_ramp_steps=0"]
VARIANTS = ("shared", "three_pass", "bf16", "fp16")

CASES = {
    "tiny": ("configs/tiny.yaml", []),
    "paper256": ("configs/ffhq.yaml", ["generator.size=256", *PAPER]),
    "paper1024": ("configs/ffhq.yaml", ["generator.size=1024", *PAPER]),
}


def three_pass_render(self: CLCAE, w: torch.Tensor, w_plus: torch.Tensor, f: torch.Tensor | None,
                      outputs: Any = ("w", "w_plus", "f"), f_blend: float = 1.0) -> Rendered:
    """The authors' way: each reconstruction is a whole generator pass of its own (G(w+, f) re-runs the layers
    up to convs.3 that G(w+) already ran).  Same maths as :meth:`CLCAE.render`."""
    g = self.decoder
    images = {}
    if "w" in outputs:
        images["w"] = g.synthesis(g.broadcast(w))
    g5, skip = g.synthesis_prefix(w_plus)
    if "w_plus" in outputs:
        images["w_plus"] = g.synthesis_suffix(g5, skip, w_plus)
    if "f" in outputs:
        g5_again, skip_again = g.synthesis_prefix(w_plus)
        images["f"] = g.synthesis_suffix(blend_feature(g5_again, f, f_blend), skip_again, w_plus)
    return Rendered({k: self.to_input_resolution(v) for k, v in images.items()}, g5)


def build_step(path: str, overrides: list[str], device: torch.device) -> InversionStep:
    cfg = load_config(ROOT / path, overrides)
    torch.manual_seed(0)
    model = build_clcae(cfg)
    aligner = build_aligner(cfg, model.x_avg, model.latent_avg)
    return InversionStep(cfg, model, aligner).to(device)


def set_variant(step: InversionStep, variant: str) -> None:
    """One step object serves every variant (one model in memory: a 1024 step holds 6+ GB on CPU): the render
    method and the precision are switched between calls.  The weights and optimiser state move on from step to
    step for all variants alike, which changes no cost."""
    model = step.model
    if variant == "three_pass":
        model.render = types.MethodType(three_pass_render, model)
    else:
        model.__dict__.pop("render", None)  # back to CLCAE.render
    step.amp = MixedPrecision(variant if variant in ("bf16", "fp16") else "fp32")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def compare_variants(name: str, batch: int, rounds: int, variants: list[str], device: torch.device) -> dict:
    """One step of every variant per round, in a rotating order; ratios to ``shared`` per round."""
    path, overrides = CASES[name]
    step = build_step(path, overrides, device)
    cfg = step.cfg
    h, w = cfg.encoder.input_size
    x = (torch.rand(batch, 3, h, w, generator=torch.Generator().manual_seed(0)) * 2 - 1).to(device)
    first = {}
    for v in variants:  # warm-up; fp16 may skip its first optimiser steps (GradScaler back-off)
        set_variant(step, v)
        sync(device)
        t0 = time.perf_counter()
        step(x, 1000)
        sync(device)
        first[v] = round(time.perf_counter() - t0, 2)
    times: dict[str, list[float]] = {v: [] for v in variants}
    for r in range(rounds):
        for v in variants[r % len(variants):] + variants[:r % len(variants)]:
            set_variant(step, v)
            sync(device)
            t0 = time.perf_counter()
            step(x, 1000)
            sync(device)
            times[v].append(time.perf_counter() - t0)
    out: dict[str, Any] = {"case": name, "config": path, "overrides": overrides, "batch": batch, "rounds": rounds,
                           "generator_size": cfg.generator.size, "device": str(device), "first_step_s": first,
                           "seconds_per_step": {v: [round(t, 3) for t in ts] for v, ts in times.items()}}
    if device.type == "cuda":
        out["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20)
    if "shared" in times:
        out["time_vs_shared"] = {}
        for v, ts in times.items():
            if v != "shared":
                ratios = [a / b for a, b in zip(ts, times["shared"])]
                out["time_vs_shared"][v] = {"median": round(statistics.median(ratios), 3),
                                            "min": round(min(ratios), 3), "max": round(max(ratios), 3)}
    return out


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
        images = model.render(wd, wpd, fd).images
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
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=None,
                        help="compare step variants interleaved (see the docstring) instead of the generator share")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--smoke", action="store_true", help="tiny config, batch 2, one round of every variant")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if args.smoke:
        args.cases, args.batch, args.steps, args.variants = ["tiny"], 2, 1, list(VARIANTS)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    report = {"benchmark": "bench/train_step.py", "device": str(device), "torch": torch.__version__,
              "threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(),
              "load_average_at_start": [round(x, 2) for x in os.getloadavg()]}
    if device.type == "cpu":  # as training on CPU runs (clcae.train.loop); CLCAE_KEEP_FREED_MEMORY=0: off
        report["malloc_keeps_freed_memory"] = keep_freed_memory()
    if args.variants:
        report["results"] = [compare_variants(c, args.batch, args.steps, args.variants, device) for c in args.cases]
    else:
        report["results"] = [bench_case(c, args.batch, args.steps) for c in args.cases]
    report["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
