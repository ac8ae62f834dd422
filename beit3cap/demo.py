"""``beit3cap demo``: the whole system on a laptop CPU in minutes, from nothing.

1. a COCO-layout dataset of generated images (``data.synth.make_coco_tree``), indexed with the
   seed-compatible builder (``data.index.make_coco_captioning_index``);
2. a BPE sentencepiece model trained on its training captions;
3. a small BEiT-3 trained from scratch by the training entry point of ``run_beit3_finetuning.py``
   (``train.main`` with the official flags), validated after every epoch;
4. the Karpathy-style test split captioned and scored by that entry point's ``--eval`` path (beam 3,
   length penalty 0.6; BLEU, METEOR, ROUGE-L, CIDEr-D; SPICE when its jars are installed);
5. an image-blind baseline: the same model shown one grey image instead of each test image;
6. ``report.html`` (``report.py``) with scores, curves, captioned test images, configuration and timings.

The recipe (see ``docs/readme/demo.md`` for why): ``beit3_mini_patch16_64`` (16 image tokens), batch 32,
lr 1e-3 with a 60-step warm-up, mask probability 0.6, 18 text tokens, no flip and no random crop
(captions say where the shapes are and how many there are).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import re
import shlex
import shutil
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from tqdm import tqdm

MARKER = "demo.json"  # written last; also marks a folder as the demo's own (safe to overwrite)
CAPTIONS_PER_IMAGE = 5
TASK = "coco_captioning"


@dataclass(frozen=True)
class DemoPlan:
    """Sizes and training hyper-parameters of one demo run."""

    name: str
    n_train: int  # training images (x5 captions = training rows)
    n_val: int
    n_test: int
    epochs: int
    image_size: int = 64
    model: str = "beit3_mini_patch16_64"
    batch_size: int = 32
    lr: float = 1e-3
    warmup_steps: int = 60
    mask_prob: float = 0.6
    max_tokens: int = 18  # BOS + up to 16 pieces + EOS; the longest generated caption has 15 words
    spm_pieces: int = 300
    seed: int = 42
    n_examples: int = 24  # test images shown in the report

    @property
    def steps_per_epoch(self) -> int:
        return self.n_train * CAPTIONS_PER_IMAGE // self.batch_size

    @property
    def steps(self) -> int:
        return self.steps_per_epoch * self.epochs

    def flags(self, data: Path, spm: Path, run: Path, vocab_size: int,
              evaluate: Path | None = None) -> list[str]:
        """The ``run_beit3_finetuning.py`` flags of the training run (validation scores CIDEr-D only,
        to skip METEOR's start-up each epoch), or of the ``--eval`` run of checkpoint ``evaluate``
        (every metric)."""
        extra = ["--eval_metrics", "CIDEr"] if evaluate is None else ["--eval", "--finetune", str(evaluate)]
        return [
            "--model", self.model, "--input_size", str(self.image_size), "--task", TASK,
            "--batch_size", str(self.batch_size), "--layer_decay", "1.0", "--lr", f"{self.lr:g}",
            "--epochs", str(self.epochs), "--warmup_epochs", "0", "--warmup_steps", str(self.warmup_steps),
            "--drop_path", "0.0", "--sentencepiece_model", str(spm), "--vocab_size", str(vocab_size),
            "--data_path", str(data), "--output_dir", str(run), "--weight_decay", "0.05",
            "--seed", str(self.seed), "--save_ckpt_freq", str(self.epochs),
            "--num_max_bpe_tokens", str(self.max_tokens), "--captioning_mask_prob", f"{self.mask_prob:g}",
            "--no_hflip", "--train_crop_scale", "1", "1", "--device", "cpu", "--num_workers", "0",
            "--no_auto_resume", *extra,
        ]


# Measured on the 2-core project machine (docs/readme/demo.md): about 3 minutes of training.
DEFAULT_PLAN = DemoPlan("default", n_train=2000, n_val=100, n_test=100, epochs=6)
QUICK_PLAN = DemoPlan("quick", n_train=1000, n_val=50, n_test=50, epochs=2, n_examples=12)


# ---------------------------------------------------------------------------------------------- budget

def measure_step_seconds(plan: DemoPlan, repeats: int = 5) -> float:
    """Seconds per training step of ``plan``'s model on this machine: forward, backward and AdamW on a
    random batch, plus data loading (about 1.2 ms per sample here, measured with the real loader)."""
    import torch

    from .model import create_model

    g = torch.Generator().manual_seed(0)
    model = create_model(plan.model, vocab_size=plan.spm_pieces + 2, drop_path_rate=0.0).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    b, t, s = plan.batch_size, plan.max_tokens, plan.image_size
    image = torch.randn(b, 3, s, s, generator=g)
    ids = torch.randint(4, plan.spm_pieces, (b, t), generator=g)
    pos = (torch.rand(b, t, generator=g) < plan.mask_prob).long()
    pos[:, 0] = 0
    times = []
    for k in range(repeats + 2):
        start = time.perf_counter()
        logits = model(image, ids, torch.zeros_like(ids), pos)
        torch.nn.functional.cross_entropy(logits, ids[pos.bool()]).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if k >= 2:  # the first steps allocate
            times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2] + 0.0012 * b


def plan_for_minutes(minutes: float, step_seconds: float, base: DemoPlan = DEFAULT_PLAN) -> DemoPlan:
    """A plan whose whole run should take about ``minutes`` at ``step_seconds`` per step: the training
    budget is what the fixed costs (data, evaluation, report, one validation per epoch) leave; longer
    budgets buy more epochs (up to 8) and then more images."""
    fixed = 30.0 + 0.002 * (base.n_val + base.n_test)
    per_epoch_fixed = 2.0
    budget = max(minutes * 60.0 - fixed, 10.0)
    steps = budget / step_seconds
    epochs = int(min(8, max(2, steps // 320)))
    steps = (budget - epochs * per_epoch_fixed) / step_seconds
    n_train = max(200, int(steps * base.batch_size / (CAPTIONS_PER_IMAGE * epochs)))
    return replace(base, name=f"{minutes:g} minutes", n_train=n_train, epochs=epochs)


# --------------------------------------------------------------------------------------------- phases

@dataclass
class Phase:
    name: str
    seconds: float = 0.0


class Timer:
    def __init__(self) -> None:
        self.phases: list[Phase] = []

    @contextlib.contextmanager
    def phase(self, name: str, step: int, of: int) -> Iterator[None]:
        print(f"\n[{step}/{of}] {name}", flush=True)
        start = time.perf_counter()
        try:
            yield
        finally:
            self.phases.append(Phase(name, time.perf_counter() - start))

    def rows(self) -> list[tuple[str, float]]:
        return [(p.name, p.seconds) for p in self.phases]


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
    """Create ``out`` or clear a previous demo run in it; refuse any other non-empty folder."""
    if out.exists() and not out.is_dir():
        raise SystemExit(f"error: --out {out} is a file")
    if out.is_dir() and any(out.iterdir()):
        if not (out / MARKER).is_file() and not (out / "data" / "dataset_coco.json").is_file():
            raise SystemExit(f"error: --out {out} is not empty and holds no earlier demo run ({MARKER}); "
                             "choose a new or empty folder")
        for name in ("data", "run"):
            shutil.rmtree(out / name, ignore_errors=True)
        for name in (MARKER, "report.html", "train_loss.png", "val_cider.png"):
            (out / name).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)


def training_captions(data: Path) -> list[str]:
    """Captions of the Karpathy train + restval images only: the tokenizer never sees test captions."""
    with open(data / "dataset_coco.json", encoding="utf-8") as f:
        images = json.load(f)["images"]
    return [s["raw"] for img in images if img["split"] in ("train", "restval") for s in img["sentences"]]


def _train_main(argv: list[str]) -> None:
    from .train import main

    rc = main(argv, prog="run_beit3_finetuning.py")
    if rc:
        raise SystemExit(f"error: training entry point failed (exit code {rc}) for: {shlex.join(argv)}")


def _best_checkpoint(run: Path, plan: DemoPlan) -> Path:
    for name in ("checkpoint-best.pth", f"checkpoint-{plan.epochs - 1}.pth"):
        if (run / name).is_file():
            return run / name
    raise SystemExit(f"error: training wrote no checkpoint into {run}")


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    rows = []
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
            ("torch", torch.__version__), ("Python", platform.python_version()),
            ("platform", platform.platform())]
    if hasattr(os, "getloadavg"):
        rows.append(("load average at the end (1/5/15 min)", " / ".join(f"{x:.2f}" for x in os.getloadavg())))
    return rows


# ----------------------------------------------------------------------------------------------- run

@dataclass
class DemoResult:
    out_dir: Path
    report: Path
    metrics: dict[str, float | None]
    blind_metrics: dict[str, float | None]
    blind_caption: str
    timings: list[tuple[str, float]]
    plan: DemoPlan
    command: str


def run_demo(out_dir: str | os.PathLike, plan: DemoPlan = DEFAULT_PLAN) -> DemoResult:
    """Run every phase into ``out_dir`` (``data/``, ``run/``, ``report.html``, ``demo.json``)."""
    out = Path(out_dir).resolve()
    prepare_output(out)
    data, run = out / "data", out / "run"
    timer = Timer()
    n = 6
    print(f"beit3cap demo ({plan.name}): {plan.n_train} training images x {CAPTIONS_PER_IMAGE} captions, "
          f"{plan.n_val} validation and {plan.n_test} test images; {plan.model}, {plan.epochs} epochs of "
          f"{plan.steps_per_epoch} steps; output in {out}", flush=True)

    with timer.phase("generating a COCO-layout dataset of shape images", 1, n):
        from .data.synth import make_coco_tree

        total = plan.n_train + plan.n_val + plan.n_test
        with _files_progress([data / "train2014", data / "val2014"], total, "images"):
            make_coco_tree(data, n_train=plan.n_train, n_val=plan.n_val, n_test=plan.n_test,
                           image_size=plan.image_size, seed=plan.seed)

    with timer.phase("training the sentencepiece model and building the index files", 2, n):
        from .data.index import make_coco_captioning_index
        from .tokenizer import load_tokenizer, train_sentencepiece

        spm = train_sentencepiece(training_captions(data), data / "demo.spm", vocab_size=plan.spm_pieces)
        tokenizer = load_tokenizer(spm)
        print(make_coco_captioning_index(data, tokenizer, num_max_bpe_tokens=plan.max_tokens), flush=True)

    flags = plan.flags(data, spm, run, tokenizer.vocab_size)
    command = shlex.join(["python", "run_beit3_finetuning.py", *flags])
    with timer.phase(f"training {plan.model} from scratch ({plan.steps} steps)", 3, n):
        print(command, flush=True)
        _train_main(flags)

    checkpoint = _best_checkpoint(run, plan)
    with timer.phase(f"captioning and scoring the {plan.n_test} test images (beam 3)", 4, n):
        _train_main(plan.flags(data, spm, run, tokenizer.vocab_size, evaluate=checkpoint))
        metrics, examples_scores = _test_scores(run, data)

    with timer.phase("image-blind baseline (a grey image instead of each test image)", 5, n):
        blind_caption, blind_metrics = _blind_baseline(checkpoint, spm, data, plan)

    with timer.phase("writing the report", 6, n):
        report = _write_report(out, data, run, plan, command, metrics, examples_scores, blind_caption,
                               blind_metrics, timer)
    result = DemoResult(out, report, metrics, blind_metrics, blind_caption, timer.rows(), plan, command)
    _write_marker(result)
    _print_summary(result)
    return result


def _test_scores(run: Path, data: Path) -> tuple[dict[str, float | None], dict[int, float]]:
    """Corpus scores written by ``--eval`` and each test image's CIDEr-D (for the report's grid)."""
    from . import evaluate as E

    result = run / "coco_captioning_result.json"
    if not result.is_file():
        raise SystemExit(f"error: the --eval run wrote no {result}")
    metrics = json.loads(result.read_text(encoding="utf-8"))
    preds = E.load_predictions(run / "submit_coco_captioning_test.json")
    gts = E.load_ground_truth(data / "coco_karpathy_test_gt.json")
    scores = E.evaluate_predictions(preds, gts, metrics=("CIDEr",))
    per_image = dict(zip(scores.image_ids, scores.per_image["CIDEr"].tolist()))
    return metrics, per_image


def _blind_baseline(checkpoint: Path, spm: Path, data: Path, plan: DemoPlan) -> tuple[str, dict[str, float | None]]:
    """The trained model's caption of one uniform grey image, given as the caption of every test image.
    BLEU, ROUGE-L and CIDEr-D (no METEOR: its start-up would cost more than the whole baseline)."""
    from PIL import Image

    from . import evaluate as E
    from .captioner import Captioner

    captioner = Captioner.from_checkpoint(checkpoint, spm, num_beams=3, max_len=plan.max_tokens,
                                          length_penalty=0.6)
    grey = Image.new("RGB", (plan.image_size, plan.image_size), (128, 128, 128))
    caption = captioner.caption([grey])[0]
    gts = E.load_ground_truth(data / "coco_karpathy_test_gt.json")
    scores = E.evaluate_predictions({i: caption for i in gts}, gts, metrics=("Bleu", "ROUGE_L", "CIDEr"))
    return caption, scores.corpus


def _write_report(out: Path, data: Path, run: Path, plan: DemoPlan, command: str, metrics: dict,
                  per_image: dict[int, float], blind_caption: str, blind_metrics: dict, timer: Timer) -> Path:
    from . import evaluate as E
    from .metrics import spice_unavailable_reason
    from .report import Example, ReportData, write_report

    gts = E.load_ground_truth(data / "coco_karpathy_test_gt.json")
    captions = {p["image_id"]: p["caption"] for p in E.load_predictions(run / "submit_coco_captioning_test.json")}
    paths = {r["image_id"]: r["image_path"] for r in _read_jsonl(data / "coco_captioning.test.jsonl")}
    examples = [Example(i, (data / paths[i]).read_bytes(), captions.get(i, ""), list(gts[i]), per_image.get(i))
                for i in list(gts)[:plan.n_examples]]
    notes = {}
    if metrics.get("SPICE") is None:
        notes["SPICE"] = spice_unavailable_reason() or "not computed"
    from .model import get_config

    cfg = get_config(plan.model)
    settings = [
        ("data", f"{plan.n_train} training images ({plan.n_train * CAPTIONS_PER_IMAGE} caption rows), "
                 f"{plan.n_val} validation, {plan.n_test} test; {plan.image_size} px, seed {plan.seed}"),
        ("tokenizer", f"BPE sentencepiece, up to {plan.spm_pieces} pieces, trained on the training captions"),
        ("model", f"{plan.model}: {cfg.embed_dim}-dim, {cfg.depth} layers, {cfg.num_heads} heads, "
                  f"{cfg.patch_size} px patches ({cfg.num_image_tokens} image tokens), random init"),
        ("training", f"{plan.epochs} epochs x {plan.steps_per_epoch} steps of {plan.batch_size}, AdamW lr "
                     f"{plan.lr:g} (warm-up {plan.warmup_steps} steps, cosine), mask probability "
                     f"{plan.mask_prob:g}, {plan.max_tokens} text tokens, no flip, no random crop"),
        ("decoding", f"beam search, 3 beams, length penalty 0.6, max_len {plan.max_tokens}"),
        ("weights evaluated", str(_best_checkpoint(run, plan).name)),
        ("evaluation command", "the same flags plus --eval --finetune <checkpoint>"),
    ]
    data_ = ReportData(
        metrics=metrics, blind_metrics=blind_metrics, blind_caption=blind_caption, examples=examples,
        step_log=_read_jsonl(run / "train_steps.jsonl"), epoch_log=_read_jsonl(run / "log.txt"),
        command=command, settings=settings, timings=timer.rows(), machine=machine_rows(), notes=notes,
        n_test=len(gts), title=f"beit3cap demo report ({plan.name} run)")
    return write_report(data_, out)


def _write_marker(result: DemoResult) -> None:
    from .fileio import atomic_write_json

    atomic_write_json(result.out_dir / MARKER, {
        "report": str(result.report), "metrics": result.metrics, "blind_metrics": result.blind_metrics,
        "blind_caption": result.blind_caption, "timings": dict(result.timings),
        "total_seconds": sum(s for _, s in result.timings), "plan": asdict(result.plan),
        "command": result.command}, indent=2)


def _print_summary(result: DemoResult) -> None:
    m, b = result.metrics, result.blind_metrics
    labels = (("Bleu_4", "BLEU-4"), ("METEOR", "METEOR"), ("ROUGE_L", "ROUGE-L"), ("CIDEr", "CIDEr"))
    scores = "  ".join(f"{label} {m[k]:.3f}" for k, label in labels if isinstance(m.get(k), (int, float)))
    spice = f"SPICE {m['SPICE']:.3f}" if isinstance(m.get("SPICE"), (int, float)) else "SPICE unavailable"
    total = sum(s for _, s in result.timings)
    blind = b.get("CIDEr")
    print(f"\nbeit3cap demo done in {total:.0f} s ({result.plan.n_test} held-out test images, beam 3)", flush=True)
    print(f"test scores: {scores}  {spice}")
    print(f"image-blind baseline: CIDEr {blind:.3f} (the model's caption of a grey image: "
          f"\"{result.blind_caption}\")" if blind is not None else "image-blind baseline: not scored")
    print(f"report: {result.report}", flush=True)


def default_out_dir() -> Path:
    return Path("beit3cap-demo")


def resolve_plan(quick: bool, minutes: float | None) -> DemoPlan:
    if quick and minutes is not None:
        raise SystemExit("error: --quick and --minutes exclude each other")
    if quick:
        return QUICK_PLAN
    if minutes is None:
        return DEFAULT_PLAN
    if not math.isfinite(minutes) or minutes < 1:
        raise SystemExit(f"error: --minutes must be at least 1, got {minutes:g}")
    print(f"measuring the training step time for a {minutes:g}-minute budget ...", flush=True)
    seconds = measure_step_seconds(DEFAULT_PLAN)
    plan = plan_for_minutes(minutes, seconds)
    print(f"{seconds:.3f} s per step: {plan.n_train} training images, {plan.epochs} epochs ({plan.steps} steps)",
          flush=True)
    return plan


if __name__ == "__main__":  # pragma: no cover - use `beit3cap demo`
    from .commands.demo import main

    sys.exit(main(sys.argv[1:]))
