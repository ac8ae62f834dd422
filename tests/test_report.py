"""The demo report: plots from run logs, a self-contained HTML page, escaping, missing pieces."""

from __future__ import annotations

import base64
import io
import re

import pytest
from PIL import Image

from beit3cap.report import Example, ReportData, plot_training_loss, plot_val_cider, write_report


def _jpeg(colour: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), colour).save(buf, "JPEG")
    return buf.getvalue()


def _steps(n: int = 50) -> list[dict]:
    return [{"epoch": s // 25, "global_step": s + 1, "loss": 5.0 / (1 + s), "lr": 1e-3 * min(1, (s + 1) / 10)}
            for s in range(n)]


def _data(**changes) -> ReportData:
    base = dict(
        metrics={"Bleu_1": 0.8, "Bleu_2": 0.7, "Bleu_3": 0.6, "Bleu_4": 0.5, "METEOR": 0.4, "ROUGE_L": 0.7,
                 "CIDEr": 2.345678, "SPICE": None},
        blind_metrics={"Bleu_4": 0.2, "ROUGE_L": 0.5, "CIDEr": 0.4},
        blind_caption="a grey image showing three big red circles",
        examples=[Example(7, _jpeg((200, 30, 30)), "a red <b>square</b> & more", ["ref one", "ref <two>"], 3.5),
                  Example(8, _jpeg((30, 30, 200)), "", ["r"], None)],
        step_log=_steps(), epoch_log=[{"epoch": 0, "val_CIDEr": 0.9}, {"epoch": 1, "val_CIDEr": 1.7}],
        command="python run_beit3_finetuning.py --model beit3_mini_patch16_64 --data_path '/a b'",
        settings=[("model", "mini")], timings=[("data", 1.5), ("training", 180.25)],
        machine=[("cores", "2")], notes={"SPICE": "SPICE needs CoreNLP jars"}, n_test=100)
    base.update(changes)
    return ReportData(**base)


def _is_png(raw: bytes) -> bool:
    return raw[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_is_self_contained_with_metrics_examples_plots_and_timings(tmp_path):
    path = write_report(_data(), tmp_path)
    page = path.read_text(encoding="utf-8")
    assert path == tmp_path / "report.html"
    assert _is_png((tmp_path / "train_loss.png").read_bytes()) and _is_png((tmp_path / "val_cider.png").read_bytes())
    # Both plots and both example images are embedded, so the page works without its folder.
    uris = re.findall(r'src="data:(image/\w+);base64,([A-Za-z0-9+/=]+)"', page)
    assert [m for m, _ in uris].count("image/png") == 2 and [m for m, _ in uris].count("image/jpeg") == 2
    embedded = {base64.b64decode(b) for _, b in uris}
    assert (tmp_path / "train_loss.png").read_bytes() in embedded
    assert "image-rendering: pixelated" in page
    table = page[page.index("<table id=metrics>"):]
    table = table[:table.index("</table>")]
    assert "<th>CIDEr-D</th><td class=num>2.3457</td><td class=num>0.4000</td>" in table
    assert "unavailable: SPICE needs CoreNLP jars" in table
    assert "<th>METEOR</th><td class=num>0.4000</td><td class=num>—</td>" in table
    assert "5.9× the baseline" in page  # 2.345678 / 0.4
    assert "181.8 s" in page  # total of the timings
    assert "--data_path &#x27;/a b&#x27;" in page


def test_report_escapes_captions_and_references(tmp_path):
    page = write_report(_data(), tmp_path).read_text(encoding="utf-8")
    assert "a red &lt;b&gt;square&lt;/b&gt; &amp; more" in page
    assert "<li>ref &lt;two&gt;</li>" in page
    assert "<b>square</b>" not in page
    assert "(empty caption)" in page


def test_report_without_logs_or_blind_scores_still_renders(tmp_path):
    data = _data(step_log=[], epoch_log=[], blind_metrics={}, metrics={"CIDEr": 1.0})
    page = write_report(data, tmp_path).read_text(encoding="utf-8")
    assert _is_png((tmp_path / "val_cider.png").read_bytes())
    assert "<th>CIDEr-D</th><td class=num>1.0000</td><td class=num>—</td>" in page
    assert "× the baseline" not in page


def test_loss_plot_skips_non_finite_losses(tmp_path):
    steps = _steps(20) + [{"global_step": 21, "loss": float("nan"), "lr": 1e-3}, {"global_step": 22, "loss": None}]
    assert _is_png(plot_training_loss(steps, tmp_path / "loss.png").read_bytes())


@pytest.mark.parametrize("blind", [None, 0.3])
def test_cider_plot_with_and_without_baseline(tmp_path, blind):
    out = plot_val_cider([{"epoch": 0, "val_CIDEr": 1.0}, {"epoch": 1}], tmp_path / "c.png", blind, 1.2)
    with Image.open(out) as im:
        assert im.size == (640, 360)


def test_attribute_table(tmp_path):
    page = write_report(_data(attributes=[("colour", 0.95, 0.17), ("background", 1.0, 1 / 3)]),
                        tmp_path).read_text(encoding="utf-8")
    assert "<tr><th>colour</th><td class=num>95 %</td><td class=num>17 %</td></tr>" in page
    assert "<th>background</th><td class=num>100 %</td><td class=num>33 %</td>" in page
    assert "<table id=attributes>" not in write_report(_data(), tmp_path / "b").read_text(encoding="utf-8")
