"""Checkpoint reading, adapting and writing, on real files in the official layouts (tiny random models)."""

from __future__ import annotations

import argparse
import functools
import http.server
import os
import pickle
import random
import subprocess
import sys
import threading
import zipfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from beit3cap.checkpoint import (
    POSITION_KEY, CheckpointError, CheckpointMismatchError, UnsafeCheckpointError, config_from_state_dict,
    extract_state_dict, load_checkpoint_file, load_pretrained, model_from_checkpoint, save_checkpoint,
    save_weights_safetensors,
)
from beit3cap.model import MODEL_CONFIGS, create_model, get_config

VOCAB = 100


def tiny(img_size: int = 32, **overrides):
    torch.manual_seed(img_size + len(overrides))
    return create_model("beit3_tiny_patch16_32", img_size=img_size, vocab_size=VOCAB, **overrides)


def pretrained_layout(model) -> dict[str, torch.Tensor]:
    """What the official pretrained files hold under 'model': backbone, mlm_head and a mim_head."""
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    dim = model.config.embed_dim
    sd["mim_head.weight"] = torch.randn(32, dim)
    sd["mim_head.bias"] = torch.randn(32)
    return sd


def assert_weights_equal(model, sd, skip=()):
    for k, v in model.state_dict().items():
        if k not in skip:
            torch.testing.assert_close(v, sd[k].to(v.dtype), rtol=0, atol=0, msg=k)


def direct_bicubic(table: torch.Tensor, grid: int) -> torch.Tensor:
    n = int((table.shape[0] - 3) ** 0.5)
    x = table[3:].reshape(1, n, n, -1).permute(0, 3, 1, 2)
    x = F.interpolate(x, size=(grid, grid), mode="bicubic", align_corners=False)
    return x.permute(0, 2, 3, 1).reshape(grid * grid, -1)


# ----------------------------------------------------------------------------------------------------
# The pretrained layout, interpolation, dtypes


def test_pretrained_file_with_zip_name_is_interpolated_to_a_larger_model(tmp_path, capsys):
    src = tiny(img_size=64)  # grid 4: plays the 224-px pretrained file
    sd = pretrained_layout(src)
    path = tmp_path / "beit3_tiny_patch16_64.zip"  # a torch file saved under a .zip name
    torch.save({"model": sd}, path)

    dst = tiny(img_size=96)  # grid 6: plays the 480-px captioning model
    report = load_pretrained(dst, path)

    assert report.unexpected == ["mim_head.weight", "mim_head.bias"]
    assert report.missing == []
    assert len(report.loaded) == len(dst.state_dict())
    assert "mim_head.weight" in capsys.readouterr().out
    table, old = dst.state_dict()[POSITION_KEY], sd[POSITION_KEY]
    assert report.interpolated == {POSITION_KEY: ((19, 64), (39, 64))}
    assert table.shape == (3 + 36, 64)
    torch.testing.assert_close(table[:3], old[:3], rtol=0, atol=0)
    torch.testing.assert_close(table[3:], direct_bicubic(old, 6), rtol=0, atol=0)
    assert not torch.allclose(table[3:3 + 4], old[3:7])  # the grid really was resampled
    assert_weights_equal(dst, sd, skip={POSITION_KEY})


def test_fp16_checkpoint_is_interpolated_in_its_dtype_and_cast_to_the_model(tmp_path):
    sd = {k: v.half() for k, v in tiny(img_size=32).state_dict().items()}
    torch.save({"model": sd}, tmp_path / "half.pth")
    dst = tiny(img_size=64)
    report = load_pretrained(dst, tmp_path / "half.pth", verbose=False)
    assert any("float16 -> float32" in n for n in report.notes)
    assert all(v.dtype == torch.float32 for v in dst.state_dict().values())
    expected = direct_bicubic(sd[POSITION_KEY], 4).float()  # computed in fp16, then cast
    torch.testing.assert_close(dst.state_dict()[POSITION_KEY][3:], expected, rtol=0, atol=0)
    assert_weights_equal(dst, sd, skip={POSITION_KEY})


# ----------------------------------------------------------------------------------------------------
# Layouts: keys, prefixes, formats, directories


@pytest.mark.parametrize("layout", ["model", "module", "top", "ddp_prefix", "model_prefix", "bare_backbone"])
def test_weight_layouts(tmp_path, layout):
    src = tiny()
    sd = src.state_dict()
    prefix = ""
    if layout == "model":
        obj = {"model": sd, "epoch": 3}
    elif layout == "module":
        obj = {"module": sd, "global_steps": 7}
    elif layout == "top":
        obj = dict(sd)
    elif layout == "ddp_prefix":
        obj = {"model": {f"module.{k}": v for k, v in sd.items()}}
    elif layout == "model_prefix":
        obj = {"model": {**{f"student.{k}": v for k, v in sd.items()}, "teacher.x": torch.zeros(1)}}
        prefix = "student."
    else:  # a bare torchscale backbone: keys without 'beit3.', no mlm_head
        obj = {k.removeprefix("beit3."): v for k, v in sd.items() if k.startswith("beit3.")}
    torch.save(obj, tmp_path / "ckpt.pth")

    assert set(extract_state_dict(load_checkpoint_file(tmp_path / "ckpt.pth"), model_prefix=prefix)) \
        == ({k.removeprefix("beit3.") for k in obj} if layout == "bare_backbone" else set(sd))
    dst = tiny()
    report = load_pretrained(dst, tmp_path / "ckpt.pth", model_prefix=prefix, verbose=False)
    assert report.unexpected == []
    assert report.missing == (["mlm_head.weight", "mlm_head.bias"] if layout == "bare_backbone" else [])
    assert_weights_equal(dst, sd, skip=set(report.missing))


def test_missing_model_key_names_the_available_keys(tmp_path):
    torch.save({"weights": tiny().state_dict(), "epoch": 1}, tmp_path / "odd.pth")
    with pytest.raises(CheckpointError, match=r"odd\.pth.*\['weights', 'epoch'\]"):
        load_pretrained(tiny(), tmp_path / "odd.pth")
    report = load_pretrained(tiny(), tmp_path / "odd.pth", model_key="weights", verbose=False)
    assert report.missing == [] and report.unexpected == []


def test_safetensors_export_loads_back(tmp_path):
    src = tiny()
    path = save_weights_safetensors(src, tmp_path / "weights.safetensors")
    assert list(tmp_path.iterdir()) == [path]  # no temp file left behind
    dst = tiny()
    report = load_pretrained(dst, path, verbose=False)
    assert report.notes[0] == "weights at the top level" and not report.missing
    assert_weights_equal(dst, src.state_dict())


def test_deepspeed_checkpoint_directory(tmp_path):
    src = tiny()
    args = argparse.Namespace(model="beit3_tiny_patch16_32", vocab_size=VOCAB, lr=4e-5, enable_deepspeed=True)
    state = {  # the fields DeepSpeed's save_checkpoint writes, with fp16 module weights (ZeRO 0)
        "module": {k: v.half() for k, v in src.state_dict().items()}, "buffer_names": [],
        "optimizer": {"dynamic_loss_scale": True, "cur_scale": 65536.0, "cur_iter": 10,
                      "optimizer_state_dict": {"state": {}, "param_groups": [{"lr": 4e-5, "params": [0]}]},
                      "fp32_groups_flat": [torch.zeros(4)], "clip_grad": 0.0},
        "param_shapes": None, "lr_scheduler": None, "sparse_tensor_module_names": set(), "skipped_steps": 0,
        "global_steps": 10, "global_samples": 20, "dp_world_size": 1, "mp_world_size": 1,
        "ds_config": {"train_batch_size": 2, "fp16": {"enabled": True}}, "ds_version": "0.4.0",
        "epoch": 3, "args": args,
    }
    tag = tmp_path / "out" / "checkpoint-3"
    tag.mkdir(parents=True)
    torch.save(state, tag / "mp_rank_00_model_states.pt")
    (tmp_path / "out" / "latest").write_text("checkpoint-3")

    for path in (tag, tmp_path / "out"):  # the tag directory, or the output_dir with its 'latest' file
        assert load_checkpoint_file(path)["args"].lr == 4e-5
        model, report = model_from_checkpoint(path)
        assert model.config == get_config("beit3_tiny_patch16_32", vocab_size=VOCAB)
        assert report.notes[0] == "weights under 'module'" and not report.missing and not report.unexpected
        assert_weights_equal(model, state["module"])
    (tmp_path / "out" / "latest").write_text("checkpoint-9")
    with pytest.raises(CheckpointError, match="names the tag 'checkpoint-9'"):
        load_checkpoint_file(tmp_path / "out")


def test_unpacked_torch_archive_directory(tmp_path):
    """Kaggle unpacks an uploaded .pth (a zip archive) into a folder; the seed's --finetune points at it."""
    src = tiny()
    torch.save({"model": src.state_dict()}, tmp_path / "beit3.pth")
    with zipfile.ZipFile(tmp_path / "beit3.pth") as zf:
        zf.extractall(tmp_path / "beit3_base_patch16_224")  # holds beit3/data.pkl, beit3/data/0, ...
    for folder in (tmp_path / "beit3_base_patch16_224", tmp_path / "beit3_base_patch16_224" / "beit3"):
        dst = tiny()
        load_pretrained(dst, folder, verbose=False)
        assert_weights_equal(dst, src.state_dict())


def test_real_zip_archive_wrapping_one_checkpoint(tmp_path):
    src = tiny()
    torch.save({"model": src.state_dict()}, tmp_path / "inner.pth")
    with zipfile.ZipFile(tmp_path / "download.zip", "w", zipfile.ZIP_DEFLATED) as zf:
        zf.write(tmp_path / "inner.pth", "beit3/beit3_tiny.pth")
        zf.writestr("beit3/README.txt", "weights")
    dst = tiny()
    load_pretrained(dst, tmp_path / "download.zip", verbose=False)
    assert_weights_equal(dst, src.state_dict())

    with zipfile.ZipFile(tmp_path / "two.zip", "w") as zf:
        zf.write(tmp_path / "inner.pth", "a.pth")
        zf.write(tmp_path / "inner.pth", "b.pth")
    with pytest.raises(CheckpointError, match=r"two\.zip.*2 files"):
        load_checkpoint_file(tmp_path / "two.zip")


def test_https_style_url_is_downloaded_once_into_the_hub_cache(tmp_path, monkeypatch):
    src = tiny()
    (tmp_path / "site").mkdir()
    torch.save({"model": src.state_dict()}, tmp_path / "site" / "beit3_tiny.pth")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path / "site"))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/beit3_tiny.pth"
        dst = tiny()
        load_pretrained(dst, url, verbose=False)
    finally:
        server.shutdown()
    assert_weights_equal(dst, src.state_dict())
    assert (tmp_path / "torch" / "hub" / "checkpoints" / "beit3_tiny.pth").is_file()
    load_pretrained(tiny(), url, verbose=False)  # the server is gone: the cached copy is used


def test_legacy_torch_format(tmp_path):
    src = tiny()
    torch.save({"model": src.state_dict()}, tmp_path / "old.pth", _use_new_zipfile_serialization=False)
    dst = tiny()
    load_pretrained(dst, tmp_path / "old.pth", verbose=False)
    assert_weights_equal(dst, src.state_dict())


# ----------------------------------------------------------------------------------------------------
# Training checkpoints and model_from_checkpoint


def test_training_checkpoint_with_namespace_args(tmp_path):
    src = tiny()
    opt = torch.optim.AdamW(src.parameters(), lr=1e-3)
    src(torch.randn(1, 3, 32, 32), torch.randint(4, VOCAB, (1, 5)), torch.zeros(1, 5),
        torch.ones(1, 5)).sum().backward()
    opt.step()
    args = argparse.Namespace(model="beit3_tiny_patch16_32_captioning", vocab_size=VOCAB, input_size=32,
                              task="coco_captioning", finetune="", model_key="model|module")
    torch.save({"model": src.state_dict(), "optimizer": opt.state_dict(), "epoch": 4, "scaler": {},
                "args": args}, tmp_path / "checkpoint-4.pth")

    obj = load_checkpoint_file(tmp_path / "checkpoint-4.pth")
    assert isinstance(obj["args"], argparse.Namespace) and obj["args"].task == "coco_captioning"
    model, report = model_from_checkpoint(tmp_path / "checkpoint-4.pth")
    assert model.config.num_heads == 2 and model.config.vocab_size == VOCAB and not model.training
    assert not report.missing and not report.unexpected
    assert_weights_equal(model, src.state_dict())


def test_config_is_inferred_from_shapes_without_args(tmp_path):
    torch.manual_seed(0)
    src = create_model("beit3_mini_patch16_64", vocab_size=VOCAB)
    torch.save({"model": src.state_dict()}, tmp_path / "mini.pth")
    model, report = model_from_checkpoint(tmp_path / "mini.pth")
    assert model.config == src.config  # num_heads 4 comes from the registry, not 128 // 64
    assert config_from_state_dict(src.state_dict(), num_heads=2).num_heads == 2
    bigger, _ = model_from_checkpoint(tmp_path / "mini.pth", "beit3_mini_patch16_64", img_size=96)
    assert bigger.config.img_size == 96 and bigger.config.vocab_size == VOCAB  # vocab from the weights


# ----------------------------------------------------------------------------------------------------
# Safety and bad files


class _RunsCommand:
    def __init__(self, func, arg):
        self.func, self.arg = func, arg

    def __reduce__(self):
        return self.func, (self.arg,)


@pytest.mark.parametrize("how", ["os.system", "subprocess.call"])
@pytest.mark.parametrize("container", ["torch_zip", "raw_pickle"])
def test_pickle_that_would_run_a_command_is_refused(tmp_path, how, container):
    marker = tmp_path / "pwned"
    if how == "os.system":
        evil, name = _RunsCommand(os.system, f"touch {marker}"), os.system.__module__ + ".system"
    else:
        evil = _RunsCommand(subprocess.call, [sys.executable, "-c", f"open({str(marker)!r}, 'w')"])
        name = "commands.call"  # pickle protocol 2 (torch.save's) writes subprocess.call under its Python 2 name
    path = tmp_path / "beit3_base_patch16_224.pth"
    if container == "torch_zip":
        torch.save({"model": tiny().state_dict(), "args": evil}, path)
    else:
        path.write_bytes(pickle.dumps(evil, protocol=2))
    with pytest.raises(UnsafeCheckpointError) as info:
        load_pretrained(tiny(), path)
    assert str(path) in str(info.value) and name in str(info.value) and "run code" in str(info.value)
    assert not marker.exists()


def test_files_that_are_not_checkpoints(tmp_path):
    Image.new("RGB", (8, 8), "red").save(tmp_path / "photo.jpg")
    cases = {
        "photo.pth": ((tmp_path / "photo.jpg").read_bytes(), "JPEG image"),
        "notes.pth": (b"these are not weights\n", "text file"),
        "page.pth": (b"<!DOCTYPE html><html>Sign in</html>", "HTML page"),
        "lfs.pth": (b"version https://git-lfs.github.com/spec/v1\noid sha256:ab\nsize 1\n", "git lfs pull"),
        "empty.pth": (b"", "empty file"),
    }
    for name, (data, says) in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(CheckpointError, match=says) as info:
            load_checkpoint_file(tmp_path / name)
        assert str(tmp_path / name) in str(info.value)


@pytest.mark.parametrize("fmt", ["zip", "legacy", "safetensors"])
def test_truncated_files(tmp_path, fmt):
    src = tiny()
    path = tmp_path / f"cut.{fmt}"
    if fmt == "safetensors":
        save_weights_safetensors(src, path)
    else:
        torch.save({"model": src.state_dict()}, path, _use_new_zipfile_serialization=fmt == "zip")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated") as info:
        load_checkpoint_file(path)
    assert str(path) in str(info.value)


def test_missing_file_names_the_path_and_suggests_the_extension(tmp_path):
    torch.save({"model": {}}, tmp_path / "beit3_base_patch16_224.pth")
    with pytest.raises(FileNotFoundError, match=r"beit3_base_patch16_224\.pth'") as info:
        load_checkpoint_file(tmp_path / "beit3_base_patch16_224")  # the seed writes the name without .pth
    assert info.value.filename == str(tmp_path / "beit3_base_patch16_224")
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        load_checkpoint_file(tmp_path)  # a directory with neither DeepSpeed files nor an archive


def test_wrong_model_size_names_the_model_that_fits(tmp_path):
    torch.save({"model": create_model("beit3_mini_patch16_64", vocab_size=VOCAB).state_dict()},
               tmp_path / "mini.pth")
    dst = tiny()
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    with pytest.raises(CheckpointMismatchError) as info:
        load_pretrained(dst, tmp_path / "mini.pth")
    msg = str(info.value)
    assert "mini.pth" in msg and "it fits beit3_mini_patch16_64" in msg
    assert "beit3.text_embed.weight: model [100, 64], checkpoint [100, 128]" in msg
    assert_weights_equal(dst, before)  # nothing was half-loaded

    deeper = tiny(depth=3)  # same widths, one more layer: no shape differs, the depth does
    torch.save({"model": deeper.state_dict()}, tmp_path / "deeper.pth")
    with pytest.raises(CheckpointMismatchError, match="depth: model 2 layers, checkpoint 3"):
        load_pretrained(tiny(), tmp_path / "deeper.pth")

    torch.save({"model": create_model("beit3_tiny_patch16_32", vocab_size=120).state_dict()},
               tmp_path / "vocab.pth")
    with pytest.raises(CheckpointMismatchError, match="vocab_size 120"):
        load_pretrained(tiny(), tmp_path / "vocab.pth")


def test_strict_load_refuses_unused_keys():
    sd = pretrained_layout(tiny())
    with pytest.raises(CheckpointMismatchError, match="mim_head"):
        load_pretrained(tiny(), {"model": sd}, strict=True)
    load_pretrained(tiny(), {"model": {k: v for k, v in sd.items() if "mim" not in k}}, strict=True)


# ----------------------------------------------------------------------------------------------------
# Saving


def test_saved_checkpoint_is_official_layout_and_round_trips(tmp_path):
    src = tiny()
    opt = torch.optim.AdamW(src.parameters(), lr=1e-3)
    src(torch.randn(1, 3, 32, 32), torch.randint(4, VOCAB, (1, 5)), torch.zeros(1, 5),
        torch.ones(1, 5)).sum().backward()
    opt.step()
    args = argparse.Namespace(model="beit3_tiny_patch16_32", vocab_size=VOCAB, output_dir=tmp_path / "run",
                              opt_betas=(0.9, 0.999), seed=np.int64(42))
    path = save_checkpoint(tmp_path / "checkpoint-0.pth", {
        "model": src.state_dict(), "optimizer": opt.state_dict(), "epoch": 0,
        "scaler": torch.amp.GradScaler("cpu").state_dict(), "args": args,
        "model_ema": src.state_dict(), "rng": {"torch": torch.get_rng_state(), "python": random.getstate()}})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-0.pth"]

    # What the official code (and any torch >= 2.6 user) does: a plain weights-only load, no allow-list.
    raw = torch.load(path, weights_only=True)
    assert list(raw["model"]) == list(src.state_dict())
    assert raw["args"] == {"model": "beit3_tiny_patch16_32", "vocab_size": VOCAB,
                           "output_dir": str(tmp_path / "run"), "opt_betas": (0.9, 0.999), "seed": 42}
    official = tiny()
    official.load_state_dict(raw["model"], strict=True)
    assert_weights_equal(official, src.state_dict())
    opt2 = torch.optim.AdamW(official.parameters(), lr=1e-3)
    opt2.load_state_dict(raw["optimizer"])
    torch.testing.assert_close(opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])

    model, report = model_from_checkpoint(path)  # uses the stored args
    assert not report.missing and not report.unexpected
    assert_weights_equal(model, src.state_dict())


def test_save_refuses_objects_that_need_code_to_load(tmp_path):
    with pytest.raises(TypeError, match=r"payload\['rng'\]\['numpy'\]\[1\] is a numpy.ndarray"):
        save_checkpoint(tmp_path / "c.pth", {"model": tiny().state_dict(),
                                             "rng": {"numpy": np.random.get_state()}})
    assert not list(tmp_path.iterdir())


def test_crash_during_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    old = tiny()
    path = save_checkpoint(tmp_path / "checkpoint-best.pth", {"model": old.state_dict(), "epoch": 1})
    real_save = torch.save

    def disk_full(obj, f):  # writes half of the real bytes, then fails like a full disk
        buf = __import__("io").BytesIO()
        real_save(obj, buf)
        f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(path, {"model": tiny(img_size=64).state_dict(), "epoch": 2})
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-best.pth"]
    obj = load_checkpoint_file(path)
    assert obj["epoch"] == 1
    dst = tiny()
    report = load_pretrained(dst, obj, strict=True, verbose=False, source=str(path))
    assert report.source == str(path)
    assert_weights_equal(dst, old.state_dict())


# ----------------------------------------------------------------------------------------------------
# Base size (shapes only: meta tensors cost no memory or init time)


def test_base_pretrained_layout_into_480_model():
    with torch.device("meta"):
        model = create_model("beit3_base_patch16_480")
        sd = dict(create_model("beit3_base_patch16_224").state_dict())
        sd["mim_head.weight"], sd["mim_head.bias"] = torch.empty(8192, 768), torch.empty(8192)
        large = create_model("beit3_large_patch16_480").state_dict()
    assert len(model.state_dict()) == 493
    assert config_from_state_dict(model.state_dict()) == MODEL_CONFIGS["beit3_base_patch16_480"]
    report = load_pretrained(model, {"model": sd}, verbose=False)
    assert report.unexpected == ["mim_head.weight", "mim_head.bias"] and report.missing == []
    assert report.interpolated == {POSITION_KEY: ((199, 768), (903, 768))}
    with pytest.raises(CheckpointMismatchError, match="it fits beit3_large_patch16_480"):
        load_pretrained(model, {"model": large})
