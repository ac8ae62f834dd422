"""The Java parts of COCO caption evaluation, run from the jars inside the pycocoevalcap wheel.

- PTB tokenization: Stanford CoreNLP 3.4.1's PTBTokenizer (lower-cased, one caption per line), then the
  coco-caption punctuation tokens are dropped. Captions are sanitised first: every character that a line
  reader could take as a line break becomes a space, so one caption can never shift the others.
- METEOR 1.5 (``-l en -norm``) through its ``-stdio`` protocol.
- SPICE 1.0, only when the Stanford CoreNLP 3.6.0 jars it needs are already in pycocoevalcap's
  ``spice/lib`` folder; nothing is ever downloaded.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

# Tokens the coco-caption tokenizer wrapper removes after PTB tokenization (compared case-sensitively,
# after lower-casing, so e.g. "-lrb-" survives exactly as it does there).
PUNCTUATION = frozenset(["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-",
                         ".", "?", "!", ",", ":", "-", "--", "...", ";"])

# Everything str.splitlines() breaks on, which covers every terminator the PTB lexer knows
# (\n, \r, \v, \f, U+0085, U+2028, U+2029) and the ASCII record separators.
_LINE_BREAKS = str.maketrans({c: " " for c in "\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029"})

SPICE_CORENLP_JARS = ("stanford-corenlp-3.6.0.jar", "stanford-corenlp-3.6.0-models.jar")


class JavaNotFoundError(RuntimeError):
    """Raised when the `java` executable needed by the PTB tokenizer, METEOR and SPICE is missing."""


def require_java() -> str:
    java = shutil.which("java")
    if java is None:
        raise JavaNotFoundError(
            "COCO caption metrics need Java for the PTB tokenizer and METEOR, but `java` is not on PATH. "
            "Install it with `sudo apt-get install default-jre-headless` (scripts/setup.sh does this).")
    return java


def pycocoevalcap_dir() -> Path:
    spec = importlib.util.find_spec("pycocoevalcap")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("pycocoevalcap is not installed; `pip install pycocoevalcap==1.2` "
                                  "(it ships the PTB tokenizer, METEOR and SPICE jars)")
    return Path(next(iter(spec.submodule_search_locations)))


def sanitize(caption: str) -> str:
    return caption.translate(_LINE_BREAKS)


def ptb_tokenize(captions: list[str]) -> list[str]:
    """Tokenize captions like pycocoevalcap's PTBTokenizer wrapper, in one Java run for all of them."""
    if not captions:
        return []
    java = require_java()
    jar = pycocoevalcap_dir() / "tokenizer" / "stanford-corenlp-3.4.1.jar"
    with tempfile.TemporaryDirectory(prefix="beit3cap-ptb-") as tmp:
        src = Path(tmp) / "captions.txt"
        src.write_text("\n".join(map(sanitize, captions)), encoding="utf-8")
        proc = subprocess.run(
            [java, "-cp", str(jar), "edu.stanford.nlp.process.PTBTokenizer", "-preserveLines", "-lowerCase",
             str(src)], capture_output=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"PTBTokenizer failed (exit {proc.returncode}): "
                           f"{proc.stderr.decode(errors='replace')[:1500]}")
    lines = proc.stdout.decode("utf-8").split("\n")
    if len(lines) != len(captions):
        raise RuntimeError(f"PTBTokenizer returned {len(lines)} lines for {len(captions)} captions")
    return [" ".join(w for w in line.rstrip().split(" ") if w not in PUNCTUATION) for line in lines]


def _meteor_field(text: str) -> str:
    # One line per request, '|||' between fields; the doubled-space fix mirrors the coco-caption wrapper.
    return sanitize(text).replace("|||", "").replace("  ", " ")


class Meteor:
    """A running METEOR 1.5 process. Start it early (JVM and paraphrase table take seconds to load),
    call :meth:`score` once, and it exits."""

    def __init__(self) -> None:
        java = require_java()
        folder = pycocoevalcap_dir() / "meteor"
        self._stderr = tempfile.TemporaryFile()
        # file.encoding pins stdin to UTF-8 whatever the locale (the same as the usual UTF-8 locale).
        self._proc = subprocess.Popen(
            [java, "-Dfile.encoding=UTF-8", "-jar", "-Xmx2G", str(folder / "meteor-1.5.jar"),
             "-", "-", "-stdio", "-l", "en", "-norm"],
            cwd=folder, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr,
            text=True, encoding="utf-8")

    def _read_line(self) -> str:
        line = self._proc.stdout.readline()
        if not line:
            self._proc.wait()
            self._stderr.seek(0)
            err = self._stderr.read().decode(errors="replace")[:1500]
            raise RuntimeError(f"METEOR stopped unexpectedly (exit {self._proc.returncode}): {err}")
        return line.strip()

    def score(self, hyps: list[str], refs: list[list[str]]) -> tuple[float, list[float]]:
        """Corpus METEOR (from pooled statistics, not a mean) and per-image scores."""
        if not hyps:
            self.close()
            return 0.0, []
        stdin = self._proc.stdin
        lines = ["SCORE ||| " + " ||| ".join(map(_meteor_field, r)) + " ||| " + _meteor_field(h) + "\n"
                 for h, r in zip(hyps, refs)]

        def feed() -> None:
            try:
                stdin.writelines(lines)
                stdin.flush()
            except BrokenPipeError:  # the reader reports the failure with METEOR's stderr
                pass

        writer = threading.Thread(target=feed, daemon=True)
        writer.start()  # a thread, because METEOR answers while we are still writing
        try:
            stats = [self._read_line() for _ in hyps]
            writer.join()
            stdin.write("EVAL ||| " + " ||| ".join(stats) + "\n")
            stdin.close()
            per_image = [float(self._read_line()) for _ in hyps]
            corpus = float(self._read_line())
        finally:
            self.close()
        return corpus, per_image

    def close(self) -> None:
        if self._proc.poll() is None:
            try:
                self._proc.stdin.close()
                self._proc.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                self._proc.kill()
                self._proc.wait()
        self._stderr.close()

    def __enter__(self) -> Meteor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def spice_unavailable_reason(lib_dir: Path | None = None) -> str | None:
    """None when SPICE can run offline, else a one-line instruction for enabling it."""
    if shutil.which("java") is None:
        return "SPICE needs Java: install default-jre-headless"
    lib_dir = lib_dir or pycocoevalcap_dir() / "spice" / "lib"
    missing = [name for name in SPICE_CORENLP_JARS if not (lib_dir / name).is_file()]
    if missing:
        return (f"SPICE needs Stanford CoreNLP 3.6.0: copy {' and '.join(missing)} (from "
                f"stanford-corenlp-full-2015-12-09.zip) into {lib_dir}")
    return None


def spice(hyps: list[str], refs: list[list[str]], cache_dir: Path | None = None) -> tuple[float, list[float]]:
    """Corpus SPICE (mean of the per-image 'All' F-scores, NaN-propagating as in pycocoevalcap)."""
    java = require_java()
    folder = pycocoevalcap_dir() / "spice"
    cache_dir = cache_dir or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "beit3cap" / "spice"
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="beit3cap-spice-") as tmp:
        src, out = Path(tmp) / "input.json", Path(tmp) / "output.json"
        src.write_text(json.dumps([{"image_id": i, "test": h, "refs": r}
                                   for i, (h, r) in enumerate(zip(hyps, refs))]), encoding="utf-8")
        proc = subprocess.run([java, "-jar", "-Xmx8G", str(folder / "spice-1.0.jar"), str(src),
                               "-cache", str(cache_dir), "-out", str(out), "-subset", "-silent"],
                              cwd=folder, capture_output=True, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"SPICE failed (exit {proc.returncode}): "
                               f"{proc.stderr.decode(errors='replace')[:1500]}")
        results = json.loads(out.read_text(encoding="utf-8"))

    def f_score(item: dict) -> float:
        try:
            return float(item["scores"]["All"]["f"])
        except (TypeError, ValueError):
            return math.nan

    by_index = {int(item["image_id"]): f_score(item) for item in results}
    per_image = [by_index.get(i, math.nan) for i in range(len(hyps))]
    return sum(per_image) / len(per_image) if per_image else 0.0, per_image
