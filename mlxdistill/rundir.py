"""The run directory: the one module that knows its layout (see docs/design.md), takes its
lock, refuses a different config in it, writes and restores checkpoints, and saves and loads
the trained student. Training, evaluation, export and profiling reach a run through here.

    runs/NAME/
      config.yaml  metrics.jsonl  plots/  checkpoints/step-NNNNNN/  eval.json
      model/ (full) | adapters.safetensors + adapter_config.json (LoRA, DoRA)
      eval_teacher.safetensors  hidden_projector.safetensors  profile/  .lock
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from typing import Optional

import mlx.core as mx
import yaml
from mlx.utils import tree_flatten, tree_unflatten

from . import data as data_mod
from . import files, models, saving
from .config import Config, ConfigError, from_dict, save_config
from .resume import refuse_changed
from .sections import PruneConfig

# Keys that may change between a run and its resume without changing what is computed.
RESUMABLE_CHANGES = {("train", "iters"), ("train", "save_every"), ("train", "eval_every"),
                     ("train", "report_every"), ("train", "keep_checkpoints"),
                     ("train", "nonfinite_skips"), ("run", "dist_timeout"),
                     ("train", "final_eval"), ("train", "report_to"), ("data", "test_records"),
                     # how `mlxdistill prune` cuts a student; a training run never reads them
                     *(("prune", f.name) for f in dataclasses.fields(PruneConfig))}


class RunDir:
    """A run directory by path; its attributes are the paths of what it holds."""

    def __init__(self, path: str):
        self.path = path
        join = lambda *parts: os.path.join(path, *parts)  # noqa: E731
        self.config, self.metrics = join("config.yaml"), join("metrics.jsonl")
        self.checkpoints_dir, self.plots = join("checkpoints"), join("plots")
        self.model, self.adapters = join("model"), join("adapters.safetensors")
        self.eval_json, self.eval_teacher = join("eval.json"), join("eval_teacher.safetensors")
        self.projector = join("hidden_projector.safetensors")
        self.profile, self.lock = join("profile"), join(".lock")

    def is_run(self) -> bool:
        return os.path.isfile(self.config)

    # ------------------------------------------------------------ the config

    def check_same_run(self, cfg: Config) -> None:
        """Refuse `cfg` when the directory holds a run of another config: a resume must
        compute what the first run computed (RESUMABLE_CHANGES excepted)."""
        if not os.path.exists(self.config):
            return
        with open(self.config) as f:
            old = from_dict(yaml.safe_load(f) or {}, source=self.config).to_dict()
        flat = lambda d: {(s, k): v for s, body in d.items() for k, v in body.items()}  # noqa: E731
        refuse_changed(
            flat(old), flat(cfg.to_dict()), ignore=RESUMABLE_CHANGES,
            message=lambda key, was, now: (
                f"run dir {self.path} holds a run with {key[0]}.{key[1]}={was!r}, not "
                f"{now!r}; resume with the same config or choose another run.dir"))

    def save_config(self, cfg: Config) -> None:
        save_config(cfg, self.config)

    def load_config(self) -> Config:
        """The run's config, its relative inputs anchored where `train` ran (_anchor_inputs)."""
        if not self.is_run():
            raise ConfigError(f"{self.path} is not a run directory (no config.yaml); pass the "
                              "run.dir of a `mlxdistill train` run")
        with open(self.config) as f:
            cfg = from_dict(yaml.safe_load(f) or {}, source=self.config)
        return _anchor_inputs(cfg, self.path)

    # ------------------------------------------------------------ checkpoints

    def checkpoints(self) -> list[str]:
        d = self.checkpoints_dir
        if not os.path.isdir(d):
            return []
        return sorted(os.path.join(d, n) for n in os.listdir(d)
                      if n.startswith("step-") and not files.is_tmp(n)
                      and os.path.isfile(os.path.join(d, n, "state.json")))

    def save_checkpoint(self, step: int, model, opt, state: dict, keep: int) -> None:
        """Weights, optimizer state and `state` (step, data position, ...) under
        checkpoints/step-NNNNNN, written as a temp directory and renamed: a save killed half
        way leaves the previous checkpoints untouched. The newest `keep` are kept."""
        d = os.path.join(self.checkpoints_dir, f"step-{step:06d}")
        with files.atomic_dir(d) as tmp:
            mx.save_safetensors(os.path.join(tmp, "weights.safetensors"),
                                dict(tree_flatten(model.trainable_parameters())))
            mx.save_safetensors(os.path.join(tmp, "optimizer.safetensors"),
                                dict(tree_flatten(opt.state)))
            with open(os.path.join(tmp, "state.json"), "w") as f:
                json.dump({"step": step, **state}, f)
        for old in self.checkpoints()[:-keep]:
            shutil.rmtree(old, ignore_errors=True)

    def restore(self, model, opt, log) -> dict:
        """Load the newest checkpoint into `model` and `opt` and cut metrics.jsonl back to
        it; {"step": 0} (and no metrics) when there is none."""
        files.remove_stale_tmp(self.checkpoints_dir)  # saves cut by a kill
        ckpts = self.checkpoints()
        if not ckpts:
            if os.path.exists(self.metrics):
                os.remove(self.metrics)
            return {"step": 0}
        state = restore_checkpoint(ckpts[-1], model, opt)
        # Drop metrics logged after the checkpoint: they will be logged again.
        if os.path.exists(self.metrics):
            with open(self.metrics, "r+b") as f:
                f.truncate(state["metrics_bytes"])
        log(f"resuming {self.path} at step {state['step']}")
        return state

    # ------------------------------------------------------------ the student

    def save_student(self, model, tok, student_cfg: dict, cfg: Config, adapter_cfg: dict,
                     log) -> None:
        """The trained student as mlx_lm reads it: model/ (full) or adapters (LoRA, DoRA).
        A hidden-state projector is training-only: it is kept beside the student, not in it."""
        if "distill_proj" in model:
            proj = dict(tree_flatten(model.pop("distill_proj").parameters()))
            with files.atomic_path(self.projector) as tmp:
                mx.save_safetensors(tmp, proj)
        if cfg.train.mode == "full":
            saving.save_full_model(model, tok, student_cfg, cfg.student.model, self.model,
                                   data_mod.chat_template_text(cfg.data.chat_template))
            log(f"saved the student to {self.model} (mlx_lm folder)")
        else:
            saving.save_adapters(model, adapter_cfg, cfg.student.model, self.path)
            log(f"saved {cfg.train.mode} adapters to {self.path} (mlx_lm.generate --model "
                f"{cfg.student.model} --adapter-path {self.path})")

    def finished(self, iters: int) -> bool:
        """Whether training is done: the student saved after a checkpoint at `iters` steps or
        more. A larger train.iters resumes the run; a student older than the newest
        checkpoint (a kill between the two saves, after train.iters was raised) is stale,
        and a run whose student is missing or stale is finished by saving it again."""
        ckpts = self.checkpoints()
        student = self.model if os.path.isdir(self.model) else self.adapters
        if not ckpts or not os.path.exists(student):
            return False
        state = os.path.join(ckpts[-1], "state.json")
        if os.path.getmtime(student) < os.path.getmtime(state):
            return False
        with open(state) as f:
            return json.load(f)["step"] >= iters

    def student_path(self) -> Optional[str]:
        """model/ of a full run, the run dir itself for adapters, None if the run is unfinished."""
        if os.path.isdir(self.model):
            return self.model
        return self.path if os.path.isfile(self.adapters) else None

    def load_student(self, cfg: Config):
        """The trained student, loaded as mlx_lm would (fused folder or base + adapters)."""
        if os.path.isdir(self.model):
            return models.load(self.model, "trained student",
                               trust_remote_code=cfg.student.trust_remote_code)[0]
        if os.path.isfile(self.adapters):
            return models.load_role(cfg, "student", adapter_path=self.path)[0]
        raise ConfigError(f"{self.path} has neither model/ nor adapters.safetensors; the run "
                          "did not finish: rerun `mlxdistill train` with the same config to "
                          "complete it")


def restore_checkpoint(ckpt: str, model, opt) -> dict:
    with open(os.path.join(ckpt, "state.json")) as f:
        state = json.load(f)
    model.load_weights(list(mx.load(os.path.join(ckpt, "weights.safetensors")).items()),
                       strict=False)
    opt.init(model.trainable_parameters())
    opt.state = tree_unflatten(list(mx.load(os.path.join(ckpt, "optimizer.safetensors")).items()))
    return state


class RunLock(files.PidLock):
    """One `train` per run directory: a second one would interleave checkpoints and metrics."""

    def __init__(self, run_dir: str):
        super().__init__(RunDir(run_dir).lock, f"run dir {run_dir}",
                         "wait for it or choose another run.dir", ConfigError)


def _anchor_inputs(cfg: Config, run_dir: str) -> Config:
    """A run's config.yaml holds its inputs as `train` was given them: relative paths are
    valid from the directory it ran in. That directory is the one from which the recorded
    run.dir leads to this run directory; inputs are looked up there first, so eval, export
    and profile work from anywhere. A run directory moved since (or an absolute run.dir)
    leaves them as they are, relative to where the command runs."""
    rec = os.path.normpath(cfg.run.dir)
    here = os.path.abspath(run_dir)
    if os.path.isabs(rec) or rec.startswith(os.pardir):
        return cfg
    origin = here
    for _ in rec.split(os.sep):
        origin = os.path.dirname(origin)
    if os.path.join(origin, rec) != here or origin == os.getcwd():
        return cfg

    def anchor(p):
        if not p or os.path.isabs(p) or not os.path.exists(os.path.join(origin, p)):
            return p
        return os.path.join(origin, p)

    d = cfg.data
    return dataclasses.replace(
        cfg,
        teacher=dataclasses.replace(cfg.teacher, model=anchor(cfg.teacher.model)),
        student=dataclasses.replace(cfg.student, model=anchor(cfg.student.model)),
        data=dataclasses.replace(d, train=anchor(d.train), valid=anchor(d.valid),
                                 test=anchor(d.test), chat_template=anchor(d.chat_template)),
        cache=dataclasses.replace(cfg.cache, dir=anchor(cfg.cache.dir),
                                  mix=tuple(anchor(m) for m in cfg.cache.mix)))
