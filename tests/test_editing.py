"""Editing: direction files in e4e's formats, edit arithmetic, and the direction registry."""

import logging
import os
from pathlib import Path

import pytest
import torch

from clcae.editing import (
    CARS_GANSPACE_EDITS,
    FFHQ_GANSPACE_EDITS,
    DirectionFileError,
    DirectionRegistry,
    EditError,
    GANSpaceEdit,
    GANSpacePCA,
    ganspace_coordinate,
    ganspace_edit,
    interfacegan_edit,
    load_ganspace,
    load_interfacegan,
    save_ganspace,
    save_interfacegan,
)

D, N, K, B = 16, 6, 5, 4


def _unit(*shape: int, seed: int = 0) -> torch.Tensor:
    v = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
    return v / v.norm(dim=-1, keepdim=True)


def _pca_dict() -> dict:
    comp, _ = torch.linalg.qr(torch.randn(D, K, generator=torch.Generator().manual_seed(1)))
    return {
        "mean": torch.randn(1, D, generator=torch.Generator().manual_seed(2)),
        "comp": comp.T.reshape(K, 1, D).contiguous(),
        "std": torch.linspace(2.0, 0.5, K),
    }


@pytest.fixture
def files(tmp_path: Path) -> dict[str, str]:
    """Files written exactly as e4e ships them: torch.save of a (1, D) / (1, N, D) tensor or a PCA dict."""
    paths = {name: str(tmp_path / f"{name}.pt") for name in ("smile", "pose", "pca")}
    torch.save(_unit(1, D), paths["smile"])
    torch.save(_unit(1, D, seed=3).expand(1, N, D).clone(), paths["pose"])
    torch.save(_pca_dict(), paths["pca"])
    return paths


@pytest.fixture
def w_plus() -> torch.Tensor:
    return torch.randn(B, N, D, generator=torch.Generator().manual_seed(4))


def _registry(files: dict[str, str], mode: str = "offset") -> DirectionRegistry:
    return DirectionRegistry.from_config(
        {
            "smile": {"kind": "interfacegan", "path": files["smile"], "max_strength": 5.0},
            "pose": {"kind": "interfacegan", "path": files["pose"], "max_strength": 5.0},
            "eyes": {
                "kind": "ganspace",
                "path": files["pca"],
                "component": 3,
                "layers": [2, 4],
                "max_strength": 30.0,
                "mode": mode,
            },
        },
        style_dim=D,
    )


# --------------------------------------------------------------------------------------------------- files


def test_interfacegan_round_trip_flat_and_per_layer(files, tmp_path, caplog):
    smile = load_interfacegan(files["smile"], style_dim=D)
    assert smile.name == "smile" and smile.vector.shape == (D,) and smile.source_shape == (1, D)
    assert torch.equal(smile.vector, torch.load(files["smile"], weights_only=True)[0])

    with caplog.at_level(logging.INFO, logger="clcae.editing"):
        pose = load_interfacegan(files["pose"], name="turn", style_dim=D)
    assert pose.name == "turn" and pose.source_shape == (1, N, D)
    assert torch.equal(pose.vector, torch.load(files["pose"], weights_only=True)[0, 0])
    assert "layer 0" in caplog.text

    # Layers that differ lose information: the loader says so.
    mixed = tmp_path / "mixed.pt"
    torch.save(torch.randn(N, D), mixed)
    with caplog.at_level(logging.WARNING, logger="clcae.editing"):
        assert torch.equal(
            load_interfacegan(mixed, style_dim=D).vector, torch.load(mixed, weights_only=True)[0]
        )
    assert any(r.levelno == logging.WARNING and "only layer 0" in r.message for r in caplog.records)

    out = tmp_path / "saved.pt"
    save_interfacegan(smile, str(out))
    assert torch.load(out, weights_only=True).shape == (1, D)
    assert torch.equal(load_interfacegan(str(out), style_dim=D).vector, smile.vector)


def test_loaders_read_fsspec_uris(files):
    smile = load_interfacegan("file://" + files["smile"], style_dim=D)
    assert smile.name == "smile"
    pca = load_ganspace("file://" + files["pca"], style_dim=D)
    assert pca.num_components == K


def test_ganspace_round_trip(files, tmp_path):
    raw = _pca_dict()
    pca = load_ganspace(files["pca"], style_dim=D)
    assert pca.mean.shape == (D,) and pca.comp.shape == (K, D) and pca.std.shape == (K,)
    assert torch.equal(pca.comp, raw["comp"].reshape(K, D)) and torch.equal(pca.mean, raw["mean"][0])

    out = tmp_path / "saved_pca.pt"
    save_ganspace(pca, str(out))
    saved = torch.load(out, weights_only=True)
    assert {k: tuple(v.shape) for k, v in saved.items()} == {"mean": (1, D), "comp": (K, 1, D), "std": (K,)}
    again = load_ganspace(str(out), style_dim=D)
    assert torch.equal(again.comp, pca.comp) and torch.equal(again.std, pca.std)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (torch.zeros(1, D + 1), r"shape \(1, 17\)"),
        (torch.zeros(2, N, D), r"shape \(2, 6, 16\)"),
        (torch.full((1, D), float("nan")), "NaN"),
        ({"direction": torch.zeros(1, D)}, "found dict"),
    ],
)
def test_interfacegan_bad_files_name_the_file_and_problem(tmp_path, content, message):
    path = tmp_path / "bad.pt"
    torch.save(content, path)
    with pytest.raises(DirectionFileError, match=message) as err:
        load_interfacegan(str(path), style_dim=D)
    assert str(path) in str(err.value)


def test_unreadable_and_missing_files(tmp_path):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a torch file")
    with pytest.raises(DirectionFileError, match="junk.pt"):
        load_interfacegan(str(junk), style_dim=D)
    with pytest.raises(FileNotFoundError, match="nowhere.pt"):
        load_ganspace(str(tmp_path / "nowhere.pt"), style_dim=D)


def test_a_missing_direction_file_says_which_direction_and_how_to_do_without_it(tmp_path):
    spec = {"kind": "interfacegan", "path": str(tmp_path / "smile.pt"), "max_strength": 3.0}
    with pytest.raises(FileNotFoundError) as err:
        DirectionRegistry.from_config({"smile": spec}, style_dim=D)
    message = str(err.value)
    assert message.startswith("direction 'smile': direction file not found: ") and "smile.pt" in message
    assert "directions.smile.path" in message and "directions.smile=null" in message


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d.pop("std"), r"missing key\(s\) \['std'\]"),
        (lambda d: d.update(comp=torch.zeros(K, 2, D)), r"comp \(5, 2, 16\)"),
        (lambda d: d.update(std=torch.ones(K + 1)), r"std \(6,\)"),
        (lambda d: d.update(mean=torch.zeros(1, D + 1)), r"mean \(1, 17\)"),
        (lambda d: d.update(std=-torch.ones(K)), "positive"),
        (lambda d: d.update(mean=[0.0] * D), "'mean' is a list"),
    ],
)
def test_ganspace_bad_files(tmp_path, change, message):
    content = _pca_dict()
    change(content)
    path = tmp_path / "bad_pca.pt"
    torch.save(content, path)
    with pytest.raises(DirectionFileError, match=message):
        load_ganspace(str(path), style_dim=D)


# --------------------------------------------------------------------------------------------------- edits


def test_interfacegan_edit_identity_linearity_and_batching(files):
    direction = load_interfacegan(files["smile"], style_dim=D)
    w = torch.randn(B, D)
    w[0] = -0.0  # w + 0 * d would turn these into +0.0 wherever d > 0
    same = interfacegan_edit(w, direction, 0.0)
    assert torch.equal(same.view(torch.int32), w.view(torch.int32))

    one = interfacegan_edit(w, direction, 1.0) - w
    two = interfacegan_edit(w, direction, 2.0) - w
    torch.testing.assert_close(two, 2 * one)
    torch.testing.assert_close(one, direction.vector.expand(B, D))

    strengths = torch.tensor([0.0, -3.0, 1.5, 4.0])
    batched = interfacegan_edit(w, direction, strengths)
    looped = torch.cat(
        [interfacegan_edit(w[i : i + 1], direction, float(s)) for i, s in enumerate(strengths)]
    )
    assert torch.equal(batched, looped)
    assert torch.equal(batched[0].view(torch.int32), w[0].view(torch.int32))


def test_interfacegan_edit_rejects_bad_shapes(files):
    direction = load_interfacegan(files["smile"], style_dim=D)
    with pytest.raises(EditError, match=r"w of shape \(B, 16\)"):
        interfacegan_edit(torch.zeros(B, D + 1), direction, 1.0)
    with pytest.raises(EditError, match=r"\(4,\) tensor, one per sample; got shape \(3,\)"):
        interfacegan_edit(torch.zeros(B, D), direction, torch.ones(3))


def test_ganspace_offset_identity_linearity_and_layers(files, w_plus):
    pca = load_ganspace(files["pca"], style_dim=D)
    edit = GANSpaceEdit("eyes", component=3, start=2, end=4, strength=20.0)
    w_plus[0] = -0.0  # w + 0 * d would turn these into +0.0 wherever d > 0
    assert torch.equal(ganspace_edit(w_plus, pca, edit, 0.0).view(torch.int32), w_plus.view(torch.int32))

    one = ganspace_edit(w_plus, pca, edit, 1.0) - w_plus
    two = ganspace_edit(w_plus, pca, edit, 2.0) - w_plus
    torch.testing.assert_close(two, 2 * one)
    # Only layers [start, end) move, by strength * std along the component.
    assert torch.equal(one[:, :2], torch.zeros_like(one[:, :2])) and torch.equal(one[:, 4:], one[:, 4:] * 0)
    torch.testing.assert_close(one[:, 2:4], (pca.comp[3] * pca.std[3]).expand(B, 2, D))
    # Coordinates are in std units, so the edited layers' coordinate grows by exactly the strength.
    moved = ganspace_edit(w_plus, pca, GANSpaceEdit("x", 3, 0, 1), 2.5)
    coords = ganspace_coordinate(moved, pca, 3) - ganspace_coordinate(w_plus, pca, 3)
    torch.testing.assert_close(coords, torch.full((B,), 2.5))
    # None uses the edit's own strength.
    assert torch.equal(ganspace_edit(w_plus, pca, edit), ganspace_edit(w_plus, pca, edit, 20.0))


def test_ganspace_target_mode_matches_authors_formula_per_sample(files, w_plus):
    """The authors' get_delta, run one sample at a time as their script does."""
    raw = _pca_dict()
    pca = load_ganspace(files["pca"], style_dim=D)
    k, start, end = 3, 0, 3
    strengths = torch.tensor([20.0, -2.0, 0.0, 7.0])

    def authors(latent: torch.Tensor, strength: float) -> torch.Tensor:
        w_centered = latent - raw["mean"]
        w_coord = torch.sum(w_centered[0].reshape(-1) * raw["comp"][k].reshape(-1)) / raw["std"][k]
        delta = (strength - w_coord) * raw["comp"][k] * raw["std"][k]
        padded = torch.zeros(latent.shape)
        padded[start:end] += delta.repeat(end - start, 1)
        return latent + padded

    ours = ganspace_edit(w_plus, pca, GANSpaceEdit("e", k, start, end), strengths, mode="target")
    expected = torch.stack([authors(w_plus[i], float(s)) for i, s in enumerate(strengths)])
    torch.testing.assert_close(ours, expected)
    # Layer 0 lands on the target coordinate, whatever it started at.
    torch.testing.assert_close(ganspace_coordinate(ours, pca, k), strengths)


def test_ganspace_batched_strengths_equal_loop(files, w_plus):
    pca = load_ganspace(files["pca"], style_dim=D)
    edit = GANSpaceEdit("lip", 1, 3, 6)
    strengths = torch.tensor([0.0, 1.0, -4.0, 2.5])
    for mode in ("offset", "target"):
        batched = ganspace_edit(w_plus, pca, edit, strengths, mode=mode)
        looped = [
            ganspace_edit(w_plus[i : i + 1], pca, edit, float(s), mode=mode) for i, s in enumerate(strengths)
        ]
        torch.testing.assert_close(batched, torch.cat(looped), rtol=0, atol=1e-6)


def test_ganspace_rejects_bad_ranges(files, w_plus):
    pca = load_ganspace(files["pca"], style_dim=D)
    with pytest.raises(EditError, match=r"layers \[5, 8\) do not fit a w\+ with 6 layers"):
        ganspace_edit(w_plus, pca, GANSpaceEdit("e", 0, 5, 8), 1.0)
    with pytest.raises(EditError, match="component 9 does not exist.*5 components"):
        ganspace_edit(w_plus, pca, GANSpaceEdit("e", 9, 0, 1), 1.0)
    with pytest.raises(EditError, match="empty"):
        GANSpaceEdit("e", 0, 3, 3)
    with pytest.raises(EditError, match="mode"):
        ganspace_edit(w_plus, pca, GANSpaceEdit("e", 0, 0, 1), 1.0, mode="absolute")
    with pytest.raises(EditError, match=r"w\+ of shape \(B, N, 16\)"):
        ganspace_edit(w_plus[:, 0], pca, GANSpaceEdit("e", 0, 0, 1), 1.0)
    with pytest.raises(ValueError, match="comp"):
        GANSpacePCA(mean=torch.zeros(D), comp=torch.zeros(K, D + 1), std=torch.ones(K))


def test_presets_are_the_authors_tuples():
    as_tuples = {
        name: (e.component, e.start, e.end, e.strength)
        for name, e in {**FFHQ_GANSPACE_EDITS, **CARS_GANSPACE_EDITS}.items()
    }
    assert as_tuples == {
        "eyes": (54, 7, 8, 20),
        "beard": (58, 7, 9, -20),
        "lip": (34, 10, 11, 20),
        "white_hair": (57, 7, 10, -24),
        "viewpoint": (0, 0, 5, 2),
        "cube": (16, 3, 6, 25),
        "color": (22, 9, 11, -8),
        "grass": (41, 9, 11, -18),
    }


# ------------------------------------------------------------------------------------------------ registry


def test_registry_applies_each_kind_to_its_latent(files, w_plus):
    reg = _registry(files)
    assert reg.names() == ["eyes", "pose", "smile"]
    assert reg.describe()["eyes"] == {
        "kind": "ganspace",
        "acts_on": "w_plus",
        "max_strength": 30.0,
        "component": 3,
        "layers": [2, 4],
        "mode": "offset",
    }
    w = w_plus[:, 0]
    smile, pose = (
        load_interfacegan(files["smile"], style_dim=D),
        load_interfacegan(files["pose"], style_dim=D),
    )
    pca = load_ganspace(files["pca"], style_dim=D)
    edits = [("smile", 2.0), ("eyes", torch.tensor([1.0, 0.0, -1.0, 25.0])), ("pose", -1.0)]

    expected_w = interfacegan_edit(interfacegan_edit(w, smile, 2.0), pose, -1.0)
    torch.testing.assert_close(reg.apply_to_w(w, edits), expected_w)
    expected_w_plus = ganspace_edit(w_plus, pca, GANSpaceEdit("eyes", 3, 2, 4), edits[1][1])
    assert torch.equal(reg.apply_to_w_plus(w_plus, edits), expected_w_plus)
    # Mappings work too; zero strengths leave both latents untouched.
    assert torch.equal(reg.apply_to_w(w, {"smile": 0.0, "eyes": 0.0}), w)
    assert torch.equal(reg.apply_to_w_plus(w_plus, {"smile": 0.0, "eyes": 0.0}), w_plus)


def test_registry_errors(files, w_plus):
    reg = _registry(files)
    with pytest.raises(
        EditError, match=r"unknown direction 'age'; known directions: \['eyes', 'pose', 'smile'\]"
    ):
        reg.get("age")
    with pytest.raises(EditError, match=r"strength 6 for 'smile' is out of range; \|strength\| must be <= 5"):
        reg.apply_to_w(w_plus[:, 0], [("smile", 6.0)])
    # A bad GANSpace request fails in apply_to_w already, before any network work.
    with pytest.raises(EditError, match="strength 31 for 'eyes'"):
        reg.apply_to_w(w_plus[:, 0], [("smile", 1.0), ("eyes", torch.tensor([0.0, -31.0, 0.0, 0.0]))])
    with pytest.raises(EditError, match="finite"):
        reg.check_strength("smile", float("nan"))


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"kind": "styleclip", "path": "x", "max_strength": 1}, "kind must be one of"),
        ({"kind": "interfacegan", "path": "x"}, r"missing key\(s\) \['max_strength'\]"),
        (
            {"kind": "interfacegan", "path": "x", "max_strength": 1, "layer": 2},
            r"unknown key\(s\) \['layer'\]",
        ),
        (
            {"kind": "ganspace", "path": "x", "max_strength": 1, "component": 0},
            r"missing key\(s\) \['layers'\]",
        ),
        ({"kind": "interfacegan", "path": "x", "max_strength": -1}, "max_strength must be a positive number"),
    ],
)
def test_registry_config_errors(spec, message):
    with pytest.raises(EditError, match=message):
        DirectionRegistry.from_config({"d": spec}, style_dim=D)


def test_registry_config_checks_ganspace_fields(files):
    base = {"kind": "ganspace", "path": files["pca"], "max_strength": 10}
    with pytest.raises(EditError, match=r"component 7 does not exist; .*pca.pt has 5 components"):
        DirectionRegistry.from_config({"d": {**base, "component": 7, "layers": [0, 1]}}, style_dim=D)
    with pytest.raises(EditError, match=r"layers must be \[start, end\]"):
        DirectionRegistry.from_config({"d": {**base, "component": 0, "layers": [0, 1, 2]}}, style_dim=D)
    with pytest.raises(EditError, match="mode must be one of"):
        DirectionRegistry.from_config(
            {"d": {**base, "component": 0, "layers": [0, 1], "mode": "x"}}, style_dim=D
        )


def test_registry_target_mode(files, w_plus):
    reg = _registry(files, mode="target")
    out = reg.apply_to_w_plus(w_plus, [("eyes", 4.0)])
    pca = load_ganspace(files["pca"], style_dim=D)
    torch.testing.assert_close(
        out, ganspace_edit(w_plus, pca, GANSpaceEdit("eyes", 3, 2, 4), 4.0, mode="target")
    )


# ---------------------------------------------------------------------------------------------- real files

_REFERENCE = Path(
    os.environ.get(
        "CLCAE_REFERENCE_DATA", Path(__file__).resolve().parents[1] / ".." / "shared" / "reference-data"
    )
)


@pytest.mark.skipif(not (_REFERENCE / "editing").is_dir(), reason="real direction files not present")
def test_real_e4e_files():
    root = _REFERENCE / "editing"
    for name in ("age", "smile"):
        d = load_interfacegan(str(root / f"{name}.pt"))
        assert d.source_shape == (1, 512)
        torch.testing.assert_close(d.vector.norm(), torch.tensor(1.0))
    pose = load_interfacegan(str(root / "pose.pt"))
    assert pose.source_shape == (1, 18, 512)
    pca = load_ganspace(str(root / "ffhq_pca.pt"))
    assert (pca.num_components, pca.style_dim) == (80, 512)
    reg = DirectionRegistry.from_config(
        {
            "smile": {"kind": "interfacegan", "path": str(root / "smile.pt"), "max_strength": 5},
            **{
                name: {
                    "kind": "ganspace",
                    "path": str(root / "ffhq_pca.pt"),
                    "component": e.component,
                    "layers": [e.start, e.end],
                    "max_strength": 30,
                }
                for name, e in FFHQ_GANSPACE_EDITS.items()
            },
        }
    )
    w_plus = pca.mean.expand(2, 18, 512).clone()
    out = reg.apply_to_w_plus(w_plus, [("eyes", 20.0), ("smile", 3.0)])
    assert out.shape == (2, 18, 512) and torch.equal(out[:, :7], w_plus[:, :7])
