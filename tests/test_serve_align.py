"""Serve with ``align=true``: raw photos in, the quad, faces, aligned crop and pasted-back whole photo out.

Tiny config, random weights: the reconstructions are meaningless, the geometry (detection, quads, paste-back)
is real. Photos are scikit-image's astronaut (a portrait), coffee (no face) and a two-portrait collage.
"""

from __future__ import annotations

import base64
import io

import httpx
import numpy as np
import pytest
from helpers import ROOT, encode, serve_app, serve_config
from PIL import Image
from skimage import data as skimage_data

from clcae.align import align, photo_mask
from clcae.config import load_config

pytestmark = pytest.mark.slow
CROP = (64, 64)  # configs/tiny.yaml's encoder.input_size: the aligned crop and every model output
SMILE = '[{"direction": "smile", "strength": 3}]'


def decode(b64_or_bytes: str | bytes) -> Image.Image:
    raw = base64.b64decode(b64_or_bytes) if isinstance(b64_or_bytes, str) else b64_or_bytes
    im = Image.open(io.BytesIO(raw))
    im.load()
    return im


ASTRONAUT = Image.fromarray(skimage_data.astronaut())


def collage() -> Image.Image:
    """The astronaut, then a 3/4-size copy of her (face 0 is the left, larger one)."""
    canvas = Image.new("RGB", (512 + 384, 512), (128, 128, 128))
    canvas.paste(ASTRONAUT, (0, 0))
    canvas.paste(ASTRONAUT.resize((384, 384), Image.Resampling.LANCZOS), (512, 64))
    return canvas


@pytest.fixture(scope="module")
def photos() -> dict[str, bytes]:
    return {"astronaut": encode(ASTRONAUT), "collage": encode(collage(), "JPEG", quality=92),
            "coffee": encode(Image.fromarray(skimage_data.coffee()), "JPEG", quality=90),
            "flat": encode(Image.new("RGB", (300, 200), (90, 120, 150)))}


@pytest.fixture(scope="module")
def server(ray_cluster, tmp_path_factory):
    with serve_app(serve_config(tmp_path_factory.mktemp("dirs"), "serve.max_body_mb=4")) as url:
        yield url


def post(url: str, **kw) -> httpx.Response:
    return httpx.post(url, timeout=120, **kw)


def test_invert_with_align_returns_the_librarys_quad(server, photos):
    r = post(f"{server}/v1/invert?align=true", content=photos["astronaut"])
    assert r.status_code == 200, r.text
    body = r.json()
    expected = align(photos["astronaut"], "faces", CROP)  # the same bytes through the library
    a = body["align"]
    assert a["domain"] == "faces" and a["face"] == 0 and a["source_size"] == [512, 512]
    np.testing.assert_allclose(a["quad"], expected[0].quad, atol=1e-6)
    assert len(a["faces"]) == 1 and a["faces"][0]["index"] == 0 and a["faces"][0]["score"] > 0.9
    crop = decode(a["aligned_png"])
    assert crop.size == CROP[::-1]
    np.testing.assert_array_equal(np.asarray(crop), np.asarray(expected[0].image))  # what the model inverted
    assert decode(body["reconstruction_png"]).size == CROP[::-1]
    assert len(body["w"]) == 64 and a["align_ms"] > 0


def test_a_photo_without_a_face_is_a_422(server, photos):
    for name in ("coffee", "flat"):
        r = post(f"{server}/v1/invert", files={"image": (f"{name}.jpg", photos[name])}, data={"align": "true"})
        assert r.status_code == 422, (name, r.status_code, r.text[:300])
        assert "no face" in r.json()["error"] and f"{name}.jpg" in r.json()["error"]
    r = post(f"{server}/v1/edit", files={"image": ("coffee.jpg", photos["coffee"])},
             data={"align": "true", "edits": SMILE})
    assert r.status_code == 422 and "no face" in r.json()["error"]


def test_several_faces_are_listed_and_face_picks_one(server, photos):
    expected = align(photos["collage"], "faces", CROP)
    assert len(expected) == 2
    first = post(f"{server}/v1/invert", files={"image": ("two.jpg", photos["collage"])}, data={"align": "true"})
    assert first.status_code == 200, first.text
    a = first.json()["align"]
    assert [f["index"] for f in a["faces"]] == [0, 1]
    for listed, face in zip(a["faces"], expected):
        np.testing.assert_allclose(listed["quad"], face.quad, atol=1e-6)
    assert a["face"] == 0 and np.mean(np.asarray(a["quad"])[:, 0]) < 512  # the larger, left portrait
    second = post(f"{server}/v1/invert?align=true&face=1", content=photos["collage"]).json()["align"]
    assert second["face"] == 1
    np.testing.assert_allclose(second["quad"], expected[1].quad, atol=1e-6)
    assert np.mean(np.asarray(second["quad"])[:, 0]) > 512  # the right one
    missing = post(f"{server}/v1/invert?align=true&face=2", content=photos["collage"])
    assert missing.status_code == 422 and "2 faces" in missing.json()["error"]
    assert len(missing.json()["faces"]) == 2  # the client can choose from the error, too


def test_edit_with_align_pastes_into_the_whole_photo(server, photos):
    original = np.asarray(ASTRONAUT)
    r = post(f"{server}/v1/edit", files={"image": ("astronaut.png", photos["astronaut"])},
             data={"align": "true", "edits": SMILE, "format": "json"})
    assert r.status_code == 200, r.text
    body = r.json()
    whole = np.asarray(decode(body["photo_png"]))
    assert whole.shape == original.shape
    assert decode(body["image_png"]).size == CROP[::-1] and decode(body["reconstruction_png"]).size == CROP[::-1]
    quad = np.asarray(body["align"]["quad"])
    np.testing.assert_allclose(quad, align(photos["astronaut"], "faces", CROP)[0].quad, atol=1e-6)
    weight = photo_mask(quad, (512, 512), CROP)
    outside = weight == 0
    assert 0.5 < outside.mean() < 0.99  # the face is a part of the photo, not nothing and not all of it
    np.testing.assert_array_equal(whole[outside], original[outside])  # bit-identical outside the paste mask
    inside = weight > 0.99
    assert np.abs(whole[inside].astype(int) - original[inside]).mean() > 5  # the (random) edit is in there

    # format=png (the endpoint's default): the whole photo itself; JPEG on request
    raw = post(f"{server}/v1/edit", files={"image": ("astronaut.png", photos["astronaut"])},
               data={"align": "true", "edits": SMILE})
    assert raw.status_code == 200 and raw.headers["content-type"] == "image/png"
    assert decode(raw.content).size == (512, 512)
    jpeg = post(f"{server}/v1/edit?align=true&photo_format=jpeg", files={"image": ("a.png", photos["astronaut"])},
                data={"edits": SMILE})
    assert jpeg.status_code == 200 and jpeg.headers["content-type"] == "image/jpeg"
    assert decode(jpeg.content).size == (512, 512)


def test_invert_png_with_align_is_the_whole_photo(server, photos):
    r = post(f"{server}/v1/invert?align=true&format=png&face=1", content=photos["collage"])
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    whole = np.asarray(decode(r.content))
    original = np.asarray(decode(photos["collage"]))
    assert whole.shape == original.shape == (512, 896, 3)
    quad = align(photos["collage"], "faces", CROP)[1].quad
    outside = photo_mask(quad, (896, 512), CROP) == 0
    np.testing.assert_array_equal(whole[outside], original[outside])
    assert outside[:, :512].all()  # face 1 is the right portrait: the left one is untouched


def test_quads_are_in_the_pixels_after_exif_orientation(server):
    """A phone photo stored sideways with an EXIF rotation: the quad is in the upright photo's pixels."""
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to view": the stored pixels are the upright photo turned 90 CCW
    upright = ASTRONAUT.crop((64, 0, 448, 512))  # 384 wide, 512 high
    data = encode(upright.transpose(Image.Transpose.ROTATE_90), "JPEG", quality=95, exif=exif.tobytes())
    r = post(f"{server}/v1/invert?align=true", content=data)
    assert r.status_code == 200, r.text
    a = r.json()["align"]
    assert a["source_size"] == [384, 512]  # upright: 384 wide, 512 high
    np.testing.assert_allclose(a["quad"], align(data, "faces", CROP)[0].quad, atol=1e-6)


@pytest.mark.parametrize("query,data,words", [
    ("align=maybe", {}, "align must be true or false"),
    ("align=true&face=-1", {}, "face must be a face index"),
    ("align=true&face=one", {}, "face must be a face index"),
    ("align=true&photo_format=gif", {}, "photo_format"),
    ("", {"align": "yes please"}, "align must be true or false"),
])
def test_bad_align_options_are_400(server, photos, query, data, words):
    r = post(f"{server}/v1/invert?{query}", files={"image": ("a.png", photos["astronaut"])}, data=data)
    assert r.status_code == 400 and words in r.json()["error"], r.text[:300]


def test_bad_photos_and_requests_with_align_are_4xx_never_5xx(server, photos):
    cases = [
        (post(f"{server}/v1/invert?align=true", content=b"not an image"), 415, "not a readable image"),
        (post(f"{server}/v1/invert?align=true", content=b""), 400, "0 bytes"),
        (post(f"{server}/v1/invert?align=true", content=encode(Image.new("RGB", (8, 8)))), 400, "too small"),
        (post(f"{server}/v1/invert?align=true", content=photos["astronaut"][:2000]), 415, "not a readable image"),
        (post(f"{server}/v1/invert?align=true", content=b"\0" * (5 * 2**20)), 413, "limit"),
        (post(f"{server}/v1/edit?align=true", json={"latents": {}, "edits": [{"direction": "smile", "strength": 1}]}),
         400, "needs the photo"),
        (post(f"{server}/v1/edit", files={"image": ("a.png", photos["astronaut"])}, data={"align": "true"}),
         400, "edits"),
    ]
    for r, status, words in cases:
        assert r.status_code == status and words in r.json()["error"], (status, r.status_code, r.text[:300])


def test_align_off_keeps_todays_behaviour(server, photos):
    r = post(f"{server}/v1/invert", content=photos["astronaut"])
    assert r.status_code == 200 and "align" not in r.json()
    r = post(f"{server}/v1/invert?format=png&align=false", content=photos["astronaut"])
    assert r.status_code == 200 and decode(r.content).size == CROP[::-1]  # the reconstruction, not the photo


def test_the_align_domain_follows_the_model_unless_configured():
    from clcae.config import ConfigError
    from clcae.serving import align_domain

    tiny = ROOT / "configs" / "tiny.yaml"
    assert align_domain(load_config(tiny)) == "faces"
    assert align_domain(load_config(ROOT / "configs" / "cars.yaml")) == "cars"  # generator.crop is set
    assert align_domain(load_config(tiny, ["serve.align_domain=cars"])) == "cars"
    with pytest.raises(ConfigError, match="serve.align_domain"):
        load_config(tiny, ["serve.align_domain=cats"])
