"""Fitting editing directions: InterFaceGAN on labelled latent tables, GANSpace on a generator's W."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from clcae.config import load_config
from clcae.directions import (
    DirectionFitError,
    fit_ganspace,
    fit_interfacegan,
    fit_interfacegan_to_file,
    load_labelled_latents,
    read_labelled_latents,
    sample_w,
)
from clcae.editing import DirectionRegistry, load_ganspace, load_interfacegan, save_ganspace
from clcae.factory import build_generator

ROOT = Path(__file__).resolve().parents[1]
D = 64


def unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


@pytest.fixture(scope="module")
def synthetic():
    """Latents around a far-off mean (like W around latent_avg) and a hidden unit direction d_true."""
    rng = np.random.default_rng(0)
    n = 600
    mean = rng.normal(0, 3, D)
    w = (mean + rng.normal(0, 1, (n, D))).astype(np.float32)
    d_true = unit(rng.normal(size=D))
    score = (w - mean) @ d_true + rng.normal(0, 0.05, n)
    keys = [f"{i:05d}" for i in range(n)]  # numeric-looking keys must stay strings through CSV
    return {"w": w, "d": d_true, "score": score, "labels": (score > 0).astype(np.int64), "keys": keys}


def latent_table(keys, w, **extra) -> pa.Table:
    cols = {"key": pa.array(keys, pa.string()),
            "w": pa.FixedSizeListArray.from_arrays(pa.array(w.reshape(-1), pa.float32()), w.shape[1])}
    cols.update({k: pa.array(v) for k, v in extra.items()})
    return pa.table(cols)


# ---------------------------------------------------------------------------------------------------
# InterFaceGAN


def test_interfacegan_recovers_the_hidden_direction_and_the_file_edits(synthetic, tmp_path):
    table = tmp_path / "latents.parquet"
    pq.write_table(latent_table(synthetic["keys"], synthetic["w"], smile=synthetic["labels"]), table)
    out = tmp_path / "smile.pt"
    summary = fit_interfacegan_to_file(str(table), None, "smile", str(out))

    direction = load_interfacegan(out, style_dim=D).vector.numpy()
    assert torch.load(out, weights_only=True).shape == (1, D)  # e4e's layout
    assert np.linalg.norm(direction) == pytest.approx(1.0, abs=1e-5)
    assert direction @ synthetic["d"] > 0.9  # oriented towards label 1
    assert summary["val_accuracy"] > 0.9 and summary["n_val"] == 180 and summary["keys"]["matched"] == 600
    assert summary["label_kind"] == "binary" and summary["positive_value"] == 1

    registry = DirectionRegistry.from_config({"smile": {"kind": "interfacegan", "path": str(out),
                                                        "max_strength": 3.0}}, style_dim=D)
    w = torch.from_numpy(synthetic["w"][:4])
    moved = registry.apply_to_w(w, {"smile": 2.0}) - w
    torch.testing.assert_close(moved, 2.0 * torch.from_numpy(direction).expand(4, D))


def test_direction_points_to_the_larger_label(synthetic):
    d_swapped, stats = fit_interfacegan(synthetic["w"], 1 - synthetic["labels"])
    assert d_swapped @ synthetic["d"] < -0.9
    d_bool, stats = fit_interfacegan(synthetic["w"], synthetic["labels"] == 0)  # True is the positive class
    assert d_bool @ synthetic["d"] < -0.9 and stats["positive_value"] is True


def test_continuous_labels_keep_the_top_and_bottom_ratio(synthetic):
    direction, stats = fit_interfacegan(synthetic["w"], synthetic["score"], ratio=0.25)
    assert stats["label_kind"] == "continuous"
    assert stats["n_positive"] == stats["n_negative"] == 150
    assert stats["positive_min"] > stats["negative_max"]
    assert direction @ synthetic["d"] > 0.9


def test_csv_labels_join_by_key_across_a_folder_of_parts(synthetic, tmp_path):
    keys, w, labels = synthetic["keys"], synthetic["w"], synthetic["labels"]
    folder = tmp_path / "latents"
    folder.mkdir()
    pq.write_table(latent_table(keys[:300], w[:300]), folder / "part-0.parquet")
    pq.write_table(latent_table(keys[300:], w[300:]), folder / "part-1.parquet")
    # Labels in another order, one latent without a label, one label without a latent.
    order = np.random.default_rng(1).permutation(len(keys))[:-1]
    rows = [f"{keys[i]},{labels[i]}" for i in order] + ["99999,1"]
    (tmp_path / "labels.csv").write_text("key,smile\n" + "\n".join(rows) + "\n")

    x, y, info = read_labelled_latents(str(folder), str(tmp_path / "labels.csv"), "smile")
    assert info == {"latent_rows": 600, "label_rows": 600, "matched": 599}
    kept = np.sort(order)  # latent-table order
    np.testing.assert_array_equal(x, w[kept])
    np.testing.assert_array_equal(y, labels[kept])
    direction, _ = fit_interfacegan(x, y)
    assert direction @ synthetic["d"] > 0.9


def test_batch_job_layout_and_w_plus_space(synthetic, tmp_path):
    """OUT/latents + OUT/errors as jobs/invert writes them; w_plus a flat list with its shape in metadata."""
    keys, w = synthetic["keys"][:200], synthetic["w"][:200]
    layers = 3
    w_plus = np.repeat(w[:, None], layers, axis=1)
    table = latent_table(keys, w, smile=synthetic["labels"][:200]).append_column(
        "w_plus", pa.FixedSizeListArray.from_arrays(pa.array(w_plus.reshape(-1)), layers * D))
    table = table.replace_schema_metadata({b"w_plus_shape": f"{layers},{D}".encode()})
    (tmp_path / "out" / "latents").mkdir(parents=True)
    (tmp_path / "out" / "errors").mkdir()
    pq.write_table(table, tmp_path / "out" / "latents" / "part-a.parquet")
    pq.write_table(pa.table({"key": ["bad.png"], "source": ["x"], "error": ["not an image"]}),
                   tmp_path / "out" / "errors" / "part-a.parquet")

    x, y = load_labelled_latents(str(tmp_path / "out"), None, "smile", space="w_plus")
    assert x.shape == (200, layers, D) and y.shape == (200,)
    np.testing.assert_array_equal(x[:, 2], w)
    summary = fit_interfacegan_to_file(str(tmp_path / "out"), None, "smile", str(tmp_path / "wp.pt"),
                                       space="w_plus")
    assert torch.load(tmp_path / "wp.pt", weights_only=True).shape == (1, layers, D)
    assert "layer 0" in summary["note"]


def test_bad_inputs_name_the_problem(synthetic, tmp_path):
    w, keys, labels = synthetic["w"], synthetic["keys"], synthetic["labels"]
    with pytest.raises(DirectionFitError, match="one class"):
        fit_interfacegan(w, np.ones(len(w)))
    with pytest.raises(DirectionFitError, match="too few samples: the positive class has 3"):
        fit_interfacegan(w, np.r_[np.ones(3), np.zeros(len(w) - 3)])
    bad = w.copy()
    bad[7, 3] = np.nan
    with pytest.raises(DirectionFitError, match="1 of 600 latents contain NaN.*row 7"):
        fit_interfacegan(bad, labels)
    with pytest.raises(DirectionFitError, match="labels are NaN"):
        fit_interfacegan(w, np.where(labels > 0, 1.0, np.nan))

    table = tmp_path / "t.parquet"
    pq.write_table(latent_table(keys, w), table)
    with pytest.raises(DirectionFitError, match=r"no column\(s\) \['smile'\]"):
        load_labelled_latents(str(table), None, "smile")
    (tmp_path / "other.csv").write_text("key,smile\nnope,1\nnada,0\n")
    with pytest.raises(DirectionFitError, match="0 keys matched"):
        load_labelled_latents(str(table), str(tmp_path / "other.csv"), "smile")
    with pytest.raises(DirectionFitError, match=r"no column\(s\) \['age'\]"):
        load_labelled_latents(str(table), str(tmp_path / "other.csv"), "age")
    with pytest.raises(DirectionFitError, match="no such file"):
        load_labelled_latents(str(tmp_path / "missing"), None, "smile")


def test_cli_prints_a_summary_and_fails_cleanly(synthetic, tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("directions_cli", ROOT / "jobs" / "directions.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    pq.write_table(latent_table(synthetic["keys"], synthetic["w"]), tmp_path / "t.parquet")
    lines = [f"{k},{v}" for k, v in zip(synthetic["keys"], synthetic["labels"])]
    (tmp_path / "l.csv").write_text("key,smile\n" + "\n".join(lines) + "\n")
    args = ["interfacegan", "--latents", str(tmp_path / "t.parquet"), "--labels", str(tmp_path / "l.csv"),
            "--label-column", "smile", "--out", str(tmp_path / "smile.pt")]
    assert cli.main(args) == 0
    assert json.loads(capsys.readouterr().out)["val_accuracy"] > 0.9
    assert cli.main([*args[:-4], "--label-column", "age", "--out", str(tmp_path / "x.pt")]) == 2
    assert "no column(s) ['age']" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------
# GANSpace


@pytest.fixture(scope="module")
def generator():
    return build_generator(load_config("configs/tiny.yaml"))[0]


@pytest.mark.parametrize("batch", [500, 2000])  # streamed (IncrementalPCA) and one-shot (PCA)
def test_ganspace_components_are_the_principal_axes_of_sampled_w(generator, batch):
    n, k = 2000, 12
    pca = fit_ganspace(generator, n_samples=n, components=k, seed=0, batch=batch)
    assert pca.comp.shape == (k, D) and pca.std.shape == (k,) and pca.mean.shape == (D,)
    torch.testing.assert_close(pca.comp @ pca.comp.T, torch.eye(k), atol=1e-5, rtol=0)
    assert (pca.std[:-1] >= pca.std[1:]).all()

    samples = np.concatenate(list(sample_w(generator, n, seed=0, batch=batch)))
    np.testing.assert_allclose(pca.mean.numpy(), samples.mean(0), atol=1e-5)
    # the draws are the ones Generator.mean_latent makes with the same seed and chunk
    torch.testing.assert_close(pca.mean, generator.mean_latent(n, seed=0, chunk=batch)[0], atol=1e-5, rtol=0)
    eigval, eigvec = np.linalg.eigh(np.cov(samples, rowvar=False))
    assert abs(eigvec[:, -1] @ pca.comp[0].double().numpy()) > 0.99
    assert pca.std[0].item() == pytest.approx(np.sqrt(eigval[-1]), rel=0.02)


def test_ganspace_file_round_trips_and_edits_w_plus(generator, tmp_path):
    pca = fit_ganspace(generator, n_samples=1000, components=8, seed=3, batch=1000)
    save_ganspace(pca, tmp_path / "pca.pt")
    raw = torch.load(tmp_path / "pca.pt", weights_only=True)
    assert {k: tuple(v.shape) for k, v in raw.items()} == {"mean": (1, D), "comp": (8, 1, D), "std": (8,)}
    loaded = load_ganspace(tmp_path / "pca.pt", style_dim=D)
    for name in ("mean", "comp", "std"):
        assert torch.equal(getattr(loaded, name), getattr(pca, name))

    registry = DirectionRegistry.from_config({"c1": {"kind": "ganspace", "path": str(tmp_path / "pca.pt"),
                                                     "component": 1, "layers": [2, 5], "max_strength": 5.0}},
                                             style_dim=D)
    w_plus = generator.broadcast(generator.mapping(torch.randn(2, D))).clone()
    delta = registry.apply_to_w_plus(w_plus, {"c1": 3.0}) - w_plus
    expected = torch.zeros_like(w_plus)
    expected[:, 2:5] = 3.0 * pca.std[1] * pca.comp[1]
    torch.testing.assert_close(delta, expected)


def test_ganspace_rejects_impossible_requests(generator):
    with pytest.raises(DirectionFitError, match="asked for 65 components.*at most 64"):
        fit_ganspace(generator, n_samples=1000, components=65)
    with pytest.raises(DirectionFitError, match="batch = 10"):
        fit_ganspace(generator, n_samples=1000, components=16, batch=10)


def test_generator_comes_from_either_checkpoint_kind(generator, tmp_path):
    from clcae.checkpoints import save_checkpoint
    from clcae.config import to_dict
    from clcae.directions import generator_for
    from clcae.factory import build_clcae
    from clcae.weights import WeightsError, save_rosinality

    cfg = load_config("configs/tiny.yaml")
    model = build_clcae(cfg)
    with torch.no_grad():  # weights unlike the seeded init, so loading them is what the test sees
        for p in model.decoder.style.parameters():
            p.add_(0.1)
    z = torch.randn(3, D)
    expected = model.decoder.mapping(z)
    assert not torch.allclose(expected, generator.mapping(z))
    save_rosinality(tmp_path / "g.pt", model.decoder, None)
    save_checkpoint(tmp_path / "c.pt", "inversion", model, to_dict(cfg))
    for path in (tmp_path / "g.pt", tmp_path / "c.pt"):
        torch.testing.assert_close(generator_for(cfg, str(path)).mapping(z), expected)
    torch.save({"something": torch.zeros(1)}, tmp_path / "x.pt")
    with pytest.raises(WeightsError, match="neither a rosinality"):
        generator_for(cfg, str(tmp_path / "x.pt"))
