"""``beit3cap <command> ...``: dispatch to ``beit3cap.commands.<command>.main``.

Commands are imported lazily so ``beit3cap --help`` and light commands stay fast.
"""

from __future__ import annotations

import importlib
import sys

COMMANDS: dict[str, str] = {
    "demo": "train a small captioner on generated data, evaluate it and write an HTML report",
    "synth": "generate a dataset in the COCO, NoCaps or WTS layout",
    "index": "build index files (coco | nocaps | wts | custom)",
    "spm": "train a sentencepiece model on captions",
    "train": "fine-tune or evaluate (the flags of run_beit3_finetuning.py)",
    "caption": "caption image files, folders or globs",
    "score": "score a prediction file (BLEU, METEOR, ROUGE-L, CIDEr-D, SPICE)",
    "serve": "web page and HTTP API that caption uploaded images",
}


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: beit3cap <command> [options]", "", "commands:"]
    lines += [f"  {name:<{width}}  {text}" for name, text in COMMANDS.items()]
    lines += ["", "Run 'beit3cap <command> --help' for a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"beit3cap: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(f"beit3cap.commands.{name}")
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
