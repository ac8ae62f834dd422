"""Training and evaluation as users run them: real processes of run_beit3_finetuning.py / beit3cap train on a
generated COCO tree, a tiny model and a sentencepiece model trained at test time.

Covered here: resuming after a real kill (end of epoch and mid-epoch) gives the same losses and weights as an
uninterrupted run; --eval writes one caption per test image and never auto-resumes over --finetune; the
commands of the seed documents run; non-finite losses are skipped and stop the run after the limit.
Multi-process runs are in test_distributed.py.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "run_beit3_finetuning.py"
FAST_METRICS = ["--eval_metrics", "Bleu,ROUGE_L,CIDEr"]  # no METEOR JVM at each validation


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command(args: list[str], launcher: str | None = None, nproc: int = 2) -> list[str]:
    """python run_beit3_finetuning.py ..., or under torchrun / torch.distributed.launch with nproc processes."""
    if launcher == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                str(SCRIPT), *args]
    if launcher == "launch":
        return [sys.executable, "-m", "torch.distributed.launch", f"--nproc_per_node={nproc}",
                f"--master_port={free_port()}", str(SCRIPT), *args]
    return [sys.executable, str(SCRIPT), *args]


def run(args: list[str], launcher: str | None = None, cwd: Path = ROOT, timeout: float = 300,
        check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(command(args, launcher), cwd=cwd, env=_env(), capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n"
                             f"{proc.stderr[-6000:]}")
    return proc


def run_until(args: list[str], appears: Path, timeout: float = 300) -> None:
    """Start a run and SIGKILL it as soon as ``appears`` exists (a real crash, no clean-up)."""
    proc = subprocess.Popen(command(args), cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.monotonic() + timeout
    try:
        while not appears.exists():
            if proc.poll() is not None:
                raise AssertionError(f"run ended (exit {proc.returncode}) before {appears.name} appeared:\n"
                                     f"{proc.stderr.read()[-4000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{appears} did not appear in {timeout} s")
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        proc.stderr.close()


def run_here(args: list[str], capsys) -> tuple[int, str, str]:
    """A single-process run inside the test process (no launcher, no interpreter start-up)."""
    from beit3cap.train import main

    capsys.readouterr()
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def steps(out: Path) -> dict[int, dict]:
    """train_steps.jsonl by global step (the last record of a step wins, as after a resume)."""
    records = [json.loads(line) for line in (out / "train_steps.jsonl").read_text().splitlines()]
    return {r["global_step"]: r for r in records}


def weights(path: Path, key: str = "model") -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)[key]


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def prediction_ids(path: Path) -> list[int]:
    return [p["image_id"] for p in json.loads(path.read_text())]


def index_ids(path: Path) -> list[int]:
    return [json.loads(line)["image_id"] for line in path.read_text().splitlines() if line.strip()]


# ------------------------------------------------------------------------------------------ fixtures

@pytest.fixture(scope="module")
def data(tmp_path_factory, tokenizer) -> Path:
    """COCO tree: 16 train+restval images (80 captions), 7 val and 7 test images (odd, so 2 ranks split unevenly)."""
    from beit3cap.data.index import make_coco_captioning_index
    from beit3cap.data.synth import make_coco_tree

    root = make_coco_tree(tmp_path_factory.mktemp("coco7"), n_train=16, n_val=7, n_test=7, image_size=32, seed=3)
    make_coco_captioning_index(root, tokenizer)
    return root


@pytest.fixture(scope="module")
def data_noval(tmp_path_factory, data) -> Path:
    """The same images with only the training index: no per-epoch validation."""
    root = tmp_path_factory.mktemp("coco7_noval")
    for name in ("train2014", "val2014"):
        (root / name).symlink_to(data / name)
    (root / "coco_captioning.train.jsonl").write_bytes((data / "coco_captioning.train.jsonl").read_bytes())
    return root


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory, tiny_vocab) -> Path:
    """A tiny model saved in the official layout (stands in for the pretrained/fine-tuned .pth files)."""
    from beit3cap.model import create_model

    torch.manual_seed(7)
    path = tmp_path_factory.mktemp("weights") / "tiny.pth"
    torch.save({"model": create_model("beit3_tiny_patch16_32", vocab_size=tiny_vocab).state_dict()}, path)
    return path


def tiny_flags(spm_path: Path, tiny_vocab: int, data_path: Path, out: Path) -> list[str]:
    return ["--model", "beit3_tiny_patch16_32", "--input_size", "32", "--task", "coco_captioning",
            "--sentencepiece_model", str(spm_path), "--vocab_size", str(tiny_vocab), "--data_path", str(data_path),
            "--output_dir", str(out), "--device", "cpu", "--num_workers", "0", *FAST_METRICS]


# ------------------------------------------------------------------------------------ resume after kill

def test_killed_runs_resume_to_the_same_losses_and_weights(tmp_path, spm_path, tiny_vocab, data_noval, tiny_ckpt):
    """Kill -9 right after checkpoint-0.pth is written, resume; kill -9 again after a mid-epoch checkpoint of
    epoch 1, resume again: every step's loss and the final weights (model and EMA) equal an uninterrupted run.
    Drop path, RandAugment, masking, drop-worst (from step 26), EMA, layer decay and weight decay 0 all on."""
    def flags(out: Path) -> list[str]:
        return tiny_flags(spm_path, tiny_vocab, data_noval, out) + [
            "--finetune", str(tiny_ckpt), "--batch_size", "4", "--epochs", "2", "--lr", "2e-3", "--warmup_epochs", "1",
            "--layer_decay", "0.9", "--weight_decay", "0", "--drop_path", "0.1", "--randaug", "--model_ema",
            "--model_ema_decay", "0.9", "--captioning_mask_prob", "0.7", "--drop_worst_after", "25",
            "--num_max_bpe_tokens", "24", "--seed", "5", "--save_ckpt_freq", "1", "--save_ckpt_steps", "7"]

    ref = tmp_path / "uninterrupted"
    proc = run(flags(ref) + ["--log_dir", str(ref / "tb")])
    assert "20 optimizer steps per epoch" in proc.stdout
    assert "17 parameter tensors get no gradient" in proc.stdout  # mask_token + last layer's image tail

    out = tmp_path / "killed"
    run_until(flags(out), out / "checkpoint-0.pth")
    run_until(flags(out), out / "checkpoint-1-step7.pth")
    assert not (out / "checkpoint-1.pth").exists()
    proc = run(flags(out))
    assert "Resumed from" in proc.stdout and "epoch 1, step 7" in proc.stdout

    ref_steps, got_steps = steps(ref), steps(out)
    assert sorted(ref_steps) == sorted(got_steps) == list(range(1, 41))
    assert [ref_steps[i]["loss"] for i in range(1, 41)] == [got_steps[i]["loss"] for i in range(1, 41)]
    assert ref_steps[1]["lr"] == 0.0 and ref_steps[20]["lr"] == pytest.approx(2e-3)  # warm-up from 0
    assert max_diff(weights(ref / "checkpoint-1.pth"), weights(out / "checkpoint-1.pth")) == 0.0
    assert max_diff(weights(ref / "checkpoint-1.pth", "model_ema"), weights(out / "checkpoint-1.pth", "model_ema")) == 0.0
    # weights moved (weight decay 0 trains: official bug §9.14)
    assert max_diff(weights(ref / "checkpoint-1.pth"), weights(tiny_ckpt)) > 1e-3

    # official layout, loadable with weights_only=True; mid-epoch files are cleaned up
    ckpt = torch.load(ref / "checkpoint-1.pth", map_location="cpu", weights_only=True)
    assert {"model", "optimizer", "epoch", "scaler", "args", "model_ema", "rng", "step_in_epoch"} <= ckpt.keys()
    assert ckpt["epoch"] == 1 and ckpt["args"]["model"] == "beit3_tiny_patch16_32" and ckpt["args"]["weight_decay"] == 0
    assert "beit3.vision_embed.mask_token" in ckpt["model"]
    assert sorted(p.name for p in ref.glob("checkpoint-*")) == ["checkpoint-0.pth", "checkpoint-1.pth"]
    log = [json.loads(line) for line in (ref / "log.txt").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [0, 1] and log[1]["train_loss"] < log[0]["train_loss"]
    assert list((ref / "tb").glob("events.out.tfevents.*"))


# ------------------------------------------------------------------------------------------ evaluation

def test_relative_data_and_output_paths(tmp_path, spm_path, tiny_vocab, data, tiny_ckpt, monkeypatch, capsys):
    """--data_path and --output_dir relative to the working folder, as users type them: train one epoch with
    validation, then --eval the checkpoint it wrote."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mydata").symlink_to(data)
    data_rel = Path("mydata")
    code, _, _ = run_here(tiny_flags(spm_path, tiny_vocab, data_rel, Path("run")) + [
        "--finetune", str(tiny_ckpt), "--batch_size", "8", "--epochs", "1", "--num_max_bpe_tokens", "16"], capsys)
    assert code == 0
    assert prediction_ids(tmp_path / "run/submit_coco_captioning_val_e0.json") == index_ids(
        data / "coco_captioning.val.jsonl")
    code, _, _ = run_here(tiny_flags(spm_path, tiny_vocab, data_rel, Path("pred")) + [
        "--finetune", "run/checkpoint-best.pth", "--eval", "--num_max_bpe_tokens", "16"], capsys)
    assert code == 0
    assert prediction_ids(tmp_path / "pred/submit_coco_captioning_test.json") == index_ids(
        data / "coco_captioning.test.jsonl")


def test_eval_captions_each_test_image_once_and_keeps_finetune(tmp_path, spm_path, tiny_vocab, data, tiny_ckpt,
                                                               capsys):
    """--eval needs only the test index; an explicit --finetune is used even when --output_dir holds a
    checkpoint (the official script silently auto-resumed over it)."""
    only_test = tmp_path / "data"
    only_test.mkdir()
    (only_test / "val2014").symlink_to(data / "val2014")
    for name in ("coco_captioning.test.jsonl", "coco_karpathy_test_gt.json"):
        (only_test / name).write_bytes((data / name).read_bytes())
    out = tmp_path / "out"
    out.mkdir()
    from beit3cap.model import create_model
    torch.manual_seed(99)
    torch.save({"model": create_model("beit3_tiny_patch16_32", vocab_size=tiny_vocab).state_dict()},
               out / "checkpoint-3.pth")

    code, stdout, _ = run_here(tiny_flags(spm_path, tiny_vocab, only_test, out) + [
        "--finetune", str(tiny_ckpt), "--eval", "--batch_size", "2", "--num_max_bpe_tokens", "16"], capsys)
    assert code == 0 and f"Evaluating weights from {tiny_ckpt}" in stdout
    preds = out / "submit_coco_captioning_test.json"
    assert prediction_ids(preds) == index_ids(data / "coco_captioning.test.jsonl")
    assert all(isinstance(p["caption"], str) for p in json.loads(preds.read_text()))
    result = json.loads((out / "coco_captioning_result.json").read_text())
    assert {"Bleu_4", "ROUGE_L", "CIDEr"} <= result.keys()

    # Without --finetune, auto-resume picks the checkpoint and says so; without ground truth the
    # predictions are written and not scored.
    (only_test / "coco_karpathy_test_gt.json").unlink()
    (out / "coco_captioning_result.json").unlink()
    code, stdout, stderr = run_here(tiny_flags(spm_path, tiny_vocab, only_test, out) + ["--eval", "--batch_size", "3"],
                                    capsys)
    assert code == 0 and f"Evaluating weights from {out / 'checkpoint-3.pth'}" in stdout
    assert "no ground truth for coco_captioning_test" in stderr
    assert not (out / "coco_captioning_result.json").exists()
    assert prediction_ids(preds) == index_ids(data / "coco_captioning.test.jsonl")


def test_training_validates_every_epoch_with_every_image_once(tmp_path, spm_path, tiny_vocab, data, capsys):
    out = tmp_path / "out"
    code, stdout, _ = run_here(tiny_flags(spm_path, tiny_vocab, data, out) + [
        "--batch_size", "8", "--epochs", "2", "--lr", "1e-3", "--warmup_steps", "3", "--num_max_bpe_tokens", "16",
        "--save_ckpt_freq", "5"], capsys)
    assert code == 0
    val_ids = index_ids(data / "coco_captioning.val.jsonl")
    for epoch in (0, 1):
        assert prediction_ids(out / f"submit_coco_captioning_val_e{epoch}.json") == val_ids
        assert "CIDEr" in json.loads((out / f"coco_captioning_result_val_e{epoch}.json").read_text())
    log = [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [0, 1] and all("val_CIDEr" in r and "train_loss" in r for r in log)
    assert "val CIDEr" in stdout and (out / "checkpoint-best.pth").exists()
    assert (out / "checkpoint-1.pth").exists() and not (out / "checkpoint-0.pth").exists()  # last epoch only


# ------------------------------------------------------------------------------------- non-finite loss

def test_nonfinite_steps_are_skipped_then_stop_the_run(tmp_path, spm_path, tiny_vocab, data_noval, capsys):
    """An absurd learning rate blows the weights up after one step: later steps are non-finite."""
    base = tiny_flags(spm_path, tiny_vocab, data_noval, tmp_path / "x") + [
        "--batch_size", "8", "--epochs", "1", "--lr", "1e30", "--min_lr", "1e30", "--warmup_epochs", "0",
        "--num_max_bpe_tokens", "16"]
    out = tmp_path / "skip"
    code, stdout, stderr = run_here(base + ["--output_dir", str(out), "--max_nonfinite_steps", "100"], capsys)
    log = json.loads((out / "log.txt").read_text())
    assert code == 0 and log["train_skipped_steps"] >= 5 and "non-finite loss or gradient" in stderr
    assert "steps skipped (non-finite)" in stdout

    out = tmp_path / "stop"
    code, _, stderr = run_here(base + ["--output_dir", str(out), "--max_nonfinite_steps", "3", "--save_ckpt_steps", "1"],
                               capsys)
    assert code == 1
    assert "stopping: 3 optimizer steps in a row had a non-finite loss" in stderr
    assert not (out / "checkpoint-0.pth").exists()


# ------------------------------------------------------------------------------------------ clear errors

@pytest.mark.parametrize("extra, message", [
    (["--input_size", "64"], "--input_size 64 does not match beit3_tiny_patch16_32"),
    (["--model", "beit3_huge_patch16_480"], "Unknown model 'beit3_huge_patch16_480'"),
    (["--vocab_size", "10"], "--vocab_size 10 is smaller than the vocabulary"),
    (["--precision", "fp16"], "fp16 needs CUDA"),
    (["--epochs", "1", "--batch_size", "500"], "give no full step of --batch_size 500"),
])
def test_bad_settings_fail_at_start_with_a_clear_message(tmp_path, spm_path, tiny_vocab, data, extra, message):
    from beit3cap.train import main

    with pytest.raises(SystemExit, match=message):
        main(tiny_flags(spm_path, tiny_vocab, data, tmp_path) + extra)


def test_missing_training_index_names_the_file(tmp_path, spm_path, tiny_vocab):
    from beit3cap.train import main

    with pytest.raises(SystemExit, match=f"{tmp_path}/coco_captioning.train.jsonl not found"):
        main(tiny_flags(spm_path, tiny_vocab, tmp_path, tmp_path / "out"))


def test_nocaps_trains_on_coco_validates_on_nocaps_and_writes_the_test_submission(tmp_path, spm_path, tiny_vocab,
                                                                                  tokenizer, capsys):
    """In-process (one process needs no launcher): --task nocaps reads coco_captioning.train.jsonl."""
    from beit3cap.data.index import make_coco_captioning_index, make_nocaps_captioning_index
    from beit3cap.data.synth import make_nocaps_tree
    from beit3cap.train import main

    root = make_nocaps_tree(tmp_path / "nocaps", n_val=3, n_test=5, image_size=32, n_train=4)
    make_coco_captioning_index(root, tokenizer)
    make_nocaps_captioning_index(root)
    flags = tiny_flags(spm_path, tiny_vocab, root, tmp_path / "out") + [
        "--task", "nocaps", "--batch_size", "4", "--epochs", "1", "--num_max_bpe_tokens", "12"]
    assert main(flags) == 0
    out = tmp_path / "out"
    assert prediction_ids(out / "submit_nocaps_val_e0.json") == index_ids(root / "nocaps.val.jsonl")
    assert "CIDEr" in json.loads((out / "nocaps_result_val_e0.json").read_text())
    assert main(flags + ["--eval"]) == 0
    assert prediction_ids(out / "submit_nocaps_test.json") == index_ids(root / "nocaps.test.jsonl")
    assert "EvalAI" in capsys.readouterr().out
