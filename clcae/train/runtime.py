"""Starting or joining Ray, the same way for every job."""

from __future__ import annotations

import os


def init_ray(num_cpus: int | None = None) -> None:
    """Join the cluster named by RAY_ADDRESS (as inside `ray job submit`), else start a local one.

    Locally, logical CPUs are set above the physical ones: with exactly one CPU per core, Train workers leave
    Ray Data no CPU budget and the input pipeline stalls (ray issue #44687).
    """
    import ray

    os.environ.setdefault("RAY_DATA_PARQUET_FOOTER_NUM_ACTORS", "1")  # not 32 footer-reader processes
    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init()  # RAY_ADDRESS names the cluster
    else:
        ray.init(num_cpus=num_cpus or max(4, (os.cpu_count() or 2) * 2), include_dashboard=False)
