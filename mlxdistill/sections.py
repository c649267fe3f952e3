"""The configuration's sections: one frozen dataclass per YAML section, each key with its
default, its one description (docs/configuration.md and `mlxdistill config` are generated
from them) and its check, run when the section is built. Loading YAML and command-line
overrides into these is config.py's job."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Optional

from . import remote
from .errors import Error
from .losses import DIVERGENCES


class ConfigError(Error):
    """A user error in a config file or override; the message is one line."""


def check(cond: bool, msg: str) -> None:
    """Raise ConfigError(msg) unless `cond`."""
    if not cond:
        raise ConfigError(msg)


def _one_of(key: str, value: Any, allowed) -> None:
    check(value in allowed, f"{key}={value!r} is not valid; use one of: {', '.join(allowed)}")


def _key(default: Any, doc: str) -> Any:
    """A config key with its one description: the configuration reference
    (docs/configuration.md, `mlxdistill config`) is generated from these."""
    return field(default=default, metadata={"doc": doc})


def _whole(value: Any, least: int = 1) -> bool:
    """An int (not a bool, which is one to Python) of at least `least`."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


def _positive(key: str, value: Any, allow_zero: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = ok and (value >= 0 if allow_zero else value > 0)
    check(ok, f"{key}={value!r} must be a {'non-negative' if allow_zero else 'positive'} number")


@dataclass(frozen=True)
class TeacherConfig:
    model: str = _key("weights/teacher", "mlx_lm model folder or hub id; for `generate` also "
                      "the base URL of an OpenAI-compatible endpoint (`http(s)://HOST/v1`: "
                      "mlx_lm.server, vLLM, llama.cpp's server, a cloud API), which the "
                      "`teacher.api_*` keys and `concurrency`, `max_retries`, `timeout` "
                      "configure (docs/sequence-level.md)")
    mode: str = _key("cache", "`cache` (train from `cache.dir`) or `online` (the teacher stays "
                     "in memory and gives dense targets each step)")
    trust_remote_code: bool = _key(False, "run the model folder's own Python (`model_file` in "
                                   "its config.json); never by default")
    api_model: Optional[str] = _key(None, "HTTP teacher: the `model` sent with each request "
                                    "(null: the one model the endpoint's /models lists)")
    api_key_env: Optional[str] = _key(None, "HTTP teacher: the name of the environment "
                                      "variable holding the API key, sent as `Authorization: "
                                      "Bearer` and never written anywhere (null: no key)")
    api_endpoint: str = _key("chat", "HTTP teacher, `prompt` records: `chat` (one user "
                             "message to /chat/completions) or `completions` (the raw text, "
                             "with the reasoning opener, to /completions); `messages` records "
                             "always go to /chat/completions")
    api_n: bool = _key(True, "HTTP teacher: ask for `generate.n` answers in one request (the "
                       "API's `n`; an endpoint that answers fewer is asked again for the "
                       "rest, one that refuses `n` gets one request per answer); false: one "
                       "request per answer from the start")
    api_top_logprobs: int = _key(0, "HTTP teacher, `generate`: ask the chat endpoint for the "
                                 "top this-many log-probabilities of each answer token "
                                 "(OpenAI's `top_logprobs`, 1-20; mlx_lm.server gives up to "
                                 "11) and keep them in each written record as "
                                 "`teacher_logprobs`, from which `cache` builds a top-k cache "
                                 "(0: none)")
    tokenizer: Optional[str] = _key(None, "HTTP teacher, `cache`/`train`: a local folder "
                                    "with the endpoint model's tokenizer (its tokenizer files "
                                    "and config.json; no weights), which reads the endpoint's "
                                    "tokens as ids")
    concurrency: int = _key(8, "HTTP teacher: requests in flight at once")
    max_retries: int = _key(6, "HTTP teacher: retries of a request after a 408, 429 or 5xx, a "
                            "timeout, a dropped connection or a broken answer, with exponential "
                            "backoff and jitter (or the server's Retry-After)")
    timeout: float = _key(300.0, "HTTP teacher: seconds to wait for an answer (a request "
                          "queued behind others on a busy server counts)")

    def __post_init__(self):
        _one_of("teacher.mode", self.mode, ("cache", "online"))
        check(isinstance(self.trust_remote_code, bool),
              f"teacher.trust_remote_code={self.trust_remote_code!r} must be true or false")
        if remote.is_url(self.model):
            problem = remote.url_problem(self.model)
            check(problem is None, f"teacher.model={remote.redact(self.model)}: {problem}")
        for key in ("api_model", "api_key_env"):
            v = getattr(self, key)
            check(v is None or (isinstance(v, str) and v.strip() != ""),
                  f"teacher.{key}={v!r} must be a string or null")
        check(self.api_key_env is None or remote.ENV_NAME.match(self.api_key_env) is not None,
              f"teacher.api_key_env must name an environment variable (e.g. OPENAI_API_KEY), "
              "not hold the key itself")
        _one_of("teacher.api_endpoint", self.api_endpoint, ("chat", "completions"))
        check(isinstance(self.api_n, bool),
              f"teacher.api_n={self.api_n!r} must be true or false")
        check(_whole(self.api_top_logprobs, 0) and self.api_top_logprobs <= 20,
              f"teacher.api_top_logprobs={self.api_top_logprobs!r} must be an integer in 0..20 "
              "(OpenAI's limit; 0: none)")
        check(self.tokenizer is None or (isinstance(self.tokenizer, str) and self.tokenizer),
              f"teacher.tokenizer={self.tokenizer!r} must be a folder or null")
        check(_whole(self.concurrency),
              f"teacher.concurrency={self.concurrency!r} must be a positive integer")
        check(_whole(self.max_retries, 0),
              f"teacher.max_retries={self.max_retries!r} must be an integer >= 0")
        _positive("teacher.timeout", self.timeout)


@dataclass(frozen=True)
class StudentConfig:
    model: str = _key("weights/student", "mlx_lm model folder or hub id; must share the "
                      "teacher's tokenizer")
    trust_remote_code: bool = _key(False, "as `teacher.trust_remote_code`, for the student")

    def __post_init__(self):
        check(isinstance(self.trust_remote_code, bool),
              f"student.trust_remote_code={self.trust_remote_code!r} must be true or false")


@dataclass(frozen=True)
class DataConfig:
    train: str = _key("data/train.jsonl", "training data: mlx_lm JSONL (`text`, "
                      "`prompt`/`completion` or `messages` records) or `.txt`")
    valid: Optional[str] = _key("data/valid.jsonl", "validation data for the periodic "
                                "evaluation (null: none)")
    test: Optional[str] = _key("data/test.jsonl", "held-out data for the final evaluation "
                               "(null: none)")
    dir: Optional[str] = _key(None, "a folder in mlx_lm's layout (what `mlx_lm.lora --data "
                              "DIR` takes): its train.jsonl, valid.jsonl and test.jsonl become "
                              "`train`, `valid` and `test` unless those are given beside it "
                              "(in the same file, or on the command line with it); a missing "
                              "valid or test is noted and left null")
    test_records: Optional[int] = _key(None, "records of the held-out data that evaluation "
                                       "reads (after training, `eval`, export's fallback "
                                       "threshold), the first ones (null: all), of data.test "
                                       "and of data.valid where the fallback rule is fitted: "
                                       "bounds its time on a large test set")
    seq_len: int = _key(256, "tokens per packed row; must fit both models' context")
    max_rows: Optional[int] = _key(None, "cap on packed training rows (null: all): sizes the "
                                   "teacher pass to what a run uses; a cache built for more "
                                   "rows serves its first `max_rows`")
    mask_prompt: bool = _key(True, "train only on the completion of prompt/completion records "
                             "and the last message of chat records (mlx_lm's `--mask-prompt`)")
    chat_template: Optional[str] = _key(None, "a Jinja chat template, or the path of a file "
                                        "holding one, used instead of the models' own for "
                                        "chat and prompt/completion records (teacher pass, "
                                        "generate, training, eval) and written into the "
                                        "trained and exported student's tokenizer; chat "
                                        "records need a template (null: the tokenizer's)")
    long_lines: str = _key("split", "a record longer than `seq_len`: `split` (runs on into the "
                           "next row) or `truncate` (keeps its first `seq_len` tokens); "
                           "counted either way")
    packing: str = _key("auto", "`auto`: a prompt/completion or chat record that does not fit "
                        "what is left of a row starts the next one (the rest is padding, not "
                        "trained on), so no completion is trained without its prompt; text "
                        "runs on. `stream`: every record runs on; `whole`: text kept whole too")

    def __post_init__(self):
        check(isinstance(self.seq_len, int) and self.seq_len >= 2,
              f"data.seq_len={self.seq_len!r} must be an integer >= 2")
        for split in ("train", "valid", "test"):
            p = getattr(self, split)
            check(not (isinstance(p, str) and os.path.isdir(p)),
                  f"data.{split}={p} is a folder, not a JSONL file; for a folder of "
                  f"train.jsonl/valid.jsonl/test.jsonl as mlx_lm takes it, set data.dir={p}")
        for key in ("dir", "chat_template"):
            v = getattr(self, key)
            check(v is None or (isinstance(v, str) and v.strip() != ""),
                  f"data.{key}={v!r} must be a string or null")
        _one_of("data.long_lines", self.long_lines, ("split", "truncate"))
        _one_of("data.packing", self.packing, ("auto", "stream", "whole"))
        if self.max_rows is not None:
            check(isinstance(self.max_rows, int) and self.max_rows > 0,
                  f"data.max_rows={self.max_rows!r} must be a positive integer or null")
        check(self.test_records is None or _whole(self.test_records),
              f"data.test_records={self.test_records!r} must be a positive integer or null")


@dataclass(frozen=True)
class CacheConfig:
    dir: str = _key("caches/default", "the teacher cache's folder")
    mode: str = _key("sample", "`sample` (n draws per position, unbiased) or `topk` (the k "
                     "most likely ids with their log-probabilities, and the tail's)")
    n: int = _key(16, "draws per position in sample mode (1-255)")
    k: int = _key(64, "ids per position in topk mode")
    temperature: float = _key(1.0, "teacher temperature at capture; must equal "
                              "`loss.temperature`")
    hidden_layers: tuple = _key((), "teacher blocks whose outputs are cached for hidden-state "
                                "distillation, counted from 0 (negative: from the end)")
    keep_top1: bool = _key(False, "sample mode: keep the teacher's top-1 id with its exact "
                           "probability in one of the n slots, the other n-1 drawn from the "
                           "rest (same bytes, less sampling noise)")
    next_logprob: bool = _key(False, "also store the teacher's log-probability (temperature "
                              "1) of each actual next token, float32 per position (4 B/token): "
                              "what `loss.xtok=chunk` needs; a cache without it serves every "
                              "other loss")
    shard_rows: int = _key(256, "rows per shard: the unit of resume after a kill")
    batch_size: int = _key(8, "rows per teacher forward pass")
    seed: int = _key(0, "sampling seed (per-shard keys: a resumed pass redraws identically)")
    mix: tuple = _key((), "multi-teacher: more caches (other teachers, the same data settings) "
                      "mixed with this one; with teachers of different tokenizers each step "
                      "trains on one cache, drawn by `mix_weights`")
    mix_weights: tuple = _key((), "multi-teacher: one weight per cache, `cache.dir` first "
                              "([]: equal)")
    mix_mode: str = _key("weights", "multi-teacher: `weights` (a mixture) or `confidence` "
                         "(per position, the teacher most sure of its top token)")

    def __post_init__(self):
        _one_of("cache.mode", self.mode, ("sample", "topk"))
        _one_of("cache.mix_mode", self.mix_mode, ("weights", "confidence"))
        check(all(isinstance(d, str) for d in self.mix),
              f"cache.mix={list(self.mix)!r} must be a list of cache directories")
        if self.mix_weights:
            check(len(self.mix_weights) == len(self.mix) + 1,
                  f"cache.mix_weights has {len(self.mix_weights)} entries; it needs one per "
                  f"cache ({len(self.mix) + 1}: cache.dir, then cache.mix)")
            check(all(isinstance(w, (int, float)) and w >= 0 for w in self.mix_weights)
                  and sum(self.mix_weights) > 0,
                  f"cache.mix_weights={list(self.mix_weights)!r} must be non-negative, not "
                  "all zero")
        # uint8 counts hold at most 255 draws of one id.
        check(isinstance(self.n, int) and 1 <= self.n <= 255,
              f"cache.n={self.n!r} must be an integer in 1..255 (draws per position)")
        check(isinstance(self.keep_top1, bool),
              f"cache.keep_top1={self.keep_top1!r} must be true or false")
        check(not self.keep_top1 or (self.mode == "sample" and self.n >= 2),
              f"cache.keep_top1 needs cache.mode=sample and cache.n >= 2 (got mode="
              f"{self.mode!r}, n={self.n}); top-k already keeps the top ids exactly")
        check(isinstance(self.next_logprob, bool),
              f"cache.next_logprob={self.next_logprob!r} must be true or false")
        check(isinstance(self.k, int) and self.k >= 1, f"cache.k={self.k!r} must be >= 1")
        _positive("cache.temperature", self.temperature)
        check(all(isinstance(i, int) and not isinstance(i, bool) for i in self.hidden_layers),
              f"cache.hidden_layers={list(self.hidden_layers)!r} must be a list of layer "
              "indices")
        check(isinstance(self.shard_rows, int) and self.shard_rows >= 1,
              f"cache.shard_rows={self.shard_rows!r} must be a positive integer")
        check(isinstance(self.batch_size, int) and self.batch_size >= 1,
              f"cache.batch_size={self.batch_size!r} must be a positive integer")


LOSSES = tuple(DIVERGENCES)  # the loss names, in losses.py's order
XTOK = ("auto", "mapped", "hybrid", "uld", "chunk")  # loss.xtok's values (xtok.py)


@dataclass(frozen=True)
class LossConfig:
    name: str = _key("forward_kl", "the divergence: " + ", ".join(f"`{n}`" for n in LOSSES)
                     + " (sampled caches: `forward_kl` only)")
    alpha: float = _key(0.0, "weight of hard-label cross-entropy: (1 - alpha) KD + alpha CE")
    temperature: float = _key(1.0, "T; the divergence is scaled by T^2")
    beta: float = _key(0.5, "`jsd` (TRL's generalized JSD) and `symmetric_kl` ((1 - beta) "
                       "forward + beta reverse KL): 0 is forward KL, 1 reverse KL")
    skew: float = _key(0.1, "`skew_kl` / `skew_reverse_kl` mixture weight (DistiLLM)")
    lmbda: float = _key(0.0, "on-policy (GKD): fraction of steps trained on student-written "
                        "continuations scored by the live teacher; needs "
                        "`teacher.mode: online`")
    hidden_weight: float = _key(1.0, "weight of the hidden-state term (when the cache holds "
                                "`cache.hidden_layers`)")
    hidden_loss: str = _key("cosine", "hidden-state term: `cosine` (scale-free) or `mse`")
    hidden_student_layers: tuple = _key((), "student block per cached teacher layer, counted "
                                        "from 0 ([]: the same relative depth)")
    xtok: str = _key("auto", "the loss when the student's tokenizer differs from the teacher's "
                     "(a cache serves any student tokenizer): `mapped` (KL on the tokens whose "
                     "strings both vocabularies hold, the rest as one bucket), `hybrid` "
                     "(`mapped` plus ULD inside that bucket, TRL GOLD's), `uld` (sorted "
                     "probabilities, Boizard et al.), `chunk` (likelihood of the text between "
                     "shared token boundaries, ALM; needs `cache.next_logprob`); `auto`: "
                     "`mapped`, with `alpha` 0.5 when it is 0 (measured best, "
                     "docs/cross-tokenizer.md). `name`, `temperature` and `alpha` apply as for "
                     "one tokenizer")

    def __post_init__(self):
        _one_of("loss.name", self.name, LOSSES)
        _one_of("loss.xtok", self.xtok, XTOK)
        check(isinstance(self.alpha, (int, float)) and 0.0 <= self.alpha <= 1.0,
              f"loss.alpha={self.alpha!r} must be in [0, 1]")
        _positive("loss.temperature", self.temperature)
        check(isinstance(self.beta, (int, float)) and 0.0 <= self.beta <= 1.0,
              f"loss.beta={self.beta!r} must be in [0, 1]")
        check(isinstance(self.skew, (int, float)) and 0.0 < self.skew < 1.0,
              f"loss.skew={self.skew!r} must be in (0, 1)")
        check(isinstance(self.lmbda, (int, float)) and 0.0 <= self.lmbda <= 1.0,
              f"loss.lmbda={self.lmbda!r} must be in [0, 1]")
        _positive("loss.hidden_weight", self.hidden_weight, allow_zero=True)
        _one_of("loss.hidden_loss", self.hidden_loss, ("cosine", "mse"))


TRACKERS = ("none", "wandb")  # train.report_to's values (tracking.py)


@dataclass(frozen=True)
class TrainConfig:
    mode: str = _key("full", "`full`, `lora` or `dora` (mlx_lm's layers)")
    iters: int = _key(1000, "optimizer steps")
    batch_size: int = _key(8, "rows per step, over all ranks")
    lr: float = _key(3.0e-4, "AdamW peak learning rate")
    grad_accum: int = _key(1, "micro-batches per step (`batch_size` must be divisible by it)")
    lora_rank: int = _key(8, "LoRA/DoRA rank")
    lora_layers: int = _key(-1, "LoRA/DoRA: how many of the last blocks get adapters (-1: all)")
    lora_scale: float = _key(20.0, "LoRA/DoRA scale")
    lora_dropout: float = _key(0.0, "LoRA/DoRA dropout")
    save_every: int = _key(100, "steps between checkpoints")
    eval_every: int = _key(100, "steps between validations (CE, KL to the teacher, top-1 "
                           "agreement on `eval_rows` validation rows)")
    warmup: int = _key(20, "linear warm-up steps")
    min_lr_ratio: float = _key(0.1, "cosine decay floor, as a fraction of `lr`")
    weight_decay: float = _key(0.0, "AdamW weight decay")
    grad_clip: float = _key(1.0, "global gradient-norm clip (0: off)")
    eval_rows: int = _key(8, "validation rows whose teacher distributions are kept for the "
                          "periodic validation")
    report_every: int = _key(10, "steps between metrics.jsonl records")
    keep_checkpoints: int = _key(2, "newest checkpoints kept in `run.dir`/checkpoints")
    loss_chunk: int = _key(0, "positions per loss chunk (0: the whole sequence); each chunk's "
                           "logits are recomputed in the backward pass, so [B, L, V] float32 "
                           "logits never exist at once: for 150k-token vocabularies")
    grad_checkpoint: bool = _key(False, "recompute each block's activations in the backward "
                                 "pass instead of storing them (long sequences)")
    nonfinite_skips: int = _key(0, "steps with a non-finite loss or gradient that may be "
                                "skipped (update dropped, data moves on) before the run stops; "
                                "0 stops at the first, keeping the last good checkpoint")
    final_eval: bool = _key(True, "evaluate the student against the teacher on the held-out "
                            "data once training ends (`mlxdistill eval RUN_DIR` runs it any "
                            "time)")
    report_to: str = _key("none", "experiment tracking: `none`, or `wandb` (every metrics.jsonl "
                          "record also goes to a Weights & Biases run named after `run.dir`; "
                          "`pip install \"mlxdistill[wandb]\"`)")

    def __post_init__(self):
        _one_of("train.mode", self.mode, ("full", "lora", "dora"))
        for key in ("iters", "batch_size", "grad_accum", "lora_rank", "save_every",
                    "eval_every", "report_every", "keep_checkpoints"):
            v = getattr(self, key)
            check(isinstance(v, int) and v >= 1, f"train.{key}={v!r} must be a positive integer")
        check(self.batch_size % self.grad_accum == 0,
              f"train.batch_size={self.batch_size} must be divisible by "
              f"train.grad_accum={self.grad_accum}")
        check(isinstance(self.lora_layers, int) and (self.lora_layers == -1 or self.lora_layers > 0),
              f"train.lora_layers={self.lora_layers!r} must be -1 (all) or a positive integer")
        _positive("train.lr", self.lr)
        _positive("train.warmup", self.warmup, allow_zero=True)
        _positive("train.weight_decay", self.weight_decay, allow_zero=True)
        _positive("train.grad_clip", self.grad_clip, allow_zero=True)
        _positive("train.eval_rows", self.eval_rows, allow_zero=True)
        check(isinstance(self.loss_chunk, int) and self.loss_chunk >= 0,
              f"train.loss_chunk={self.loss_chunk!r} must be an integer >= 0 (0: off)")
        check(isinstance(self.grad_checkpoint, bool),
              f"train.grad_checkpoint={self.grad_checkpoint!r} must be true or false")
        check(isinstance(self.nonfinite_skips, int) and self.nonfinite_skips >= 0,
              f"train.nonfinite_skips={self.nonfinite_skips!r} must be an integer >= 0")
        check(0.0 <= self.min_lr_ratio <= 1.0,
              f"train.min_lr_ratio={self.min_lr_ratio!r} must be in [0, 1]")
        check(isinstance(self.final_eval, bool),
              f"train.final_eval={self.final_eval!r} must be true or false")
        _one_of("train.report_to", self.report_to, TRACKERS)


@dataclass(frozen=True)
class RunConfig:
    dir: str = _key("runs/default", "the run's output folder (model or adapters, metrics, "
                    "checkpoints, evaluation, plots)")
    seed: int = _key(0, "seed of the data order and of every random draw in training "
                     "(and of `prune.method: random`)")
    dist_timeout: float = _key(600.0, "several ranks: seconds a rank waits for the others (in "
                               "one collective, or to connect) before it stops with an error")

    def __post_init__(self):
        _positive("run.dist_timeout", self.dist_timeout)


@dataclass(frozen=True)
class GenerateConfig:
    prompts: str = _key("data/prompts.jsonl", "`generate`: prompts (JSONL: `prompt` or "
                        "`messages`, optional `answer`)")
    out: str = _key("data/generated.jsonl", "`generate`: output JSONL of prompt/completion "
                    "records")
    n: int = _key(1, "answers per prompt")
    max_tokens: int = _key(256, "tokens per answer at most")
    temperature: float = _key(0.7, "sampling temperature (0: greedy)")
    top_p: float = _key(1.0, "nucleus sampling mass")
    verifier: Optional[str] = _key(None, "keep only answers that pass: null (all), `exact`, "
                                   "`regex:PATTERN` or `module:function`")
    system: Optional[str] = _key(None, "system prompt for chat prompts (HTTP teacher: the "
                                 "system message of every chat request; for /completions, "
                                 "text before the prompt)")
    batch_size: int = _key(8, "prompts per batched generation call (HTTP teacher: prompts per "
                           "written batch); a batch is the unit of resume")
    seed: int = _key(0, "sampling seed (HTTP teacher: each request gets one derived from it and "
                     "the prompt's position, sent when `temperature` > 0)")
    reasoning: Optional[str] = _key(None, "where the final answer starts: null (the whole "
                                    "answer), `think`, or `\"TEXT{reasoning}TEXT{answer}TEXT\"`; "
                                    "the verifier and task accuracy see the final answer only")
    eval_prompts: int = _key(200, "test records with an `answer` that `eval` scores for task "
                             "accuracy and grades the fallback rule on, and as many of "
                             "data.valid's that fit the rule (0: off)")

    def __post_init__(self):
        check(self.reasoning is None or self.reasoning == "think"
              or (isinstance(self.reasoning, str)
                   and 0 <= self.reasoning.find("{reasoning}")
                   < self.reasoning.find("{answer}") - len("{reasoning}")),
              f"generate.reasoning={self.reasoning!r}: use null, think, or a template with "
              "{reasoning}, then the text that ends it, then {answer}")
        check(isinstance(self.eval_prompts, int) and not isinstance(self.eval_prompts, bool)
              and self.eval_prompts >= 0,
              f"generate.eval_prompts={self.eval_prompts!r} must be a non-negative integer")
        for key in ("n", "max_tokens", "batch_size"):
            v = getattr(self, key)
            check(isinstance(v, int) and v >= 1,
                  f"generate.{key}={v!r} must be a positive integer")
        _positive("generate.temperature", self.temperature, allow_zero=True)
        check(isinstance(self.top_p, (int, float)) and 0.0 < self.top_p <= 1.0,
              f"generate.top_p={self.top_p!r} must be in (0, 1]")


PRUNE_METHODS = ("activation", "random")  # prune.method's values (prune.py)


@dataclass(frozen=True)
class PruneConfig:
    num_hidden_layers: Optional[int] = _key(None, "`prune`: blocks the student keeps, the "
                                            "teacher's most influential (null: all)")
    hidden_size: Optional[int] = _key(None, "`prune`: embedding channels kept (null: the "
                                      "teacher's)")
    intermediate_size: Optional[int] = _key(None, "`prune`: MLP channels kept per block "
                                            "(null: the teacher's)")
    num_attention_heads: Optional[int] = _key(None, "`prune`: query heads kept per block, "
                                              "whole (head_dim stays the teacher's, written "
                                              "into config.json when hidden_size / heads no "
                                              "longer gives it; qwen2 needs heads x head_dim "
                                              "= hidden_size) (null: the teacher's)")
    num_key_value_heads: Optional[int] = _key(None, "`prune`: kv heads kept per block, with "
                                              "the same number of query heads each; must "
                                              "divide `num_attention_heads` (null: the "
                                              "teacher's query heads per kv head)")
    method: str = _key("activation", "`prune`: `activation` (channels and heads by the "
                       "teacher's activations on `rows` rows of data.train, as Minitron; "
                       "blocks by Block Influence, 1 - cosine of a block's input and output, "
                       "as ShortGPT) or `random` (the same numbers drawn at random from "
                       "`run.seed`: the control)")
    rows: int = _key(64, "`prune`: packed rows of data.train (data.seq_len tokens each) the "
                     "teacher reads to measure importance")
    target_params: Optional[float] = _key(None, "`prune`: a parameter budget instead of the "
                                          "sizes (e.g. 1300000): the largest shape within it, "
                                          "depth and width cut alike (null: the sizes decide)")

    def __post_init__(self):
        for key in ("num_hidden_layers", "hidden_size", "intermediate_size",
                    "num_attention_heads", "num_key_value_heads"):
            v = getattr(self, key)
            check(v is None or _whole(v),
                  f"prune.{key}={v!r} must be a positive integer or null (the teacher's)")
        _one_of("prune.method", self.method, PRUNE_METHODS)
        check(_whole(self.rows),
              f"prune.rows={self.rows!r} must be a positive integer")
        check(self.target_params is None or (isinstance(self.target_params, (int, float))
                                              and not isinstance(self.target_params, bool)
                                              and self.target_params >= 1),
              f"prune.target_params={self.target_params!r} must be a number of parameters "
              "(e.g. 1300000) or null")


@dataclass(frozen=True)
class Config:
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    data: DataConfig = field(default_factory=DataConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    run: RunConfig = field(default_factory=RunConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)

    def __post_init__(self):
        # Cross-section rules, checked on load so they fail before any compute.
        check(self.teacher.mode == "online" or self.cache.mode != "sample"
              or self.loss.name == "forward_kl",
              f"loss.name={self.loss.name} needs the teacher's probabilities, which a sampled "
              "cache does not hold (only draws); use cache.mode=topk or loss.name=forward_kl")
        check(self.loss.lmbda == 0 or self.teacher.mode == "online",
              f"loss.lmbda={self.loss.lmbda} scores student-written sequences with the live "
              "teacher; set teacher.mode=online (or loss.lmbda=0)")
        check(self.teacher.mode == "cache" or not self.cache.hidden_layers,
              "cache.hidden_layers needs teacher.mode=cache (hidden states come from the cache)")
        check(self.teacher.mode == "online" or self.loss.temperature == self.cache.temperature,
              f"loss.temperature={self.loss.temperature} differs from cache.temperature="
              f"{self.cache.temperature}: cached teacher distributions cannot be re-tempered "
              "exactly; set both to the same value")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        for key in ("hidden_layers", "mix", "mix_weights"):
            d["cache"][key] = list(d["cache"][key])
        d["loss"]["hidden_student_layers"] = list(d["loss"]["hidden_student_layers"])
        return d


SECTIONS = {
    "teacher": TeacherConfig, "student": StudentConfig, "data": DataConfig,
    "cache": CacheConfig, "loss": LossConfig, "train": TrainConfig, "run": RunConfig,
    "generate": GenerateConfig, "prune": PruneConfig,
}
