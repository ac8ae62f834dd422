"""The demo's HTML report and its plots: pure rendering from data already computed (no model, no metrics).

``write_report(data, out_dir)`` writes ``report.html`` plus ``train_loss.png`` and ``val_cider.png``.
The page is self-contained (CSS inline, images and plots embedded as base64) so it can be opened offline,
mailed or archived on its own; the PNG files are also kept beside it for other uses.
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .fileio import atomic_write

LOSS_PNG = "train_loss.png"
CIDER_PNG = "val_cider.png"
REPORT_HTML = "report.html"

# pycocoevalcap key -> label in the metrics table, in display order.
METRIC_LABELS = {"Bleu_1": "BLEU-1", "Bleu_2": "BLEU-2", "Bleu_3": "BLEU-3", "Bleu_4": "BLEU-4",
                 "METEOR": "METEOR", "ROUGE_L": "ROUGE-L", "CIDEr": "CIDEr-D", "SPICE": "SPICE"}


@dataclass
class Example:
    """One held-out image as shown in the grid."""

    image_id: int
    image: bytes  # the image file's bytes (JPEG or PNG)
    caption: str  # generated
    references: list[str]
    cider: float | None = None  # this image's CIDEr-D within the test set


@dataclass
class ReportData:
    metrics: dict[str, float | None]  # test-split corpus scores, pycocoevalcap keys; None = not computed
    blind_metrics: dict[str, float | None]  # the same model with every image replaced by a blank one
    blind_caption: str  # what the model says about the blank image
    examples: list[Example]
    step_log: list[dict]  # train_steps.jsonl records (global_step, loss, lr, ...)
    epoch_log: list[dict]  # log.txt records (epoch, train_loss, val_CIDEr, ...)
    command: str  # the exact training command line
    settings: list[tuple[str, str]]  # other configuration rows (data sizes, model, ...)
    timings: list[tuple[str, float]]  # phase -> seconds
    machine: list[tuple[str, str]]
    notes: dict[str, str] = field(default_factory=dict)  # metric key -> why it is missing
    n_test: int = 0
    attributes: list[tuple[str, float, float]] = field(default_factory=list)  # (name, model, blind) accuracy
    blind_description: str = "every test image replaced by one uniform grey image"
    title: str = "beit3cap demo report"


# ---------------------------------------------------------------------------------------------- plots

def _figure(width: float = 6.4, height: float = 3.6):
    from matplotlib.figure import Figure  # the object API: no pyplot, no global backend state

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    return fig, fig.add_subplot()


def _save_png(fig, path: Path) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    buf = io.BytesIO()
    FigureCanvasAgg(fig).print_png(buf)
    return atomic_write(path, lambda f: f.write(buf.getvalue()), mode="wb")


def _moving_average(values: Sequence[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot_training_loss(step_log: Sequence[dict], path: str | Path) -> Path:
    """Per-step training loss (faint), its moving average and the learning rate (right axis)."""
    rows = [r for r in step_log if isinstance(r.get("loss"), (int, float)) and math.isfinite(r["loss"])]
    fig, ax = _figure()
    if rows:
        steps = [r["global_step"] for r in rows]
        loss = [float(r["loss"]) for r in rows]
        ax.plot(steps, loss, color="#9bb7d4", linewidth=0.8, label="loss per step")
        ax.plot(steps, _moving_average(loss, max(1, len(loss) // 40)), color="#1f4e8c", linewidth=2,
                label="moving average")
        lr_rows = [r for r in rows if isinstance(r.get("lr"), (int, float))]
        if lr_rows:
            ax2 = ax.twinx()
            ax2.plot([r["global_step"] for r in lr_rows], [r["lr"] for r in lr_rows], color="#d08a2c",
                     linewidth=1.2, linestyle="--", label="learning rate")
            ax2.set_ylabel("learning rate")
            ax2.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
            ax2.legend(loc="upper center", frameon=False)
        ax.legend(loc="upper right", frameon=False)
    else:
        ax.text(0.5, 0.5, "no step log", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("masked-token loss (label-smoothed)")
    ax.set_title("Training loss")
    ax.grid(alpha=0.3)
    return _save_png(fig, Path(path))


def plot_val_cider(epoch_log: Sequence[dict], path: str | Path, blind_cider: float | None = None,
                   test_cider: float | None = None) -> Path:
    """Validation CIDEr-D after each epoch; the image-blind baseline and the final test score as lines."""
    rows = [r for r in epoch_log if isinstance(r.get("val_CIDEr"), (int, float))]
    fig, ax = _figure()
    if rows:
        epochs = [int(r["epoch"]) + 1 for r in rows]
        ax.plot(epochs, [r["val_CIDEr"] for r in rows], marker="o", color="#1f4e8c", linewidth=2,
                label="validation CIDEr-D")
        ax.set_xticks(epochs)
    else:
        ax.text(0.5, 0.5, "no validation scores", ha="center", va="center", transform=ax.transAxes)
    if test_cider is not None:
        ax.axhline(test_cider, color="#2e8b57", linestyle=":", linewidth=1.5,
                   label="test CIDEr-D (evaluated weights)")
    if blind_cider is not None:
        ax.axhline(blind_cider, color="#b03a2e", linestyle="--", linewidth=1.5,
                   label="image-blind baseline (test)")
    ax.set_ylim(bottom=0)
    ax.set_xlabel("epoch")
    ax.set_ylabel("CIDEr-D")
    ax.set_title("Validation CIDEr-D")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", frameon=False)
    return _save_png(fig, Path(path))


# ----------------------------------------------------------------------------------------------- HTML

_CSS = """
body { font-family: system-ui, -apple-system, Segoe UI, Roboto, sans-serif; margin: 2em auto; max-width: 1200px;
       padding: 0 1em; color: #222; line-height: 1.4; }
h1 { margin-bottom: 0.2em; } h2 { margin-top: 1.6em; border-bottom: 1px solid #ddd; padding-bottom: 0.2em; }
table { border-collapse: collapse; margin: 0.5em 0; } td.muted { max-width: 36em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.7em; }
th { background: #f3f3f3; text-align: left; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
.headline { font-size: 1.15em; background: #f2f7ff; border-left: 4px solid #1f4e8c; padding: 0.6em 1em; }
.plots { display: flex; flex-wrap: wrap; gap: 1em; } .plots img { max-width: calc(50% - 0.5em); min-width: 420px; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(360px, 1fr)); gap: 1em; }
.card { display: flex; gap: 0.8em; border: 1px solid #ddd; border-radius: 6px; padding: 0.6em; }
.card img { width: 128px; height: 128px; image-rendering: pixelated; flex: none; border: 1px solid #bbb; }
.gen { font-weight: 600; } .refs { margin: 0.3em 0 0 1.1em; padding: 0; font-size: 0.88em; color: #555; }
.score { font-size: 0.85em; color: #666; }
pre { background: #f6f6f6; padding: 0.8em; white-space: pre-wrap; word-break: break-all; }
.muted { color: #777; }
"""


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def _fmt(value: float | None, digits: int = 4) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _data_uri(raw: bytes) -> str:
    mime = "image/png" if raw[:8] == b"\x89PNG\r\n\x1a\n" else "image/jpeg"
    return f"data:{mime};base64,{base64.b64encode(raw).decode('ascii')}"


def _rows(pairs: Sequence[tuple[str, str]]) -> str:
    return "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in pairs)


def _metrics_table(data: ReportData) -> str:
    body = []
    for key, label in METRIC_LABELS.items():
        if key not in data.metrics and key not in data.notes:
            continue
        value = data.metrics.get(key)
        if value is None:
            why = data.notes.get(key, "not computed")
            body.append(f"<tr><th>{label}</th><td colspan=2 class=muted>unavailable: {_e(why)}</td></tr>")
            continue
        blind = data.blind_metrics.get(key)
        body.append(f"<tr><th>{label}</th><td class=num>{_fmt(value)}</td><td class=num>{_fmt(blind)}</td></tr>")
    return ("<table id=metrics><tr><th>metric</th><th>model</th><th>image-blind baseline</th></tr>"
            + "".join(body) + "</table>")


def _attributes_table(rows: Sequence[tuple[str, float, float]]) -> str:
    if not rows:
        return ""
    body = "".join(f"<tr><th>{_e(name)}</th><td class=num>{100 * model:.0f} %</td><td class=num>{100 * blind:.0f} %"
                   f"</td></tr>" for name, model, blind in rows)
    return ("<p>Test images whose caption names each drawn attribute correctly:</p><table id=attributes><tr>"
            "<th>attribute</th><th>model</th><th>image-blind baseline</th></tr>" + body + "</table>")


def _example_cards(examples: Sequence[Example]) -> str:
    cards = []
    for ex in examples:
        refs = "".join(f"<li>{_e(r)}</li>" for r in ex.references)
        score = f"<div class=score>CIDEr-D of this caption: {_fmt(ex.cider, 2)}</div>" if ex.cider is not None else ""
        cards.append(
            f"<div class=card><img src=\"{_data_uri(ex.image)}\" alt=\"test image {ex.image_id}\">"
            f"<div><div class=gen>{_e(ex.caption or '(empty caption)')}</div>{score}"
            f"<div class=muted>references (image {ex.image_id}):</div><ul class=refs>{refs}</ul></div></div>")
    return "<div class=grid>" + "".join(cards) + "</div>"


def render_html(data: ReportData, loss_png: bytes, cider_png: bytes) -> str:
    cider, blind = data.metrics.get("CIDEr"), data.blind_metrics.get("CIDEr")
    ratio = f" ({cider / blind:.1f}× the baseline)" if cider is not None and blind else ""
    headline = (f"Test CIDEr-D <b>{_fmt(cider, 3)}</b> on {data.n_test} held-out images; the same model with "
                f"{_e(data.blind_description)} scores <b>{_fmt(blind, 3)}</b>{ratio}. It then always says "
                f"“{_e(data.blind_caption)}”.")
    total = sum(s for _, s in data.timings)
    timing_rows = "".join(f"<tr><th>{_e(k)}</th><td class=num>{v:.1f} s</td></tr>" for k, v in data.timings)
    timing_rows += f"<tr><th>total</th><td class=num><b>{total:.1f} s</b></td></tr>"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{_e(data.title)}</title>
<meta name="viewport" content="width=device-width, initial-scale=1"><style>{_CSS}</style></head>
<body>
<h1>{_e(data.title)}</h1>
<p class=muted>A small BEiT-3 captioner trained from scratch on generated images, evaluated on held-out images
with beam search and the COCO caption metrics.</p>
<p class=headline>{headline}</p>

<h2>Metrics (Karpathy-style test split)</h2>
{_metrics_table(data)}
<p class=muted>Scores as pycocoevalcap reports them (CIDEr-D on the 0–10 scale, the others 0–1), after PTB
tokenization. The image-blind baseline shows how much of the score the text prior alone earns.</p>
{_attributes_table(data.attributes)}

<h2>Training curves</h2>
<div class=plots><img src="{_data_uri(loss_png)}" alt="training loss curve">
<img src="{_data_uri(cider_png)}" alt="validation CIDEr curve"></div>

<h2>Held-out images</h2>
<p class=muted>Generated caption (bold) beside the five reference captions; images are shown enlarged.</p>
{_example_cards(data.examples)}

<h2>Configuration</h2>
<p>Training command (the same entry point as <code>run_beit3_finetuning.py</code>):</p>
<pre id=command>{_e(data.command)}</pre>
<table>{_rows(data.settings)}</table>

<h2>Timings</h2>
<table id=timings>{timing_rows}</table>

<h2>Machine</h2>
<table id=machine>{_rows(data.machine)}</table>
</body></html>
"""


def write_report(data: ReportData, out_dir: str | Path) -> Path:
    """Write the plots and ``report.html`` into ``out_dir``; returns the report's path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    loss_png = plot_training_loss(data.step_log, out / LOSS_PNG)
    cider_png = plot_val_cider(data.epoch_log, out / CIDER_PNG, data.blind_metrics.get("CIDEr"),
                               data.metrics.get("CIDEr"))
    page = render_html(data, loss_png.read_bytes(), cider_png.read_bytes())
    return atomic_write(out / REPORT_HTML, lambda f: f.write(page), mode="w")
