"""One module per ``beit3cap`` sub-command, each exposing ``main(argv: list[str]) -> int``."""
