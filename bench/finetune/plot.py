"""``finetune.png``: the loss curves (the uninterrupted job and the one whose node was killed),
fine-tune progress against REALTIME load, and the REALTIME latency beside it. A panel whose
experiment failed says so instead of plotting."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.finetune.figures import PROGRESS_SHARE_TARGET


def _losses(axis: Any, entry: dict[str, Any] | None) -> None:
    axis.set_title("Fine-tune loss per step")
    if not entry or "error" in entry:
        axis.text(0.5, 0.5, "not measured", ha="center", va="center", transform=axis.transAxes)
        return
    ref, kill = entry["reference"]["steps"], entry["kill"]["steps"]
    axis.plot([s["step"] for s in ref], [s["loss"] for s in ref], label="uninterrupted", lw=2)
    k = entry["kill"]
    first = [s for s in kill if s["at_unix_ms"] <= k["killed_at_unix_ms"]]
    moved = [s for s in kill if s["at_unix_ms"] > k["killed_at_unix_ms"]]
    axis.plot(
        [s["step"] for s in first],
        [s["loss"] for s in first],
        "o",
        ms=3,
        label="killed job, before",
    )
    axis.plot(
        [s["step"] for s in moved], [s["loss"] for s in moved], "x", ms=4, label="after the move"
    )
    axis.axvline(
        k["killed_at_step"], color="red", ls="--", lw=1, label=f"SIGKILL {k['killed_node']}"
    )
    axis.axvline(k["checkpoint_at_kill"], color="grey", ls=":", lw=1, label="last checkpoint")
    axis.set_xlabel("optimizer step")
    axis.set_ylabel("training loss")
    losses = [s["loss"] for s in (*ref, *kill) if s["loss"] > 0]
    if losses and max(losses) > 100 * min(losses):  # a task learned: the tail shows on a log
        axis.set_yscale("log")
    else:
        axis.set_ylim(bottom=0)
    axis.legend(fontsize=8)


def _progress(axis: Any, entry: dict[str, Any] | None) -> None:
    axis.set_title("Fine-tune progress vs REALTIME load")
    if not entry or "error" in entry:
        axis.text(0.5, 0.5, "not measured", ha="center", va="center", transform=axis.transAxes)
        return
    alone = entry["alone"]["training_tokens_per_s"] or 0.0
    loads = [0.0] + [p["load"] * 100 for p in entry["curve"]]
    rates = [alone] + [p["training_tokens_per_s"] or 0.0 for p in entry["curve"]]
    axis.plot(loads, rates, marker="o", label="training tokens/s (0 %: alone)")
    axis.axhline(PROGRESS_SHARE_TARGET * alone, color="red", ls="--", lw=1, label="50 % of alone")
    axis.set_xlabel("REALTIME load (% of the node's capacity)")
    axis.set_ylabel("training tokens/s")
    axis.set_ylim(bottom=0)
    axis.legend(fontsize=8)


def _latency(axis: Any, entry: dict[str, Any] | None) -> None:
    axis.set_title("REALTIME latency p99 with training")
    if not entry or "error" in entry:
        axis.text(0.5, 0.5, "not measured", ha="center", va="center", transform=axis.transAxes)
        return
    phases = sorted(entry["with_training"], key=lambda p: p["load"])
    loads = [p["load"] * 100 for p in phases]
    axis.plot(loads, [p["ttft_p99_s"] * 1000 for p in phases], marker="o", label="TTFT p99")
    axis.plot(
        loads, [p["inter_token_p99_s"] * 1000 for p in phases], marker="s", label="inter-token p99"
    )
    without = entry["without"]
    at = without["load"] * 100
    axis.plot([at], [without["ttft_p99_s"] * 1000], "k^", label="TTFT p99 without training")
    axis.plot([at], [without["inter_token_p99_s"] * 1000], "kv", label="inter-token p99 without")
    axis.set_xlabel("REALTIME load (% of the node's capacity)")
    axis.set_ylabel("ms")
    axis.set_ylim(bottom=0)
    axis.legend(fontsize=8)


def write_plot(doc: dict[str, Any], path: Path) -> None:
    """Write the three panels of ``doc``'s experiments to ``path``."""
    import matplotlib  # noqa: PLC0415 - only needed for the picture

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    experiments = doc["experiments"]
    fig, (losses, progress, latency) = plt.subplots(1, 3, figsize=(16, 4.8))
    _losses(losses, experiments.get("resume"))
    _progress(progress, experiments.get("sharing"))
    _latency(latency, experiments.get("sharing"))
    for axis in (losses, progress, latency):
        axis.grid(True, alpha=0.3)
    fig.suptitle(f"Fine-tuning in the gaps: {doc['settings']['model']} ({doc['settings']['mode']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
