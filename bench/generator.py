"""The StyleGAN2 generator alone: today's path against the pre-speed-work reference, precision modes, and the
FLOP floor, timed interleaved in one process.

    python bench/generator.py --sizes 1024 --batches 1 8 --rounds 5 --out bench/results/generator_cpu.json
    python bench/generator.py --smoke                       # a 64 generator, seconds: the script still runs
    python bench/generator.py --device cuda --sizes 1024 --batches 1 8 --modes fp32 bf16 fp16

Cases (``--modes``): ``reference`` (``bench/reference_generator.py``: contiguous NCHW, out-of-place element-wise
steps, the code before the speed work), ``fp32`` (today's exact path), ``bf16`` and ``fp16`` (today's path under
``torch.autocast``, as ``infer.precision`` runs it), ``compiled`` (``torch.compile`` of today's fp32 path),
``compiled_bf16`` (the compiled path under bf16 autocast).

Why interleaved ratios: the machine these figures come from is shared and loaded, so absolute times drift by
2-10x within minutes.  Every round runs each case once in a rotating order and then measures the matmul peak
(best of ``--peak-repeats`` float32 2048x2048 ``torch.mm``) right after; the JSON reports per-round ratios
(case / fp32, case / reference) and per-round "x FLOP floor" = time / (FLOPs / that round's peak), each as a
median with min and max.  With ``--threads 1`` (the default on CPU) the clock is the thread's CPU time, which
other processes cannot inflate as much as wall time (page-fault time still counts: it is ours); with more
threads it is wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import reference_generator  # noqa: E402

from bench.report import emit  # noqa: E402
from clcae.device import autocast_context, keep_freed_memory  # noqa: E402
from clcae.models.stylegan2 import Generator  # noqa: E402

MODES = ("reference", "fp32", "bf16", "fp16", "compiled", "compiled_bf16")


def clock_for(threads: int, device: torch.device) -> tuple[str, Callable[[], float]]:
    if device.type == "cpu" and threads == 1:
        return "thread CPU time", time.thread_time
    return "wall clock", time.perf_counter


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_seconds(device: torch.device, clock: Callable[[], float], repeats: int, n: int) -> float:
    """Best time of one float32 n x n matmul (the roofline reference); TF32 only if the user enabled it."""
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    best = float("inf")
    for _ in range(repeats + 1):  # the first call warms up
        sync(device)
        t0 = clock()
        torch.mm(a, b)
        sync(device)
        best = min(best, clock() - t0)
    return best


def make_cases(g: Generator, modes: Sequence[str], batch: int, device: torch.device
               ) -> dict[str, Callable[[], torch.Tensor]]:
    gen = torch.Generator().manual_seed(batch)
    w = (0.5 * torch.randn(batch, g.n_latent, g.style_dim, generator=gen)).to(device)
    cases: dict[str, Callable[[], torch.Tensor]] = {}
    for mode in modes:
        if mode == "reference":
            cases[mode] = lambda: reference_generator.synthesis(g, w)
            continue
        # "compiled" = infer.compile=true, "compiled_bf16" adds infer.precision=bf16 (the epilogues fused)
        compiled = mode.startswith("compiled")
        precision = mode.removeprefix("compiled").lstrip("_") or "fp32"
        synthesis = torch.compile(g.synthesis, dynamic=False) if compiled else g.synthesis

        def run(s: Callable[[torch.Tensor], torch.Tensor] = synthesis, p: str = precision) -> torch.Tensor:
            with autocast_context(p, device):
                return s(w)
        cases[mode] = run
    return cases


def spread(xs: list[float], digits: int = 3) -> dict[str, float]:
    return {"median": round(statistics.median(xs), digits), "min": round(min(xs), digits),
            "max": round(max(xs), digits)}


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR of a against b over the [-1, 1] range (peak-to-peak 2)."""
    mse = (a.float() - b.float()).square().mean().item()
    return float("inf") if mse == 0 else 10 * torch.log10(torch.tensor(4.0 / mse)).item()


def run_group(g: Generator, size: int, batch: int, args: argparse.Namespace, device: torch.device,
              clock: Callable[[], float]) -> dict[str, Any]:
    cases = make_cases(g, args.modes, batch, device)
    entry: dict[str, Any] = {"size": size, "batch": batch, "cases": {}}
    with torch.inference_mode():
        # FLOPs per image (convolutions and matmuls, counted once at batch 1: they scale with the batch).
        w1 = torch.zeros(1, g.n_latent, g.style_dim, device=device)
        with FlopCounterMode(display=False) as counter:
            g.synthesis(w1)
        gflop = counter.get_total_flops() / 1e9
        entry["gflop_per_image"] = round(gflop, 2)
        outputs, warm = {}, {}
        for name, fn in cases.items():
            t0 = time.perf_counter()
            outputs[name] = fn().float()
            warm[name] = round(time.perf_counter() - t0, 2)
            for _ in range(args.warmup - 1):
                fn()
        base = outputs.get("fp32", outputs.get("reference"))
        times: dict[str, list[float]] = {n: [] for n in cases}
        faults: dict[str, list[int]] = {n: [] for n in cases}
        peaks: list[float] = []
        names = list(cases)
        for r in range(args.rounds):
            for name in names[r % len(names):] + names[:r % len(names)]:
                f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                sync(device)
                t0 = clock()
                cases[name]()
                sync(device)
                times[name].append(clock() - t0)
                faults[name].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
            peaks.append(2 * args.peak_n ** 3 / matmul_seconds(device, clock, args.peak_repeats, args.peak_n) / 1e9)
    floor = [gflop * batch / p for p in peaks]  # seconds per call at the matmul peak
    entry["matmul_peak_gflops_per_round"] = [round(p, 1) for p in peaks]
    for name in names:
        t = times[name]
        c: dict[str, Any] = {
            "seconds_per_image": spread([x / batch for x in t], 4),
            "x_flop_floor": spread([x / f for x, f in zip(t, floor)]),
            "fraction_of_matmul_peak": spread([f / x for x, f in zip(t, floor)]),
            "minor_page_faults_per_image": int(statistics.median(faults[name]) / batch),
            "first_call_s": warm[name],
            "calls_s": [round(x, 3) for x in t],
        }
        for ref in ("fp32", "reference"):
            if ref in times and ref != name:
                c[f"time_vs_{ref}"] = spread([a / b for a, b in zip(t, times[ref])])
        if base is not None and name not in ("fp32", "reference" if "fp32" in outputs else ""):
            c["max_abs_diff_vs_fp32"] = float((outputs[name] - base).abs().max())
            c["psnr_db_vs_fp32"] = round(psnr(outputs[name], base), 2)
        entry["cases"][name] = c
    return entry


def to_markdown(report: dict[str, Any]) -> str:
    lines = ["| generator | batch | path | s / image (median) | x fp32 (median [min, max]) | x reference "
             "| x FLOP floor | % of matmul peak | page faults / image | PSNR vs fp32 |",
             "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|"]

    def fmt(s: dict[str, float] | None) -> str:
        return "" if s is None else f"{s['median']:.2f} [{s['min']:.2f}, {s['max']:.2f}]"

    for e in report["results"]:
        for name, c in e["cases"].items():
            ps = c.get("psnr_db_vs_fp32")
            lines.append(f"| {e['size']} | {e['batch']} | {name} | {c['seconds_per_image']['median']:.3f} "
                         f"| {fmt(c.get('time_vs_fp32'))} | {fmt(c.get('time_vs_reference'))} "
                         f"| {fmt(c['x_flop_floor'])} | {100 * c['fraction_of_matmul_peak']['median']:.0f}% "
                         f"| {c['minor_page_faults_per_image']} | {'' if ps is None else ps} |")
    m = report["machine"]
    lines += ["", f"Machine: {m['device']} {m.get('cpu_model', '')}, {m['cpu_count']} CPUs, torch {m['torch']}, "
              f"{report['threads']} thread(s), clock: {report['clock']}; load average {m['load_average_at_start']} "
              f"at the start, {report.get('load_average_at_end')} at the end (shared machine: ratios, not times).",
              f"Rounds {report['rounds']} per group, interleaved with a rotating order; matmul peak (float32 "
              f"{report['peak_n']}^2 torch.mm) measured after every round, the FLOP floor = GFLOP / that peak."]
    return "\n".join(lines) + "\n"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--sizes", type=int, nargs="+", default=[1024])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--modes", nargs="+", choices=MODES, default=["reference", "fp32"])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default 1 on CPU: CPU-time clock)")
    p.add_argument("--peak-n", type=int, default=None, help="matmul size for the peak (2048 CPU, 8192 CUDA)")
    p.add_argument("--peak-repeats", type=int, default=3)
    p.add_argument("--smoke", action="store_true", help="a 64 generator, batch 1 and 2, 1 round")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    if args.smoke:
        args.sizes, args.batches, args.rounds, args.warmup = [64], [1, 2], 1, 1
    if args.threads is None:
        args.threads = 1 if args.device == "cpu" else torch.get_num_threads()
    if args.peak_n is None:
        args.peak_n = 512 if args.smoke else (8192 if args.device == "cuda" else 2048)
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    clock_name, clock = clock_for(args.threads, device)
    machine: dict[str, Any] = {"device": str(device), "torch": torch.__version__, "cpu_count": os.cpu_count(),
                               "platform": platform.platform(),
                               "load_average_at_start": [round(x, 2) for x in os.getloadavg()]}
    names = [ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
             if ln.startswith("model name")] if Path("/proc/cpuinfo").exists() else []
    if names:
        machine["cpu_model"] = names[0]
    if device.type == "cuda":
        machine["gpu"] = torch.cuda.get_device_name(device)
    else:  # as the platform's CPU processes run (the Inverter and training call it); CLCAE_KEEP_FREED_MEMORY=0: off
        machine["malloc_keeps_freed_memory"] = keep_freed_memory()
    report: dict[str, Any] = {"benchmark": "bench/generator.py", "machine": machine, "threads": args.threads,
                              "clock": clock_name, "rounds": args.rounds, "peak_n": args.peak_n,
                              "modes": list(args.modes), "weights": "random (seed 0), constant noise",
                              "results": []}
    for size in args.sizes:
        torch.manual_seed(0)
        g = Generator(size) if not args.smoke else Generator(size, 64, 2, channel_max=32)
        g = g.to(device).eval().requires_grad_(False)
        for batch in args.batches:
            entry = run_group(g, size, batch, args, device, clock)
            report["results"].append(entry)
            print(json.dumps({k: v for k, v in entry.items() if k != "cases"} | {
                n: {k: c[k] for k in ("x_flop_floor", "time_vs_fp32", "time_vs_reference", "psnr_db_vs_fp32")
                    if k in c} for n, c in entry["cases"].items()}), file=sys.stderr, flush=True)
        del g
    report["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    emit(report, args.out, markdown=to_markdown(report))
    return report


if __name__ == "__main__":
    main()
