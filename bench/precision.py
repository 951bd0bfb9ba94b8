"""``infer.precision``: speed and fidelity of the Inverter (what Serve and the batch job run) in fp32, bf16, fp16.

    python bench/precision.py --sizes 256 1024 --batches 1 --rounds 3 --out bench/results/precision_cpu.json

One model per precision (the same random weights at the official sizes, ``configs/ffhq.yaml``: IR-SE50, 256x256
input) in its own Inverter, the same input batch.  Fidelity against fp32: PSNR of G(w+, f) over the [-1, 1] range and
max |difference| of w, w+ and f.  Speed: ``Inverter.invert`` timed interleaved (a rotating order per round),
reported as per-round ratios to fp32 (median, min, max); on CPU with one thread the clock is the thread's CPU time
(see bench/generator.py for why), otherwise wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.report import emit  # noqa: E402
from clcae.config import PRECISIONS, load_config  # noqa: E402
from clcae.factory import build_clcae  # noqa: E402
from clcae.inference import Inverter  # noqa: E402


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = (a - b).square().mean().item()
    return float("inf") if mse == 0 else round(10 * torch.log10(torch.tensor(4.0 / mse)).item(), 2)


def run(size: int, batch: int, rounds: int, precisions: list[str], device: str, clock: Any) -> dict[str, Any]:
    cfg = load_config(ROOT / "configs" / "ffhq.yaml", [f"generator.size={size}", "generator.checkpoint=null",
                                                       "encoder.pretrained=null"])
    inverters = {}
    for p in precisions:  # one model each (same seed, same weights): a low-precision Inverter lowers its encoder
        torch.manual_seed(0)
        inverters[p] = Inverter(build_clcae(cfg, load_pretrained=False), device=device, precision=p)
    x = (torch.rand(batch, 3, 256, 256, generator=torch.Generator().manual_seed(1)) * 2 - 1).to(device)
    results = {p: inv.invert(x) for p, inv in inverters.items()}  # warm-up, and the outputs compared
    ref = results["fp32"]
    times: dict[str, list[float]] = {p: [] for p in precisions}
    for r in range(rounds):
        for p in precisions[r % len(precisions):] + precisions[:r % len(precisions)]:
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = clock()
            inverters[p].invert(x)
            if device == "cuda":
                torch.cuda.synchronize()
            times[p].append(clock() - t0)
    out: dict[str, Any] = {"size": size, "batch": batch, "rounds": rounds, "modes": {}}
    for p in precisions:
        res = results[p]
        ratios = [a / b for a, b in zip(times[p], times["fp32"])]
        out["modes"][p] = {
            "seconds_per_image_median": round(statistics.median(times[p]) / batch, 3),
            "time_vs_fp32": {"median": round(statistics.median(ratios), 3), "min": round(min(ratios), 3),
                             "max": round(max(ratios), 3)},
            "speedup_vs_fp32_median": round(1 / statistics.median(ratios), 2),
            "psnr_db_image_vs_fp32": psnr(res.image, ref.image),
            "max_abs_diff_w": float((res.w - ref.w).abs().max()),
            "max_abs_diff_w_plus": float((res.w_plus - ref.w_plus).abs().max()),
            "max_abs_diff_f": float((res.f - ref.f).abs().max()) if res.f is not None else None,
            "max_abs_w_plus": float(ref.w_plus.abs().max()),
            "calls_s": [round(t, 3) for t in times[p]],
        }
    return out


def to_markdown(report: dict[str, Any]) -> str:
    lines = ["| generator | batch | precision | x fp32 time (median [min, max]) | speed-up | PSNR G(w+, f) vs fp32 "
             "| max abs diff w | max abs diff w+ | max abs diff f |", "|---:|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in report["results"]:
        for p, m in r["modes"].items():
            t = m["time_vs_fp32"]
            f = m["max_abs_diff_f"]
            lines.append(f"| {r['size']} | {r['batch']} | {p} | {t['median']:.2f} [{t['min']:.2f}, {t['max']:.2f}] "
                         f"| {m['speedup_vs_fp32_median']:.2f}x | {m['psnr_db_image_vs_fp32']} "
                         f"| {m['max_abs_diff_w']:.2g} | {m['max_abs_diff_w_plus']:.2g} "
                         f"| {'' if f is None else f'{f:.2g}'} |")
    lines += ["", f"Inverter.invert on a (B, 3, 256, 256) batch, random weights at the official sizes, "
              f"{report['threads']} thread(s), clock: {report['clock']}, {report['device']}; load average "
              f"{report['load_average_at_start']} -> {report['load_average_at_end']} (shared machine: ratios only)."]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[256, 1024])
    p.add_argument("--batches", type=int, nargs="+", default=[1])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--precisions", nargs="+", choices=PRECISIONS, default=list(PRECISIONS))
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default 1: CPU-time clock)")
    p.add_argument("--out", type=Path)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if "fp32" not in args.precisions:
        args.precisions.insert(0, "fp32")
    threads = args.threads or (1 if args.device == "cpu" else torch.get_num_threads())
    torch.set_num_threads(threads)
    one_thread_cpu = args.device == "cpu" and threads == 1
    clock = time.thread_time if one_thread_cpu else time.perf_counter
    report: dict[str, Any] = {"benchmark": "bench/precision.py", "device": args.device, "torch": torch.__version__,
                              "threads": threads, "clock": "thread CPU time" if one_thread_cpu else "wall clock",
                              "load_average_at_start": [round(x, 2) for x in os.getloadavg()], "results": []}
    for size in args.sizes:
        for batch in args.batches:
            report["results"].append(run(size, batch, args.rounds, args.precisions, args.device, clock))
            print(json.dumps({k: v for k, v in report["results"][-1].items() if k != "modes"}
                             | {m: {k: v[k] for k in ("time_vs_fp32", "psnr_db_image_vs_fp32")}
                                for m, v in report["results"][-1]["modes"].items()}), file=sys.stderr, flush=True)
    report["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    emit(report, args.out, markdown=to_markdown(report))
    return report


if __name__ == "__main__":
    main()
