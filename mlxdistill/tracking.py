"""Experiment tracking (`train.report_to`): every metrics.jsonl record also goes to a tracker.

The trainer opens one on rank 0, logs each record it writes, and closes it when the loop
ends; every other rank (and `report_to: none`) gets `Null`, so the loop has no branches.
wandb is an optional extra (`pip install "mlxdistill[wandb]"`), imported only when asked
for; `check` runs before any work, so a missing package fails at once, not after the teacher
pass. wandb's own settings apply as usual: WANDB_MODE=offline, WANDB_DIR, WANDB_PROJECT.
"""

from __future__ import annotations

import os

from .config import Config, ConfigError

PROJECT = "mlxdistill"  # the wandb project unless WANDB_PROJECT names another


class Null:
    """No tracking."""

    def log(self, rec: dict) -> None:
        pass

    def close(self) -> None:
        pass


class Wandb:
    """One wandb run per `train` invocation, named after the run directory, its config the
    resolved config; metrics are logged at their training step."""

    def __init__(self, cfg: Config):
        wandb = _import_wandb()
        name = os.path.basename(os.path.abspath(cfg.run.dir))
        try:
            self.run = wandb.init(project=os.environ.get("WANDB_PROJECT") or PROJECT,
                                  name=name, config=cfg.to_dict())
        except Exception as e:  # no login, no network: wandb's many errors, as one line
            why = " ".join(str(e).split()) or type(e).__name__
            raise ConfigError(f"train.report_to=wandb: wandb could not start a run ({why}); "
                              "run `wandb login`, or set WANDB_MODE=offline to log to disk "
                              "and `wandb sync` later") from None

    def log(self, rec: dict) -> None:
        self.run.log({k: v for k, v in rec.items() if k != "step"}, step=rec["step"])

    def close(self) -> None:
        self.run.finish()


def _import_wandb():
    try:
        import wandb  # the optional extra: only when train.report_to asks for it
    except ImportError:
        raise ConfigError('train.report_to=wandb needs the wandb package: pip install '
                          '"mlxdistill[wandb]"') from None
    return wandb


def check(cfg: Config) -> None:
    """Fail now if the tracker `cfg` asks for cannot be used (before any work)."""
    if cfg.train.report_to == "wandb":
        _import_wandb()


def open_tracker(cfg: Config, main: bool = True):
    """The tracker of `cfg` (.log(record), .close()); `Null` off rank 0 and for `none`."""
    if main and cfg.train.report_to == "wandb":
        return Wandb(cfg)
    return Null()
