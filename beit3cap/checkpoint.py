"""Read and write BEiT-3 checkpoints in the layout of the official code (microsoft/unilm ``beit3``).

Reading never runs code from a file. Torch files go through torch's weights-only unpickler, which only
rebuilds tensors and builtin containers, plus the classes in ``SAFE_GLOBALS``; anything else is refused
with an ``UnsafeCheckpointError`` naming the refused global. safetensors files hold no code at all.

Accepted inputs (recognised by content, not by name): a ``torch.save`` file (``.pth``/``.pt``/``.bin``,
also when saved under a ``.zip`` name), a real zip archive wrapping one such file, a ``.safetensors``
file, a DeepSpeed checkpoint directory (``checkpoint-N/mp_rank_00_model_states.pt``, or its parent
holding a ``latest`` file), and a directory holding an unpacked torch archive (Kaggle unpacks uploaded
``.pth`` files, which are zip archives).
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import math
import os
import pickle
import re
import shutil
import tempfile
import urllib.parse
import zipfile
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from beit3cap.fileio import atomic_write
from beit3cap.model import MODEL_CONFIGS, BEiT3Config, BEiT3ForCaptioning, get_config, resolve_model_name

# The only non-builtin class official files carry: the argparse ``args`` saved by ``utils.save_model``
# and by the DeepSpeed ``client_state``. DeepSpeed's fp16 optimizer state (ZeRO stage 0, the official
# setting) is plain data, and ZeRO optimizer shards live in files this module never reads.
SAFE_GLOBALS: list[type] = [argparse.Namespace]

POSITION_KEY = "beit3.encoder.embed_positions.A.weight"
DEEPSPEED_MODEL_FILE = "mp_rank_00_model_states.pt"
_LEADING_ROWS = 3  # two unused fairseq rows + CLS precede the patch rows of table A
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DDP/DeepSpeed wrappers and torch.compile
_LAYER_RE = re.compile(r"^(?:beit3\.)?encoder\.layers\.(\d+)\.")
_PLAIN_TYPES = (type(None), bool, int, float, complex, str, bytes, torch.Size, torch.dtype, torch.device)


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file."""


class UnsafeCheckpointError(CheckpointError):
    """The file references a Python global outside the allow-list: unpickling it could run code."""


class CheckpointMismatchError(CheckpointError):
    """The weights belong to a different architecture (size, depth, vocabulary) than the model."""


# ----------------------------------------------------------------------------------------------------
# Reading files


def load_checkpoint_file(path: str | os.PathLike) -> Any:
    """The object stored in a checkpoint file or directory, with every tensor on the CPU. An http(s)
    URL is downloaded once into torch's hub cache (``$TORCH_HOME/hub/checkpoints``), as officially."""
    if str(path).startswith(("https://", "http://")):
        path = _download(str(path))
    path = Path(path)
    if not path.exists():
        near = [p.name for p in (path.with_name(path.name + s) for s in (".pth", ".pt", ".bin")) if p.exists()]
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        raise FileNotFoundError(errno.ENOENT, f"checkpoint not found{hint}", str(path))
    if path.is_dir():
        return _load_directory(path)
    return _load_file(path, str(path), allow_wrapped=True)


def _download(url: str) -> Path:
    target = Path(torch.hub.get_dir()) / "checkpoints" / Path(urllib.parse.urlparse(url).path).name
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(url, str(target), progress=True)  # via a temp file, then renamed
    return target


def _load_file(path: Path, shown: str, allow_wrapped: bool) -> Any:
    kind = _sniff(path, shown)
    if kind == "safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            return load_file(path, device="cpu")
        except SafetensorError as e:
            raise CheckpointError(f"{shown}: unreadable safetensors file ({e}); it is truncated or corrupt") from e
    if kind == "zip" and not _is_torch_archive(_zip_names(path, shown)):
        if not allow_wrapped:
            raise CheckpointError(f"{shown}: a zip archive inside a zip archive is not supported")
        return _load_wrapped(path, shown)
    return _torch_load(path, shown)


def _sniff(path: Path, shown: str) -> str:
    with open(path, "rb") as f:
        head = f.read(64)
    if not head:
        raise CheckpointError(f"{shown}: empty file (0 bytes); the download or copy probably failed")
    if head.startswith(b"PK"):
        return "zip"
    if head[0] == 0x80 and 2 <= head[1] <= 5:  # a pickle: torch's legacy (pre-1.6) format
        return "pickle"
    if head[8:10] == b'{"':  # 8-byte header length, then the JSON header
        return "safetensors"
    raise CheckpointError(
        f"{shown} is not a checkpoint: it looks like {_describe(head)} (first bytes {head[:12]!r}). Expected a "
        "torch.save file (.pth/.pt/.bin), a .safetensors file or a DeepSpeed checkpoint directory.")


def _describe(head: bytes) -> str:
    signatures = {b"\xff\xd8\xff": "a JPEG image", b"\x89PNG": "a PNG image", b"GIF8": "a GIF image",
                  b"\x1f\x8b": "a gzip archive", b"version https://git-lfs":
                  "a Git LFS pointer, not the weights (fetch them with `git lfs pull`)"}
    for magic, what in signatures.items():
        if head.startswith(magic):
            return what
    if head.lstrip().lower().startswith((b"<!doctype html", b"<html")):
        return "an HTML page (the download saved an error or login page)"
    if all(b >= 32 or b in b"\t\n\r" for b in head):  # no control bytes: text in any ASCII-based encoding
        return "a text file"
    return "unknown binary data"


def _zip_names(path: Path, shown: str) -> list[str]:
    try:
        with zipfile.ZipFile(path) as zf:
            return [info.filename for info in zf.infolist() if not info.is_dir()]
    except zipfile.BadZipFile as e:
        raise CheckpointError(f"{shown}: truncated or corrupt ({e}; {path.stat().st_size} bytes); "
                              "the download or copy is probably incomplete") from e


def _is_torch_archive(names: list[str]) -> bool:
    return any(n.count("/") == 1 and n.endswith("/data.pkl") for n in names)


def _load_wrapped(path: Path, shown: str) -> Any:
    names = _zip_names(path, shown)
    found = [n for n in names if Path(n).suffix.lower() in (".pth", ".pt", ".bin", ".safetensors")]
    member = found[0] if len(found) == 1 else names[0] if len(names) == 1 else None
    if member is None:
        raise CheckpointError(f"{shown}: a zip archive of {len(names)} files ({', '.join(names[:5])}); "
                              "expected exactly one checkpoint file inside")
    with tempfile.TemporaryDirectory(prefix="beit3cap-") as tmp:
        inner = Path(tmp) / "inner"  # our own name: member paths are never used on disk
        try:
            with zipfile.ZipFile(path) as zf, zf.open(member) as src, open(inner, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        except (zipfile.BadZipFile, EOFError) as e:
            raise CheckpointError(f"{shown}!{member}: truncated or corrupt ({e})") from e
        return _load_file(inner, f"{shown}!{member}", allow_wrapped=False)


def _load_directory(path: Path) -> Any:
    if not (path / DEEPSPEED_MODEL_FILE).is_file() and (path / "latest").is_file():
        tag = (path / "latest").read_text().strip()  # a DeepSpeed output_dir: follow its tag
        if not (path / tag).is_dir():
            raise CheckpointError(f"{path / 'latest'} names the tag {tag!r}, but {path / tag} does not exist")
        path = path / tag
    if (path / DEEPSPEED_MODEL_FILE).is_file():
        return _load_file(path / DEEPSPEED_MODEL_FILE, str(path / DEEPSPEED_MODEL_FILE), allow_wrapped=False)
    roots = [d for d in (path, *sorted(p for p in path.iterdir() if p.is_dir())) if (d / "data.pkl").is_file()]
    if len(roots) == 1:
        return _load_unpacked_archive(roots[0], str(path))
    entries = sorted(p.name for p in path.iterdir())[:8]
    raise CheckpointError(f"{path} is a directory but not a checkpoint: expected {DEEPSPEED_MODEL_FILE} "
                          "(DeepSpeed), a 'latest' file, or an unpacked torch archive (data.pkl); "
                          f"found {entries}")


def _load_unpacked_archive(root: Path, shown: str) -> Any:
    """Re-pack an unpacked torch zip archive (stored, not compressed) and load that."""
    with tempfile.TemporaryDirectory(prefix="beit3cap-") as tmp:
        packed = Path(tmp) / "archive.pth"
        with zipfile.ZipFile(packed, "w", zipfile.ZIP_STORED) as zf:
            for f in sorted(p for p in root.rglob("*") if p.is_file()):
                info = zipfile.ZipInfo("archive/" + f.relative_to(root).as_posix())  # 1980 timestamp
                with open(f, "rb") as src, zf.open(info, "w", force_zip64=f.stat().st_size >= 2**31) as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
        return _torch_load(packed, shown)


def _torch_load(path: Path, shown: str) -> Any:
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        refused = _refused_global(str(e))
        if refused:
            allowed = ", ".join(f"{c.__module__}.{c.__qualname__}" for c in SAFE_GLOBALS)
            raise UnsafeCheckpointError(
                f"{shown}: refused to load: the file references the Python global {refused!r}, which is not "
                f"on the allow-list (tensors, builtin containers, {allowed}). Unpickling it could run code "
                "from the file, so nothing was executed. If the file is your own, re-save its tensors as "
                "plain data (dicts of tensors) in a trusted environment.") from e
        raise CheckpointError(f"{shown}: not a readable checkpoint ({_unpickler_detail(e)}); the file is corrupt, "
                              "truncated or not a PyTorch file") from e
    except EOFError as e:
        raise CheckpointError(f"{shown}: truncated (ends too early); the download or copy is incomplete") from e
    except (RuntimeError, OSError, ValueError) as e:
        raise CheckpointError(f"{shown}: cannot be read: {e}") from e


def _unpickler_detail(error: Exception) -> str:
    """The weights-only unpickler's own reason, without torch's advice to disable the check."""
    lines = [line.strip() for line in str(error).splitlines()[1:] if line.strip()]
    keep = [line for line in lines if not line.startswith(("Check the documentation", "(1)", "(2)"))]
    return " ".join(keep).removeprefix("WeightsUnpickler error:").strip() or str(error)


def _refused_global(message: str) -> str | None:
    if not message.startswith("Weights only load failed"):
        return None
    found = re.search(r"GLOBAL ([\w.]+)", message)
    if found:
        return found.group(1)
    found = re.search(r"(?:unrecognized function|but got) ([^\n]+)", message)
    return found.group(1).strip() if found else None


# ----------------------------------------------------------------------------------------------------
# State dicts


def extract_state_dict(obj: Any, model_key: str = "model|module",
                       model_prefix: str = "") -> dict[str, torch.Tensor]:
    """The weights inside a loaded checkpoint: the first of ``model_key`` ('|'-separated) present, else
    the object itself if it is a dict of tensors; keys must start with ``model_prefix`` (stripped); a
    wrapper prefix (``module.``, ``_orig_mod.``) shared by every key is stripped."""
    return _extract(obj, model_key, model_prefix, "checkpoint")[0]


def _extract(obj: Any, model_key: str, model_prefix: str, shown: str) -> tuple[dict[str, torch.Tensor], list[str]]:
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{shown} holds a {type(obj).__name__}, not a dict of weights")
    keys = [k for k in model_key.split("|") if k]
    used = next((k for k in keys if k in obj), None)
    if used is not None:
        weights, notes = obj[used], [f"weights under {used!r}"]
        if not isinstance(weights, Mapping):
            raise CheckpointError(f"{shown}: {used!r} holds a {type(weights).__name__}, not a dict of weights")
    elif obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        weights, notes = obj, ["weights at the top level"]
    else:
        raise CheckpointError(f"{shown}: none of the keys {keys} is present and the top level is not a dict of "
                              f"tensors; its keys are {list(obj)[:10]} (choose one with model_key)")
    sd = {k: v for k, v in weights.items() if isinstance(v, torch.Tensor)}
    if len(sd) < len(weights):
        notes.append(f"ignored {len(weights) - len(sd)} non-tensor entries")
    if model_prefix:
        sd = {k[len(model_prefix):]: v for k, v in sd.items() if k.startswith(model_prefix)}
        notes.append(f"kept keys under model_prefix {model_prefix!r}")
    if not sd:
        raise CheckpointError(f"{shown}: no weights found (model_key {model_key!r}, "
                              f"model_prefix {model_prefix!r})")
    stripped = True
    while stripped:
        stripped = False
        for prefix in _WRAPPER_PREFIXES:
            if all(k.startswith(prefix) for k in sd):
                sd = {k[len(prefix):]: v for k, v in sd.items()}
                notes.append(f"stripped the {prefix!r} prefix")
                stripped = True
    return sd, notes


def _layer_ids(sd: Mapping[str, Any]) -> set[int]:
    return {int(m.group(1)) for k in sd if (m := _LAYER_RE.match(k))}


def interpolate_position_table(table: torch.Tensor, grid: int) -> torch.Tensor:
    """Resize image position table A (3 leading rows + n*n patch rows) to 3 + grid*grid rows like the
    official loader: the leading rows are kept, the patch grid is resized bicubically (align_corners=False)
    in the table's own dtype and device (the CPU for tables read from files)."""
    rows, dim = table.shape
    orig = math.isqrt(max(rows - _LEADING_ROWS, 0))
    if orig * orig != rows - _LEADING_ROWS or orig == 0:
        raise CheckpointError(f"position table of {rows} rows is not 3 + a square number of patches")
    if orig == grid:
        return table
    patches = table[_LEADING_ROWS:].reshape(1, orig, orig, dim).permute(0, 3, 1, 2)
    patches = F.interpolate(patches, size=(grid, grid), mode="bicubic", align_corners=False)
    return torch.cat([table[:_LEADING_ROWS], patches.permute(0, 2, 3, 1).reshape(grid * grid, dim)])


def config_from_state_dict(sd: Mapping[str, torch.Tensor], num_heads: int | None = None) -> BEiT3Config:
    """The architecture implied by the shapes. Heads are not visible in shapes: unless given, they are
    those of the registered model with the same sizes, else embed_dim // 64 (BEiT-3's head size)."""
    prefix = "" if "text_embed.weight" in sd else "beit3."

    def shape(key: str) -> tuple[int, ...]:
        if prefix + key not in sd:
            raise CheckpointError(f"cannot infer the architecture: the weights lack {prefix + key!r}")
        return tuple(sd[prefix + key].shape)

    vocab, dim = shape("text_embed.weight")
    _, in_chans, patch, _ = shape("vision_embed.proj.weight")
    rows = shape("encoder.embed_positions.A.weight")[0]
    grid = math.isqrt(max(rows - _LEADING_ROWS, 0))
    if grid * grid != rows - _LEADING_ROWS or grid == 0:
        raise CheckpointError(f"position table of {rows} rows is not 3 + a square number of patches")
    depth = len(_layer_ids(sd))
    fields = dict(embed_dim=dim, depth=depth, ffn_dim=shape("encoder.layers.0.ffn.A.fc1.weight")[0],
                  img_size=grid * patch, patch_size=patch, in_chans=in_chans, vocab_size=vocab,
                  max_text_positions=shape("encoder.embed_positions.B.weight")[0])
    if num_heads is None:
        same = [c.num_heads for c in MODEL_CONFIGS.values() if _same_size(c, fields)]
        num_heads = same[0] if same else dim // 64
        if num_heads == 0 or dim % num_heads:
            raise CheckpointError(f"cannot infer num_heads for embed_dim {dim}; pass num_heads")
    return BEiT3Config(num_heads=num_heads, **fields)


def _same_size(cfg: BEiT3Config, fields: Mapping[str, int]) -> bool:
    return all(getattr(cfg, f) == fields[f] for f in ("embed_dim", "depth", "ffn_dim", "patch_size"))


def _describe_config(cfg: BEiT3Config) -> str:
    return (f"embed_dim {cfg.embed_dim}, depth {cfg.depth}, ffn_dim {cfg.ffn_dim}, {cfg.img_size} px, "
            f"patch {cfg.patch_size}, vocab_size {cfg.vocab_size}")


def _fitting_models(cfg: BEiT3Config) -> list[str]:
    """Registered names with the checkpoint's sizes, same image size first (others need interpolation)."""
    same = [n for n, c in MODEL_CONFIGS.items() if _same_size(c, dataclasses.asdict(cfg))]
    return sorted(same, key=lambda n: MODEL_CONFIGS[n].img_size != cfg.img_size)


# ----------------------------------------------------------------------------------------------------
# Loading into a model


@dataclasses.dataclass
class KeyReport:
    """What ``load_pretrained`` did; ``str(report)`` is the printed summary."""

    source: str
    loaded: list[str]
    missing: list[str]  # model keys the checkpoint lacks (left as initialised)
    unexpected: list[str]  # checkpoint keys the model lacks (ignored), e.g. mim_head.* of pretraining
    interpolated: dict[str, tuple[tuple[int, ...], tuple[int, ...]]]
    notes: list[str]

    def __str__(self) -> str:
        lines = [f"Loaded {len(self.loaded)} tensors from {self.source} ({'; '.join(self.notes)})"]
        lines += [f"Interpolated {k}: {list(a)} -> {list(b)}" for k, (a, b) in self.interpolated.items()]
        if self.missing:
            lines.append(f"Weights of the model not initialized from the checkpoint: {self.missing}")
        if self.unexpected:
            lines.append(f"Weights from the checkpoint not used by the model: {self.unexpected}")
        return "\n".join(lines)


def load_pretrained(model: nn.Module, path_or_state_dict: str | os.PathLike | Mapping[str, Any],
                    model_key: str = "model|module", model_prefix: str = "", strict: bool = False,
                    verbose: bool = True, source: str | None = None) -> KeyReport:
    """Load the matching weights of a checkpoint file (or an already loaded checkpoint / state dict)
    into ``model``, like the official ``load_model_and_may_interpolate``: position table A is resized to
    the model's grid, tensors are cast to the model's dtypes, missing and unused keys are reported (and
    with ``strict`` refused). Weights of another size, depth or vocabulary raise CheckpointMismatchError
    before anything is loaded. ``source`` names an already loaded object in messages (e.g. its path)."""
    if isinstance(path_or_state_dict, Mapping):
        obj, shown = path_or_state_dict, source or "the given state dict"
    else:
        obj, shown = load_checkpoint_file(path_or_state_dict), source or str(path_or_state_dict)
    report = _load_into(model, obj, shown, model_key, model_prefix, strict)
    if verbose:
        print(report)
    return report


def _load_into(model: nn.Module, obj: Any, shown: str, model_key: str, model_prefix: str,
               strict: bool) -> KeyReport:
    sd, notes = _extract(obj, model_key, model_prefix, shown)
    expected = model.state_dict()
    if "text_embed.weight" in sd and "beit3.text_embed.weight" in expected:  # a bare torchscale backbone
        sd = {f"beit3.{k}": v for k, v in sd.items()}
        notes.append("added the 'beit3.' prefix of the captioning wrapper")
    interpolated = {}
    if POSITION_KEY in sd and POSITION_KEY in expected:
        old, want = sd[POSITION_KEY], expected[POSITION_KEY]
        if old.shape != want.shape and old.shape[1:] == want.shape[1:]:
            sd[POSITION_KEY] = interpolate_position_table(old, math.isqrt(want.shape[0] - _LEADING_ROWS))
            interpolated[POSITION_KEY] = (tuple(old.shape), tuple(sd[POSITION_KEY].shape))
    _check_fits(model, expected, sd, shown)
    loaded = [k for k in expected if k in sd]
    report = KeyReport(shown, loaded, [k for k in expected if k not in sd],
                       [k for k in sd if k not in expected], interpolated, notes)
    if not loaded:
        raise CheckpointMismatchError(f"{shown}: no key matches the model (checkpoint keys look like "
                                      f"{list(sd)[:3]}; model keys like {list(expected)[:3]})")
    if strict and (report.missing or report.unexpected):
        raise CheckpointMismatchError(f"{shown}: strict load refused\n{report}")
    cast = sorted({f"{sd[k].dtype} -> {expected[k].dtype}".replace("torch.", "")
                   for k in loaded if sd[k].dtype != expected[k].dtype})
    if cast:
        notes.append("cast " + ", ".join(cast))
    model.load_state_dict({k: sd[k].to(expected[k].dtype) for k in loaded}, strict=False)
    return report


def _check_fits(model: nn.Module, expected: Mapping[str, torch.Tensor], sd: Mapping[str, torch.Tensor],
                shown: str) -> None:
    bad = [(k, list(expected[k].shape), list(v.shape)) for k, v in sd.items()
           if k in expected and v.shape != expected[k].shape]
    depth_differs = _layer_ids(sd) and _layer_ids(sd) != _layer_ids(expected)
    if not bad and not depth_differs:
        return
    lines = [f"{shown} does not fit the model"]
    if isinstance(model, BEiT3ForCaptioning):
        names = _fitting_models(model.config)
        name = f"{names[0]}, " if names and MODEL_CONFIGS[names[0]].img_size == model.config.img_size else ""
        lines[0] += f" ({name}{_describe_config(model.config)})"
    lines[0] += ":"
    lines += [f"  {k}: model {a}, checkpoint {b}" for k, a, b in bad[:5]]
    if len(bad) > 5:
        lines.append(f"  ... and {len(bad) - 5} more mismatched shapes")
    if depth_differs:
        lines.append(f"  depth: model {len(_layer_ids(expected))} layers, checkpoint {len(_layer_ids(sd))}")
    try:
        cfg = config_from_state_dict(sd)
    except CheckpointError:
        raise CheckpointMismatchError("\n".join(lines)) from None
    names = _fitting_models(cfg)
    fits = (f"it fits {names[0]} with vocab_size {cfg.vocab_size}" if names else
            "no registered model has these sizes (build a BEiT3Config with them)")
    lines.append(f"The checkpoint is {_describe_config(cfg)}: {fits}.")
    raise CheckpointMismatchError("\n".join(lines))


def _arg(args: Any, name: str) -> Any:
    return args.get(name) if isinstance(args, Mapping) else getattr(args, name, None)


def model_from_checkpoint(path: str | os.PathLike, model_name: str | None = None,
                          **overrides: Any) -> tuple[BEiT3ForCaptioning, KeyReport]:
    """Build the model a checkpoint was made for and load it (eval mode). The architecture comes from
    ``model_name``, else from the ``args.model`` stored by training, else from the weights' shapes; the
    vocabulary size comes from the stored args or the weights unless overridden."""
    obj = load_checkpoint_file(path)
    sd = extract_state_dict(obj)
    inferred = config_from_state_dict(sd, num_heads=overrides.get("num_heads"))
    args = obj.get("args") if isinstance(obj, Mapping) else None
    stored = _arg(args, "model") if args is not None else None
    if model_name is None and isinstance(stored, str):
        try:
            resolve_model_name(stored)
            model_name = stored
        except ValueError:
            pass  # a name this project does not register: the shapes decide
    if model_name is not None:
        vocab = (_arg(args, "vocab_size") if args is not None else None) or inferred.vocab_size
        config = get_config(model_name, **{"vocab_size": vocab, **overrides})
    else:
        config = dataclasses.replace(inferred, **overrides)
    model = BEiT3ForCaptioning(config)
    return model.eval(), _load_into(model, obj, str(path), "model|module", "", strict=False)


# ----------------------------------------------------------------------------------------------------
# Writing


def plain_args(args: Any) -> dict[str, Any]:
    """Training arguments as a dict of builtins (paths become strings, numpy scalars Python numbers)."""
    if isinstance(args, argparse.Namespace):
        args = vars(args)
    elif dataclasses.is_dataclass(args) and not isinstance(args, type):
        args = dataclasses.asdict(args)
    if not isinstance(args, Mapping):
        raise TypeError(f"args must be an argparse.Namespace, a dataclass or a dict, not {type(args).__name__}")

    def plain(v: Any) -> Any:
        if isinstance(v, os.PathLike):
            return os.fspath(v)
        if type(v).__module__ == "numpy" and hasattr(v, "item") and getattr(v, "ndim", 1) == 0:
            return v.item()
        if type(v) in (list, tuple):
            return type(v)(plain(x) for x in v)
        if isinstance(v, Mapping):
            return {k: plain(x) for k, x in v.items()}
        return v

    return {k: plain(v) for k, v in args.items()}


def _check_plain(obj: Any, where: str) -> None:
    if isinstance(obj, torch.Tensor) or type(obj) in _PLAIN_TYPES:
        return
    if type(obj) in (dict, OrderedDict):
        for k, v in obj.items():
            _check_plain(k, f"a key of {where}")
            _check_plain(v, f"{where}[{k!r}]")
    elif type(obj) in (list, tuple, set):
        for i, v in enumerate(obj):
            _check_plain(v, f"{where}[{i}]")
    else:
        raise TypeError(f"{where} is a {type(obj).__module__}.{type(obj).__qualname__}: checkpoints hold plain "
                        "data only (tensors, numbers, strings, lists, dicts), so that "
                        "torch.load(weights_only=True) reads them; convert it first (e.g. vars(namespace), "
                        "str(path), array.tolist())")


def save_checkpoint(path: str | os.PathLike, payload: Mapping[str, Any]) -> Path:
    """Write a training checkpoint in the official layout (``model``, ``optimizer``, ``epoch``,
    ``scaler``, ``args``, optional ``model_ema``, plus any extra keys) atomically: a crash leaves the
    previous file intact. ``args`` is stored as a plain dict; everything must be plain data."""
    if "model" not in payload:
        raise ValueError("a checkpoint payload needs a 'model' state dict")
    out = dict(payload)
    if out.get("args") is not None:
        out["args"] = plain_args(out["args"])
    _check_plain(out, "payload")
    return atomic_write(path, lambda f: torch.save(out, f), mode="wb")


def save_weights_safetensors(model: nn.Module, path: str | os.PathLike) -> Path:
    """Export the model's weights (only) as a safetensors file, atomically."""
    from safetensors.torch import save
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    data = save(tensors, metadata={"format": "pt"})
    return atomic_write(path, lambda f: f.write(data), mode="wb")
