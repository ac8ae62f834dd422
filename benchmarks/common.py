"""Shared by the benchmark scripts: a description of the machine and appending a section to BENCHMARKS.md."""

from __future__ import annotations

import datetime as _dt
import os
import platform
import re
from pathlib import Path

BENCHMARKS_MD = Path(__file__).resolve().parents[1] / "BENCHMARKS.md"


def _cpuinfo() -> tuple[str, set[str]]:
    """The CPU's model name and feature flags (empty where /proc/cpuinfo cannot be read)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown CPU", set()
    name = re.search(r"model name\s*:\s*(.+)", info)
    flags = re.search(r"^flags\s*:\s*(.+)$", info, re.M)
    return (name.group(1).strip() if name else "unknown CPU"), (set(flags.group(1).split()) if flags else set())


def bf16_units() -> str:
    """On AMX CPUs bf16 matrix products run several times faster than fp32; without AMX (avx512_bf16 at
    most) slower, so the same benchmark can flip sign from one machine to the next."""
    flags = _cpuinfo()[1]
    return "AMX" if "amx_bf16" in flags else ("avx512_bf16, no AMX" if "avx512_bf16" in flags else "no bf16 units")


def machine_summary() -> str:
    """One sentence naming the CPU (with its bf16 units), Python, torch and its threads, and the date."""
    import torch
    cpu = _cpuinfo()[0]
    bf16 = bf16_units()
    return (f"Machine: {os.cpu_count()} cores ({cpu}; {bf16}), Python {platform.python_version()}, "
            f"torch {torch.__version__}, {torch.get_num_threads()} torch threads; measured "
            f"{_dt.date.today().isoformat()}.")


def append_section(title: str, body: str) -> None:
    """Replace the section called ``title`` in BENCHMARKS.md (or add it), leaving the others as they are."""
    text = BENCHMARKS_MD.read_text() if BENCHMARKS_MD.exists() else "# Benchmarks\n"
    heading = f"## {title}"
    pattern = re.compile(rf"^{re.escape(heading)}\n.*?(?=^## |\Z)", re.S | re.M)
    section = f"{heading}\n\n{body.strip()}\n\n"
    text = pattern.sub(lambda _: section, text) if pattern.search(text) else text.rstrip() + "\n\n" + section
    BENCHMARKS_MD.write_text(text)


def flop_counter():
    """torch's FlopCounterMode, also counting the CPU attention kernels (SDPA on the CPU), which its formula
    table leaves out: without them our model's arithmetic would be undercounted next to a reference that
    computes attention with plain matrix products."""
    from torch.utils import flop_counter as fc
    aten = __import__("torch").ops.aten
    cpu = {aten._scaled_dot_product_flash_attention_for_cpu:
           lambda q, k, v, *_, out_shape=None, **__: fc.sdpa_flop_count(q, k, v),
           aten._scaled_dot_product_flash_attention_for_cpu_backward:
           lambda grad, q, k, v, *_, out_shape=None, **__: fc.sdpa_backward_flop_count(grad, q, k, v)}
    return fc.FlopCounterMode(display=False, custom_mapping=cpu)
