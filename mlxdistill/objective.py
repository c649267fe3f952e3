"""What the student minimises: one immutable description, built once from the config, and
the loss function it binds to a model. Training, `plan --probe` and the benchmarks all take
their loss from here, so they measure the same thing, the hidden-state term included.

    loss = (1 - alpha) KD + alpha CE  [+ hidden_weight x hidden-state term]

The KD and CE parts come from the final logits, over the whole sequence or in
`train.loss_chunk` chunks of positions (losses.chunked_distill_loss); the hidden-state term
compares mapped student blocks, through a learned projection, with the teacher states a cache
holds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import mlx.core as mx

from . import losses, models, surgery, xlosses
from .config import ConfigError


@dataclass(frozen=True)
class Hidden:
    """Hidden-state distillation on a student: (student block, teacher layer) pairs and the
    dict the captured student blocks write their outputs into on every forward pass."""
    pairs: tuple
    store: dict


@dataclass(frozen=True)
class Objective:
    kd: losses.KD = losses.KD()
    hidden_weight: float = 1.0
    hidden_loss: str = "cosine"
    loss_chunk: int = 0  # positions per chunk of the logits' loss (0: the whole sequence)
    grad_checkpoint: bool = False
    xtok: str = ""  # a cross-tokenizer loss (xtok.LOSSES): the student has its own tokens

    @classmethod
    def from_config(cls, cfg, xtok: str = "", alpha: Optional[float] = None) -> "Objective":
        """The config's objective; `xtok` and its `alpha` (xtok.alpha) for a student of
        another tokenizer."""
        lc, t = cfg.loss, cfg.train
        a = lc.alpha if alpha is None else alpha
        return cls(losses.KD(lc.name, lc.temperature, lc.beta, lc.skew, a),
                   lc.hidden_weight, lc.hidden_loss, t.loss_chunk, t.grad_checkpoint, xtok)

    def bind(self, model, vocab: int, hidden: Optional[Hidden] = None,
             log: Callable[[str], None] = lambda m: None, what: str = "the student",
             id_map=None):
        """loss_fn(model, x, mask, labels, targets) -> (loss, (ntok, kd, ce, hidden)), the
        form step.make_step takes. Applies gradient checkpointing to `model` when asked (it
        changes the model's blocks, once). A cross-tokenizer objective needs `id_map`
        (teacher id -> student id of the same string, align.string_map)."""
        if self.grad_checkpoint:
            surgery.grad_checkpoint(model)
        forward = models.logits_fn(model, vocab)
        split = surgery.split_head(model, vocab) if self.loss_chunk and not self.xtok else None
        if self.loss_chunk and split is None:
            log(f"train.loss_chunk: {what} computes its logits in a way this does not "
                "split" + (" or trains across tokenizers" if self.xtok else "")
                + "; using the whole-sequence loss")
        if self.xtok:
            id_map = mx.array(id_map, dtype=mx.int32)

        def logits_terms(x, targets, labels, mask):
            if self.xtok:
                return xlosses.cross_distill_loss(self.xtok, forward(x), targets, labels,
                                                  mask, id_map, self.kd)
            if split is None:
                return losses.distill_loss(forward(x), targets, labels, mask, self.kd)
            body, head, head_module = split
            return losses.chunked_distill_loss(body(x), head,
                                               head_module.trainable_parameters(), targets,
                                               labels, mask, self.loss_chunk, self.kd)

        def loss_fn(_model, x, mask, labels, targets):
            loss, ntok, kd, ce = logits_terms(x, targets, labels, mask)
            hid = mx.array(0.0)
            if hidden is not None:
                for j, (ls, lt) in enumerate(hidden.pairs):
                    pred = model.distill_proj.maps[j](hidden.store[ls])
                    hid = hid + losses.hidden_loss(pred, targets[f"hidden.{lt}"], mask,
                                                   self.hidden_loss)[0] / len(hidden.pairs)
                loss = loss + self.hidden_weight * hid
            return loss, (ntok, kd, ce, hid)

        return loss_fn


def setup_hidden(cfg, model, student_cfg: dict, teacher_layers: list, n_teacher_layers: int,
                 d_teacher: int) -> Optional[Hidden]:
    """Hidden-state distillation when the teacher's states at `teacher_layers` are in the
    targets: capture the mapped student blocks and attach one learned projection per pair.
    The projector rides on the student as `distill_proj` so the one optimizer and checkpoint
    cover it; it is taken off before the student is saved (rundir.save_student)."""
    if not teacher_layers:
        return None
    n_s = surgery.num_layers(model)
    s_layers = list(cfg.loss.hidden_student_layers) or surgery.default_layer_map(
        teacher_layers, n_teacher_layers, n_s)
    if len(s_layers) != len(teacher_layers):
        raise ConfigError(f"loss.hidden_student_layers has {len(s_layers)} entries for "
                          f"{len(teacher_layers)} cached teacher layers {teacher_layers}")
    s_layers = surgery.resolve_layers(s_layers, n_s, "loss.hidden_student_layers")
    store = surgery.capture_layers(model, s_layers)
    model.distill_proj = surgery.Projector(int(student_cfg["hidden_size"]), d_teacher,
                                           len(teacher_layers))
    return Hidden(tuple(zip(s_layers, teacher_layers)), store)
