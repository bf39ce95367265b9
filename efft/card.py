"""The run card: what ran, where, how fast, how much memory, how the loss went.

Written into the output directory as card.json (machine-readable), card.md (for people) and
loss.png. Also what scripts/ use to describe the machine in cards/.
"""
from __future__ import annotations

import json
import os
import platform
import sys
from importlib import metadata
from pathlib import Path

import torch

PACKAGES = ("efft", "torch", "transformers", "peft", "bitsandbytes", "datasets", "safetensors", "triton", "accelerate")


def package_versions() -> dict[str, str | None]:
    out = {"python": sys.version.split()[0]}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def device_description() -> dict:
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        return {"type": "cuda", "name": p.name, "memory_gb": round(p.total_memory / 2**30, 1), "count": torch.cuda.device_count()}
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"type": "cpu", "name": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads()}


def loss_curve(log_history: list[dict]) -> list[tuple[int, float]]:
    return [(int(e["step"]), float(e["loss"])) for e in log_history if "loss" in e and "step" in e]


def plot_loss(curve: list[tuple[int, float]], path: Path) -> bool:
    if not curve:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot([s for s, _ in curve], [l for _, l in curve], marker="o", markersize=2)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def write_card(out_dir: Path, card: dict) -> None:
    """card.json, card.md and loss.png in ``out_dir`` (each written whole or not at all)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    curve = card.get("loss_curve", [])
    if plot_loss(curve, out_dir / "loss.png.tmp.png"):
        os.replace(out_dir / "loss.png.tmp.png", out_dir / "loss.png")
        card["loss_plot"] = "loss.png"
    _write_atomic(out_dir / "card.json", json.dumps(card, indent=2, default=str))
    _write_atomic(out_dir / "card.md", render_markdown(card))


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def render_markdown(card: dict) -> str:
    dev = card.get("device", {})
    mem = card.get("memory", {})
    lines = [
        f"# Run card: {card.get('recipe_name', 'run')}",
        "",
        f"- device: {dev.get('type')} — {dev.get('name')}",
        f"- steps: {card.get('global_step')}, train time: {card.get('train_seconds', 0):.1f} s, "
        f"tokens/s: {card.get('tokens_per_second') or 0:.1f}",
        f"- loss: first {_fmt_loss(card.get('first_loss'))}, last {_fmt_loss(card.get('last_loss'))}",
        f"- parameters: {card.get('trainable_params'):,} trainable of {card.get('total_params'):,}",
        "",
        "## Memory",
        "",
        "| what | value |",
        "| --- | --- |",
    ]
    for k, v in mem.items():
        lines.append(f"| {k} | {_fmt_bytes(v) if k.endswith('bytes') else v} |")
    if card.get("loss_plot"):
        lines += ["", f"![loss]({card['loss_plot']})"]
    gens = card.get("generations") or []
    if gens:
        lines += ["", "## Answers before and after", ""]
        for g in gens:
            lines += [f"**Prompt:** {g['prompt']}", "", f"- before: {g['before']!r}", f"- after: {g['after']!r}", ""]
    lines += ["", "## Versions", "", ", ".join(f"{k} {v}" for k, v in card.get("versions", {}).items() if v), ""]
    lines += ["## Recipe", "", "```json", json.dumps(card.get("recipe", {}), indent=2), "```", ""]
    return "\n".join(lines)


def _fmt_loss(v) -> str:
    return f"{v:.4f}" if isinstance(v, (int, float)) else str(v)


def _fmt_bytes(v) -> str:
    if not isinstance(v, (int, float)):
        return str(v)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(v) < 1024 or unit == "GiB":
            return f"{v:.1f} {unit}" if unit != "B" else f"{int(v)} B"
        v /= 1024
    return str(v)
