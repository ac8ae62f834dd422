"""The demo's phases, from nothing to ``report.html``:

1. a COCO-layout dataset of generated images (``data.synth.make_coco_tree``);
2. a BPE sentencepiece model trained on its training captions, and the index files written by the
   seed-compatible builder (``data.index.make_coco_captioning_index``);
3. a small BEiT-3 trained from scratch by the entry point of ``run_beit3_finetuning.py`` (``train.main``
   with the official flags), validated after every epoch;
4. the test split captioned and scored by that entry point's ``--eval`` path (beam 3, length penalty 0.6;
   BLEU, METEOR, ROUGE-L, CIDEr-D; SPICE when its jars are installed);
5. an image-blind baseline: the same model shown one grey image instead of each test image;
6. ``report.html`` (``report.py``) with scores, curves, captioned test images, configuration and timings.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import re
import shlex
import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm import tqdm

from .attributes import ATTRIBUTES, attribute_accuracy
from .plan import CAPTIONS_PER_IMAGE, DEFAULT_PLAN, DemoPlan

MARKER = "demo.json"  # written last; also marks a folder as the demo's own (safe to overwrite)
_OUTPUTS = ("data", "run", MARKER, "report.html", "train_loss.png", "val_cider.png")
TEST_GT = "coco_karpathy_test_gt.json"
TEST_PREDICTIONS = "submit_coco_captioning_test.json"


class Timer:
    """Wall time of each phase, announced as it starts."""

    def __init__(self, phases: int) -> None:
        self.n, self.rows = phases, []

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        print(f"\n[{len(self.rows) + 1}/{self.n}] {name}", flush=True)
        start = time.perf_counter()
        try:
            yield
        finally:
            self.rows.append((name, time.perf_counter() - start))


@contextlib.contextmanager
def _files_progress(folders: list[Path], total: int, desc: str) -> Iterator[None]:
    """A progress bar fed by counting the files that appear in ``folders`` (the generator has no hook)."""
    stop = threading.Event()
    bar = tqdm(total=total, desc=desc, unit="img", dynamic_ncols=True, mininterval=0.5)

    def count() -> int:
        return sum(sum(1 for _ in os.scandir(f)) for f in folders if f.is_dir())

    def poll() -> None:
        while not stop.wait(0.3):
            bar.update(min(count(), total) - bar.n)

    watcher = threading.Thread(target=poll, daemon=True)
    watcher.start()
    try:
        yield
        bar.update(total - bar.n)
    finally:
        stop.set()
        watcher.join()
        bar.close()


def prepare_output(out: Path) -> None:
    """Create ``out``, or clear an earlier demo run from it (only the demo's own files); refuse any other
    non-empty folder."""
    if out.exists() and not out.is_dir():
        raise SystemExit(f"error: --out {out} is a file")
    if out.is_dir() and any(out.iterdir()):
        if not (out / MARKER).is_file() and not (out / "data" / "dataset_coco.json").is_file():
            raise SystemExit(f"error: --out {out} is not empty and holds no earlier demo run ({MARKER}); "
                             "choose a new or empty folder")
        for name in _OUTPUTS:
            path = out / name
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)


def training_captions(data: Path) -> list[str]:
    """Captions of the Karpathy train + restval images only: the tokenizer never sees test captions."""
    with open(data / "dataset_coco.json", encoding="utf-8") as f:
        images = json.load(f)["images"]
    return [s["raw"] for img in images if img["split"] in ("train", "restval") for s in img["sentences"]]


def _run_entry_point(argv: list[str]) -> None:
    """``run_beit3_finetuning.py``'s main() in this process (same code, same flags)."""
    from ..train import main

    rc = main(argv, prog="run_beit3_finetuning.py")
    if rc:
        raise SystemExit(f"error: the training entry point failed (exit code {rc}) for: {shlex.join(argv)}")


def _checkpoint(run: Path, plan: DemoPlan) -> Path:
    """The weights with the best validation CIDEr-D, else the last epoch's."""
    for name in ("checkpoint-best.pth", f"checkpoint-{plan.epochs - 1}.pth"):
        if (run / name).is_file():
            return run / name
    raise SystemExit(f"error: training wrote no checkpoint into {run}")


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            with contextlib.suppress(ValueError):
                rows.append(json.loads(line))
    return rows


def machine_rows() -> list[tuple[str, str]]:
    import torch

    cpu = platform.processor() or "unknown"
    with contextlib.suppress(OSError):
        m = re.search(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text())
        cpu = m.group(1).strip() if m else cpu
    rows = [("CPU", cpu), ("cores", str(os.cpu_count())), ("torch threads", str(torch.get_num_threads())),
            ("torch", torch.__version__), ("Python", platform.python_version()), ("platform", platform.platform())]
    if hasattr(os, "getloadavg"):  # the machine may be shared: say how busy it was
        rows.append(("load average at the end (1/5/15 min)", " / ".join(f"{x:.2f}" for x in os.getloadavg())))
    return rows


# ----------------------------------------------------------------------------------------------- run

@dataclass
class Scores:
    metrics: dict[str, float | None]  # corpus scores, pycocoevalcap keys
    attributes: dict[str, float]  # fraction of images whose caption names each attribute right
    per_image_cider: dict[int, float]
    captions: dict[int, str]


@dataclass
class DemoResult:
    out_dir: Path
    report: Path
    plan: DemoPlan
    command: str
    test: Scores
    blind: Scores
    blind_caption: str
    timings: list[tuple[str, float]]


def run_demo(out_dir: str | os.PathLike, plan: DemoPlan = DEFAULT_PLAN) -> DemoResult:
    """Run every phase into ``out_dir`` (``data/``, ``run/``, ``report.html``, ``demo.json``); the last
    lines printed are the test scores, the baseline and the report's path."""
    out = Path(out_dir).resolve()
    prepare_output(out)
    data, run = out / "data", out / "run"
    timer = Timer(6)
    print(f"beit3cap demo ({plan.name} plan): {plan.n_train} training images x {CAPTIONS_PER_IMAGE} captions, "
          f"{plan.n_val} validation and {plan.n_test} test images; {plan.model} from scratch, {plan.epochs} "
          f"epochs of {plan.steps_per_epoch} steps; writing to {out}", flush=True)

    with timer.phase("generating a COCO-layout dataset of shape images"):
        from ..data.synth import make_coco_tree

        with _files_progress([data / "train2014", data / "val2014"], plan.n_train + plan.n_val + plan.n_test,
                             "images"):
            make_coco_tree(data, n_train=plan.n_train, n_val=plan.n_val, n_test=plan.n_test,
                           image_size=plan.image_size, seed=plan.seed)

    with timer.phase("training the sentencepiece model and writing the index files"):
        from ..data.index import make_coco_captioning_index
        from ..tokenizer import load_tokenizer, train_sentencepiece

        spm = train_sentencepiece(training_captions(data), data / "demo.spm", vocab_size=plan.spm_pieces)
        tokenizer = load_tokenizer(spm)
        print(make_coco_captioning_index(data, tokenizer, num_max_bpe_tokens=plan.max_tokens), flush=True)

    flags = plan.flags(data, spm, run, tokenizer.vocab_size)
    command = shlex.join(["python", "run_beit3_finetuning.py", *flags])
    with timer.phase(f"training {plan.model} from scratch ({plan.steps} steps)"):
        print(command, flush=True)
        _run_entry_point(flags)

    checkpoint = _checkpoint(run, plan)
    with timer.phase(f"captioning and scoring the {plan.n_test} test images (beam 3)"):
        _run_entry_point(plan.flags(data, spm, run, tokenizer.vocab_size, evaluate=checkpoint))
        test = _test_scores(run, data)

    with timer.phase("image-blind baseline: the model's caption of a grey image, for every test image"):
        blind_caption, blind = _blind_baseline(checkpoint, spm, data, plan)

    with timer.phase("writing the report"):
        report = _write_report(out, data, run, plan, command, checkpoint, test, blind, blind_caption, timer)
    result = DemoResult(out, report, plan, command, test, blind, blind_caption, timer.rows)
    _write_marker(result)
    _print_summary(result)
    return result


def _score(captions: dict[int, str], gts: dict[int, list[str]], metrics: tuple[str, ...]) -> Scores:
    from .. import evaluate as E

    scores = E.evaluate_predictions(captions, gts, metrics=metrics)
    per_image = dict(zip(scores.image_ids, scores.per_image["CIDEr"].tolist()))
    return Scores(scores.corpus, attribute_accuracy(captions, gts), per_image, captions)


def _test_scores(run: Path, data: Path) -> Scores:
    """The corpus scores written by ``--eval``, plus each image's CIDEr-D and the attribute accuracy."""
    from .. import evaluate as E

    result = run / "coco_captioning_result.json"
    if not result.is_file():
        raise SystemExit(f"error: the --eval run wrote no {result}")
    captions = {p["image_id"]: p["caption"] for p in E.load_predictions(run / TEST_PREDICTIONS)}
    scores = _score(captions, E.load_ground_truth(data / TEST_GT), ("CIDEr",))
    scores.metrics = json.loads(result.read_text(encoding="utf-8"))
    return scores


def _blind_baseline(checkpoint: Path, spm: Path, data: Path, plan: DemoPlan) -> tuple[str, Scores]:
    """BLEU, ROUGE-L and CIDEr-D of the grey image's caption given to every test image (no METEOR: its
    start-up would cost more than the whole baseline)."""
    from PIL import Image

    from .. import evaluate as E
    from ..captioner import Captioner

    captioner = Captioner.from_checkpoint(checkpoint, spm, num_beams=3, max_len=plan.max_tokens,
                                          length_penalty=0.6)
    caption = captioner.caption([Image.new("RGB", (plan.image_size,) * 2, (128, 128, 128))])[0]
    gts = E.load_ground_truth(data / TEST_GT)
    return caption, _score({i: caption for i in gts}, gts, ("Bleu", "ROUGE_L", "CIDEr"))


def _write_report(out: Path, data: Path, run: Path, plan: DemoPlan, command: str, checkpoint: Path,
                  test: Scores, blind: Scores, blind_caption: str, timer: Timer) -> Path:
    from .. import evaluate as E
    from ..metrics import spice_unavailable_reason
    from ..model import get_config
    from ..report import Example, ReportData, write_report

    gts = E.load_ground_truth(data / TEST_GT)
    paths = {r["image_id"]: r["image_path"] for r in _read_jsonl(data / "coco_captioning.test.jsonl")}
    examples = [Example(i, (data / paths[i]).read_bytes(), test.captions.get(i, ""), list(gts[i]),
                        test.per_image_cider.get(i)) for i in list(gts)[:plan.n_examples]]
    notes = {}
    if test.metrics.get("SPICE") is None:
        notes["SPICE"] = spice_unavailable_reason() or "not computed"
    cfg = get_config(plan.model)
    settings = [
        ("data", f"{plan.n_train} training images ({plan.n_train * CAPTIONS_PER_IMAGE} caption rows), "
                 f"{plan.n_val} validation, {plan.n_test} test; {plan.image_size} px, seed {plan.seed}"),
        ("tokenizer", f"BPE sentencepiece, up to {plan.spm_pieces} pieces, trained on the training captions"),
        ("model", f"{plan.model}: {cfg.embed_dim}-dim, {cfg.depth} layers, {cfg.num_heads} heads, "
                  f"{cfg.patch_size} px patches ({cfg.num_image_tokens} image tokens), random initialisation"),
        ("training", f"{plan.epochs} epochs x {plan.steps_per_epoch} steps of {plan.batch_size} captions; AdamW, "
                     f"lr {plan.lr:g} after {plan.warmup_steps} warm-up steps, cosine decay; mask probability "
                     f"{plan.mask_prob:g}; {plan.max_tokens} text tokens; no flip, no random crop"),
        ("decoding", f"beam search, 3 beams, length penalty 0.6, max_len {plan.max_tokens}"),
        ("weights evaluated", f"{checkpoint.name} (the best validation CIDEr-D)"),
        ("evaluation command", "the training flags plus --eval --finetune " + str(checkpoint)),
    ]
    attributes = [(a, test.attributes[a], blind.attributes[a]) for a in ATTRIBUTES]
    report = ReportData(
        metrics=test.metrics, blind_metrics=blind.metrics, blind_caption=blind_caption, examples=examples,
        step_log=_read_jsonl(run / "train_steps.jsonl"), epoch_log=_read_jsonl(run / "log.txt"),
        command=command, settings=settings, timings=timer.rows, machine=machine_rows(), notes=notes,
        n_test=len(gts), attributes=attributes, title=f"beit3cap demo report ({plan.name} plan)")
    return write_report(report, out)


def _write_marker(result: DemoResult) -> None:
    from ..fileio import atomic_write_json

    atomic_write_json(result.out_dir / MARKER, {
        "report": str(result.report), "metrics": result.test.metrics, "attributes": result.test.attributes,
        "blind_metrics": result.blind.metrics, "blind_attributes": result.blind.attributes,
        "blind_caption": result.blind_caption, "timings": dict(result.timings),
        "total_seconds": sum(s for _, s in result.timings), "plan": asdict(result.plan),
        "command": result.command}, indent=2)


def _print_summary(result: DemoResult) -> None:
    m = result.test.metrics
    labels = (("Bleu_4", "BLEU-4"), ("METEOR", "METEOR"), ("ROUGE_L", "ROUGE-L"), ("CIDEr", "CIDEr"))
    scores = "  ".join(f"{label} {m[k]:.3f}" for k, label in labels if isinstance(m.get(k), (int, float)))
    spice = f"SPICE {m['SPICE']:.3f}" if isinstance(m.get("SPICE"), (int, float)) else "SPICE unavailable"
    right = ", ".join(f"{a} {100 * v:.0f}%" for a, v in result.test.attributes.items())
    blind = result.blind.metrics.get("CIDEr")
    print(f"\nbeit3cap demo done in {sum(s for _, s in result.timings):.0f} s; {result.plan.n_test} held-out "
          f"test images, beam 3", flush=True)
    print(f"attributes named right: {right}")
    print(f"test scores: {scores}  {spice}")
    print(f"image-blind baseline: CIDEr {blind:.3f} (the model's caption of a grey image: "
          f"\"{result.blind_caption}\")")
    print(f"report: {result.report}", flush=True)


def default_out_dir() -> Path:
    return Path("beit3cap-demo")
