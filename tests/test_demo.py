"""End to end: ``beit3cap demo --quick`` generates data, trains through the run_beit3_finetuning.py entry
point, evaluates with beam search and the COCO metrics, and writes the report; plus the demo's planning
and output-folder rules."""

from __future__ import annotations

import contextlib
import io
import json
import random
import re

import pytest

from beit3cap.cli import main as cli_main
from beit3cap.data.synth import random_scene, scene_captions
from beit3cap.demo import (ATTRIBUTES, DEFAULT_PLAN, MARKER, QUICK_PLAN, attribute_accuracy, plan_for_minutes,
                           prepare_output, resolve_plan, scene_attributes)
from beit3cap.demo.attributes import scene_truth

# A model that ignores the pixels, or a broken pipeline, stays below these. Measured over seeds 42, 1, 2, 3
# (the README, section The demo): test CIDEr-D 1.00-1.14, image-blind baseline 0.64-0.74 (gain 0.30-0.50),
# background named right 100 % (blind 31-40 %), shape colour 43-52 % (blind: one colour, ~17 %).
QUICK_MIN_CIDER = 0.85
QUICK_MIN_GAIN_OVER_BLIND = 0.2


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "out"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert cli_main(["demo", "--quick", "--out", str(out)]) == 0
    return out, stdout.getvalue().strip().splitlines()


def test_quick_demo_learns_from_the_pixels(quick_run):
    out, _ = quick_run
    summary = json.loads((out / MARKER).read_text())
    cider, blind = summary["metrics"]["CIDEr"], summary["blind_metrics"]["CIDEr"]
    assert cider >= QUICK_MIN_CIDER, summary
    assert cider >= blind + QUICK_MIN_GAIN_OVER_BLIND, summary
    # Even the one-minute model reads the background off the pixels; the blind baseline cannot.
    assert summary["attributes"]["background"] >= 0.9, summary["attributes"]
    assert summary["blind_attributes"]["background"] < 0.7, summary["blind_attributes"]
    assert summary["attributes"]["colour"] >= 0.3, summary["attributes"]
    for key in ("Bleu_4", "METEOR", "ROUGE_L"):
        assert 0.0 < summary["metrics"][key] <= 1.0
    # The training went through the official entry point with the demo's flags and logged every step.
    assert summary["command"].startswith("python run_beit3_finetuning.py --model beit3_mini_patch16_64")
    assert "--train_crop_scale 1 1" in summary["command"] and "--no_hflip" in summary["command"]
    steps = (out / "run" / "train_steps.jsonl").read_text().splitlines()
    assert len(steps) == QUICK_PLAN.steps
    epochs = [json.loads(line) for line in (out / "run" / "log.txt").read_text().splitlines()]
    assert [e["epoch"] for e in epochs] == list(range(QUICK_PLAN.epochs))
    assert all(e["val_CIDEr"] > 0 for e in epochs)
    preds = json.loads((out / "run" / "submit_coco_captioning_test.json").read_text())
    assert len(preds) == QUICK_PLAN.n_test and len({p["caption"] for p in preds}) > 1


def test_quick_demo_report_has_metrics_examples_curves_and_configuration(quick_run):
    out, _ = quick_run
    page = (out / "report.html").read_text(encoding="utf-8")
    for png in ("train_loss.png", "val_cider.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert page.count('src="data:image/png;base64,') == 2
    assert page.count('src="data:image/jpeg;base64,') == QUICK_PLAN.n_examples
    table = page[page.index("<table id=metrics>"):]
    table = table[:table.index("</table>")]
    for label in ("BLEU-4", "METEOR", "ROUGE-L", "CIDEr-D"):
        assert re.search(rf"<th>{label}</th><td class=num>\d\.\d{{4}}</td>", table), label
    assert "SPICE" in table
    assert "<table id=attributes>" in page
    assert "run_beit3_finetuning.py" in page and "torch" in page and "cores" in page
    assert "training beit3_mini_patch16_64 from scratch" in page


def test_quick_demo_ends_with_the_metrics_and_the_report_path(quick_run):
    out, lines = quick_run
    assert lines[-1] == f"report: {out / 'report.html'}"
    assert lines[-2].startswith("image-blind baseline: CIDEr ")
    assert lines[-3].startswith("test scores: BLEU-4 ") and " CIDEr " in lines[-3]


def test_attribute_reader_follows_the_synth_grammar():
    for seed in range(300):
        rng = random.Random(seed)
        scene = random_scene(rng)
        truth = {"count": scene.count, "size": scene.size, "colour": scene.colour, "shape": scene.shape,
                 "position": scene.position, "background": scene.background}
        captions = scene_captions(scene, rng)
        assert scene_truth(captions) == truth, captions
        for caption in captions:
            said = scene_attributes(caption)
            # Every template names everything but (in two of them) the background.
            assert {k: v for k, v in said.items() if v is not None} == \
                {k: v for k, v in truth.items() if k != "background" or said["background"] is not None}, caption


def test_attribute_accuracy_counts_named_and_right_attributes():
    refs = {1: ["two big red circles on the left on a grey background"],
            2: ["a small blue square at the top on a white background"]}
    got = attribute_accuracy({1: "two big red circles on the left on a grey background",
                              2: "two small blue triangles near the top"}, refs)
    assert got == {"count": 0.5, "size": 1.0, "colour": 1.0, "shape": 0.5, "position": 1.0, "background": 0.5}
    assert set(got) == set(ATTRIBUTES)
    assert scene_attributes("three little green crosses in the center")["position"] == "middle"


def test_output_folder_rules(tmp_path):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("keep me")
    with pytest.raises(SystemExit, match="not empty"):
        prepare_output(foreign)
    assert (foreign / "thesis.tex").read_text() == "keep me"
    earlier = tmp_path / "earlier"
    (earlier / "run").mkdir(parents=True)
    (earlier / "run" / "checkpoint-1.pth").write_bytes(b"x")
    (earlier / MARKER).write_text("{}")
    (earlier / "notes.txt").write_text("the user's")
    prepare_output(earlier)
    assert not (earlier / "run").exists() and not (earlier / MARKER).exists()
    assert (earlier / "notes.txt").exists()
    with pytest.raises(SystemExit, match="is a file"):
        prepare_output(foreign / "thesis.tex")


def test_minutes_budget_scales_the_plan():
    plans = [plan_for_minutes(m, step_seconds=0.1) for m in (1, 2, 4, 8, 30)]
    steps = [p.steps for p in plans]
    assert steps == sorted(steps) and steps[0] < steps[-1]
    assert all(2 <= p.epochs <= 8 and p.n_train >= 200 for p in plans)
    # A slower machine gets fewer steps for the same budget.
    assert plan_for_minutes(4, step_seconds=0.2).steps < plan_for_minutes(4, step_seconds=0.1).steps
    assert plans[2].model == DEFAULT_PLAN.model and plans[2].lr == DEFAULT_PLAN.lr


def test_plan_choice():
    assert resolve_plan(False, None) == DEFAULT_PLAN
    assert resolve_plan(True, None) == QUICK_PLAN
    with pytest.raises(SystemExit, match="exclude"):
        resolve_plan(True, 3)
    with pytest.raises(SystemExit, match="at least 1"):
        resolve_plan(False, 0.2)
