"""The Inverter: one object for the batch job and Serve — inversion, edits, checkpoints, input checks."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from clcae.checkpoints import save_checkpoint
from clcae.config import ConfigError, DirectionConfig, load_config, to_dict
from clcae.data.images import InputError, decode_image
from clcae.editing import EditError, save_interfacegan
from clcae.factory import build_clcae, build_directions
from clcae.inference import Inverter


@pytest.fixture(scope="module")
def inverter(tmp_path_factory):
    d = tmp_path_factory.mktemp("dirs")
    torch.manual_seed(0)
    save_interfacegan(torch.nn.functional.normalize(torch.randn(1, 64), dim=1), d / "smile.pt")
    cfg = load_config("configs/tiny.yaml")
    cfg.directions = {"smile": DirectionConfig(kind="interfacegan", path=str(d / "smile.pt"), max_strength=5.0)}
    return Inverter(build_clcae(cfg), build_directions(cfg), device="cpu")


def photo(mode: str = "RGB", size=(80, 72)) -> bytes:
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    if mode == "I;16":
        im = Image.new("I;16", size)
        im.frombytes((arr[..., 0].astype("<u2") * 257).tobytes(), "raw", "I;16")
    else:
        im = Image.fromarray(arr).convert(mode)
    buf = io.BytesIO()
    im.save(buf, format="TIFF" if mode == "CMYK" else "PNG")
    return buf.getvalue()


def test_invert_shapes_and_extra_outputs(inverter):
    res = inverter.invert([photo(), photo()], extra_outputs=("w", "w_plus"))
    assert res.w.shape == (2, 64) and res.w_plus.shape == (2, 10, 64) and res.f.shape == (2, 32, 16, 16)
    assert res.image.shape == (2, 3, 64, 64) and set(res.extra_images) == {"w", "w_plus"}


def test_edit_strength_zero_is_identity_and_nonzero_changes(inverter):
    res = inverter.invert([photo()])
    assert torch.equal(inverter.edit(res, [("smile", 0.0)]), res.image)
    assert not torch.allclose(inverter.edit(res, [("smile", 2.0)]), res.image)


def test_edit_from_client_latents_without_encoder_state(inverter):
    res = inverter.invert([photo()])
    again = inverter.latents_to_inversion(res.w, res.w_plus, res.f)
    torch.testing.assert_close(again.image, res.image)
    assert torch.equal(inverter.edit(again, {"smile": 0.0}), again.image)
    assert not torch.allclose(inverter.edit(again, {"smile": 3.0}), again.image)
    with pytest.raises(InputError, match=r"w_plus must have shape \(B, 10, 64\)"):
        inverter.latents_to_inversion(res.w, res.w_plus[:, :5], res.f)
    with pytest.raises(InputError, match="NaN"):
        inverter.latents_to_inversion(res.w * float("nan"), res.w_plus, res.f)


def test_edit_errors_name_the_problem(inverter):
    res = inverter.invert([photo()])
    with pytest.raises(EditError, match="smile"):
        inverter.edit(res, [("smiel", 1.0)])
    with pytest.raises(EditError, match="5"):
        inverter.edit(res, [("smile", 50.0)])


def test_checkpoint_round_trip_gives_the_same_inversion(inverter, tmp_path):
    cfg = load_config("configs/tiny.yaml")
    save_checkpoint(tmp_path / "c.pt", "inversion", inverter.model, to_dict(cfg), model_id="tiny@1")
    other = Inverter.from_pretrained(str(tmp_path / "c.pt"), device="cpu")
    assert other.model_id == "tiny@1"
    x = [photo()]
    assert torch.equal(other.invert(x).image, inverter.invert(x).image)
    tweaked = Inverter.from_pretrained(str(tmp_path / "c.pt"), overrides=["infer.batch_size=2"], device="cpu")
    assert torch.equal(tweaked.invert(x).image, inverter.invert(x).image)
    with pytest.raises(ConfigError, match="model.attention_dropout is part of the model's architecture"):
        Inverter.from_pretrained(str(tmp_path / "c.pt"), overrides=["model.attention_dropout=0.0"])


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "P", "CMYK", "I;16"])
def test_non_rgb_modes_are_converted(inverter, mode):
    im = decode_image(photo(mode))
    assert im.mode == "RGB"
    assert inverter.invert([photo(mode)]).image.shape == (1, 3, 64, 64)


def test_bad_images_are_refused_with_reasons():
    with pytest.raises(InputError, match="0 bytes"):
        decode_image(b"")
    with pytest.raises(InputError, match="not a readable image"):
        decode_image(b"hello, not an image")
    with pytest.raises(InputError, match="not a readable image"):
        decode_image(photo()[:200])  # truncated PNG
    big = Image.new("L", (9000, 8000))  # 72 Mpx, over the 64 Mpx limit; PNG of zeros is small
    buf = io.BytesIO()
    big.save(buf, format="PNG")
    with pytest.raises(InputError, match="pixel limit"):
        decode_image(buf.getvalue())
