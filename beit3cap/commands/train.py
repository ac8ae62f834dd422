"""``beit3cap train``: fine-tune or evaluate with the flags of the official run_beit3_finetuning.py."""

from __future__ import annotations

from ..train import main as train_main


def main(argv: list[str]) -> int:
    return train_main(argv, prog="beit3cap train")
