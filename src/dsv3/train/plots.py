"""PNG plots of a run from its metrics.jsonl: loss curves and the expert-load heat map (matplotlib, Agg)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _ema(x: np.ndarray, beta: float = 0.9) -> np.ndarray:
    """Exponential moving average, bias-corrected (as Adam's moments) so the first points are not pulled to 0."""
    out, m = np.empty(len(x)), 0.0
    for i, v in enumerate(x):
        m = beta * m + (1 - beta) * v
        out[i] = m / (1 - beta ** (i + 1))
    return out


def _moe_layer_names(run_dir: Path, n: int) -> list[str]:
    """Names of the rows of `load`: the main MoE layers in order, then the MTP blocks."""
    try:
        from dsv3.config import ModelConfig

        cfg = ModelConfig.from_json(run_dir / "config.json")
        names = [f"layer {i}" for i in range(cfg.num_hidden_layers) if cfg.is_moe_layer(i)]
        names += [f"MTP {k + 1}" for k in range(cfg.num_nextn_predict_layers)]
    except (OSError, ValueError):
        names = []
    return names if len(names) == n else [f"MoE layer {i}" for i in range(n)]


def plot_run(run_dir: str | Path) -> list[Path]:
    """Write RUN/plots/loss.png and RUN/plots/expert_load.png (when the model routes); return the paths."""
    import matplotlib

    matplotlib.use("Agg")  # files only; no display needed
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    rows = read_metrics(run_dir / "metrics.jsonl")
    train = [r for r in rows if "loss" in r]
    val = [r for r in rows if "val_loss" in r]
    out_dir = run_dir / "plots"
    out_dir.mkdir(exist_ok=True)
    written = []

    fig, (ax, ax_bpb) = plt.subplots(1, 2, figsize=(12, 4.5))
    if train:
        tok = np.array([r["tokens"] for r in train]) / 1e6
        ntp = np.array([r["ntp"] for r in train])
        ax.plot(tok, ntp, color="C0", alpha=0.25, lw=0.8)
        ax.plot(tok, _ema(ntp), color="C0", label="train NTP")
        mtp = [r.get("mtp") for r in train]
        if all(m is not None for m in mtp):
            mtp_a = np.array(mtp, dtype=float)
            ax.plot(tok, mtp_a, color="C1", alpha=0.25, lw=0.8)
            ax.plot(tok, _ema(mtp_a), color="C1", label="train MTP (depth-mean)")
    if val:
        vt = np.array([r["tokens"] for r in val]) / 1e6
        ax.plot(vt, [r["val_loss"] for r in val], "o-", color="C2", label="val NTP")
        if all(r.get("val_mtp") is not None for r in val):
            ax.plot(vt, [r["val_mtp"] for r in val], "s--", color="C3", label="val MTP")
        ax_bpb.plot(vt, [r["val_bpb"] for r in val], "o-", color="C2")
    ax.set(xlabel="tokens (M)", ylabel="cross-entropy (nats)", title="loss")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    ax_bpb.set(xlabel="tokens (M)", ylabel="bits per byte", title="validation bits per byte")
    ax_bpb.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_dir / "loss.png", dpi=90)
    plt.close(fig)
    written.append(out_dir / "loss.png")

    loads = [r for r in train if r.get("load")]
    if loads:
        steps = np.array([r["step"] for r in loads])
        heat = np.array([r["load"] for r in loads], dtype=float)  # [T, L, E]: load / mean load
        n_layers = heat.shape[1]
        names = _moe_layer_names(run_dir, n_layers)
        fig, axes = plt.subplots(n_layers + 1, 1, figsize=(10, 1.6 * n_layers + 2.6), sharex=True,
                                 gridspec_kw={"height_ratios": [1] * n_layers + [1.3]})
        vmax = max(2.0, float(np.percentile(heat, 99)))
        # cell edges halfway between the logged steps (they are not evenly spaced: step 1, then every k)
        mid = (steps[1:] + steps[:-1]) / 2
        x_edges = np.concatenate([[steps[0] - 0.5], mid, [steps[-1] + 0.5]])
        y_edges = np.arange(heat.shape[2] + 1) - 0.5
        for i in range(n_layers):
            im = axes[i].pcolormesh(x_edges, y_edges, heat[:, i].T, cmap="magma", vmin=0, vmax=vmax)
            axes[i].invert_yaxis()
            axes[i].set_ylabel(f"{names[i]}\nexpert", fontsize=8)
        fig.colorbar(im, ax=axes[:n_layers], label="load / mean load", pad=0.01)
        vio_steps = np.array([r["step"] for r in train])
        axes[-1].plot(vio_steps, [r["maxvio"] for r in train], color="C0", alpha=0.3, lw=0.8)
        axes[-1].plot(vio_steps, _ema(np.array([r["maxvio"] for r in train], dtype=float)), color="C0",
                      label="MaxVio (mean over layers)")
        axes[-1].set(xlabel="step", ylabel="MaxVio")
        axes[-1].grid(alpha=0.3)
        axes[-1].legend(loc="upper right")
        axes[0].set_title("expert load per MoE layer over training")
        fig.savefig(out_dir / "expert_load.png", dpi=90, bbox_inches="tight")
        plt.close(fig)
        written.append(out_dir / "expert_load.png")
    return written


def compare_runs(run_dirs: list[str | Path], out: str | Path, labels: list[str] | None = None
                 ) -> list[dict[str, Any]]:
    """One figure comparing runs (validation loss over tokens; MaxVio over steps, smoothed) written to `out`,
    and per run: final val loss and bits per byte, mean MaxVio over the last 10% of steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = labels or [Path(d).name for d in run_dirs]
    fig, (ax_loss, ax_vio) = plt.subplots(1, 2, figsize=(12, 4.5))
    summary = []
    for d, label in zip(run_dirs, labels, strict=True):
        rows = read_metrics(Path(d) / "metrics.jsonl")
        train = [r for r in rows if "loss" in r and r.get("maxvio") is not None]
        val = [r for r in rows if "val_loss" in r]
        if not train or not val:
            raise ValueError(f"{d}: no training or validation rows in metrics.jsonl")
        ax_loss.plot([r["tokens"] / 1e6 for r in val], [r["val_loss"] for r in val], "o-", label=label)
        vio = np.array([r["maxvio"] for r in train], dtype=float)
        (line,) = ax_vio.plot([r["step"] for r in train], _ema(vio), label=label)
        ax_vio.plot([r["step"] for r in train], vio, color=line.get_color(), alpha=0.2, lw=0.7)
        tail = vio[-max(1, len(vio) // 10):]
        summary.append({"run": label, "tokens": train[-1]["tokens"], "steps": train[-1]["step"],
                        "val_loss": val[-1]["val_loss"], "val_bpb": val[-1]["val_bpb"],
                        "maxvio_last10": float(tail.mean()), "maxvio_mean": float(vio.mean())})
    ax_loss.set(xlabel="tokens (M)", ylabel="validation loss (nats)", title="validation loss")
    ax_vio.set(xlabel="step", ylabel="MaxVio (batch, mean over MoE layers)", title="load balance")
    for ax in (ax_loss, ax_vio):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=80)
    plt.close(fig)
    return summary
