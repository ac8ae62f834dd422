"""``beit3cap demo``: train a small captioner from scratch on generated data with the training code of
``run_beit3_finetuning.py``, evaluate it with beam search and the COCO metrics, and write an HTML report.

    from beit3cap.demo import run_demo, QUICK_PLAN
    result = run_demo("out", QUICK_PLAN)        # -> DemoResult (report path, scores, timings)
"""

from .attributes import ATTRIBUTES, attribute_accuracy, scene_attributes
from .pipeline import MARKER, DemoResult, Scores, default_out_dir, prepare_output, run_demo
from .plan import DEFAULT_PLAN, QUICK_PLAN, DemoPlan, measure_step_seconds, plan_for_minutes, resolve_plan

__all__ = ["ATTRIBUTES", "DEFAULT_PLAN", "MARKER", "QUICK_PLAN", "DemoPlan", "DemoResult", "Scores",
           "attribute_accuracy", "default_out_dir", "measure_step_seconds", "plan_for_minutes", "prepare_output",
           "resolve_plan", "run_demo", "scene_attributes"]
