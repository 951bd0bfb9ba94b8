"""Raw photos through the bulk job: ``jobs/invert.py --align faces --edit ...`` on real portraits (scikit-image's
astronaut, a two-portrait collage) and a photo without a face; the tiny model with random weights (the geometry is
real, the reconstructions are not)."""

from __future__ import annotations

import importlib.util
import io
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from skimage import data as skimage_data

from clcae.align import Aligner, photo_mask
from clcae.editing import save_interfacegan

ROOT = Path(__file__).resolve().parents[1]


def png(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("photos")
    astronaut = Image.fromarray(skimage_data.astronaut())
    astronaut.save(folder / "astronaut.png")
    canvas = Image.new("RGB", (512 + 384, 512), (128, 128, 128))
    canvas.paste(astronaut, (0, 0))
    canvas.paste(astronaut.resize((384, 384), Image.Resampling.LANCZOS), (512, 64))
    canvas.save(folder / "two.png")
    Image.fromarray(skimage_data.coffee()).save(folder / "coffee.png")
    return folder


def invert_job():
    spec = importlib.util.spec_from_file_location("invert_photos_cli", ROOT / "jobs" / "invert.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_invert_aligns_photos_keeps_quads_and_writes_edited_whole_photos(photos, tmp_path, ray_cluster, capsys):
    torch.manual_seed(0)
    save_interfacegan(torch.nn.functional.normalize(torch.randn(1, 64), dim=1), tmp_path / "d.pt")
    out = tmp_path / "table"
    args = ["--input", str(photos), "--output", str(out), "--align", "faces", "--edit", "d=3.0",
            "directions.d.kind=interfacegan", f"directions.d.path={tmp_path / 'd.pt'}"]
    assert invert_job().main(args) == 0
    printed = capsys.readouterr().out
    summary = json.loads(printed[printed.index("{"):])
    # accounting per photo: 3 photos = 2 that gave faces (3 face rows) + 1 error row
    assert (summary["inputs"], summary["photos"], summary["written"], summary["errors"]) == (3, 2, 3, 1)
    rows = {r["key"]: r for r in pq.read_table(out / "latents").to_pylist()}
    assert set(rows) == {"astronaut.png#face0", "two.png#face0", "two.png#face1"}
    errors = pq.read_table(out / "errors").to_pylist()
    assert [e["key"] for e in errors] == ["coffee.png"] and "no face found" in errors[0]["error"]
    # the table's quads are the library's for the same photo bytes (the crop size is the encoder's input)
    aligner = Aligner("faces", 64)
    for name, n in (("astronaut.png", 1), ("two.png", 2)):
        faces = aligner((photos / name).read_bytes(), name=name)
        assert len(faces) == n
        for face in faces:
            row = rows[f"{name}#face{face.index}"]
            assert row["source_key"] == name and row["face_count"] == n and row["face_index"] == face.index
            # MTCNN batches photos of equal detection size together: a photo's points move with its batch by float
            # rounding only (measured 4e-5 px here); 0.02 px is far below anything visible
            np.testing.assert_allclose(np.reshape(row["quad"], (4, 2)), face.quad, atol=0.02)
            np.testing.assert_allclose(np.reshape(row["landmarks"], (5, 2)), face.landmarks, atol=0.02)
    # the edit pasted back into the whole photo: the photo's size, untouched outside the paste mask
    original = np.asarray(Image.open(photos / "two.png").convert("RGB"))
    for i in (0, 1):
        edited = np.asarray(Image.open(out / "edited" / f"two.png.face{i}.png"))
        assert edited.shape == original.shape
        mask = photo_mask(np.reshape(rows[f"two.png#face{i}"]["quad"], (4, 2)), (896, 512), 64)
        assert np.array_equal(edited[mask == 0], original[mask == 0])
        assert not np.array_equal(edited[mask > 0.5], original[mask > 0.5])
    # a re-run skips every photo (complete ones and the error) and writes nothing twice
    assert invert_job().main(args) == 0
    printed = capsys.readouterr().out
    again = json.loads(printed[printed.index("{"):])
    assert again["inputs"] == 3 and again["skipped"] == 3 and again["written"] == 0
    assert pq.read_table(out / "latents").num_rows == 3
