"""The Python API: one function per command, what `mlxdistill COMMAND` runs, and the place
where stages are strung together (train, then evaluate). The command line (cli.py) parses
arguments and calls these; scripts and notebooks call them directly.

    from mlxdistill import api
    cfg = api.load_config("configs/default.yaml", ["train.iters=50"])
    result = api.train(cfg)            # eval.json's content: teacher / before / after
    model, tokenizer = api.load_student(cfg.run.dir)
"""

from __future__ import annotations

from typing import Optional

from . import cache as cache_mod
from . import evaluate as evaluate_mod
from . import export as export_mod
from . import generate as generate_mod
from . import models
from . import plan as plan_mod
from . import profile as profile_mod
from . import trainer
from .config import Config, load_config  # noqa: F401  (part of the API)
from .distributed import World
from .rundir import RunDir


def train(cfg: Config, quiet: bool = False, log=print) -> Optional[dict]:
    """Train the student (building the teacher cache if it is missing), then evaluate it
    against the teacher on held-out data (rank 0; other ranks return None).

    The teacher is loaded at most once before training (cache pass and validation targets
    share it) and released before the loop in cache mode, so the student trains without it;
    evaluation loads it again once the student is saved. In online mode, where the teacher
    stays in memory for training, evaluation reuses it."""
    teacher = models.Lazy(cfg, "teacher")
    if not trainer.fit(cfg, quiet, log, teacher):
        return None
    return evaluate_mod.evaluate_run(cfg.run.dir, quiet=quiet, log=log, cfg=cfg,
                                     teacher=teacher)


def fit(cfg: Config, quiet: bool = False, log=print) -> bool:
    """Train only (no final evaluation); True on rank 0."""
    return trainer.fit(cfg, quiet, log)


def build_cache(cfg: Config, quiet: bool = False, log=print) -> dict:
    """The teacher pass over data.train -> cache.dir (resumes a killed pass); the manifest."""
    world = World(cfg.run.dist_timeout)
    log = log if world.main else (lambda m: None)  # rank 0 reports for all
    log(world.describe())
    m = cache_mod.build(cfg, quiet=quiet, log=log, world=world)
    log(f"cache {cfg.cache.dir}: {m['rows']} rows, {m['tokens']} tokens, mode {m['mode']}")
    return m


def inspect_cache(cache_dir: str) -> dict:
    """A cache's manifest summary, after verifying every shard."""
    return cache_mod.summary(cache_dir)


def generate(cfg: Config, quiet: bool = False, log=print) -> dict:
    """Teacher-written answers for generate.prompts -> generate.out (resumes)."""
    return generate_mod.generate(cfg, quiet=quiet, log=log)


def evaluate(run_dir: str, data_path: Optional[str] = None, quiet: bool = False,
             log=print) -> dict:
    """Evaluate a finished run against its teacher (writes RUN_DIR/eval.json)."""
    return evaluate_mod.evaluate_run(run_dir, data_path, quiet=quiet, log=log)


def load_run_config(run_dir: str) -> Config:
    """The config a finished run trained with, its relative inputs found from anywhere."""
    return RunDir(run_dir).load_config()


def load_student(run_dir: str):
    """(model, tokenizer) of a finished run's student, as mlx_lm loads it."""
    run = RunDir(run_dir)
    cfg = run.load_config()
    model = run.load_student(cfg)
    _, tok = models.load_meta(cfg.student.model, "student")
    return model, tok


def export(run_dir: str, out: str, bits: int = 16, group_size: int = 64, force: bool = False,
           log=print, **kw) -> dict:
    """Fuse, optionally quantize and verify a run's student into `out` (export.export_run's
    keywords: tune_iters, tune_lr, gguf, target_quality)."""
    return export_mod.export_run(run_dir, out, bits, group_size, force, log=log, **kw)


def profile(model_or_run: str, bits=(16, 8, 4), prompt_tokens: int = 128,
            gen_tokens: int = 64, repeats: int = 3, group_size: int = 64,
            out_dir: Optional[str] = None, log=print) -> dict:
    """Latency, memory and fidelity per precision, projected onto target devices."""
    return profile_mod.run_profile(model_or_run, list(bits), prompt_tokens, gen_tokens,
                                   repeats, group_size, out_dir, log=log)


def plan(cfg: Config, probe: bool = False, memory_bytes: Optional[int] = None,
         metal: Optional[bool] = None) -> dict:
    """Will `cfg` fit? Peak memory of the teacher pass and training, cache size, time."""
    return plan_mod.plan(cfg, probe=probe, memory_bytes=memory_bytes, metal=metal)
