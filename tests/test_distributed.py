"""Multi-process training and evaluation (gloo on the CPU) and the seed documents' commands.

- torchrun with 2 processes computes what 1 process computes with the same global batch;
- the seed documents' commands run with only paths (and the model size, process count, device) changed,
  through ``python -m torch.distributed.launch`` (which passes ``--local-rank``);
- ``--eval --dist_eval`` on 2 processes writes exactly one caption per test image (7 images: uneven split).
"""

from __future__ import annotations

import importlib.util
import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from beit3cap import distributed as D
from test_train import (ROOT, SCRIPT, FAST_METRICS, _env, data, free_port, index_ids, max_diff,  # noqa: F401
                        prediction_ids, run, steps, tiny_ckpt, tiny_flags, weights)

HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None


# ------------------------------------------------------------------------------------ rank discovery

def _clear(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID",
                 "OMPI_COMM_WORLD_RANK"):
        monkeypatch.delenv(name, raising=False)


def test_discover_reads_launcher_slurm_and_mpi_environments(monkeypatch):
    _clear(monkeypatch)
    assert D.discover() is None
    assert D.init_distributed("cpu") == D.DistInfo()  # one process: no process group, no barrier
    D.barrier()
    assert D.all_gather_object({"a": 1}) == [{"a": 1}]

    monkeypatch.setenv("SLURM_PROCID", "3")
    monkeypatch.setenv("SLURM_NTASKS", "8")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    assert D.discover() == (3, 8, 1, "env://")  # the official code left world_size at --world_size

    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert D.discover() == (1, 2, 1, "env://")  # torchrun / torch.distributed.launch win over SLURM

    for k, v in {"OMPI_COMM_WORLD_RANK": "5", "OMPI_COMM_WORLD_SIZE": "6", "OMPI_COMM_WORLD_LOCAL_RANK": "2",
                 "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "1234"}.items():
        monkeypatch.setenv(k, v)
    assert D.discover(dist_on_itp=True) == (5, 6, 2, "tcp://10.0.0.1:1234")


# ------------------------------------------------------------------------------ torchrun vs 1 process

def test_torchrun_two_processes_equal_one_process_with_the_same_global_batch(tmp_path, spm_path, tiny_vocab, data,
                                                                             tiny_ckpt):
    """The loss is normalised by the masked tokens of the whole global batch, so the per-step losses and the
    weights agree up to float rounding (drop path off: its draws differ per rank; drop-worst off: it is per rank)."""
    def flags(out: Path, batch: int) -> list[str]:
        return tiny_flags(spm_path, tiny_vocab, data, out) + [
            "--finetune", str(tiny_ckpt), "--batch_size", str(batch), "--epochs", "1", "--lr", "1e-3",
            "--warmup_steps", "2", "--drop_path", "0", "--randaug", "--num_max_bpe_tokens", "16", "--seed", "1",
            "--clip_grad", "5.0"]

    one, two = tmp_path / "one", tmp_path / "two"
    run(flags(one, 4))
    proc = run(flags(two, 2), launcher="torchrun")
    assert "global batch 4" in proc.stdout
    s1, s2 = steps(one), steps(two)
    assert sorted(s1) == sorted(s2) == list(range(1, 21))
    assert s2[1]["loss"] == pytest.approx(s1[1]["loss"], abs=1e-6)
    assert max(abs(s1[i]["loss"] - s2[i]["loss"]) for i in s1) < 1e-4
    assert max_diff(weights(one / "checkpoint-0.pth"), weights(two / "checkpoint-0.pth")) < 1e-4
    # validation: 7 images over 2 ranks, each captioned exactly once
    val_ids = index_ids(data / "coco_captioning.val.jsonl")
    assert prediction_ids(two / "submit_coco_captioning_val_e0.json") == val_ids
    assert json.loads((two / "log.txt").read_text())["val_CIDEr"] is not None


# ------------------------------------------------------------------------------ the seed documents

COCO_TRAIN = """python -m torch.distributed.launch --nproc_per_node=8 run_beit3_finetuning.py \\
        --model beit3_{size}_patch16_480 \\
        --input_size 480 \\
        --task coco_captioning \\
        --batch_size 32 \\
        --layer_decay 1.0 \\
        --lr {lr} \\
        --randaug \\
        --epochs 10 \\
        --warmup_epochs 1 \\
        --drop_path 0.1 \\
        --sentencepiece_model /your_beit3_model_path/beit3.spm \\
        --finetune /your_beit3_model_path/beit3_{size}_patch16_224.pth \\
        --data_path /path/to/your_data \\
        --output_dir /path/to/save/your_model \\
        --log_dir /path/to/save/your_model/log \\
        --weight_decay 0.05 \\
        --seed 42 \\
        --save_ckpt_freq 5 \\
        --num_max_bpe_tokens 32 \\
        --captioning_mask_prob 0.7 \\
        --drop_worst_after 12000 \\
        --dist_eval \\
        --checkpoint_activations \\
        --enable_deepspeed"""

COCO_EVAL = """python -m torch.distributed.launch --nproc_per_node=8 run_beit3_finetuning.py \\
        --model beit3_{size}_patch16_480 \\
        --input_size 480 \\
        --task coco_captioning \\
        --batch_size 16 \\
        --sentencepiece_model /your_beit3_model_path/beit3.spm \\
        --finetune /your_beit3_model_path/beit3_{size}_patch16_480_coco_captioning.pth \\
        --data_path /path/to/your_data \\
        --output_dir /path/to/save/your_prediction \\
        --eval \\
        --dist_eval"""

WTS_TRAIN = """python run_beit3_finetuning.py \\
         --device cuda \\
         --model beit3_base_patch16_224 \\
         --input_size 224 \\
         --task coco_captioning \\
         --batch_size 32 \\
         --layer_decay 1.0 \\
         --lr 4e-5 \\
         --randaug \\
         --epochs 10 \\
         --warmup_epochs 1 \\
         --drop_path 0.1 \\
         --sentencepiece_model /kaggle/input/beit-base-224/beit3.spm \\
         --finetune /kaggle/input/beit-base-224/beit3_base_patch16_224 \\
         --data_path /kaggle/working/beit3_img_captioning \\
         --output_dir . \\
         --log_dir /kaggle/working/beit3_img_captioning \\
         --weight_decay 0.05 \\
         --seed 42 \\
         --save_ckpt_freq 5 \\
         --num_max_bpe_tokens 64 \\
         --captioning_mask_prob 0.7 \\
         --drop_worst_after 12000 \\
         --dist_eval \\
         --checkpoint_activations"""

SEED_COMMANDS = {
    "coco_base_train": COCO_TRAIN.format(size="base", lr="4e-5"),
    "coco_large_train": COCO_TRAIN.format(size="large", lr="8e-6"),
    "coco_base_eval": COCO_EVAL.format(size="base"),
    "coco_large_eval": COCO_EVAL.format(size="large"),
    "wts_train": WTS_TRAIN,
}


def seed_argv(text: str, paths: dict[str, str], tiny_vocab: int) -> list[str]:
    """The command as argv: paths replaced, the model made tiny, 2 processes instead of 8 on a free port,
    the script by absolute path, and --device cpu --epochs 1 (one short epoch) and the test vocabulary added."""
    for old, new in paths.items():
        text = text.replace(old, new)
    for size in ("base", "large"):
        for px in ("480", "224"):
            text = text.replace(f"--model beit3_{size}_patch16_{px} ", "--model beit3_tiny_patch16_32 ")
    text = text.replace("--input_size 480", "--input_size 32").replace("--input_size 224", "--input_size 32")
    text = text.replace("--nproc_per_node=8", f"--nproc_per_node=2 --master_port={free_port()}")
    argv = shlex.split(text.replace("\\\n", " "))
    assert argv[0] == "python"
    argv[0] = sys.executable
    argv[argv.index("run_beit3_finetuning.py")] = str(SCRIPT)
    return argv + ["--device", "cpu", "--epochs", "1", "--vocab_size", str(tiny_vocab), *FAST_METRICS]


@pytest.fixture(scope="module")
def seed_world(tmp_path_factory, spm_path, tiny_vocab, data, tokenizer, tiny_ckpt) -> dict:
    """The files the seed commands name, at temporary paths: models, COCO data, a WTS working folder."""
    from beit3cap.data.index import make_wts_index
    from beit3cap.data.synth import make_wts_tree

    base = tmp_path_factory.mktemp("seed")
    models = base / "your_beit3_model_path"
    models.mkdir()
    shutil.copy(spm_path, models / "beit3.spm")
    for name in ("beit3_base_patch16_224.pth", "beit3_large_patch16_224.pth",
                 "beit3_base_patch16_480_coco_captioning.pth", "beit3_large_patch16_480_coco_captioning.pth"):
        shutil.copy(tiny_ckpt, models / name)
    kaggle = base / "kaggle"
    (kaggle / "input/beit-base-224").mkdir(parents=True)
    shutil.copy(spm_path, kaggle / "input/beit-base-224/beit3.spm")
    shutil.copy(tiny_ckpt, kaggle / "input/beit-base-224/beit3_base_patch16_224")  # no extension, as in the fork
    working = kaggle / "working/beit3_img_captioning"
    working.mkdir(parents=True)
    wts = make_wts_tree(base / "wts", n_train=8, n_val=2, phases=4, image_size=32)
    make_wts_index(wts / "vehicle_caption/train/vehicle_caption_moving_datasets.json", tokenizer,
                   wts / "avg_normal_244_train", split_name="train", out_dir=working)
    make_wts_index(wts / "vehicle_caption/val/vehicle_caption_moving_datasets.json", tokenizer,
                   wts / "avg_normal_244_test", split_name="val", out_dir=working)
    paths = {"/your_beit3_model_path": str(models), "/path/to/your_data": str(data),
             "/path/to/save/your_model": str(base / "model"), "/path/to/save/your_prediction": str(base / "pred"),
             "/kaggle": str(kaggle)}
    return {"paths": paths, "base": base, "working": working}


@pytest.mark.parametrize("name", sorted(SEED_COMMANDS))
def test_seed_command_flags_parse(name, seed_world, tiny_vocab):
    from beit3cap.args import config_from_argv

    argv = seed_argv(SEED_COMMANDS[name], seed_world["paths"], tiny_vocab)
    cfg = config_from_argv(argv[argv.index(str(SCRIPT)) + 1:])
    assert cfg.task == "coco_captioning" and cfg.model == "beit3_tiny_patch16_32" and cfg.device == "cpu"
    assert cfg.dist_eval and cfg.eval == name.endswith("_eval")
    assert cfg.enable_deepspeed == ("coco" in name and name.endswith("_train"))


@pytest.mark.parametrize("name", ["coco_base_train", "coco_large_train"])
def test_seed_deepspeed_commands_say_how_to_install_deepspeed(name, seed_world, tiny_vocab, monkeypatch):
    from beit3cap.train import main

    monkeypatch.setitem(sys.modules, "deepspeed", None)  # `import deepspeed` now fails as if it were not installed
    argv = seed_argv(SEED_COMMANDS[name], seed_world["paths"], tiny_vocab)
    with pytest.raises(SystemExit) as err:
        main(argv[argv.index(str(SCRIPT)) + 1:])
    message = str(err.value.code)
    assert "\n" not in message and "--enable_deepspeed needs DeepSpeed" in message
    assert "pip install -e '.[deepspeed]'" in message


def _run_seed(argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run(argv, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{shlex.join(argv)}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def test_seed_coco_training_runs_with_torch_distributed_launch(seed_world, tiny_vocab, data):
    """The base training command (without --enable_deepspeed unless DeepSpeed is installed) on 2 processes."""
    argv = seed_argv(SEED_COMMANDS["coco_base_train"], seed_world["paths"], tiny_vocab)
    if not HAS_DEEPSPEED:
        argv.remove("--enable_deepspeed")
    _run_seed(argv, ROOT)
    out = seed_world["base"] / "model"
    assert (out / "checkpoint-0.pth").exists() or (out / "checkpoint-0").is_dir()
    assert prediction_ids(out / "submit_coco_captioning_val_e0.json") == index_ids(data / "coco_captioning.val.jsonl")
    assert list((out / "log").glob("events.out.tfevents.*"))
    assert json.loads((out / "log.txt").read_text())["epoch"] == 0


def test_seed_coco_eval_dist_eval_captions_each_test_image_once(seed_world, tiny_vocab, data):
    """torch.distributed.launch passes --local-rank; 7 test images over 2 ranks, one caption each."""
    argv = seed_argv(SEED_COMMANDS["coco_base_eval"], seed_world["paths"], tiny_vocab)
    proc = _run_seed(argv, ROOT)
    out = seed_world["base"] / "pred"
    assert prediction_ids(out / "submit_coco_captioning_test.json") == index_ids(data / "coco_captioning.test.jsonl")
    assert "CIDEr" in json.loads((out / "coco_captioning_result.json").read_text())
    assert "Infer 7 examples" in proc.stdout


def test_seed_wts_training_runs_in_the_working_folder(seed_world, tiny_vocab):
    """Single process, --output_dir ., index files in --data_path, --finetune without an extension."""
    argv = seed_argv(SEED_COMMANDS["wts_train"], seed_world["paths"], tiny_vocab)
    cwd = seed_world["base"] / "wts_run"
    cwd.mkdir()
    _run_seed(argv, cwd)
    working = seed_world["working"]
    assert (cwd / "checkpoint-0.pth").exists()
    val_ids = index_ids(working / "coco_captioning.val.jsonl")
    assert len(val_ids) == 8 and prediction_ids(cwd / "submit_coco_captioning_val_e0.json") == val_ids
    assert "CIDEr" in json.loads((cwd / "coco_captioning_result_val_e0.json").read_text())
    assert list(working.glob("events.out.tfevents.*"))


# -------------------------------------------------------------------------------------------- DeepSpeed

@pytest.mark.slow
@pytest.mark.skipif(not HAS_DEEPSPEED, reason="DeepSpeed not installed (pip install -e '.[deepspeed]')")
@pytest.mark.parametrize("zero_stage", [0, 2])
def test_deepspeed_matches_native_training_and_resumes(tmp_path, spm_path, tiny_vocab, data, tiny_ckpt, zero_stage,
                                                        monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "torch_extensions"))

    def flags(out: Path) -> list[str]:
        return tiny_flags(spm_path, tiny_vocab, data, out) + [
            "--finetune", str(tiny_ckpt), "--batch_size", "2", "--epochs", "2", "--lr", "1e-3", "--warmup_steps", "2",
            "--drop_path", "0", "--num_max_bpe_tokens", "16", "--seed", "1", "--save_ckpt_freq", "1"]

    native, ds = tmp_path / "native", tmp_path / "ds"
    run(flags(native), launcher="torchrun")
    run(flags(ds) + ["--enable_deepspeed", "--zero_stage", str(zero_stage)], launcher="torchrun", timeout=900)
    assert (ds / "checkpoint-0").is_dir() and (ds / "deepspeed_config.json").exists()
    first = weights_of_ds(ds / "checkpoint-1")
    shutil.rmtree(ds / "checkpoint-1")  # as if killed during epoch 1
    proc = run(flags(ds) + ["--enable_deepspeed", "--zero_stage", str(zero_stage)], launcher="torchrun", timeout=900)
    assert "Resumed from" in proc.stdout and "epoch 1, step 0" in proc.stdout
    s_native, s_ds = steps(native), steps(ds)
    assert max(abs(s_native[i]["loss"] - s_ds[i]["loss"]) for i in s_native) < 1e-4
    ref = weights(native / "checkpoint-1.pth")
    resumed = weights_of_ds(ds / "checkpoint-1")
    assert max_diff(ref, {k: resumed[k] for k in ref}) < 1e-4
    assert max_diff(first, resumed) == 0.0


def weights_of_ds(folder: Path) -> dict[str, torch.Tensor]:
    from beit3cap.checkpoint import extract_state_dict, load_checkpoint_file

    return {k: v.float() for k, v in extract_state_dict(load_checkpoint_file(folder)).items()}
