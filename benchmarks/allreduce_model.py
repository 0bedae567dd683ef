"""A model of DDP's exposed all-reduce time, for hardware the benchmark could not measure.

Per step, one GPU computes for ``compute_s`` (forward, backward, optimizer; measured on the
1-unit run with no communication). Backward takes ``BACKWARD_SHARE`` of it and fills the
gradient buckets in DDP's order (parameters in reverse, a 1 MiB first bucket, then
``bucket_cap_mb`` buckets) at a steady rate. Each bucket is all-reduced as soon as it is full,
one at a time, with a ring: ``2 (N-1)/N x bytes / bandwidth + 2 (N-1) x latency``. What is
still running when backward ends is exposed; the predicted scaling efficiency is
``compute / (compute + exposed)`` at a fixed per-GPU batch (weak scaling).

Where it stops being valid: see README "Scaling benchmark".
"""

from __future__ import annotations

from dataclasses import dataclass

# Backward is about twice the forward's work; the optimizer step is small beside both.
BACKWARD_SHARE = 2 / 3
FIRST_BUCKET_BYTES = 1 << 20  # torch.distributed._DEFAULT_FIRST_BUCKET_BYTES


@dataclass(frozen=True)
class Link:
    name: str
    bandwidth_gbs: float  # achievable per-GPU ring bandwidth, GB/s (1e9 bytes)
    latency_us: float  # per ring step
    sizes: tuple[int, ...]  # GPU counts to project
    basis: str  # where the number comes from


# Stated assumptions: achievable all-reduce bus bandwidth, a bit under each link's nominal rate.
LINKS = (
    Link(
        "NVLink",
        240.0,
        5.0,
        (2, 4, 8),
        "A100 SXM NVLink 3 via NVSwitch: 300 GB/s per direction nominal, ~240 achieved by NCCL",
    ),
    Link("PCIe", 20.0, 10.0, (2, 4, 8), "PCIe 4.0 x16: 32 GB/s per direction nominal, ~20 through the host bridge"),
    Link(
        "InfiniBand",
        22.0,
        10.0,
        (16, 32, 64),
        "HDR 200 Gb/s (25 GB/s), one NIC per GPU, 8 GPUs per node: the inter-node hop limits the ring",
    ),
)


def bucket_sizes(param_bytes: list[int], bucket_cap_mb: float) -> list[int]:
    """DDP's buckets in the order backward fills them: ``param_bytes`` in registration order."""
    buckets, current, limit = [], 0, FIRST_BUCKET_BYTES
    for b in reversed(param_bytes):
        current += b
        if current >= limit:
            buckets.append(current)
            current, limit = 0, int(bucket_cap_mb * 2**20)
    if current:
        buckets.append(current)
    return buckets


def ring_allreduce_s(nbytes: float, n: int, bandwidth_gbs: float, latency_us: float) -> float:
    if n <= 1:
        return 0.0
    return 2 * (n - 1) / n * nbytes / (bandwidth_gbs * 1e9) + 2 * (n - 1) * latency_us * 1e-6


def exposed_comm_s(compute_s: float, buckets: list[int], n: int, bandwidth_gbs: float, latency_us: float) -> float:
    """All-reduce time left after backward ends, buckets overlapping the rest of backward."""
    if n <= 1 or not buckets:
        return 0.0
    backward = BACKWARD_SHARE * compute_s
    total, filled, comm_end = sum(buckets), 0, 0.0
    for b in buckets:
        filled += b
        ready = backward * filled / total  # relative to the start of backward
        comm_end = max(ready, comm_end) + ring_allreduce_s(b, n, bandwidth_gbs, latency_us)
    return max(0.0, comm_end - backward)


def efficiency(compute_s: float, buckets: list[int], n: int, link: Link) -> float:
    return compute_s / (compute_s + exposed_comm_s(compute_s, buckets, n, link.bandwidth_gbs, link.latency_us))


def compute_for_efficiency(target: float, buckets: list[int], n: int, link: Link) -> float:
    """The shortest compute time per step (s) that still reaches ``target`` efficiency: a GPU
    faster than that is communication-bound on this link (efficiency rises with compute time,
    since a longer backward hides more of the all-reduce)."""
    lo, hi = 1e-6, 1e3
    for _ in range(100):
        mid = (lo * hi) ** 0.5
        lo, hi = (mid, hi) if efficiency(mid, buckets, n, link) < target else (lo, mid)
    return hi


def project(compute_s: float, per_unit_images_s: float, buckets: list[int], links=LINKS) -> list[dict]:
    """One projected row per link and GPU count."""
    rows = []
    for link in links:
        for n in link.sizes:
            exposed = exposed_comm_s(compute_s, buckets, n, link.bandwidth_gbs, link.latency_us)
            eff = efficiency(compute_s, buckets, n, link)
            rows.append(
                {
                    "name": f"{link.name} x{n}",
                    "link": link.name,
                    "units": n,
                    "bandwidth_gbs": link.bandwidth_gbs,
                    "latency_us": link.latency_us,
                    "allreduce_ms": 1e3 * ring_allreduce_s(sum(buckets), n, link.bandwidth_gbs, link.latency_us),
                    "compute_ms": 1e3 * compute_s,
                    "exposed_comm_ms": 1e3 * exposed,
                    "efficiency": eff,
                    "images_per_sec": n * per_unit_images_s * eff,
                    "compute_ms_for_90pct": 1e3 * compute_for_efficiency(0.9, buckets, n, link),
                }
            )
    return rows
