"""Fine-tuning and evaluation driver: what the official ``run_beit3_finetuning.py`` main() does, for
``coco_captioning`` and ``nocaps``, on one process or many (torchrun / torch.distributed.launch).

``main(argv)`` parses the official flags (``beit3cap.args``) and calls :func:`run` with a typed config.
Set-up lives in ``runsetup.py``, the loops in ``engine.py``, resume state in ``trainstate.py``,
logs in ``runlog.py`` and DeepSpeed in ``deepspeed_support.py``.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

from . import distributed as D
from . import trainstate as S
from .args import TrainConfig, config_from_argv
from .engine import NativeStepper, TrainingStopped, TrainLoop, caption_loader, gather_predictions, resolve_precision
from .loss import CaptioningLoss
from .model import BEiT3ForCaptioning
from .optim import build_optimizer, cosine_schedule, parameter_groups, state_mismatch
from .runlog import RunLogger
from .runsetup import (TRAIN_INDEX, RunEnv, SkipSampler, build_model, eval_loader, freeze_unused_parameters,
                       index_path, require_index, resolve_device, short_list, worker_count)
from .tokenizer import load_tokenizer


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    cfg = config_from_argv(argv, prog)
    try:
        return run(cfg)
    except TrainingStopped as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 1
    finally:
        D.cleanup()


# ------------------------------------------------------------------------------------------ evaluation

def predict_and_score(model: nn.Module, cfg: TrainConfig, tokenizer, index_file: Path, split_key: str,
                      suffix: str, result_name: str | None, env: RunEnv, strict: bool) -> dict | None:
    """Caption every image of ``index_file`` once (sharded over ranks), write ``submit_{suffix}.json`` on
    rank 0 and, when the ground truth of ``split_key`` is found, score it into ``result_name``.

    Without a ground-truth file the predictions are only written (with a warning). A scoring failure
    (mismatching ids, no Java, ...) is an error when ``strict`` (--eval) and a warning during training,
    where it must not end a long run.
    """
    from . import evaluate as E

    loader = eval_loader(cfg, index_file, env)
    local = caption_loader(model, loader, tokenizer, cfg, env.device, env.precision, desc=f"captioning {suffix}")
    merged = gather_predictions(list(zip(loader.sampler.indices, local)))
    if merged is None:
        return None
    out_dir = Path(cfg.output_dir or ".")
    pred_file = E.write_predictions(out_dir / f"submit_{suffix}.json", merged)
    print(f"Infer {len(merged)} examples into {pred_file}", flush=True)
    if result_name is None:
        return None
    try:
        gt = E.find_ground_truth(split_key, cfg.output_dir or None, cfg.data_path, required=False)
        if gt is None:
            D.warn(f"no ground truth for {split_key} in {out_dir} or {cfg.data_path} "
                   f"({E.ground_truth_name(split_key)}): {pred_file} is not scored")
            return None
        scores = E.score_predictions_file(pred_file, gt, allow_partial=cfg.allow_partial_eval,
                                          metrics=cfg.metric_names)
    except Exception as e:  # PredictionError, GroundTruthError, JavaNotFoundError, ...
        if strict:
            raise SystemExit(f"error: scoring {pred_file} failed: {e}") from None
        D.warn(f"scoring {pred_file} failed, training goes on: {type(e).__name__}: {e}")
        return None
    E.write_result(out_dir / result_name, scores)
    return scores


def load_weights_for_eval(model: nn.Module, cfg: TrainConfig) -> None:
    """--resume, else --finetune, else (with --auto_resume) the newest checkpoint of --output_dir.

    Unlike the official script, an explicit --finetune is never replaced by an auto-resumed checkpoint.
    """
    from .checkpoint import load_pretrained

    if cfg.resume:
        source = cfg.resume
    elif cfg.finetune:
        source = cfg.finetune
    elif cfg.auto_resume and cfg.output_dir and (point := S.find_latest_checkpoint(cfg.output_dir)):
        source = str(point.path)
    else:
        D.warn("--eval without --finetune or --resume: evaluating randomly initialised weights")
        return
    report = load_pretrained(model, source, cfg.model_key, cfg.model_prefix, verbose=False)
    D.print0(f"Evaluating weights from {source}\n{report}")


def evaluate_only(cfg: TrainConfig, model: nn.Module, tokenizer, env: RunEnv) -> int:
    test_index = require_index(cfg, f"{cfg.task}.test.jsonl", "--eval captions the test split")
    load_weights_for_eval(model, cfg)
    model.to(env.device)
    result = "coco_captioning_result.json" if cfg.task == "coco_captioning" else None
    scores = predict_and_score(model, cfg, tokenizer, test_index, f"{cfg.task}_test", f"{cfg.task}_test",
                               result, env, strict=True)
    if scores:
        D.print0("Test: " + ", ".join(f"{k} {v:.4f}" for k, v in scores.items() if isinstance(v, (int, float))))
    if cfg.task == "nocaps":
        D.print0("NoCaps test captions are not public: submit submit_nocaps_test.json to the EvalAI server "
                 "(https://eval.ai/web/challenges/challenge-page/355)")
    return 0


# ---------------------------------------------------------------------------------------------- train

def run(cfg: TrainConfig) -> int:
    ds = None
    if cfg.enable_deepspeed:
        from . import deepspeed_support as ds
        ds.require()
    device_type = resolve_device(cfg.device)
    if ds is not None:
        ds.single_process_env()
    info = D.init_distributed(device_type, cfg.dist_url, cfg.dist_on_itp, cfg.world_size)
    device = torch.device("cuda", info.local_rank) if device_type == "cuda" else torch.device("cpu")
    env = RunEnv(device, resolve_precision(cfg.precision, device_type), cfg.pin_mem and device_type == "cuda",
                 worker_count(cfg))
    S.seed_all(cfg.seed + info.rank)
    if not cfg.output_dir:
        D.warn("no --output_dir: checkpoints and logs are not written; predictions go to the current folder")
    tokenizer = load_tokenizer(cfg.sentencepiece_model)
    if cfg.vocab_size < tokenizer.vocab_size:
        raise SystemExit(f"error: --vocab_size {cfg.vocab_size} is smaller than the vocabulary of "
                         f"{cfg.sentencepiece_model} ({tokenizer.vocab_size} ids including <mask>)")
    model = build_model(cfg)
    if cfg.eval:
        return evaluate_only(cfg, model, tokenizer, env)
    return Trainer(cfg, model, tokenizer, env, ds).fit()


class Trainer:
    """Builds data, optimizer and state, resumes, and runs the epochs with validation and checkpoints."""

    def __init__(self, cfg: TrainConfig, model: BEiT3ForCaptioning, tokenizer, env: RunEnv, ds) -> None:
        from .data.dataset import CaptioningTrainDataset, collate
        from .data.transforms import build_transform

        self.collate = collate
        self.cfg, self.model, self.tokenizer, self.env, self.ds = cfg, model, tokenizer, env, ds
        self.device, self.precision = env.device, env.precision
        train_index = require_index(cfg, TRAIN_INDEX, f"--task {cfg.task} trains on it")
        self.val_index = index_path(cfg, f"{cfg.task}.val.jsonl")
        if not self.val_index.is_file():
            D.warn(f"{self.val_index} not found: no validation during training")
            self.val_index = None
        self.dataset = CaptioningTrainDataset(
            cfg.data_path, [train_index],
            build_transform(True, cfg.input_size, cfg.randaug, cfg.hflip, cfg.train_interpolation,
                            tuple(cfg.train_crop_scale)),
            cfg.num_max_bpe_tokens, cfg.captioning_mask_prob, tokenizer.mask_token_id, tokenizer.vocab_size,
            seed=cfg.seed)
        world = D.get_world_size()
        per_rank = math.ceil(len(self.dataset) / world)
        self.steps_per_epoch = (per_rank // cfg.batch_size) // cfg.update_freq
        if self.steps_per_epoch == 0:
            raise SystemExit(f"error: {len(self.dataset)} training rows over {world} process(es) give no full "
                             f"step of --batch_size {cfg.batch_size} x --update_freq {cfg.update_freq}")
        self.schedule = cosine_schedule(cfg.lr, cfg.min_lr, cfg.epochs, self.steps_per_epoch, cfg.warmup_epochs,
                                        cfg.warmup_steps)
        self.n_parameters = sum(p.numel() for p in model.parameters())
        D.print0(f"Model {cfg.model}: {self.n_parameters:,} parameters; {len(self.dataset)} training rows, "
                 f"{self.steps_per_epoch} optimizer steps per epoch, global batch "
                 f"{cfg.batch_size * cfg.update_freq * world}; precision {env.precision.name}")

    # --- weights, optimizer, resume -------------------------------------------------------------------
    def _initial_weights(self) -> None:
        from .checkpoint import load_pretrained

        if self.cfg.finetune:
            report = load_pretrained(self.model, self.cfg.finetune, self.cfg.model_key, self.cfg.model_prefix,
                                     verbose=False)
            D.print0(str(report))

    def _resume_payload(self) -> tuple[S.ResumePoint | None, dict | None]:
        from .checkpoint import load_checkpoint_file

        cfg = self.cfg
        if cfg.resume:
            payload = load_checkpoint_file(cfg.resume)
            return S.resume_point_from_payload(Path(cfg.resume), payload), payload
        if cfg.auto_resume and cfg.output_dir and (point := S.find_latest_checkpoint(cfg.output_dir)):
            return point, load_checkpoint_file(point.path)
        return None, None

    def fit(self) -> int:
        cfg, model, device = self.cfg, self.model, self.device
        self._initial_weights()
        model.to(device)
        unused = freeze_unused_parameters(model, self.cfg, device)
        D.print0(f"{len(unused)} parameter tensors get no gradient from the captioning loss (frozen): "
                 f"{short_list(unused)}")
        ema = None
        if cfg.model_ema:
            ema = S.ModelEma(model, cfg.model_ema_decay, "cpu" if cfg.model_ema_force_cpu else None)
        scaler = torch.amp.GradScaler(device.type, enabled=self.precision.name == "fp16" and self.ds is None)
        if self.ds is not None:
            ddp_model, optimizer, stepper = self.ds.initialize(cfg, model, parameter_groups(
                model, cfg.weight_decay, cfg.layer_decay), self.precision)
        else:
            optimizer = build_optimizer(model, cfg.lr, cfg.weight_decay, cfg.layer_decay, cfg.opt_eps, cfg.opt_betas)
            ddp_model = model
            if D.is_initialized():
                ddp_model = DistributedDataParallel(
                    model, device_ids=[device.index] if device.type == "cuda" else None,
                    gradient_as_bucket_view=True)
            stepper = NativeStepper(ddp_model, optimizer, scaler, cfg.clip_grad)

        start_epoch, start_step = cfg.start_epoch, 0
        if self.ds is not None:
            point, self.rng_states = self.ds.resume(ddp_model, cfg, ema)
        else:
            point, payload = self._resume_payload()
            self.rng_states = None
            if payload is not None:
                self._restore(payload, optimizer, scaler, ema)
                self.rng_states = payload.get("rng")
        if point is not None:
            start_epoch, start_step = point.epoch, point.step_in_epoch
            D.print0(f"Resumed from {point.path}: epoch {start_epoch}, step {start_step}")
        self.best = S.best_val_metric(cfg.output_dir, cfg.task, start_epoch) if cfg.output_dir else None
        if start_epoch >= cfg.epochs:
            D.print0(f"Nothing to train: the run is at epoch {start_epoch} of --epochs {cfg.epochs}")

        logger = None
        if D.is_main_process():
            resumed_at = start_epoch * self.steps_per_epoch + start_step if point else None
            logger = RunLogger(cfg.output_dir or None, cfg.log_dir, resumed_at)
        loop = TrainLoop(cfg, ddp_model, stepper, optimizer, CaptioningLoss(
            cfg.label_smoothing, cfg.drop_worst_ratio, cfg.drop_worst_after), self.schedule, self.steps_per_epoch,
            device, self.precision, ema, logger)
        self.loop, self.optimizer, self.scaler, self.ema, self.engine = loop, optimizer, scaler, ema, ddp_model
        try:
            for epoch in range(start_epoch, cfg.epochs):
                self._epoch(epoch, start_step if epoch == start_epoch else 0, logger)
        finally:
            if logger is not None:
                logger.close()
        return 0

    def _restore(self, payload: dict, optimizer, scaler, ema) -> None:
        self.model.load_state_dict(payload["model"])
        if "optimizer" in payload:
            problem = state_mismatch(optimizer, payload["optimizer"])
            if problem is None:
                optimizer.load_state_dict(payload["optimizer"])
            else:
                D.warn(f"the checkpoint's optimizer state does not fit this model ({problem}): "
                       "starting with a fresh optimizer")
        if payload.get("scaler") and scaler.is_enabled():
            scaler.load_state_dict(payload["scaler"])
        if ema is not None and payload.get("model_ema") is not None:
            ema.load_state_dict(payload["model_ema"])
        saved = payload.get("steps_per_epoch")
        if saved is not None and saved != self.steps_per_epoch:
            D.warn(f"the checkpoint was written with {saved} steps per epoch, this run has "
                   f"{self.steps_per_epoch} (other batch size or process count): the schedule shifts")

    # --- one epoch ------------------------------------------------------------------------------------
    def _batches(self, epoch: int, start_step: int):
        cfg = self.cfg
        sampler = DistributedSampler(self.dataset, num_replicas=D.get_world_size(), rank=D.get_rank(),
                                     shuffle=True, seed=cfg.seed, drop_last=False)
        sampler.set_epoch(epoch)
        self.dataset.set_epoch(epoch)
        skip = start_step * cfg.update_freq * cfg.batch_size
        loader = DataLoader(self.dataset, batch_size=cfg.batch_size, sampler=SkipSampler(sampler, skip),
                            drop_last=True, num_workers=self.env.workers, pin_memory=self.env.pin,
                            collate_fn=self.collate, generator=torch.Generator().manual_seed(cfg.seed + epoch))
        return iter(loader)

    def _epoch(self, epoch: int, start_step: int, logger: RunLogger | None) -> None:
        cfg = self.cfg
        if start_step and self.rng_states is not None and len(self.rng_states) == D.get_world_size():
            S.set_rng_state(self.rng_states[D.get_rank()])
        else:
            S.seed_all(S.epoch_seed(cfg.seed, D.get_rank(), epoch))
        self.rng_states = None
        on_step = self._save_step if cfg.save_ckpt_steps and cfg.output_dir and cfg.save_ckpt else None
        stats = self.loop.train_epoch(epoch, self._batches(epoch, start_step), start_step, on_step)
        if cfg.output_dir and cfg.save_ckpt and ((epoch + 1) % cfg.save_ckpt_freq == 0 or epoch + 1 == cfg.epochs):
            self._save(epoch, 0)
        record = {f"train_{k}": v for k, v in stats.summary().items()}
        val_scores = None
        if self.val_index is not None:
            val_scores = predict_and_score(
                self.model, cfg, self.tokenizer, self.val_index, f"{cfg.task}_val", f"{cfg.task}_val_e{epoch}",
                f"{cfg.task}_result_val_e{epoch}.json", self.env, strict=False)
        cider = val_scores.get("CIDEr") if val_scores else None
        improved = isinstance(cider, (int, float)) and (self.best is None or cider > self.best)
        if self.ds is not None:  # DeepSpeed saves collectively: every rank must know
            improved = D.broadcast_object(improved)
        if improved:
            self.best = float(cider) if cider is not None else self.best
            if cfg.output_dir and cfg.save_ckpt:
                self._save_best(epoch)
        if D.is_main_process():
            self._report(epoch, record, val_scores, improved, logger)

    def _report(self, epoch: int, record: dict, val_scores: dict | None, improved: bool,
                logger: RunLogger | None) -> None:
        line = f"epoch {epoch}: loss {record['train_loss']:.4f}, acc {record['train_acc']:.3f}, " \
               f"lr {record['train_lr']:.2e}, {record['train_images_per_s']:.1f} img/s, " \
               f"{record['train_seconds']:.0f} s"
        if record["train_first_step"] > 1:
            line += f" (resumed at step {int(record['train_first_step'])})"
        if record["train_skipped_steps"]:
            line += f", {int(record['train_skipped_steps'])} steps skipped (non-finite)"
        if val_scores:
            record.update({f"val_{k}": v for k, v in val_scores.items() if isinstance(v, (int, float))})
            if "val_CIDEr" in record:
                saved = ", saved checkpoint-best.pth" if improved and self.cfg.save_ckpt and self.cfg.output_dir else ""
                line += f" | val CIDEr {record['val_CIDEr']:.4f} (best {self.best:.4f}{saved})"
        record.update(epoch=epoch, n_parameters=self.n_parameters)
        print(line, flush=True)
        if logger is not None:
            logger.epoch(record, (epoch + 1) * self.steps_per_epoch)

    # --- checkpoints ------------------------------------------------------------------------------------
    def _save_step(self, epoch: int, steps_done: int) -> None:
        if steps_done % self.cfg.save_ckpt_steps == 0 and steps_done < self.steps_per_epoch:
            self._save(epoch, steps_done)

    def _save(self, epoch: int, steps_done: int) -> None:
        """A resume point; every rank takes part (RNG states are gathered), rank 0 writes."""
        rng = D.all_gather_object(S.rng_state())
        name = S.checkpoint_name(epoch, steps_done)
        if self.ds is not None:
            self.ds.save(self.engine, self.cfg, name, self._client_state(epoch, steps_done, rng))
            return
        if D.is_main_process():
            path = self._write(Path(self.cfg.output_dir) / name, epoch, steps_done, rng)
            S.remove_step_checkpoints(self.cfg.output_dir, keep=path)

    def _save_best(self, epoch: int) -> None:
        if self.ds is not None:
            self.ds.save(self.engine, self.cfg, "checkpoint-best", self._client_state(epoch, 0, None))
        elif D.is_main_process():
            self._write(Path(self.cfg.output_dir) / "checkpoint-best.pth", epoch, 0, rng=None)

    def _client_state(self, epoch: int, steps_done: int, rng) -> dict:
        state = {"epoch": epoch, "step_in_epoch": steps_done,
                 "global_step": epoch * self.steps_per_epoch + steps_done,
                 "steps_per_epoch": self.steps_per_epoch, "args": self.cfg.to_plain()}
        if rng is not None:
            state["rng"] = rng
        if self.ema is not None:
            state["model_ema"] = self.ema.state_dict()
        return state

    def _write(self, path: Path, epoch: int, steps_done: int, rng) -> Path:
        from .checkpoint import save_checkpoint

        payload = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                   "scaler": self.scaler.state_dict(), **self._client_state(epoch, steps_done, rng)}
        start = time.perf_counter()
        save_checkpoint(path, payload)
        D.print0(f"Saved {path} ({time.perf_counter() - start:.1f} s)")
        return path


if __name__ == "__main__":
    sys.exit(main())
