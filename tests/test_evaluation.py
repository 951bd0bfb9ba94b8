"""Evaluation: the Table 1 metrics of G(w), G(w+), G(w+, f), ID after an edit, timing, the report files."""

from __future__ import annotations

import csv
import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clcae.data.images import decode_image, encode_png
from clcae.data.shards import ShardWriter
from clcae.editing import EditError
from clcae.evaluation import COLUMNS, EvaluationError, evaluate, parse_edit, read_images, to_markdown, write_report
from clcae.metrics import psnr, ssim

ROOT = Path(__file__).resolve().parents[1]
N_IMAGES = 6


def pngs(n: int) -> list[bytes]:
    rng = np.random.default_rng(0)
    return [encode_png(Image.fromarray(rng.integers(0, 255, (72, 80, 3), dtype=np.uint8))) for _ in range(n)]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    d = tmp_path_factory.mktemp("images")
    for i, data in enumerate(pngs(N_IMAGES)):
        (d / f"{i:02d}.png").write_bytes(data)
    (d / "broken.png").write_bytes(b"not a png")  # counted and listed, not fatal
    (d / "notes.txt").write_text("not an image")  # no image suffix: skipped
    return d


@pytest.fixture(scope="module")
def result(inverter, folder):
    # a random tiny ArcFace exercises the ID rows without any weights file
    return evaluate(inverter, read_images(str(folder)), edit=[("smile", 2.0)], id_network="arcface",
                    id_backbone="ir_se_tiny", lpips_pretrained_backbone=False, batch_size=4, source=str(folder))


def test_three_columns_with_every_metric_in_range(result):
    assert result["images"] == N_IMAGES
    assert result["undecodable"]["count"] == 1 and result["undecodable"]["items"][0]["key"] == "broken.png"
    assert list(result["columns"]) == ["CLCAE_w", "CLCAE_w+", "CLCAE"]
    for column in result["columns"].values():
        psnr_, ssim_, lpips_, id_ = (column[m] for m in ("psnr", "ssim", "lpips", "id"))
        assert all(s["n"] == N_IMAGES for s in (psnr_, ssim_, lpips_, id_))
        assert math.isfinite(psnr_["mean"]) and psnr_["mean"] > 0
        assert -1 <= ssim_["mean"] <= 1 and lpips_["mean"] >= 0 and -1 <= id_["mean"] <= 1
        assert all(s["std"] >= 0 for s in (psnr_, ssim_, lpips_, id_))
    clcae = result["columns"]["CLCAE"]
    assert clcae["id_after_edit"]["n"] == N_IMAGES and -1 <= clcae["id_after_edit"]["mean"] <= 1
    assert result["columns"]["CLCAE_w"]["id_after_edit"]["mean"] is None
    # 6 images in batches of 4: two timed batches, each after the warm-up calls
    assert clcae["time_s"]["n_batches"] == 2 and 0 < clcae["time_s"]["median"] <= clcae["time_s"]["mean"] * 2
    timing = result["timing"]
    assert timing["warmup_calls"] == 2 and "Inverter.invert" in timing["method"]
    setup = result["setup"]
    assert setup["batch_size"] == 4 and setup["device"] == "cpu" and setup["threads"] >= 1
    assert setup["lpips"]["random"] is True and setup["id"]["random"] is True
    assert setup["ssim_window"] == "gaussian11"


def test_values_equal_the_metrics_of_the_inverter_outputs(result, inverter, folder):
    """evaluate's per-image PSNR/SSIM are those of the Inverter's outputs against the same preprocessed inputs."""
    first = sorted(p for p in folder.glob("0*.png"))[:4]  # evaluate's first batch
    x = inverter.preprocess([decode_image(p.read_bytes()) for p in first])
    inv = inverter.invert(x, extra_outputs=("w", "w_plus"))
    rows = result["per_image"][:4]
    assert [r["key"] for r in rows] == [p.name for p in first]
    np.testing.assert_allclose([r["CLCAE.psnr"] for r in rows], psnr(inv.image, x).double(), rtol=1e-6)
    np.testing.assert_allclose([r["CLCAE_w.ssim"] for r in rows], ssim(inv.extra_images["w"], x).double(),
                               rtol=1e-6)
    np.testing.assert_allclose([r["CLCAE_w+.psnr"] for r in rows], psnr(inv.extra_images["w_plus"], x).double(),
                               rtol=1e-6)
    assert result["columns"]["CLCAE"]["psnr"]["mean"] == pytest.approx(
        np.mean([r["CLCAE.psnr"] for r in result["per_image"]]))


def test_report_files_lay_out_table_1(result, tmp_path):
    paths = write_report(result, str(tmp_path / "eval"))
    summary = json.loads(Path(paths["metrics.json"]).read_text())  # strict JSON: no NaN/Infinity
    assert set(summary["columns"]) == set(COLUMNS) and "per_image" not in summary
    md = Path(paths["metrics.md"]).read_text()
    assert md == to_markdown(result)
    assert "| | CLCAE_w = G(w) | CLCAE_w+ = G(w+) | CLCAE = G(w+, f) |" in md
    for label in ("PSNR↑", "SSIM↑", "LPIPS↓", "ID↑", "Time (s)↓", "ID after edit↑"):
        assert sum(line.startswith(f"| {label} |") for line in md.splitlines()) == 1
    for words in ("device: cpu", "batch size: 4", "warm-up", "Gaussian window 11", "RANDOM backbone",
                  "RANDOM weights", "smile=2"):
        assert words in md
    with open(paths["per_image.csv"]) as fh:
        assert len(list(csv.DictReader(fh))) == N_IMAGES


def test_shards_input_limit_and_no_id_network(inverter, tmp_path):
    with ShardWriter(str(tmp_path / "shards"), rows_per_shard=3) as writer:
        for i, data in enumerate(pngs(5)):
            writer.write({"key": f"img{i}", "image": data, "height": 72, "width": 80})
    assert [k for k, _ in read_images(str(tmp_path / "shards"))] == [f"img{i}" for i in range(5)]
    res = evaluate(inverter, read_images(str(tmp_path / "shards")), edit={"smile": 1.0}, id_network="none",
                   lpips_pretrained_backbone=False, batch_size=2, limit=3, timing=False)
    assert res["images"] == 3 and [r["key"] for r in res["per_image"]] == ["img0", "img1", "img2"]
    assert res["columns"]["CLCAE"]["id"]["mean"] is None
    assert "no ID network" in res["columns"]["CLCAE"]["id_after_edit"]["note"]
    md = to_markdown(res)
    assert "| ID↑ | n/a | n/a | n/a |" in md and "time: disabled" in md


def test_bad_requests_fail_before_work(inverter, folder, tmp_path):
    with pytest.raises(EditError, match="unknown direction 'smiel'"):
        evaluate(inverter, read_images(str(folder)), edit=[("smiel", 1.0)], id_network="none")
    with pytest.raises(EditError, match="out of range"):
        evaluate(inverter, read_images(str(folder)), edit=[("smile", 50.0)], id_network="none")
    with pytest.raises(EvaluationError, match="NAME=STRENGTH"):
        parse_edit("smile")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.txt").write_text("x")
    with pytest.raises(EvaluationError, match="no image files"):
        list(read_images(str(tmp_path / "empty")))
    with pytest.raises(EvaluationError, match="all 1 failed to decode"):
        evaluate(inverter, [("x.png", b"junk")], id_network="none", lpips_pretrained_backbone=False)


def test_cli_writes_the_report(folder, tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("evaluate_cli", ROOT / "jobs" / "evaluate.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    args = ["--config", "configs/tiny.yaml", "--input", str(folder), "--out", str(tmp_path / "out"),
            "--limit", "2", "--batch-size", "2", "--no-timing",
            # a direction whose file is not there: not loaded, as no --edit names it
            "directions.up.kind=interfacegan", f"directions.up.path={tmp_path / 'nowhere_up.pt'}"]
    assert cli.main(args) == 0
    assert "| PSNR↑ |" in capsys.readouterr().out
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["images"] == 2
    assert cli.main([*args, "--edit", "smile=2.0"]) == 2
    assert "unknown direction 'smile'" in capsys.readouterr().err


def test_a_folder_of_images_and_parquet_files_is_refused_not_read_as_shards(tmp_path):
    (tmp_path / "mixed").mkdir()
    for i, data in enumerate(pngs(2)):
        (tmp_path / "mixed" / f"{i}.png").write_bytes(data)
    with ShardWriter(str(tmp_path / "mixed" / "shards")) as writer:
        writer.write({"key": "k0", "image": pngs(1)[0], "height": 72, "width": 80})
    with pytest.raises(EvaluationError, match=r"2 image file\(s\).*1 Parquet file\(s\)"):
        list(read_images(str(tmp_path / "mixed")))
