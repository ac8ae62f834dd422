"""``beit3cap serve``: a web page and HTTP API that caption uploaded images.

    beit3cap serve --checkpoint model.pth --sentencepiece_model beit3.spm     # http://127.0.0.1:8000/
    beit3cap serve --demo                                                    # the model of `beit3cap demo`

The model loads once, before the server starts listening. Endpoints: ``/`` (the page), ``POST /caption``,
``GET /health``, ``/openapi.json`` and ``/docs``. The server binds to 127.0.0.1 unless ``--host`` says
otherwise. Exit status: 2 for bad arguments or a checkpoint that cannot be loaded, 3 if the server could
not start (e.g. the port is taken; uvicorn's start-up failure code).
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import sys
from pathlib import Path

AMP_CHOICES = ("none", "bf16", "fp16")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="beit3cap serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", "--finetune", dest="checkpoint", default=None,
                   help="fine-tuned captioning checkpoint (.pth with 'model' or 'module', DeepSpeed folder, "
                        "safetensors)")
    p.add_argument("--sentencepiece_model", "--sentencepiece-model", dest="spm", default=None,
                   help="the sentencepiece model the checkpoint was trained with (beit3.spm)")
    p.add_argument("--model", default=None, help="architecture, e.g. beit3_base_patch16_480 (default: from the "
                                                 "checkpoint)")
    p.add_argument("--demo", action="store_true",
                   help="serve the model trained by `beit3cap demo` (for whichever of --checkpoint and "
                        "--sentencepiece_model is not given)")
    p.add_argument("--demo_dir", "--demo-dir", dest="demo_dir", default=None,
                   help="the folder `beit3cap demo --out` wrote (default: the demo's default, ./beit3cap-demo)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--amp", choices=AMP_CHOICES, default="none", help="autocast precision for the model")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default %(default)s; 0.0.0.0 exposes the service to the network)")
    p.add_argument("--port", type=int, default=8000, help="(default %(default)s)")
    p.add_argument("--max_upload_mb", "--max-upload-mb", dest="max_upload_mb", type=float, default=10.0,
                   help="largest image file accepted, in MB (default %(default)s)")
    p.add_argument("--max_images", "--max-images", dest="max_images", type=int, default=16,
                   help="most images in one request (default %(default)s)")
    p.add_argument("--max_batch", "--max-batch", dest="max_batch", type=int, default=16,
                   help="most images in one model call (default %(default)s)")
    p.add_argument("--batch_wait_ms", "--batch-wait-ms", dest="batch_wait_ms", type=float, default=15.0,
                   help="how long a request waits for others to share its model call (default %(default)s)")
    p.add_argument("--num_beams", "--num-beams", dest="num_beams", type=int, default=3,
                   help="default for requests that do not set it (default %(default)s)")
    p.add_argument("--max_len", "--max-len", dest="max_len", type=int, default=None,
                   help="default text length budget: at most max_len - 3 words (default: 32, or the demo's own "
                        "text length with --demo)")
    p.add_argument("--length_penalty", "--length-penalty", dest="length_penalty", type=float, default=0.6)
    p.add_argument("--forbid_special", "--forbid-special", dest="forbid_special", action="store_true",
                   help="never emit BOS/PAD/UNK/MASK or unused vocabulary rows (the official decoder may)")
    p.add_argument("--log_level", "--log-level", dest="log_level", default="info",
                   choices=("critical", "error", "warning", "info", "debug"))
    return p


def _demo_model(demo_dir: str | None) -> tuple[Path, Path, Path, int | None]:
    """(checkpoint, sentencepiece model, folder, training text length) of a ``beit3cap demo`` run.

    The demo writes ``data/demo.spm``, ``run/checkpoint-best.pth`` (or ``run/checkpoint-N.pth``) and, last,
    ``demo.json`` with its plan, whose text length is the demo's own evaluation ``max_len``."""
    from ..demo import MARKER, default_out_dir

    folder = Path(demo_dir) if demo_dir else default_out_dir()
    run = folder / "run"
    checkpoint = run / "checkpoint-best.pth"
    if not checkpoint.is_file():
        epochs = [p for p in run.glob("checkpoint-*.pth") if p.stem.split("-")[-1].isdigit()]
        checkpoint = max(epochs, key=lambda p: int(p.stem.split("-")[-1]), default=checkpoint)
    max_len = None
    try:
        max_len = int(json.loads((folder / MARKER).read_text(encoding="utf-8"))["plan"]["max_tokens"])
    except (OSError, ValueError, KeyError, TypeError):
        pass  # an interrupted or older run: the usual default applies
    return checkpoint, folder / "data" / "demo.spm", folder, max_len


def _resolve_model_files(args: argparse.Namespace, parser: argparse.ArgumentParser) -> tuple[str, str]:
    """The checkpoint and sentencepiece model to serve. With --demo and no --max_len, args.max_len becomes
    the demo's own text length."""
    if args.checkpoint and args.spm:
        return args.checkpoint, args.spm
    if not args.demo:
        parser.error("give --checkpoint and --sentencepiece_model, or --demo to serve the model of "
                     "`beit3cap demo`")
    checkpoint, spm, folder, max_len = _demo_model(args.demo_dir)
    missing = [str(p) for p, given in ((checkpoint, args.checkpoint), (spm, args.spm)) if not given and not p.is_file()]
    if missing:
        where = f" --out {folder}" if args.demo_dir else ""
        raise FileNotFoundError(f"no trained demo model in {folder} (missing {', '.join(missing)}): run "
                                f"`beit3cap demo{where}` first, or pass --checkpoint and --sentencepiece_model")
    if args.max_len is None and not args.checkpoint:
        args.max_len = max_len
    return args.checkpoint or str(checkpoint), args.spm or str(spm)


def _check_exists(checkpoint: str, spm: str) -> None:
    """Fail before the slow imports when a local file is missing (checkpoints may also be URLs)."""
    if "://" not in checkpoint and not Path(checkpoint).exists():
        raise FileNotFoundError(f"checkpoint not found: {checkpoint}")
    if not Path(spm).is_file():
        raise FileNotFoundError(f"sentencepiece model not found: {spm}")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def main(argv: list[str]) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not 0 <= args.port <= 65535:
        parser.error(f"--port must be in 0..65535, got {args.port}")
    if args.max_upload_mb <= 0 or args.max_images < 1 or args.max_batch < 1 or args.batch_wait_ms < 0:
        parser.error("need --max_upload_mb > 0, --max_images >= 1, --max_batch >= 1 and --batch_wait_ms >= 0")

    try:
        checkpoint, spm = _resolve_model_files(args, parser)
        _check_exists(checkpoint, spm)
    except FileNotFoundError as e:
        print(f"beit3cap serve: error: {e}", file=sys.stderr)
        return 2

    # Imported here so `--help` and argument errors stay instant.
    import torch
    import uvicorn
    from pydantic import ValidationError

    from ..captioner import Captioner
    from ..serve import create_app
    from ..serve_requests import CaptionSettings, describe_settings_error

    try:
        defaults = CaptionSettings(num_beams=args.num_beams, max_len=args.max_len or 32,
                                   length_penalty=args.length_penalty)
    except ValidationError as e:
        print(f"beit3cap serve: error: {describe_settings_error(e, prefix='--')}", file=sys.stderr)
        return 2
    amp = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.amp]
    try:
        captioner = Captioner.from_checkpoint(checkpoint, spm, args.model, device=args.device,
                                              forbid_special=args.forbid_special, amp_dtype=amp)
        app = create_app(captioner, max_upload_mb=args.max_upload_mb, max_images=args.max_images,
                         max_batch=args.max_batch, batch_wait_ms=args.batch_wait_ms, defaults=defaults,
                         model_name=args.model)
    except (OSError, ValueError) as e:  # missing/unreadable files, mismatched sizes, bad defaults
        print(f"beit3cap serve: error: {e}", file=sys.stderr)
        return 2

    shown = f"[{args.host}]" if ":" in args.host else args.host
    url = f"http://{shown}:{args.port}/" if args.port else f"http://{shown}:<port uvicorn reports below>/"
    print(f"beit3cap serve: {checkpoint} on {args.device}; open {url} "
          "(API: POST /caption, GET /health, docs at /docs)", file=sys.stderr, flush=True)
    if not _is_loopback(args.host):
        print(f"beit3cap serve: warning: listening on {args.host}: anyone who can reach this machine can use "
              "the model (there is no authentication)", file=sys.stderr, flush=True)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    except SystemExit as e:  # uvicorn exits this way when it cannot bind
        return int(e.code or 1)
    return 0
