"""The official files this platform reads: where each comes from, what it holds, and a hint naming the
source when a file is missing or unreadable.  ``clcae weights fetch NAME`` downloads from here."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class OfficialFile:
    name: str
    filename: str
    urls: tuple[str, ...]
    source: str
    # No checksum is published by the authors for any of these files.  ``sha256`` is set only where independent
    # mirrors agree (a warning on mismatch, not a failure); ``md5_prefix`` is MoCo's own published one.
    sha256: str | None = None
    md5_prefix: str | None = None
    folder: bool = False          # a Google Drive folder (needs `gdown --folder`)
    note: str = ""


def _drive(file_id: str) -> str:
    return f"https://drive.google.com/uc?id={file_id}"


_E4E_RAW = "https://raw.githubusercontent.com/omertov/encoder4editing/main/editings"

OFFICIAL: dict[str, OfficialFile] = {f.name: f for f in [
    OfficialFile("stylegan2-ffhq", "stylegan2-ffhq-config-f.pt", (_drive("1EM87UquaoQmk17Q8d5kYIAHqu0dkYqdT"),),
                 "pSp/e4e/ReStyle/CLCAE READMEs ('FFHQ StyleGAN', rosinality conversion of NVlabs config-f)",
                 note="{'g_ema', 'latent_avg'}; 1024 px"),
    OfficialFile("stylegan2-car", "stylegan2-car-config-f.pt", (_drive("1UmMHHB3DU1trTB8_9Fjkck5ZwArnD81B"),),
                 "ReStyle README ('LSUN Car StyleGAN')",
                 note="512 px; the CLCAE README's 'Car StyleGAN' link repeats the FFHQ id (a bug)"),
    OfficialFile("ir-se50", "model_ir_se50.pth", (_drive("1KW7bjndL3QG3sxBbZxreGHigcCCpsDgn"),),
                 "TreB1eN/InsightFace_Pytorch IR-SE50, as linked by pSp/e4e/CLCAE ('IR-SE50 Model')",
                 sha256="a035c768259b98ab1ce0e646312f48b9e1e218197a0f80ac6765e88f8b6ddf28"),
    OfficialFile("moco-v2", "moco_v2_800ep_pretrain.pt",
                 ("https://dl.fbaipublicfiles.com/moco/moco_checkpoints/moco_v2_800ep/moco_v2_800ep_pretrain.pth.tar",
                  _drive("18rLcNGdteX5LwT7sv_F7HWr12HpVEzVe")),
                 "facebookresearch/moco README (pSp/e4e link a renamed copy)", md5_prefix="a04e12f8",
                 note="{'state_dict': module.encoder_q.*}"),
    OfficialFile("curricularface", "CurricularFace_Backbone.pth", (_drive("1f4IwVa2-Bn9vWLwB-bUwm53U_MlvinAj"),),
                 "pSp/ReStyle/CLCAE READMEs ('CurricularFace Backbone'), for the paper's ID metric"),
    OfficialFile("clcae-ffhq", "clcae_ffhq_inversion.pt", (_drive("1gCsF8mHxjhExswCchz7UpXfe-NvAhIm9"),),
                 "KumapowerLIU/CLCAE README ('FFHQ_Inversion')", note="{'state_dict': encoder.*/decoder.*, 'opts'}"),
    OfficialFile("clcae-car", "clcae_car_inversion.pt", (_drive("1pd8M8CZoZWx_YkJzXTSJsCk-J41dtGmt"),),
                 "KumapowerLIU/CLCAE README ('Car_Inversion')"),
    OfficialFile("clcae-contrastive-ffhq", "ffhq_cont", (_drive("19Q75nlaZ8KVdUd6C9s2y6c1cKXuB90TS"),),
                 "KumapowerLIU/CLCAE README ('Contrastive model and data for FFHQ')", folder=True,
                 note="a folder: best_model_image.pt, best_model_latent.pt and the synthetic pairs"),
    OfficialFile("clcae-contrastive-car", "car_cont", (_drive("1JzUJlBs_lRpOAU0gxDsftv4YQ1gqxXmg"),),
                 "KumapowerLIU/CLCAE README ('Contrastive model and data for Car')",
                 note="best_model_image.pt, best_model_latent.pt"),
    OfficialFile("interfacegan-age", "editing/age.pt", (f"{_E4E_RAW}/interfacegan_directions/age.pt",),
                 "omertov/encoder4editing editings/interfacegan_directions"),
    OfficialFile("interfacegan-smile", "editing/smile.pt", (f"{_E4E_RAW}/interfacegan_directions/smile.pt",),
                 "omertov/encoder4editing editings/interfacegan_directions"),
    OfficialFile("interfacegan-pose", "editing/pose.pt", (f"{_E4E_RAW}/interfacegan_directions/pose.pt",),
                 "omertov/encoder4editing editings/interfacegan_directions"),
    OfficialFile("ganspace-ffhq", "editing/ffhq_pca.pt", (f"{_E4E_RAW}/ganspace_pca/ffhq_pca.pt",),
                 "omertov/encoder4editing editings/ganspace_pca"),
    OfficialFile("ganspace-cars", "editing/cars_pca.pt", (f"{_E4E_RAW}/ganspace_pca/cars_pca.pt",),
                 "omertov/encoder4editing editings/ganspace_pca"),
]}


def where_from(path: str | os.PathLike, source: str | None = None) -> str:
    """A hint naming the official source of a file, matched on its file name (or given)."""
    if source:
        return f" Expected {source}."
    name = Path(str(path)).name
    for f in OFFICIAL.values():
        if Path(f.filename).name == name or (name.startswith("best_model_") and f.folder):
            how = f"`clcae weights fetch {f.name}`" if f.urls else "download it by hand"
            return f" It is the official file {f.filename!r} from {f.source}; {how}."
    # Not an official file (e.g. one of our own checkpoints): the path itself is what to check.
    return ""
