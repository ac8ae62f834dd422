"""The flags of the official ``run_beit3_finetuning.py`` (spec §1.1), shared by that script and
``beit3cap train``, and their conversion to the typed :class:`TrainConfig` the library takes.

Every official flag parses with its official default. Flags that only matter for other tasks
(ImageNet mixup, retrieval, ...) are accepted and ignored; ``--help`` lists them under their own
heading. New flags (precision, mid-epoch checkpoints, non-finite guard, ...) have defaults that keep
the official behaviour where one exists.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import Any

CAPTIONING_TASKS = ("coco_captioning", "nocaps")
OTHER_TASKS = ("nlvr2", "vqav2", "flickr30k", "coco_retrieval", "imagenet")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


@dataclass
class TrainConfig:
    """What a training or evaluation run needs; built from the flags by :func:`config_from_args`."""

    task: str
    sentencepiece_model: str
    model: str = "beit3_base_patch16_224"
    input_size: int = 224
    drop_path: float = 0.1
    checkpoint_activations: bool = False
    vocab_size: int = 64010
    num_max_bpe_tokens: int = 64
    gen_max_len: int | None = None  # None: --num_max_bpe_tokens (official)
    # EMA
    model_ema: bool = False
    model_ema_decay: float = 0.9999
    model_ema_force_cpu: bool = False
    # optimizer and schedule
    opt: str = "adamw"
    opt_eps: float = 1e-8
    opt_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    clip_grad: float | None = None
    weight_decay: float = 0.05
    lr: float = 5e-4
    layer_decay: float = 0.9
    task_head_lr_weight: float = 0.0
    min_lr: float = 1e-6
    warmup_epochs: int = 5
    warmup_steps: int = -1
    batch_size: int = 64
    eval_batch_size: int | None = None
    epochs: int = 20
    update_freq: int = 1
    precision: str = "auto"
    max_nonfinite_steps: int = 10
    # data
    data_path: str = ""
    randaug: bool = False
    hflip: bool = True
    train_crop_scale: list[float] = field(default_factory=lambda: [0.5, 1.0])
    train_interpolation: str = "bicubic"
    captioning_mask_prob: float = 0.6
    num_workers: int = 10
    pin_mem: bool = True
    # loss
    label_smoothing: float = 0.1
    drop_worst_ratio: float = 0.2
    drop_worst_after: int = 12000
    # generation
    num_beams: int = 3
    length_penalty: float = 0.6
    # weights and checkpoints
    finetune: str = ""
    model_key: str = "model|module"
    model_prefix: str = ""
    output_dir: str = ""
    log_dir: str | None = None
    resume: str = ""
    auto_resume: bool = True
    save_ckpt: bool = True
    save_ckpt_freq: int = 5
    save_ckpt_steps: int = 0
    start_epoch: int = 0
    # run mode and devices
    eval: bool = False
    dist_eval: bool = False
    allow_partial_eval: bool = False
    eval_metrics: str = "all"
    device: str | None = None  # None: cuda when available, else cpu with a warning
    seed: int = 0
    dist_url: str = "env://"
    dist_on_itp: bool = False
    world_size: int = 1
    task_cache_path: str | None = None
    # DeepSpeed
    enable_deepspeed: bool = False
    zero_stage: int = 0
    initial_scale_power: int = 16
    deepspeed_config: str | None = None

    @property
    def generation_max_len(self) -> int:
        return self.gen_max_len if self.gen_max_len is not None else self.num_max_bpe_tokens

    @property
    def metric_names(self) -> tuple[str, ...]:
        from .metrics import METRICS

        return METRICS if self.eval_metrics == "all" else tuple(m.strip() for m in self.eval_metrics.split(","))

    @property
    def resolved_eval_batch_size(self) -> int:
        return self.eval_batch_size if self.eval_batch_size else max(1, int(1.5 * self.batch_size))

    def to_plain(self) -> dict[str, Any]:
        """Plain data (str/int/float/bool/None/list) for checkpoints that load with weights_only=True."""
        return dataclasses.asdict(self)


def _bool_pair(p: argparse._ArgumentGroup, name: str, default: bool, help: str) -> None:
    p.add_argument(f"--{name}", dest=name, action="store_true", help=help)
    p.add_argument(f"--no_{name}", dest=name, action="store_false", help=f"turn off --{name}")
    p.set_defaults(**{name: default})


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog, formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Fine-tune or evaluate BEiT-3 image captioning (the flags of the official "
                    "run_beit3_finetuning.py). Launch with python, torchrun or "
                    "python -m torch.distributed.launch.")

    g = p.add_argument_group("model")
    g.add_argument("--model", default="beit3_base_patch16_224", type=str,
                   help="model name, e.g. beit3_base_patch16_480 (suffix _captioning accepted)")
    g.add_argument("--task", required=True, choices=CAPTIONING_TASKS + OTHER_TASKS,
                   help="coco_captioning or nocaps (other official tasks are rejected)")
    g.add_argument("--input_size", default=224, type=int, help="image side; must equal the model's img_size")
    g.add_argument("--drop_path", type=float, default=0.1, help="maximum stochastic-depth rate")
    g.add_argument("--checkpoint_activations", action="store_true", default=None,
                   help="recompute activations in the backward pass (saves memory)")
    g.add_argument("--sentencepiece_model", type=str, required=True, help="path to beit3.spm")
    g.add_argument("--vocab_size", type=int, default=64010,
                   help="text-embedding and head rows; at least the tokenizer's vocabulary")
    g.add_argument("--num_max_bpe_tokens", type=int, default=64,
                   help="text length incl. BOS/EOS for training; also the generation length")
    g.add_argument("--gen_max_len", type=int, default=None,
                   help="generation max_len (default: --num_max_bpe_tokens, as the official code)")
    g.add_argument("--model_ema", action="store_true", default=False, help="keep an EMA copy (saved only)")
    g.add_argument("--model_ema_decay", type=float, default=0.9999)
    g.add_argument("--model_ema_force_cpu", action="store_true", default=False)

    g = p.add_argument_group("optimization")
    g.add_argument("--opt", default="adamw", type=str, help="adamw (lookahead_adamw is not supported)")
    g.add_argument("--opt_eps", default=1e-8, type=float)
    g.add_argument("--opt_betas", default=[0.9, 0.999], type=float, nargs="+")
    g.add_argument("--clip_grad", type=float, default=None, help="max gradient norm (None: no clipping)")
    g.add_argument("--momentum", type=float, default=0.9, help="unused (official flag)")
    g.add_argument("--weight_decay", type=float, default=0.05, help="0 works (fixed official bug)")
    g.add_argument("--lr", type=float, default=5e-4, help="peak learning rate")
    g.add_argument("--layer_decay", type=float, default=0.9, help="layer-wise lr decay (1.0: none)")
    g.add_argument("--task_head_lr_weight", type=float, default=0,
                   help="lr weight of parameters named head.* (the captioning model has none)")
    g.add_argument("--warmup_lr", type=float, default=1e-6, help="unused: warm-up starts at 0 (official)")
    g.add_argument("--min_lr", type=float, default=1e-6, help="floor of the cosine schedule")
    g.add_argument("--warmup_epochs", type=int, default=5)
    g.add_argument("--warmup_steps", type=int, default=-1, help="if > 0, overrides --warmup_epochs")
    g.add_argument("--batch_size", default=64, type=int, help="per process")
    g.add_argument("--eval_batch_size", default=None, type=int, help="default: int(1.5 * batch_size)")
    g.add_argument("--epochs", default=20, type=int)
    g.add_argument("--update_freq", default=1, type=int, help="gradient accumulation steps")
    g.add_argument("--precision", "--amp", dest="precision", default="auto", choices=PRECISIONS,
                   help="auto: fp16 with a grad scaler on CUDA (official), fp32 on the CPU; "
                        "bf16 works on CPU and GPU, fp16 needs CUDA")
    g.add_argument("--max_nonfinite_steps", type=int, default=10,
                   help="stop after this many optimizer steps in a row with a non-finite loss or "
                        "gradient (each one is skipped with a warning)")

    g = p.add_argument_group("data")
    g.add_argument("--data_path", default="/datasets01/imagenet_full_size/061417/", type=str,
                   help="folder with the index .jsonl files and the images")
    g.add_argument("--randaug", action="store_true", default=False)
    g.add_argument("--train_interpolation", type=str, default="bicubic")
    g.add_argument("--no_hflip", dest="hflip", action="store_false", default=True,
                   help="no random horizontal flip in training (keeps left/right in captions right)")
    g.add_argument("--train_crop_scale", type=float, nargs=2, default=[0.5, 1.0], metavar=("MIN", "MAX"),
                   help="area range of the training random crop (official 0.5 1.0; 1 1 keeps the whole image, "
                        "for captions that count objects or say where they are)")
    g.add_argument("--captioning_mask_prob", type=float, default=0.6)
    g.add_argument("--num_workers", default=10, type=int, help="data-loading workers per process")
    _bool_pair(g, "pin_mem", True, "pin host memory for faster GPU copies")

    g = p.add_argument_group("loss and generation")
    g.add_argument("--label_smoothing", type=float, default=0.1)
    g.add_argument("--drop_worst_ratio", type=float, default=0.2)
    g.add_argument("--drop_worst_after", type=int, default=12000, help="in optimizer steps")
    g.add_argument("--num_beams", type=int, default=3)
    g.add_argument("--length_penalty", type=float, default=0.6)

    g = p.add_argument_group("weights, checkpoints and logs")
    g.add_argument("--finetune", default="", help="initial weights (pretrained or fine-tuned .pth/.zip)")
    g.add_argument("--model_key", default="model|module", type=str)
    g.add_argument("--model_prefix", default="", type=str)
    g.add_argument("--output_dir", default="", help="checkpoints, predictions, metrics and log.txt")
    g.add_argument("--log_dir", default=None, help="TensorBoard folder")
    g.add_argument("--resume", default="", help="checkpoint to resume training from")
    _bool_pair(g, "auto_resume", True, "resume from the newest checkpoint in --output_dir "
                                       "(never over an explicit --finetune in --eval mode)")
    _bool_pair(g, "save_ckpt", True, "save checkpoints")
    g.add_argument("--save_ckpt_freq", default=5, type=int, help="save checkpoint-{epoch}.pth every N epochs")
    g.add_argument("--save_ckpt_steps", default=0, type=int,
                   help="also save a resumable checkpoint every N optimizer steps inside an epoch (0: off)")
    g.add_argument("--start_epoch", default=0, type=int)

    g = p.add_argument_group("run mode and distributed")
    g.add_argument("--eval", action="store_true", help="only caption the test split (and score COCO)")
    g.add_argument("--dist_eval", action="store_true", default=False,
                   help="shard evaluation over processes (always done when distributed)")
    g.add_argument("--allow_partial_eval", action="store_true", default=False,
                   help="score even if some ground-truth images have no prediction (default: error)")
    g.add_argument("--eval_metrics", default="all",
                   help="metrics for validation and test scoring: all (Bleu, METEOR, ROUGE_L, CIDEr, SPICE) "
                        "or a comma list, e.g. Bleu,ROUGE_L,CIDEr (no Java start-up for METEOR)")
    g.add_argument("--device", default=None, choices=("cuda", "cpu"),
                   help="default: cuda, falling back to cpu with a warning when CUDA is missing")
    g.add_argument("--seed", default=0, type=int, help="the process of rank r uses seed + r")
    g.add_argument("--world_size", default=1, type=int, help="used only when SLURM gives no task count")
    g.add_argument("--local_rank", "--local-rank", dest="local_rank", default=-1, type=int,
                   help="set by torch.distributed.launch; the rank is read from the environment")
    g.add_argument("--dist_on_itp", action="store_true", help="read ranks from OpenMPI variables")
    g.add_argument("--dist_url", default="env://")
    g.add_argument("--task_cache_path", default=None, type=str, help="accepted; predictions are gathered "
                                                                     "in memory")

    g = p.add_argument_group("DeepSpeed (needs: pip install -e '.[deepspeed]')")
    g.add_argument("--enable_deepspeed", action="store_true", default=False)
    g.add_argument("--initial_scale_power", type=int, default=16, help="fp16 initial loss scale 2^N")
    g.add_argument("--zero_stage", default=0, type=int, choices=(0, 1, 2), help="ZeRO stage")
    g.add_argument("--deepspeed", action="store_true", default=False, help="accepted (DeepSpeed's own flag)")
    g.add_argument("--deepspeed_config", default=None,
                   help="use this DeepSpeed JSON instead of the generated <output_dir>/deepspeed_config.json")

    g = p.add_argument_group("accepted and ignored (ImageNet and other tasks of the official script)")
    for name, kw in [("--nb_classes", dict(type=int, default=1000)), ("--mixup", dict(type=float)),
                     ("--cutmix", dict(type=float)), ("--cutmix_minmax", dict(type=float, nargs="+")),
                     ("--mixup_prob", dict(type=float)), ("--mixup_switch_prob", dict(type=float)),
                     ("--mixup_mode", dict(type=str)), ("--color_jitter", dict(type=float)),
                     ("--aa", dict(type=str)), ("--smoothing", dict(type=float)),
                     ("--crop_pct", dict(type=float)), ("--reprob", dict(type=float)),
                     ("--remode", dict(type=str)), ("--recount", dict(type=int))]:
        g.add_argument(name, help="ignored", **{"default": None, **kw})
    g.add_argument("--resplit", action="store_true", default=False, help="ignored")
    return p


def parse_args(argv: list[str] | None = None, prog: str | None = None) -> argparse.Namespace:
    return build_parser(prog).parse_args(argv)


def config_from_args(ns: argparse.Namespace) -> TrainConfig:
    """Check the flags that argparse cannot check and build the typed config."""
    if ns.task not in CAPTIONING_TASKS:
        raise SystemExit(f"error: --task {ns.task} is not supported: beit3cap implements "
                         f"{' and '.join(CAPTIONING_TASKS)} only")
    if ns.opt.lower() != "adamw":
        raise SystemExit(f"error: --opt {ns.opt} is not supported (only adamw)")
    checks = [("--batch_size", ns.batch_size, 1), ("--epochs", ns.epochs, 0), ("--update_freq", ns.update_freq, 1),
              ("--num_max_bpe_tokens", ns.num_max_bpe_tokens, 3), ("--num_beams", ns.num_beams, 1),
              ("--save_ckpt_freq", ns.save_ckpt_freq, 1), ("--num_workers", ns.num_workers, 0),
              ("--max_nonfinite_steps", ns.max_nonfinite_steps, 1), ("--save_ckpt_steps", ns.save_ckpt_steps, 0)]
    for flag, value, low in checks:
        if value < low:
            raise SystemExit(f"error: {flag} must be >= {low}, got {value}")
    if not 0.0 <= ns.drop_worst_ratio < 1.0:
        raise SystemExit(f"error: --drop_worst_ratio must be in [0, 1), got {ns.drop_worst_ratio}")
    if not 0.0 <= ns.label_smoothing < 1.0:
        raise SystemExit(f"error: --label_smoothing must be in [0, 1), got {ns.label_smoothing}")
    if not 0.0 < ns.train_crop_scale[0] <= ns.train_crop_scale[1] <= 1.0:
        raise SystemExit(f"error: --train_crop_scale needs 0 < MIN <= MAX <= 1, got {ns.train_crop_scale}")
    if len(ns.opt_betas) != 2:
        raise SystemExit(f"error: --opt_betas takes two numbers, got {ns.opt_betas}")
    if ns.gen_max_len is not None and ns.gen_max_len < 3:
        raise SystemExit(f"error: --gen_max_len must be >= 3, got {ns.gen_max_len}")
    if ns.eval_metrics != "all":
        from .metrics import METRICS

        unknown = [m for m in ns.eval_metrics.split(",") if m.strip() not in METRICS]
        if unknown:
            raise SystemExit(f"error: --eval_metrics: unknown {unknown}; choose from {', '.join(METRICS)}")
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    values = {k: v for k, v in vars(ns).items() if k in names}
    values["checkpoint_activations"] = bool(values.get("checkpoint_activations"))
    values["opt_betas"] = [float(b) for b in ns.opt_betas]
    return TrainConfig(**values)


def config_from_argv(argv: list[str] | None = None, prog: str | None = None) -> TrainConfig:
    return config_from_args(parse_args(argv, prog))
