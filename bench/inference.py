"""The speed table: the StyleGAN2 generator, CLCAE's three reconstructions and the pSp path, in one run.

Prints JSON (and writes markdown with ``--out``/``--md``) with ms/image for each (generator size, batch), FLOPs
per image, the achieved FLOP/s next to this machine's measured matmul peak, and the ratios the project tracks:

* ``generator``            G.synthesis(w+) alone (no encoder, no pooling).
* ``clcae_w``              CLCAE inversion to G(w): ``CLCAE.forward(x, outputs=("w",))`` (the whole encoder runs,
                           one generator pass from the broadcast w, pooling).
* ``clcae_w_plus``         the same to G(w+): ``CLCAE.forward(x, outputs=("w_plus",))``.
* ``clcae_inference``      CLCAE to G(w+, f), what a user gets: ``Inverter.invert(x)`` on a preprocessed
                           (B, 3, 256, 256) tensor = IR-SE50 + FPN + map2style + W+ and F cross-attention (eval
                           mode) + G(w+, f) + pooling.
* ``psp``                  pSp's GradualStyleEncoder (the same IR-SE50 + FPN, N map2style blocks split 3/4/rest
                           on c3/p2/p1) + one generator pass G(w+) + pooling, as pSp's ``forward``.
* ``clcae_train_forward``  ``CLCAE.forward(x)``: the training-style forward with G(w), G(w+) and G(w+, f)
                           (eval mode, no autograd; by default at batch 1 only, see --train-forward-batches).

All weights are random at the official sizes (IR-SE50, 256x256 input, style_dim 512, the official channel
table): nothing is read from disk or downloaded.  The models come from ``load_config`` + ``build_clcae``, the
code path users run.  The pSp path is ``clcae.models.encoder.PSPEncoder`` (the fidelity study's pSp baseline)
on the CLCAE model's generator, so both paths render with the same weights.

Timing: ``torch.inference_mode``, warm-up calls per case, then ``repeats`` rounds in which every case runs once
(the order rotates each round, so load from other processes hits all cases alike); wall clock by
``time.perf_counter`` with ``torch.cuda.synchronize()`` on CUDA.  Reported: median and min per image, and the
CLCAE/pSp ratio both as a ratio of medians and as the median of the per-round ratios.  FLOPs per image (batch
1, matmuls and convolutions counted by ``torch.utils.flop_counter``) give a ratio that machine load cannot
move.  Groups whose rounds are slow (1024 x 8 on a laptop CPU) run fewer rounds, down to one, within
``--budget-s``; the JSON says so.

    python bench/inference.py --quick
    python bench/inference.py --out bench_inference.json            # 256 and 1024, batch 1 and 8
    python bench/inference.py --device cuda --repeats 20
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

from clcae.cli_args import config_file, default_config
from clcae.config import CLCAEConfig, load_config
from clcae.device import pick_device
from clcae.factory import build_clcae
from clcae.inference import Inverter
from clcae.models.clcae import CLCAE
from clcae.models.encoder import PSPEncoder
from clcae.models.stylegan2 import Generator

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = Path(default_config("ffhq"))
CASES = ("generator", "clcae_w", "clcae_w_plus", "clcae_inference", "psp", "clcae_train_forward")
LABELS = {
    "generator": "G(w+) alone (generator only)",
    "clcae_w": "CLCAE -> G(w)",
    "clcae_w_plus": "CLCAE -> G(w+)",
    "clcae_inference": "CLCAE -> G(w+, f) (Inverter.invert)",
    "psp": "pSp -> G(w+)",
    "clcae_train_forward": "CLCAE.forward: G(w), G(w+), G(w+, f)",
}
TARGET_RATIO = 1.3            # issue: full CLCAE inference at most 1.3x the pSp path
PAPER_SECONDS = {"clcae": 0.080, "psp": 0.028}  # the paper's runtime table (GPU, authors' timing)


# ---------------------------------------------------------------------------------------------- models
def bench_config(config: Path, size: int, extra: Sequence[str] = ()) -> CLCAEConfig:
    """The user config at ``size`` with random weights: no generator checkpoint, no IR-SE50 init."""
    overrides = [f"generator.size={size}", "generator.checkpoint=null", "encoder.pretrained=null", *extra]
    return load_config(config, overrides)


def build_models(cfg: CLCAEConfig, device: torch.device, seed: int = 0) -> tuple[Inverter, CLCAE]:
    torch.manual_seed(seed)
    model = build_clcae(cfg, load_pretrained=False)
    inverter = Inverter(model, device=str(device), model_id=f"bench:{cfg.name}:{cfg.generator.size}")
    torch.manual_seed(seed + 1)
    m, g = inverter.model, inverter.model.decoder
    enc = PSPEncoder(cfg.encoder.backbone, tuple(cfg.encoder.input_size), g.style_dim, g.n_latent)
    # Same generator module, latent_avg and crop: both paths render with the same weights.
    psp = CLCAE(enc, g, m.latent_avg, m.crop).to(device).eval().requires_grad_(False)
    return inverter, psp


def case_functions(inverter: Inverter, psp: CLCAE, batch: int, device: torch.device
                   ) -> dict[str, Callable[[], Any]]:
    model = inverter.model
    g: Generator = model.decoder
    gen = torch.Generator().manual_seed(batch)
    h, w = inverter.input_size
    x = (torch.rand(batch, 3, h, w, generator=gen) * 2 - 1).to(device)
    w_plus = (model.latent_avg.cpu() + 0.5 * torch.randn(batch, g.n_latent, g.style_dim, generator=gen)).to(device)
    return {
        "generator": lambda: g.synthesis(w_plus),
        "clcae_w": lambda: model(x, outputs=("w",)),
        "clcae_w_plus": lambda: model(x, outputs=("w_plus",)),
        "clcae_inference": lambda: inverter.invert(x),
        "psp": lambda: psp(x, outputs=("w_plus",)),
        "clcae_train_forward": lambda: model(x),
    }


# ---------------------------------------------------------------------------------------------- timing
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> float:
    """Wall-clock ms of one call, the device drained before and after."""
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return (time.perf_counter() - t0) * 1e3


def run_group(fns: dict[str, Callable[[], Any]], device: torch.device, warmup: int, repeats: int,
              budget_ms: float = float("inf")) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Warm every case up, then up to ``repeats`` rounds with every case once, in a rotating order.

    Returns per-case warm-up and timed call times (ms).  When the last warm-up round says the timed rounds
    would take longer than ``budget_ms``, fewer rounds run (at least one): on 2 CPU cores one round at
    1024 x 8 takes minutes, and each of its calls already averages over 8 images.
    """
    names = list(fns)
    warm: dict[str, list[float]] = {n: [] for n in names}
    times: dict[str, list[float]] = {n: [] for n in names}
    with torch.inference_mode():
        for name in names:
            for _ in range(warmup):
                warm[name].append(timed(fns[name], device))
        round_ms = sum(w[-1] for w in warm.values())
        if round_ms * repeats > budget_ms:
            repeats = max(1, int(budget_ms // round_ms))
        for r in range(repeats):
            for name in names[r % len(names):] + names[:r % len(names)]:
                times[name].append(timed(fns[name], device))
    return warm, times


def gflops(fns: dict[str, Callable[[], Any]]) -> dict[str, float]:
    """GFLOP per call (matmuls and convolutions, as torch's FlopCounterMode counts them): load-independent."""
    out = {}
    for name, fn in fns.items():
        with FlopCounterMode(display=False) as counter, torch.inference_mode():
            fn()
        out[name] = round(counter.get_total_flops() / 1e9, 2)
    return out


def flop_summary(fns: dict[str, Callable[[], Any]]) -> dict[str, Any]:
    per_image = gflops(fns)
    out: dict[str, Any] = {"gflop_per_image": per_image}
    if "clcae_inference" in per_image and "psp" in per_image:
        out["clcae_inference_over_psp"] = round(per_image["clcae_inference"] / per_image["psp"], 3)
    return out


def matmul_peak(device: torch.device, n: int | None = None, repeats: int = 5,
                dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """This machine's measured dense matmul rate (GFLOP/s, best of ``repeats``) in the benchmark's dtype.

    The ceiling that the models' convolutions and matmuls (float32, the same threads) could at best reach; a
    roofline reference, not a vendor figure.  On CUDA, float32 matmuls use TF32 only when the user enabled it
    (``torch.backends.cuda.matmul.allow_tf32``), the same setting the models run under.
    """
    n = n or (8192 if device.type == "cuda" else 2048)
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=gen, dtype=dtype).to(device)
    b = torch.randn(n, n, generator=gen, dtype=dtype).to(device)
    with torch.inference_mode():
        for _ in range(2):  # warm-up: thread pool, cuBLAS handle and heuristics
            torch.mm(a, b)
        best = min(timed(lambda: torch.mm(a, b), device) for _ in range(repeats))
    return {"n": n, "dtype": str(dtype).removeprefix("torch."), "repeats": repeats, "best_ms": round(best, 2),
            "gflops": round(2 * n**3 / (best / 1e3) / 1e9, 1)}


def throughput(entry: dict[str, Any], flops: dict[str, Any], peak_gflops: float | None) -> None:
    """Add achieved GFLOP/s (FLOPs per image over median time per image) and its share of the matmul peak."""
    per_image = flops.get("gflop_per_image", {})
    for name, case in entry["cases"].items():
        if name not in per_image:
            continue
        achieved = per_image[name] / (case["ms_per_image_median"] / 1e3)
        case["gflop_per_image"] = per_image[name]
        case["achieved_gflops"] = round(achieved, 1)
        if peak_gflops:
            case["fraction_of_matmul_peak"] = round(achieved / peak_gflops, 3)


def summarise(call_ms: list[float], batch: int) -> dict[str, Any]:
    per_image = [t / batch for t in call_ms]
    return {
        "ms_per_image_median": round(statistics.median(per_image), 2),
        "ms_per_image_min": round(min(per_image), 2),
        "ms_per_call_median": round(statistics.median(call_ms), 2),
        "calls_ms": [round(t, 2) for t in call_ms],
    }


def ratios(times: dict[str, list[float]]) -> dict[str, float]:
    med = {k: statistics.median(v) for k, v in times.items()}
    out: dict[str, float] = {}
    if "clcae_inference" in med and "psp" in med:
        out["clcae_inference_over_psp"] = round(med["clcae_inference"] / med["psp"], 3)
        out["clcae_inference_over_psp_min"] = round(min(times["clcae_inference"]) / min(times["psp"]), 3)
        # Same round = similar background load: the paired ratio is the steadier figure on a busy machine.
        paired = [a / b for a, b in zip(times["clcae_inference"], times["psp"])]
        out["clcae_inference_over_psp_paired_median"] = round(statistics.median(paired), 3)
    if "generator" in med:
        for name in ("clcae_inference", "psp"):
            if name in med:
                out[f"generator_share_of_{name}"] = round(med["generator"] / med[name], 3)
    for name in ("clcae_w", "clcae_w_plus"):
        if name in med and "psp" in med:
            out[f"{name}_over_psp"] = round(med[name] / med["psp"], 3)
    if "clcae_train_forward" in med and "clcae_inference" in med:
        out["clcae_train_forward_over_clcae_inference"] = round(
            med["clcae_train_forward"] / med["clcae_inference"], 3)
    return out


def peak_rss_mb() -> float:
    # ru_maxrss is KiB on Linux, bytes on macOS.
    scale = 1 / 1024 / 1024 if sys.platform == "darwin" else 1 / 1024
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale, 1)


def machine(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {
        "device": str(device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
    }
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                 if line.startswith("model name")]
        if names:
            info["cpu_model"] = names[0]
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    if hasattr(os, "getloadavg"):
        info["load_average_at_start"] = [round(x, 2) for x in os.getloadavg()]
    return info


# ---------------------------------------------------------------------------------------------- main
def run(args: argparse.Namespace) -> dict[str, Any]:
    device = pick_device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible to torch; use --device cpu or auto")
    report = report_header(args, device)
    start = time.perf_counter()
    report["matmul_peak"] = matmul_peak(device) if args.peak else None
    if report["matmul_peak"]:
        print(f"[bench] matmul peak {report['matmul_peak']}", file=sys.stderr, flush=True)
    for size in args.sizes:
        cfg = bench_config(args.config, size, args.set)
        inverter, psp = build_models(cfg, device)
        report["input_size"] = list(inverter.input_size)
        if args.flops:
            # Batch 1 (FLOPs scale linearly with batch); a second opinion on the ratio that load cannot move.
            fns = {k: v for k, v in case_functions(inverter, psp, 1, device).items() if k in args.cases}
            report["flops"][str(size)] = flop_summary(fns)
        for batch in args.batches:
            report["results"].append(time_group(inverter, psp, size, batch, args, device))
        del inverter, psp
    report["target"] = target_summary(report["results"])
    if report["matmul_peak"]:
        # Measured again at the end: on a shared machine the first figure can be low; the ceiling is the higher.
        end = matmul_peak(device)
        first = report["matmul_peak"]
        report["matmul_peak"] = {**(end if end["gflops"] > first["gflops"] else first),
                                 "gflops_at_start": first["gflops"], "gflops_at_end": end["gflops"]}
    for entry in report["results"]:
        peak = report["matmul_peak"]["gflops"] if report["matmul_peak"] else None
        throughput(entry, report["flops"].get(str(entry["size"]), {}), peak)
    report["total_wall_s"] = round(time.perf_counter() - start, 1)
    if hasattr(os, "getloadavg"):
        report["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    return report


def report_header(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    return {
        "benchmark": "bench/inference.py",
        **machine(device),
        "config": str(args.config),
        "weights": "random init at the config's sizes (generator.checkpoint=null, encoder.pretrained=null)",
        "input_size": None,
        "warmup": args.warmup,
        "repeats_requested": args.repeats,
        "cases": list(args.cases),
        "train_forward_batches": list(args.train_forward_batches),
        "budget_s_per_group": args.budget_s or None,
        "method": "torch.inference_mode; warm-up calls per case, then rounds with every case once in a rotating "
                  "order; time.perf_counter wall clock" + (" with torch.cuda.synchronize" if device.type == "cuda"
                                                          else ""),
        "flops": {},
        "results": [],
    }


def time_group(inverter: Inverter, psp: Any, size: int, batch: int, args: argparse.Namespace,
               device: torch.device) -> dict[str, Any]:
    """Every case at one (size, batch), interleaved: the entry of the report's ``results``."""
    cases = [c for c in args.cases if c != "clcae_train_forward" or batch in args.train_forward_batches]
    fns = {k: v for k, v in case_functions(inverter, psp, batch, device).items() if k in cases}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    warm, times = run_group(fns, device, args.warmup, args.repeats, (args.budget_s or float("inf")) * 1e3)
    repeats = len(next(iter(times.values())))
    entry: dict[str, Any] = {
        "size": size, "batch": batch, "n_latent": inverter.model.decoder.n_latent,
        "warmup": args.warmup, "repeats": repeats, "group_wall_s": round(time.perf_counter() - t0, 1),
        "cases": {k: {**summarise(v, batch), "warmup_calls_ms": [round(t, 2) for t in warm[k]]}
                  for k, v in times.items()},
        "ratios": ratios(times),
        "peak_rss_mb_so_far": peak_rss_mb(),
    }
    if repeats < args.repeats:
        entry["note"] = (f"repeats reduced from {args.repeats} to {repeats}: {args.repeats} rounds would "
                         f"exceed the {args.budget_s:g} s budget for the timed rounds of one group")
    if device.type == "cuda":
        entry["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    print(f"[bench] size {size} batch {batch}: " + ", ".join(
        f"{k} {v['ms_per_image_median']:.1f} ms/img" for k, v in entry["cases"].items())
          + f"; ratios {entry['ratios']}", file=sys.stderr, flush=True)
    return entry


def target_summary(results: list[dict[str, Any]]) -> dict[str, Any]:
    got = {f"{r['size']}x{r['batch']}": r["ratios"].get("clcae_inference_over_psp") for r in results}
    got = {k: v for k, v in got.items() if v is not None}
    return {
        "max_clcae_inference_over_psp": TARGET_RATIO,
        "paper_ratio": round(PAPER_SECONDS["clcae"] / PAPER_SECONDS["psp"], 2),
        "paper_seconds": PAPER_SECONDS,
        "clcae_inference_over_psp": got,
        "met": bool(got) and all(v <= TARGET_RATIO for v in got.values()),
    }


def to_markdown(report: dict[str, Any]) -> str:
    """The speed table: one row per (generator size, batch, case), the machine and method underneath."""
    peak = report.get("matmul_peak")
    lines = [
        "| generator | batch | path | ms / image (median) | ms / image (min) | GFLOP / image | achieved GFLOP/s "
        "| share of matmul peak | x pSp (time) |",
        "|---:|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["results"]:
        psp = r["cases"].get("psp", {}).get("ms_per_image_median")
        for name, c in r["cases"].items():
            ratio = f"{c['ms_per_image_median'] / psp:.2f}" if psp and name != "generator" else ""
            gflop = c.get("gflop_per_image")
            share = c.get("fraction_of_matmul_peak")
            lines.append(
                f"| {r['size']} | {r['batch']} | {LABELS.get(name, name)} | {c['ms_per_image_median']:.1f} "
                f"| {c['ms_per_image_min']:.1f} | {'' if gflop is None else f'{gflop:.4g}'} "
                f"| {c.get('achieved_gflops', '')} | {'' if share is None else f'{100 * share:.0f}%'} "
                f"| {ratio} |")
    where = report.get("gpu") or report.get("cpu_model") or report.get("processor")
    notes = [
        "",
        f"Machine: {report['device']} ({where}), {report['cpu_count']} CPUs, torch {report['torch']}, "
        f"{report['threads']} threads; load average at start {report.get('load_average_at_start')}, at end "
        f"{report.get('load_average_at_end')}.",
    ]
    if peak:
        notes.append(f"Matmul peak: {peak['gflops']} GFLOP/s ({peak['dtype']} {peak['n']}x{peak['n']} torch.mm, "
                     f"best of {peak['repeats']}, the higher of {peak.get('gflops_at_start')} at the start and "
                     f"{peak.get('gflops_at_end')} at the end of the run). FLOPs per image are counted at batch 1 "
                     "by torch.utils.flop_counter (matmuls and convolutions).")
    notes.append(f"Method: {report['method']}. Repeats per group: "
                 + ", ".join(f"{r['size']}x{r['batch']}: {r['repeats']}" for r in report["results"])
                 + f". Target CLCAE/pSp <= {TARGET_RATIO} (paper: {PAPER_SECONDS['clcae']} s vs "
                   f"{PAPER_SECONDS['psp']} s on a V100); met: {report['target']['met']}.")
    return "\n".join(lines + notes) + "\n"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda", "auto"), default="cpu")
    p.add_argument("--sizes", type=int, nargs="+", default=[256, 1024], help="generator sizes")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--repeats", type=int, default=5, help="timed rounds per (size, batch)")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls per case before timing (>= 2)")
    p.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES))
    p.add_argument("--train-forward-batches", type=int, nargs="*", default=[1], metavar="B",
                   help="batches at which clcae_train_forward runs (default 1: at 1024 x 8 its 24-image "
                        "generator suffix would need an estimated 10+ GB and minutes per call on CPU)")
    p.add_argument("--budget-s", type=float, default=None,
                   help="seconds allowed for the timed rounds of one (size, batch); slower groups run fewer "
                        "repeats (at least 1), stated in the JSON. Default 75, none with --quick; 0 = none")
    p.add_argument("--no-flops", dest="flops", action="store_false",
                   help="skip the FLOP count (one extra batch-1 call per case and size)")
    p.add_argument("--no-peak", dest="peak", action="store_false", help="skip the matmul peak measurement")
    p.add_argument("--quick", action="store_true", help="size 256, batch 1, 3 repeats")
    p.add_argument("--config", type=lambda v: Path(config_file(v)), default=DEFAULT_CONFIG)
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="extra config overrides")
    p.add_argument("--out", type=Path, help="also write the JSON here, and the markdown table next to it (.md)")
    p.add_argument("--md", type=Path, help="write the markdown table here (default: --out with suffix .md)")
    args = p.parse_args(argv)
    if args.quick:
        args.sizes, args.batches, args.repeats = [256], [1], min(args.repeats, 3)
    if args.budget_s is None:
        args.budget_s = 0.0 if args.quick else 75.0
    if args.warmup < 2:
        p.error(f"--warmup must be >= 2 (got {args.warmup}): the first calls pay for allocation and kernel setup")
    if args.repeats < 1 or min(args.batches) < 1:
        p.error("--repeats and --batches must be >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    report = run(args)
    text = json.dumps(report, indent=2)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    md_path = args.md or (args.out.with_suffix(".md") if args.out is not None else None)
    if md_path is not None:
        md_path.parent.mkdir(parents=True, exist_ok=True)
        md_path.write_text(to_markdown(report))


if __name__ == "__main__":
    main()
