"""The benchmark scripts still run and report what their READMEs promise (no timing is asserted).

Benchmarks are not tests; these checks only keep bench/ from rotting: the speed table's columns are
consistent with each other, and the fidelity study's test splits and tables are what its docstring says.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shlex
import sys
from pathlib import Path

import pytest
import torch

from clcae.config import load_config
from clcae.factory import build_clcae, build_directions
from clcae.serving import model_replica_resources

ROOT = Path(__file__).resolve().parents[1]


def load_bench(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def speed_table(tmp_path_factory):
    inference = load_bench("inference")
    out = tmp_path_factory.mktemp("speed") / "speed.json"
    inference.main(["--config", str(ROOT / "configs" / "tiny.yaml"), "--sizes", "64", "--batches", "1", "2",
                    "--repeats", "1", "--out", str(out)])
    return inference, json.loads(out.read_text()), out.with_suffix(".md").read_text()


def test_speed_table_reports_every_path_with_flops_and_throughput(speed_table):
    inference, report, md = speed_table
    assert report["matmul_peak"]["gflops"] > 0
    assert [(r["size"], r["batch"]) for r in report["results"]] == [(64, 1), (64, 2)]
    flops = report["flops"]["64"]["gflop_per_image"]
    # CLCAE's three paths share the encoder; G(w+, f) skips nothing of G(w+) (f replaces G5, the prefix still
    # runs for the skip), so its count is at least G(w+)'s, and every inversion costs more than G alone.
    assert flops["clcae_inference"] >= flops["clcae_w_plus"] > flops["generator"]
    assert flops["psp"] > flops["generator"]
    for r in report["results"]:
        expected = {"generator", "clcae_w", "clcae_w_plus", "clcae_inference", "psp"}
        assert expected <= set(r["cases"])
        assert ("clcae_train_forward" in r["cases"]) == (r["batch"] == 1)  # default --train-forward-batches 1
        for name, case in r["cases"].items():
            # every figure a reader compares is present, finite and positive; a fraction of the measured peak
            # far above 1 would mean the FLOP count or the timing is wrong (timings themselves are not asserted)
            for key in ("gflop_per_image", "ms_per_image_median", "achieved_gflops", "fraction_of_matmul_peak"):
                assert 0 < case[key] < float("inf"), (name, key, case[key])
            assert case["fraction_of_matmul_peak"] < 3, (name, case)
    for label in inference.LABELS.values():
        assert label in md
    assert "Matmul peak" in md and md.count("\n| 64 |") == 6 + 5


def test_speed_table_rejects_too_few_warmup_calls():
    inference = load_bench("inference")
    with pytest.raises(SystemExit):
        inference.parse_args(["--warmup", "1"])


@pytest.fixture(scope="module")
def fidelity():
    return load_bench("fidelity")


def test_fidelity_splits_are_on_and_off_the_generator_manifold(fidelity):
    cfg = load_config(ROOT / "configs" / "tiny.yaml")
    model = build_clcae(cfg, load_pretrained=False).eval()
    s = fidelity.Settings(**{**fidelity.QUICK, "n_test": 6})
    splits = fidelity.make_splits(model, s)
    on, off = splits["on_manifold"], splits["off_manifold"]
    g = model.decoder
    assert on.images.shape == off.images.shape == (6, 3, *cfg.encoder.input_size)
    # on-manifold: the 8-bit image of G(w) for the stored w, which is the w+ truth broadcast
    assert torch.equal(on.w_plus, g.broadcast(on.w))
    assert torch.equal(on.images, fidelity.quantise(fidelity.render(model, on.w_plus)))
    # off-manifold: every image mixes two codes across layers (never a single w), then blur and noise
    assert off.w is None
    distinct = [len(torch.unique(off.w_plus[i], dim=0)) for i in range(6)]
    assert min(distinct) == 2
    clean = fidelity.quantise(fidelity.render(model, off.w_plus))
    assert (off.images - clean).abs().mean() > 0.01
    # the test sets never move with the study seed
    again = fidelity.make_splits(model, s)
    assert torch.equal(again["off_manifold"].images, off.images)


def test_fidelity_tables_aggregate_seeds_and_show_missing_cells(fidelity):
    def cell(v):
        return {"psnr": v, "ssim": 0.5, "lpips": 0.2, "latent_error": 0.3, "edit_psnr": None}

    per_seed = {sd: {"clcae": {"f": {"on_manifold": cell(20.0 + sd), "off_manifold": cell(18.0)}}} for sd in (0, 1, 2)}
    agg = fidelity.aggregate(per_seed)
    psnr = agg["clcae"]["f"]["on_manifold"]["psnr"]
    assert psnr["mean"] == pytest.approx(21.0) and psnr["std"] == pytest.approx(1.0) and psnr["n"] == 3
    assert agg["clcae"]["f"]["on_manifold"]["edit_psnr"] is None
    text = fidelity.table([("CLCAE", "clcae", "f"), ("pSp", "psp", "w_plus")], agg, ("psnr", "edit_psnr"))
    rows = text.splitlines()
    assert rows[2].startswith("| CLCAE | 21.00 ± 1.00 | n/a | 18.00 ± 0.00 | n/a |")
    assert rows[3] == "| pSp | n/a | n/a | n/a | n/a |"


def test_align_bench_reports_faces_per_s_and_writes_a_panel(tmp_path, capsys):
    from PIL import Image

    align = load_bench("align")
    out, panel = tmp_path / "align.json", tmp_path / "panel.png"
    assert align.main(["--megapixels", "0.5", "--repeats", "1", "--out", str(out), "--panel", str(panel)]) == 0
    result = json.loads(out.read_text())
    assert json.loads(capsys.readouterr().out) == result
    (size,) = result["sizes"]
    assert size["faces"] == 1 and size["faces_per_s"] > 0 and size["faces_per_cpu_s"] > 0
    assert Image.open(panel).height == 384 + 22  # two panels at one height, a label row under them
    # later steps append panels (reconstruction, edit pasted back): any number, any widths
    extra = align.write_panel(tmp_path / "more.png", [(name, Image.new("RGB", (w, 50))) for name, w in
                                                      (("original", 100), ("aligned", 50), ("edit", 50))], height=100)
    assert Image.open(extra).size == (200 + 100 + 100 + 2 * 6, 100 + 22)


def test_batch_bench_reports_per_round_ratios_as_median_and_spread():
    batch = load_bench("batch")

    def runs(seconds):
        return [{"images": 0, "seconds": s} for s in seconds]

    ray = [{"seconds": s, "images_per_s": 1.0, "stages": {"invert_s": s / 2, "actor_ready_s": None}}
           for s in (8.0, 10.0, 40.0)]
    ray2 = [{"seconds": s, "images_per_s": 1.0, "stages": {"invert_s": s / 2, "actor_ready_s": 1.0}}
            for s in (13.0, 14.0, 30.0)]
    out = batch.summarise({"plain": runs([10.0, 12.0, 11.0]), "plain_2x": runs([20.0, 21.0, 22.0]),
                           "ray_1a": ray, "ray_1a_2x": ray2}, [1], 100)
    r = out["ratios"]
    # within each round: plain seconds / ray seconds, and the extra seconds of 2N over N for the margin
    assert r["ray_1a_over_plain_end_to_end"]["rounds"] == [1.25, 1.2, 0.275]
    assert r["ray_1a_over_plain_end_to_end"]["median"] == 1.2
    assert r["ray_1a_over_plain_end_to_end"]["min"] == 0.275 and r["ray_1a_over_plain_end_to_end"]["max"] == 1.25
    # a round whose 2N run was faster than its N run has no margin: listed, left out of the statistics
    assert r["ray_1a_over_plain_marginal"]["rounds"] == [2.0, 2.25, None]
    assert r["ray_1a_over_plain_marginal"]["median"] == 2.125
    assert out["marginal_images_per_s"]["plain"]["rounds"] == [10.0, 11.11, 9.09]
    assert out["cases"]["ray_1a"]["stages"] == {"invert_s": 5.0}  # a stage some round lacks is left out
    assert out["cases"]["plain"]["seconds"]["median"] == 11.0


def test_cpu_seconds_are_attributed_to_the_process_that_spent_them(tmp_path):
    """bench/serve_load.py's per-process CPU profile: a child that burns CPU between two snapshots is charged what
    it spent in between, under its role, even when it renames itself the way Ray renames a worker that runs a
    method (``ray::Fake`` -> ``ray::Fake.method``).  Diffing by title charged the new title the process's whole
    lifetime: the Serve controller showed 4-11 ms per request that it never spent."""
    import subprocess

    memory = load_bench("memory")
    script = tmp_path / "burn_cpu.py"
    script.write_text(
        "import sys, time\nfrom ray._raylet import setproctitle\n"
        "def burn(s):\n    end = time.process_time() + s\n    while time.process_time() < end:\n        pass\n"
        "setproctitle('ray::Fake')\nburn(0.6)\nprint('idle', flush=True)\nsys.stdin.readline()\n"
        "setproctitle('ray::Fake.method')\nburn(0.3)\nprint('done', flush=True)\nsys.stdin.readline()\n")
    child = subprocess.Popen([sys.executable, str(script)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             text=True)
    try:
        assert child.stdout.readline().strip() == "idle"
        before = memory.cpu_snapshot()
        assert before[child.pid][0] == "ray::Fake" and before[child.pid][1] >= 0.55
        child.stdin.write("go\n")
        child.stdin.flush()
        assert child.stdout.readline().strip() == "done"
        after = memory.cpu_snapshot()
        assert after[child.pid][0] == "ray::Fake.method"
        spent = memory.cpu_spent(before, after)
        assert 0.25 <= spent["ray::Fake"] < 0.55, spent  # the 0.3 s in between, not the 0.9 s since it started
        assert "ray::Fake.method" not in spent
        assert spent["this process"] >= 0.0
    finally:
        child.communicate("\n")


def gpu_script_steps(mode: str) -> list[tuple[str, list[str]]]:
    """(bench script, its argv) for every step of bench/gpu.sh's GPU run (``mode="gpu"``) or ``--smoke`` run, as
    bash would expand them (continuation lines joined, $OUT and the RANDOM_WEIGHTS array filled in)."""
    text = (ROOT / "bench" / "gpu.sh").read_text().replace("\\\n", " ")
    weights = shlex.split(re.search(r"^RANDOM_WEIGHTS=\(([^)]*)\)", text, re.M).group(1))
    smoke, gpu = text.split("if [[ $SMOKE == 1 ]]; then", 1)[1].split("\nelse\n", 1)
    body = smoke if mode == "smoke" else gpu.split("\nfi\n", 1)[0]
    steps = []
    for line in body.splitlines():
        words = shlex.split(line.strip(), comments=True)
        if words[:1] != ["step"]:
            continue
        assert words[3] == "$PY", line
        argv = []
        for w in words[5:]:
            argv += weights if w == "${RANDOM_WEIGHTS[@]}" else [w.replace("$OUT", "/nonexistent/out")]
        steps.append((Path(words[4]).stem, argv))
    return steps


@pytest.mark.parametrize("mode", ["gpu", "smoke"])
def test_every_gpu_script_step_parses_and_its_config_loads(mode, tmp_path):
    """The GPU run has only been rehearsed (--smoke) on CPU: a flag or config-key typo in its own lines would only
    show on a lent GPU, whose minutes are few.  Every step's arguments go through its script's own parser, and the
    config with its overrides through load_config, which rejects unknown keys."""
    steps = gpu_script_steps(mode)
    expected = ["generator", "inference", "train_step", "batch", "serve_load"]
    assert sorted({name for name, _ in steps}) == sorted(expected)
    for name, argv in steps:
        module = load_bench(name)
        args = module.parse_args(argv)
        if mode == "gpu" and "--device" in argv:
            assert args.device == "cuda", (name, argv)
        if hasattr(args, "overrides"):
            cfg = load_config(args.config, list(args.overrides))
            if mode == "gpu":  # paper sizes, random weights at the official shapes: nothing to download
                assert cfg.generator.size == 1024 and cfg.generator.checkpoint is None, name
                assert cfg.encoder.pretrained is None, name
                build_directions(cfg)  # every direction file the run would load is there (none are named)
        if mode == "gpu" and name == "serve_load":  # both applications' model replicas on the one lent GPU
            configs = module.bench_configs(args, 8000, str(tmp_path))
            gpus = sum(2 * args.replicas * model_replica_resources(c.serve)["num_gpus"] for c in configs.values())
            assert all(c.serve.use_gpu for c in configs.values()) and 0 < gpus <= 1, gpus
