"""What every benchmark ends with: its JSON result printed, and written to ``--out`` when given (with the
markdown table beside it, ``.md``, for the benchmarks that make one)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def emit(result: dict[str, Any], out: str | Path | None, indent: int = 2, markdown: str | None = None) -> None:
    text = json.dumps(result, indent=indent)
    print(text)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text + "\n")
        if markdown is not None:
            Path(out).with_suffix(".md").write_text(markdown)
