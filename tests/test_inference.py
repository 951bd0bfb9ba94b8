"""The Inverter: one object for the batch job and Serve — inversion, edits, checkpoints, input checks."""

from __future__ import annotations

import io

import pytest
import torch
from helpers import MODE_ZOO, noise_image
from PIL import Image

from clcae.checkpoints import save_checkpoint
from clcae.config import ConfigError, load_config, to_dict
from clcae.data.images import InputError, decode_image
from clcae.editing import EditError
from clcae.inference import Inverter


def photo(mode: str = "RGB", fmt: str = "PNG", size=(80, 72)) -> bytes:
    return noise_image(mode, fmt, size)


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


@pytest.mark.parametrize("mode,fmt", MODE_ZOO)
def test_non_rgb_modes_are_converted(inverter, mode, fmt):
    im = decode_image(photo(mode, fmt))
    assert im.mode == "RGB"
    assert inverter.invert([photo(mode, fmt)]).image.shape == (1, 3, 64, 64)


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
