"""Scaling benchmark: the report's figure, three panels from one result dict (scaling_report.py):
measured throughput, the measured step-time breakdown, and efficiency against the number of
processes/GPUs, measured points over the projected lines."""

from __future__ import annotations

from pathlib import Path


def render_plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a batch node
    import matplotlib.pyplot as plt

    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(15, 4.5))
    _throughput(ax1, result["measured"])
    _step_time(ax2, result["measured"])
    _efficiency(ax3, result["measured"], result["projected"])
    s = result["settings"]
    fig.suptitle(
        f"{s['arch']}, {s['data']}, batch {s['batch_size']}/process, amp {s['amp']} ({result['machine']['cpu']})",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _throughput(ax, meas: list[dict]) -> None:
    names = [r["name"] for r in meas]
    ax.bar(names, [r["images_per_sec"] for r in meas], color="tab:blue", label="total")
    ax.bar(names, [r["images_per_sec_per_rank"] for r in meas], width=0.4, color="tab:orange", label="per rank")
    ax.set_ylabel("images/s")
    ax.set_title("Measured throughput")
    ax.legend()


def _step_time(ax, meas: list[dict]) -> None:
    names = [r["name"] for r in meas]
    bottom = [0.0] * len(meas)
    for key, label in (("data_wait_ms", "data wait"), ("compute_ms", "compute"), ("exposed_comm_ms", "exposed comm")):
        vals = [r[key] for r in meas]
        ax.bar(names, vals, bottom=bottom, label=label)
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax.set_ylabel("ms per step")
    ax.set_title("Step time (measured)")
    ax.legend()


def _efficiency(ax, meas: list[dict], projected: list[dict]) -> None:
    for link in dict.fromkeys(p["link"] for p in projected):
        pts = [p for p in projected if p["link"] == link]
        ax.plot([p["units"] for p in pts], [p["efficiency"] for p in pts], "--o", label=f"{link} (projected)")
    for r in meas:
        if r["efficiency"] is not None:
            ax.plot([r["world"]], [r["efficiency"]], "s", markersize=9, label=f"{r['name']} (measured)")
    ax.set_xscale("log", base=2)
    effs = [r["efficiency"] for r in meas if r["efficiency"] is not None]
    ax.set_ylim(0, max([1.05, *(1.05 * e for e in effs)]))  # N ranks may beat one on a CPU
    ax.set_xlabel("processes / GPUs")
    ax.set_ylabel("scaling efficiency")
    ax.set_title("Efficiency vs the 1-unit run")
    ax.legend(fontsize=7)
