"""The benchmark's outputs: metrics.json, report.md, report.png, report.html and a text table.

Every file is written whole with `pirl.storage.write_bytes` (atomic locally, one PUT on object
stores). The PNG has the pretraining loss curve (records of the run's metrics.jsonl that carry
"loss" and "global_step") and its per-epoch representation health (pirl.health: loss over its
chance value, the bank's mean cosine, alignment, uniformity) beside a bar chart of linear (per
head) and kNN top-1.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
from dataclasses import dataclass, field

from pirl import storage
from pirl.redaction import redact

log = logging.getLogger("pirl")
TRUNKS = (("trained", "trained"), ("random_init", "random-init"))


@dataclass
class Pretraining:
    """What the benchmark shows of the pretraining run, from its metrics.jsonl."""

    curve: list[tuple[int, float]] = field(default_factory=list)  # (global_step, loss)
    epochs: list[dict] = field(default_factory=list)  # {"epoch", "epoch_loss", "health": {...}}

    def health_summary(self) -> dict:
        """The last epoch's health statistics, with its epoch number ({} when none)."""
        last = [e for e in self.epochs if "health" in e]
        return {"epoch": last[-1]["epoch"], **last[-1]["health"]} if last else {}


def read_pretraining(url: str) -> Pretraining:
    """The loss curve and per-epoch records of a metrics.jsonl; empty (with a warning) when it
    cannot be read."""
    if not url:
        return Pretraining()
    try:
        text = storage.read_bytes(url).decode()
    except (FileNotFoundError, storage.StorageError, UnicodeDecodeError) as exc:
        log.warning("no pretraining curves: cannot read %s (%s)", url, exc)
        return Pretraining()
    out = Pretraining()
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if not isinstance(record, dict):
            continue
        if "loss" in record and "global_step" in record:
            out.curve.append((int(record["global_step"]), float(record["loss"])))
        if "epoch_loss" in record:
            out.epochs.append(record)
    out.curve.sort()
    return out


def rows(metrics: dict) -> list[tuple[str, dict[str, tuple[float, float] | None]]]:
    """[(label, {trunk: (top1, top5) or None})] in table order: linear heads, then kNN."""
    trunks = metrics["trunks"]
    out = []
    for head in metrics["protocol"]["heads"]:
        name = head["name"]
        cells = {}
        for key, _ in TRUNKS:
            r = trunks.get(key, {}).get("linear", {}).get(name)
            cells[key] = (r["top1"], r["top5"]) if r else None
        out.append((f"linear {name}", cells))
    for k in metrics["protocol"]["knn"]["k"] if metrics["protocol"]["knn"]["enabled"] else []:
        cells = {}
        for key, _ in TRUNKS:
            r = trunks.get(key, {}).get("knn", {}).get(str(k))
            cells[key] = (r["top1"], r["top5"]) if r else None
        out.append((f"kNN k={k}", cells))
    return out


def _present(metrics: dict) -> list[tuple[str, str]]:
    return [(key, label) for key, label in TRUNKS if key in metrics["trunks"]]


def _fmt(cell: tuple[float, float] | None, i: int) -> str:
    return "-" if cell is None else f"{cell[i]:.2f}"


def text_table(metrics: dict) -> str:
    """A plain-text table: trained vs random-init, top-1/top-5 per linear head and per k."""
    present = _present(metrics)
    width = max(len(label) for label, _ in rows(metrics)) + 2
    head1 = " " * width + "".join(f"{label:>18}" for _, label in present)
    head2 = f"{'evaluation':<{width}}" + "".join(f"{'top-1':>9}{'top-5':>9}" for _ in present)
    lines = [head1, head2, "-" * len(head2)]
    for label, cells in rows(metrics):
        lines.append(
            f"{label:<{width}}"
            + "".join(f"{_fmt(cells[k], 0):>9}{_fmt(cells[k], 1):>9}" for k, _ in present)
        )
    h = metrics["headline"]
    lines.append(
        f"headline: linear {h['linear_head']} top-1 {h['linear_top1']:.2f}"
        + "".join(f", kNN k={k} top-1 {v:.2f}" for k, v in h.get("knn_top1", {}).items())
        + f" ({metrics['dataset']['val']['num_samples']} val images, accuracies in %)"
    )
    return "\n".join(lines) + "\n"


def describe_lr(lr: dict) -> str:
    """'multistep 0.01, 0.001 at epochs 8' and the like, from a derived LR schedule."""
    name = lr["name"]
    if name == "multistep":
        values = ", ".join(f"{v:.3g}" for v in lr["values"])
        return f"multistep {values} at epochs {', '.join(map(str, lr['milestones']))}"
    if name in ("cosine", "linear"):
        return f"{name} {lr['start_value']:.3g} -> {lr['end_value']:.3g}"
    return f"constant {lr['value']:.3g}"


def markdown(metrics: dict, png_name: str = "report.png") -> str:
    present = _present(metrics)
    trained = metrics["trunks"]["trained"]
    ds = metrics["dataset"]
    lines = [
        "# Linear evaluation and kNN",
        "",
        f"Trunk: ResNet-{metrics['model']['depth']} w{metrics['model']['width_multiplier']}, "
        f"weights `{trained['weights']['url']}` (sha256 `{trained['weights']['sha256'][:16]}`).",
        f"Data: {ds['train']['num_samples']} train / {ds['val']['num_samples']} val images, "
        f"{ds['num_classes']} classes. Accuracies in %.",
        "",
        "| evaluation | "
        + " | ".join(f"{label} top-1 | {label} top-5" for _, label in present)
        + " |",
        "|---|" + "---:|" * (2 * len(present)),
    ]
    for label, cells in rows(metrics):
        lines.append(
            f"| {label} | "
            + " | ".join(f"{_fmt(cells[k], 0)} | {_fmt(cells[k], 1)}" for k, _ in present)
            + " |"
        )
    h = metrics["headline"]
    p = metrics["protocol"]
    lines += [
        "",
        f"**Headline:** linear `{h['linear_head']}` top-1 **{h['linear_top1']:.2f}**"
        + "".join(f", kNN k={k} top-1 **{v:.2f}**" for k, v in h.get("knn_top1", {}).items()),
        "",
        f"Protocol: {p['epochs']} epochs, SGD (momentum {p['momentum']}, nesterov "
        f"{p['nesterov']}, wd {p['weight_decay']}), LR {describe_lr(p['lr'])}, batch "
        f"{p['batch_size_per_rank']} x {p['world_size']}; kNN T {p['knn']['temperature']} on "
        f"`{p['knn']['feature']}`.",
        "",
        *_health_lines(metrics.get("pretraining_health")),
        f"![benchmark]({png_name})",
        "",
    ]
    return "\n".join(lines)


def _health_lines(health: dict | None) -> list[str]:
    if not health:
        return []
    return [
        f"Pretraining health after epoch {health['epoch']}: loss {health['loss_vs_chance']:.2f}x "
        f"its chance value, bank mean cosine {health['bank_mean_cosine']:.3f}, alignment "
        f"{health['alignment']:.3f}, uniformity {health['uniformity']:.3f} (see pirl.health).",
        "",
    ]


def plot_png(metrics: dict, pretraining: Pretraining) -> bytes:
    from pirl.extras import need

    need("matplotlib", "report", "the benchmark's report.png").use("Agg")
    from matplotlib import pyplot as plt

    fig, (ax_loss, ax_health, ax_acc) = plt.subplots(1, 3, figsize=(17, 4.5))
    _plot_loss(ax_loss, pretraining)
    _plot_health(ax_health, pretraining)
    table = rows(metrics)
    present = _present(metrics)
    width = 0.8 / len(present)
    for j, (key, label) in enumerate(present):
        xs = [i + (j - (len(present) - 1) / 2) * width for i in range(len(table))]
        ys = [cell[0] if (cell := cells[key]) else 0.0 for _, cells in table]
        bars = ax_acc.bar(xs, ys, width, label=label)
        ax_acc.bar_label(bars, fmt="%.1f", fontsize=7)
    ax_acc.set_xticks(range(len(table)))
    ax_acc.set_xticklabels([label for label, _ in table], rotation=30, ha="right", fontsize=8)
    ax_acc.set_ylabel("top-1 (%)")
    ax_acc.set_ylim(0, 122)
    ax_acc.set_title("linear eval per head, kNN")
    ax_acc.legend(fontsize=8, loc="upper right", ncol=2)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def _empty(ax, title: str) -> None:
    ax.text(0.5, 0.5, "no pretraining metrics", ha="center", va="center")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title)


def _plot_loss(ax, pretraining: Pretraining) -> None:
    if not pretraining.curve:
        return _empty(ax, "pretraining loss")
    ax.plot([s for s, _ in pretraining.curve], [v for _, v in pretraining.curve], lw=1.2)
    ax.set_xlabel("global step")
    ax.set_ylabel("loss")
    ax.set_title("pretraining loss")


def _plot_health(ax, pretraining: Pretraining) -> None:
    epochs = [e for e in pretraining.epochs if "health" in e]
    if not epochs:
        return _empty(ax, "representation health")
    xs = [e["epoch"] for e in epochs]
    series = (
        ("loss_vs_chance", "loss / chance (1 = no learning)"),
        ("bank_mean_cosine", "bank mean cosine (1 = collapsed)"),
        ("alignment", "alignment E||v - m||^2 (0 = aligned)"),
        ("uniformity", "uniformity (0 = collapsed)"),
    )
    for key, label in series:
        ax.plot(xs, [e["health"][key] for e in epochs], marker="o", ms=3, lw=1.2, label=label)
    ax.axhline(1.0, color="grey", lw=0.6, ls="--")
    ax.axhline(0.0, color="grey", lw=0.6)
    ax.set_xlabel("epoch")
    ax.set_title("representation health per epoch")
    ax.legend(fontsize=7)


def html_report(metrics: dict, png: bytes) -> str:
    """A self-contained page (the PNG inline as base64) for the KFP UI's HTML viewer."""
    present = _present(metrics)
    head = "".join(f"<th>{label} top-1</th><th>{label} top-5</th>" for _, label in present)
    body = "".join(
        f"<tr><td>{html.escape(label)}</td>"
        + "".join(f"<td>{_fmt(cells[k], 0)}</td><td>{_fmt(cells[k], 1)}</td>" for k, _ in present)
        + "</tr>"
        for label, cells in rows(metrics)
    )
    w = metrics["trunks"]["trained"]["weights"]
    img = base64.b64encode(png).decode()
    return (
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>pirl benchmark</title>"
        "<style>body{font-family:sans-serif}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}</style></head><body>"
        "<h2>Linear evaluation and kNN (accuracy %)</h2>"
        f"<p>weights {html.escape(w['url'])} (sha256 {w['sha256'][:16]})</p>"
        f"<table><tr><th>evaluation</th>{head}</tr>{body}</table>"
        f"<p><img alt='benchmark' src='data:image/png;base64,{img}'></p></body></html>"
    )


def flat_summary(metrics: dict) -> dict[str, float]:
    """Scalars by dotted name (trained.linear.res5.top1, random_init.knn.20.top1, ...), the form
    KFP's Metrics artifact takes."""
    out = {}
    for key, _ in _present(metrics):
        t = metrics["trunks"][key]
        for name, r in t.get("linear", {}).items():
            out[f"{key}.linear.{name}.top1"] = r["top1"]
            out[f"{key}.linear.{name}.top5"] = r["top5"]
        for k, r in t.get("knn", {}).items():
            out[f"{key}.knn.{k}.top1"] = r["top1"]
            out[f"{key}.knn.{k}.top5"] = r["top5"]
    return out


def write_reports(out_dir: str, metrics: dict, pretraining: Pretraining) -> list[str]:
    health = pretraining.health_summary()
    if health:
        metrics = {**metrics, "pretraining_health": health}
    png = plot_png(metrics, pretraining)
    files = {
        "report.png": png,
        "report.md": redact(markdown(metrics)).encode(),
        "report.html": redact(html_report(metrics, png)).encode(),
        # last: its presence means done
        "metrics.json": redact(json.dumps(metrics, indent=1)).encode(),
    }
    urls = []
    for name, data in files.items():
        url = storage.join(out_dir, name)
        storage.write_bytes(url, data)
        urls.append(url)
    return urls
