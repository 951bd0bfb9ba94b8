"""TensorBoard event files for a training run, beside its checkpoints: ``{run}/tensorboard/``.

    tensorboard --logdir {train.storage_path}/{run name}

Rank 0 writes them (scalars at every report, sample grids at every sample interval). On local storage the
writer writes into the run directory directly. On object storage (``s3://`` ...) it writes to a local folder
and uploads: at each sync the current event file is closed, uploaded once, deleted locally, and the next
event goes to a new file, so nothing is uploaded twice and an upload never rewrites a growing object.
TensorBoard reads every event file of a folder in name (= time) order.

After a resume the first new file starts with a purge marker at the resumed step: TensorBoard then hides what
the failed attempt had logged past its last checkpoint, so the curves do not double back.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from clcae.config import StorageConfig
from clcae.data.storage import filesystem, is_local, join

if TYPE_CHECKING:
    from torch.utils.tensorboard import SummaryWriter

log = logging.getLogger(__name__)

EVENTS_DIR = "tensorboard"
UPLOAD_EVERY_S = 120.0  # object storage: at most this long between uploads, besides checkpoints and samples


class EventLog:
    def __init__(self, run_uri: str, storage: StorageConfig | None = None, resumed_step: int | None = None):
        self.storage = storage
        self.remote = None if is_local(run_uri) else join(run_uri, EVENTS_DIR)
        self.folder = (tempfile.mkdtemp(prefix="clcae-events-") if self.remote
                       else os.path.join(filesystem(run_uri)[1], EVENTS_DIR))
        self._writer: SummaryWriter | None = None
        self._disabled = False
        # TensorBoard drops earlier events with step >= purge_step when it reads this marker
        self._purge_step = resumed_step + 1 if resumed_step is not None else None
        self._uploaded_at = time.monotonic()

    def _open(self) -> SummaryWriter | None:
        if self._writer is None and not self._disabled:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as exc:  # a worker image without the package: train on, without dashboards
                log.warning("no TensorBoard events for this run (%s): pip install tensorboard", exc)
                self._disabled = True
                return None
            self._writer = SummaryWriter(self.folder, purge_step=self._purge_step, flush_secs=3600)
            self._purge_step = None  # once, in the first file after a resume
        return self._writer

    def scalars(self, values: Mapping[str, float], step: int) -> None:
        writer = self._open()
        for tag, value in values.items() if writer is not None else ():
            writer.add_scalar(tag, float(value), step)

    def image(self, tag: str, image: Image.Image, step: int) -> None:
        writer = self._open()
        if writer is not None:
            writer.add_image(tag, np.asarray(image.convert("RGB")), step, dataformats="HWC")

    def sync(self, force: bool = False) -> None:
        """Make what was logged readable: flush locally; upload to object storage when ``force`` (checkpoint,
        sample, end of run) or when the last upload is older than UPLOAD_EVERY_S."""
        if self._writer is None:
            return
        if self.remote is None:
            self._writer.flush()
            return
        if not force and time.monotonic() - self._uploaded_at < UPLOAD_EVERY_S:
            return
        self._writer.close()
        self._writer = None
        self._upload()

    def _upload(self) -> None:
        fs, _ = filesystem(self.remote, self.storage)
        for local in sorted(Path(self.folder).glob("events.out.tfevents.*")):
            target = filesystem(join(self.remote, local.name), self.storage)[1]
            try:
                fs.put_file(str(local), target)
            except Exception as exc:  # noqa: BLE001 - a dashboard upload must not stop training
                log.warning("could not upload %s to %s (kept locally, retried at the next sync): %s",
                            local.name, self.remote, exc)
                continue
            local.unlink()
        self._uploaded_at = time.monotonic()

    def close(self) -> None:
        self.sync(force=True)
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self.remote is not None:
            shutil.rmtree(self.folder, ignore_errors=True)

    def __enter__(self) -> EventLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()  # also when training fails: what was logged up to then is kept
