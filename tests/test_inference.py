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


class GeneratorPasses:
    """Counts generator passes by wrapping the generator's prefix (up to convs.3) and suffix; a whole image is one
    of each."""

    def __init__(self, generator):
        self.generator, self.counts = generator, {"prefix": 0, "suffix": 0}

    def __enter__(self):
        for part in self.counts:
            original = getattr(self.generator, f"synthesis_{part}")

            def counted(*a, _original=original, _part=part, **k):
                self.counts[_part] += 1
                return _original(*a, **k)

            setattr(self.generator, f"synthesis_{part}", counted)
        return self

    def __exit__(self, *exc):
        for part in self.counts:
            del self.generator.__dict__[f"synthesis_{part}"]


def images(n: int) -> torch.Tensor:
    return torch.rand(n, 3, 64, 64, generator=torch.Generator().manual_seed(n)) * 2 - 1


def test_invert_and_edit_is_invert_then_edit_in_two_generator_passes_not_three(inverter):
    x, edits = images(2), [("smile", 2.0)]
    g = inverter.model.decoder
    with GeneratorPasses(g) as one_call:
        inversion, edited = inverter.invert_and_edit(x, edits)
    with GeneratorPasses(g) as two_calls:
        separate = inverter.invert(x)
        expected = inverter.edit(separate, edits)
    assert one_call.counts == two_calls.counts == {"prefix": 2, "suffix": 2}
    torch.testing.assert_close(edited, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(inversion.image, separate.image, rtol=0, atol=1e-5)
    # Serve's old path for an uploaded image: invert in one replica, ship w, w+, f and the residuals to the edit
    # replica, which re-rendered the reconstruction (a third pass) and edited without T3 (f followed by Eq. 6 only)
    with GeneratorPasses(g) as shipped:
        again = inverter.latents_to_inversion(separate.w, separate.w_plus, separate.f, separate.deltas)
        old = inverter.edit(again, edits)
    assert shipped.counts == {"prefix": 2, "suffix": 2}  # + the inversion's 1 and 1 = three passes
    assert torch.equal(inverter.invert_and_edit(x, [("smile", 0.0)])[1], inversion.image)  # strength 0: exact
    assert not torch.allclose(old, edited, atol=1e-4)  # the old upload path did not re-run F attention on T3


def test_invert_and_edit_takes_one_edit_per_image_or_none(inverter):
    x = images(3)
    per_image = [[("smile", 2.0)], None, {"smile": -1.5}]
    g = inverter.model.decoder
    with GeneratorPasses(g) as passes:
        inversion, edited = inverter.invert_and_edit(x, per_image=per_image)
    assert passes.counts == {"prefix": 2, "suffix": 2} and edited.shape == (2, 3, 64, 64)
    alone = [inverter.invert_and_edit(x[i:i + 1], e)[1][0] for i, e in ((0, per_image[0]), (2, per_image[2]))]
    # alone = other batch sizes, whose CPU kernels round differently (1e-5 here): what batching always costs
    torch.testing.assert_close(edited, torch.stack(alone), rtol=0, atol=1e-4)
    torch.testing.assert_close(inversion.image, inverter.invert(x).image, rtol=0, atol=1e-5)
    assert inverter.invert_and_edit(x, per_image=[None] * 3)[1] is None


def test_invert_and_edit_checks_edits_before_any_model_work(inverter):
    g = inverter.model.decoder
    with GeneratorPasses(g) as passes:
        with pytest.raises(EditError, match="5"):
            inverter.invert_and_edit(images(2), per_image=[None, [("smile", 50.0)]])
        with pytest.raises(EditError, match="smiel"):
            inverter.invert_and_edit(images(1), [("smiel", 1.0)], checked=True)  # names are always resolved
        with pytest.raises(EditError, match="one per image"):
            inverter.invert_and_edit(images(2), per_image=[None])
    assert passes.counts == {"prefix": 0, "suffix": 0}
    # checked=True: the caller (Serve's ingress) already checked the strengths; they are not checked again
    assert inverter.invert_and_edit(images(1), [("smile", 50.0)], checked=True)[1].shape == (1, 3, 64, 64)


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
