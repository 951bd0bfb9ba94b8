"""Does mixed-precision training follow the fp32 loss curve?  Stage-2 steps on the tiny config, in process
(no Ray), fixed seed, the same batches for every precision.

    python bench/amp_curve.py --steps 100 --out bench/results/amp_curve_tiny.json

Every precision starts from the same weights (seed 0) and sees the same batches: images G(w) of the tiny
generator at random w (seed 1), ``data.batch_size`` per step.  The JSON holds each precision's per-step total
loss and a summary: the mean of the last ``--tail`` steps and the per-step difference to fp32 relative to fp32's
own step-to-step noise (the standard deviation of its first differences over the same tail).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from clcae.config import PRECISIONS, load_config  # noqa: E402
from clcae.factory import build_aligner, build_clcae  # noqa: E402
from clcae.train.steps import InversionStep  # noqa: E402


def curve(precision: str, steps: int, images: torch.Tensor, batch: int) -> tuple[list[float], float]:
    cfg = load_config(ROOT / "configs" / "tiny.yaml", [f"train.precision={precision}"])
    torch.manual_seed(0)
    model = build_clcae(cfg, load_pretrained=False)
    aligner = build_aligner(cfg, model.x_avg, model.latent_avg)
    step = InversionStep(cfg, model, aligner)
    losses = []
    t0 = time.perf_counter()
    for i in range(steps):
        j = (i * batch) % len(images)
        losses.append(step(images[j:j + batch], i)["total"])
    return losses, time.perf_counter() - t0


def summarise(curves: dict[str, list[float]], seconds: dict[str, float], steps: int, tail_n: int) -> dict:
    tail = slice(steps - tail_n, steps)
    ref = curves.get("fp32")
    summary = {}
    for prec, losses in curves.items():
        s = {"first": round(losses[0], 5), "mean_last_tail": round(statistics.mean(losses[tail]), 5),
             "seconds_total": round(seconds[prec], 1)}
        if ref is not None and prec != "fp32":
            diffs = [a - b for a, b in zip(losses, ref)]
            noise = statistics.stdev([b - a for a, b in zip(ref[tail], ref[tail][1:])])
            s["max_abs_diff_vs_fp32"] = round(max(abs(d) for d in diffs), 5)
            s["mean_abs_diff_vs_fp32_tail"] = round(statistics.mean(abs(d) for d in diffs[tail]), 5)
            s["fp32_step_to_step_noise_tail"] = round(noise, 5)
            s["tail_diff_over_noise"] = round(s["mean_abs_diff_vs_fp32_tail"] / noise, 3)
        summary[prec] = s
    return {"benchmark": "bench/amp_curve.py", "config": "configs/tiny.yaml", "steps": steps, "tail": tail_n,
            "seed": 0, "torch": torch.__version__, "summary": summary,
            "curves": {k: [round(v, 6) for v in c] for k, c in curves.items()}}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--tail", type=int, default=20)
    p.add_argument("--precisions", nargs="+", choices=PRECISIONS, default=list(PRECISIONS))
    p.add_argument("--merge", type=Path, nargs="+", help="combine the JSON of runs with one precision each "
                   "(run in parallel processes) into --out, recomputing the summary")
    p.add_argument("--out", type=Path)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.merge:
        parts = [json.loads(f.read_text()) for f in args.merge]
        curves = {k: v for r in parts for k, v in r["curves"].items()}
        seconds = {k: v["seconds_total"] for r in parts for k, v in r["summary"].items()}
        report = summarise(curves, seconds, parts[0]["steps"], parts[0]["tail"])
        report["note"] = "one process per precision, run side by side; merged with --merge"
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        print(json.dumps(report["summary"], indent=2))
        return report
    cfg = load_config(ROOT / "configs" / "tiny.yaml")
    torch.manual_seed(1)
    g = build_clcae(cfg, load_pretrained=False).decoder.eval()
    with torch.no_grad():
        w = g.mapping(torch.randn(64, cfg.generator.style_dim))
        images = g.synthesis(g.broadcast(w)).clamp(-1, 1)
    curves, seconds = {}, {}
    for prec in args.precisions:
        curves[prec], seconds[prec] = curve(prec, args.steps, images, cfg.data.batch_size)
        print(f"[amp] {prec}: first {curves[prec][0]:.4f} last {curves[prec][-1]:.4f} ({seconds[prec]:.0f} s)",
              file=sys.stderr, flush=True)
    report = summarise(curves, seconds, args.steps, args.tail)
    text = json.dumps(report, indent=2)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print(json.dumps(report["summary"], indent=2))
    return report


if __name__ == "__main__":
    main()
