"""Typed run configuration: TOML files and `section.key=value` overrides mapped onto dataclasses.

Every key is checked: an unknown key, a wrong type or an out-of-range value is a `ConfigError` naming the key.
Nothing here imports or evaluates code from the config.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from softar import SoftarError
from softar.disk import read_text


class ConfigError(SoftarError):
    pass


@dataclass
class ModelConfig:
    n_layer: int = 4  # transformer blocks
    n_head: int = 4  # attention heads (they divide d_model)
    d_model: int = 128  # width of the hidden states
    d_embed: int = 0  # m, the embedding space soft tokens live in; 0 means d_model
    block_size: int = 64  # slots in the context window
    vocab_size: int = 0  # 0: taken from the data's meta.json
    dropout: float = 0.0  # on attention, residual and embedding outputs in training
    bias: bool = False  # biases in the linear layers and LayerNorms
    pos_emb: Literal["learned", "rope"] = "learned"  # learned absolute positions, or rotary embeddings
    rope_base: float = 10000.0  # the rotary embeddings' base
    # the embedding space E: trained with the model, frozen unit-norm random rows, frozen from another run, or the
    # data's pretrained vectors (frozen; `softar prepare --tokenizer glove` writes them, m = 50)
    embedding: Literal["learned", "random", "checkpoint", "pretrained"] = "learned"
    embedding_from: str = ""  # run directory whose E is used when embedding = "checkpoint"
    vector_head: bool = False  # y = W h in R^m, trained by regression to the next token's embedding
    collapse_head: bool = False  # a learned collapse: an MLP from a layer where the whole context is mixed onto R^m
    collapse_layer: int = -1  # the collapse head's input: -1 the last layer; k in 0..n_layer the stream after k blocks
    collapse_mix: bool = False  # the collapse head reads a learned softmax mix of all layers instead
    # a Hugging Face causal LM, a local save_pretrained folder (never a hub id: nothing is downloaded): the network
    # and its starting weights; n_layer, n_head, d_model and vocab_size are read from it (`resolve`). A corpus must be
    # tokenized with its tokenizer (`softar prepare --tokenizer hf --hf DIR`); a task's records are tokenized with it
    # at load, the task's markers added as special tokens (the vocabulary grows by them)
    hf: str = ""
    lora_rank: int = 0  # > 0: train LoRA adapters of this rank on every linear layer of model.hf, not its weights
    lora_alpha: float = 16.0  # the adapters' scale is lora_alpha / lora_rank
    # model.hf's weights as stored in memory and checkpoints: bfloat16 halves them (the optimizer then steps in
    # bfloat16; LoRA's adapters stay float32); softAR's own GPT computes in bfloat16 through train.dtype (autocast)
    dtype: Literal["float32", "bfloat16"] = "float32"

    @property
    def m(self) -> int:
        return self.d_embed or self.d_model


@dataclass
class DataConfig:
    dir: str = "data/shakespeare_char"  # the output of `softar prepare`
    # which next tokens the training loss is on: "all", or "queries": on binding data (`softar prepare --synthetic
    # binding`) only the queries' values whose fact is in the context (window plus history), the lookup's dense
    # supervision; the logged evals and the final val loss still count every token (the retention study scores
    # the queries)
    targets: str = "all"


@dataclass
class TrainConfig:
    max_iters: int = 2000  # optimizer steps
    batch_size: int = 12  # sequences per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 1e-3  # the peak learning rate
    min_lr: float = 1e-4  # the learning rate the cosine decay ends at
    warmup_iters: int = 100  # steps of linear warmup
    lr_decay_iters: int = 0  # 0: max_iters (resolved when the config is loaded)
    weight_decay: float = 0.1  # AdamW's, on matrices (not on biases and norms)
    beta1: float = 0.9  # AdamW's
    beta2: float = 0.99  # AdamW's
    grad_clip: float = 1.0  # 0 disables clipping
    seed: int = 1337  # of the initial weights, the batches and every sampled evaluation
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: cuda when available
    dtype: Literal["float32", "bfloat16"] = "float32"  # bfloat16 means autocast
    compile: bool = False  # torch.compile the model
    checkpointing: bool = False  # activation checkpointing: each block recomputed in backward (less memory, more time)
    threads: int = 0  # torch intra-op threads; 0 leaves torch's default
    eval_interval: int = 250  # steps between periodic evaluations
    eval_iters: int = 20  # sampled batches per split for periodic evals
    log_interval: int = 10  # steps between flushes of metrics.jsonl and the progress bar
    ckpt_interval: int = 0  # 0: eval_interval
    keep_last: int = 3  # checkpoints kept on disk
    max_bad_steps: int = 10  # consecutive non-finite steps (skipped) before the run stops
    # fine-tuning: start from this run's latest weights ("{seed}" becomes train.seed); parameters the config adds
    # (summary-slot modules) start fresh, the optimizer and the schedule start anew
    init_from: str = ""
    parallel: Literal["ddp", "fsdp"] = "ddp"  # under torchrun: replicate (DDP) or shard (FSDP2)
    check_memory: bool = True  # refuse, before allocating, a run that cannot fit in the memory available


@dataclass
class LossConfig:
    """Weights of the training losses (0 switches one off) and how soft inputs are trained."""

    ce: float = 1.0  # cross-entropy through the tied LM head
    mse: float = 0.0  # vector head vs the stop-gradient next-token embedding
    cosine: float = 0.0  # vector head: 1 - cosine to the next token's embedding
    infonce: float = 0.0  # vector head: contrastive loss against every embedding
    infonce_temperature: float = 0.1  # of the InfoNCE similarities
    vmf: float = 0.0  # von Mises-Fisher NLL of the vector head
    collapse: float = 0.0  # collapse head: MSE to the next token's embedding
    # parallel scheduled sampling: this fraction of input positions gets the model's own soft token (section
    # [soft]) from a first pass
    soft_inputs: float = 0.0


@dataclass
class SoftConfig:
    """What a soft token is (a name in `softar.soft.tokens.SOFT_TOKENS`) and the noise put on it: one spec for
    training (soft slots, soft inputs), decoding (`softar sample`) and evaluation."""

    kind: str = "expected"  # a name in softar.soft.tokens.SOFT_TOKENS
    top_k: int = 0  # distribution-based soft tokens over the top-k renormalised; 0: all
    args: dict[str, float] = field(default_factory=dict)  # the definition's own parameters, e.g. {beta = 1.0}
    noise: str = "none"  # a name in `softar.soft.tokens.NOISES`; applied in training and decoding, never in eval
    noise_scale: float = 0.0  # the noise's size, a multiple of the embeddings' scale


@dataclass
class ContextConfig:
    """The window's layout: model.block_size slots as [aggregate][segments][hard][soft] (docs/design.md, "Context
    layout"). The hard region gets what the other three leave; aggregate = segments = soft = 0 is a plain GPT."""

    aggregate: int = 0  # 0 or 1 slot summing all history older than the segments
    segments: int = 0  # slots each summing one span of the history just before the hard region
    soft: int = 0  # slots holding the model's own recent outputs, uncollapsed
    segment_len: int = 64  # tokens in the newest segment
    segment_growth: int = 1  # each older segment is this many times longer (1: fixed lengths)
    aggregate_all: bool = False  # the aggregate covers all history, segments included
    op: Literal["sum", "mean", "sqrt", "decay"] = "mean"  # sqrt: sum / sqrt(n); decay: sum of decay^age e
    decay: float = 0.98  # per token of age, for op = "decay"
    project: bool = False  # a learned projection + LayerNorm on aggregate, segment and soft slots
    kind_embeddings: bool = True  # a learned vector per slot kind added to each slot (non-plain layouts)
    max_history: int = 512  # training: each window comes with 0..max_history tokens of history before it
    # training: how the soft region is filled. one_step guesses each soft slot from the true tokens before it (one
    # parallel pass); rollout fills it step by step from the model's own soft tokens, as generation does after a prompt
    soft_fill: Literal["one_step", "rollout"] = "one_step"
    # generation: the memory hierarchy moves this many tokens at a time (1: every token). Between moves the window
    # only grows at its end, so the KV cache serves; a training window holds every phase of the schedule already
    shift_every: int = 1
    # training: the fraction of batches whose hard region is only partly full (1..hard-1 tokens, no history), as at
    # the start of a generation, so soft slots also sit where generation puts them
    fill_draw: float = 0.0
    # what the summary slots hold: "arithmetic" (the history's embedding arithmetic, `op`), or a learned kind of
    # softar.soft.memory.MEMORIES (the retention study's controls: pause, write, rmt)
    memory: str = "arithmetic"

    @property
    def plain(self) -> bool:
        return self.aggregate == self.segments == self.soft == 0

    def segment_lengths(self) -> list[int]:
        """Tokens per segment, newest first."""
        return [self.segment_len * self.segment_growth**i for i in range(self.segments)]


@dataclass
class TaskConfig:
    """A reasoning task (`softar/tasks`) instead of a text corpus: data.dir holds `softar task prepare`'s JSON. Each
    example is [question] <bot> [thoughts or pauses] <eot> [steps] <ans> [answer] <eos>, trained on what follows
    <eot>. Modes: no_cot (no steps), cot (every step), pause (`pauses` learned <pause> slots, no steps), thoughts
    (Coconut's curriculum: at stage k the first k steps are replaced by k * thoughts_per_step continuous thoughts,
    each the soft token `soft.kind` of the position before it; kind "hidden" is Coconut's fed-back last hidden
    state)."""

    name: str = ""  # "" trains a language model on data.dir; else a name in softar.tasks.TASKS
    render: Literal["text", "symbolic"] = "text"  # the task's words, or node-id tokens for the same graphs
    mode: str = "cot"  # a name in softar.tasks.modes.MODES
    thoughts_per_step: int = 1  # c: thoughts that replace one reasoning step
    max_stage: int = 6  # the curriculum's last stage (k thoughts replace k steps; later steps stay)
    # optimizer steps per curriculum stage before the last; 0: max_iters // (max_stage + 1), resolved into the saved
    # config so a resumed run keeps its curriculum
    stage_iters: int = 0
    # clear AdamW's moments at the first step of every curriculum stage after the first (Coconut resets its
    # optimizer when a stage changes)
    stage_reset: bool = False
    pauses: int = 6  # pause mode: <pause> slots between question and answer
    eval_examples: int = 100  # periodic evals: greedy accuracy on this many valid examples (the final eval: all)
    max_answer_tokens: int = 64  # greedy decoding stops after this many tokens without <eos>
    # the first steps train associative recall over node tokens (`softar.tasks.recall`: the role pretraining plays
    # for a pretrained model), then the task; 0: no warm-up
    recall_iters: int = 0
    recall_pairs: int = 14  # facts per recall sequence (over recall_pairs + 2 nodes)
    # the warm-up's peak learning rate (its own warmup and cosine decay to train.min_lr); 0: train.lr. The lookup
    # forms abruptly, and at 1e-3 the 4-layer twins model formed it in 300 steps on some seeds only
    recall_lr: float = 0.0
    # after the warm-up, every recall_every-th step trains recall again (replay, so that the task does not wipe the
    # lookup the warm-up taught); 0: never
    recall_every: int = 0
    # a generating task's depth curriculum: its first depth_iters task steps (after the warm-up) draw questions of
    # its shallowest depth only, and every depth_iters more steps admit the next depth; 0: every depth from the start
    depth_iters: int = 0
    # the depths a generating task trains on (supervised or RL), some of its dataset's; []: all of them
    depths: list[int] = field(default_factory=list)


@dataclass
class RLConfig:
    """Reinforcement learning from a trained task run (`softar rl`, GRPO; `softar/rl`). Each step draws
    train.batch_size prompts, samples group_size rollouts of each under the thought policy, scores them with the
    task's reward, and takes inner_steps clipped-objective updates at train.lr."""

    init_from: str = ""  # the task run to start from (its model, task and data; its latest checkpoint's weights)
    policy: str = "soft"  # what fills the thought slots: a thought policy of softar.soft.feeds
    group_size: int = 8  # rollouts per prompt (G)
    inner_steps: int = 1  # updates per batch of rollouts (the ratio is exactly 1 on the first)
    clip: float = 0.2  # PPO's clip range
    kl_coef: float = 0.0  # weight of the KL estimate to the initial policy
    sigma: float = 0.5  # noisy_soft: noise std, relative to the soft tokens' root-mean-square coordinate
    temperature: float = 1.0  # of every sampled token
    eval_samples: int = 32  # periodic evals: samples per valid prompt, for pass@1..pass@eval_samples
    reward: str = "answer"  # a name in softar.tasks.rewards.REWARDS: answer, path, path_partial, format
    scale_advantages: bool = True  # divide by the group's std (GRPO); false: Dr. GRPO's unscaled advantages
    # "sequence": each rollout's actions averaged, then the rollouts (GRPO); "token": every action of the global
    # batch weighs the same, in the objective and the KL (DAPO), so long rollouts weigh more
    loss_average: Literal["sequence", "token"] = "sequence"
    # where the policy acts: "written", the thought slots of the run's mode (a cot run writes its chain as sampled
    # tokens); "thoughts", a cot run's chain becomes thought slots after <eot>, one per step token, then <ans> and
    # the answer sampled: the chain fed back hard, soft or noisy (Soft Tokens, Hard Truths), each step read as its
    # LM head's most likely token where the policy draws none
    chain: Literal["written", "thoughts"] = "written"


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    context: ContextConfig = field(default_factory=ContextConfig)
    soft: SoftConfig = field(default_factory=SoftConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    rl: RLConfig = field(default_factory=RLConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _check_type(key: str, value: Any, tp: Any) -> Any:
    """Return `value` as type `tp`, or raise a ConfigError naming `key`."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        if value not in typing.get_args(tp):
            choices = ", ".join(repr(a) for a in typing.get_args(tp))
            raise ConfigError(f"{key}: expected one of {choices}, got {value!r}")
        return value
    if origin is list:  # list[int]: an array of numbers
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected an array, got {type(value).__name__} {value!r}")
        return [_check_type(f"{key}[{i}]", v, typing.get_args(tp)[0]) for i, v in enumerate(value)]
    if origin is dict:  # dict[str, float]: a table of named numbers
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a table, got {type(value).__name__} {value!r}")
        return {k: _check_type(f"{key}.{k}", v, typing.get_args(tp)[1]) for k, v in value.items()}
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            if arg is type(None) and value is None:
                return None
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
    if tp is bool:
        ok = isinstance(value, bool)
    elif tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif tp is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
        value = float(value) if ok else value
    elif tp is str:
        ok = isinstance(value, str)
    else:  # pragma: no cover - a schema bug, not a user error
        raise TypeError(f"unsupported config type {tp} for {key}")
    if not ok:
        raise ConfigError(f"{key}: expected {tp.__name__}, got {type(value).__name__} {value!r}")
    return value


# keys that moved: configs written before the [soft] section still load
LEGACY_KEYS = {("loss", "soft_kind"): ("soft", "kind"), ("loss", "soft_top_k"): ("soft", "top_k"),
               ("loss", "noise"): ("soft", "noise"), ("loss", "noise_scale"): ("soft", "noise_scale")}


def _upgrade(raw: dict[str, Any]) -> dict[str, Any]:
    raw = {k: dict(v) if isinstance(v, dict) else v for k, v in raw.items()}
    for (old_s, old_k), (new_s, new_k) in LEGACY_KEYS.items():
        if isinstance(raw.get(old_s), dict) and old_k in raw[old_s]:
            value = raw[old_s].pop(old_k)
            if isinstance(raw.setdefault(new_s, {}), dict):
                if new_k in raw[new_s]:
                    raise ConfigError(f"{old_s}.{old_k}: moved to {new_s}.{new_k}, which is given too; give only "
                                      f"{new_s}.{new_k}")
                raw[new_s][new_k] = value
    return raw


def typed_sections(raw: Any) -> dict[str, dict[str, Any]]:
    """Every section a known table, every key a known one of its type: what any config file or override list must
    be, whichever command reads it."""
    if not isinstance(raw, dict):
        raise ConfigError("config: expected a table of sections")
    sections = {f.name: f for f in dataclasses.fields(Config)}
    typed: dict[str, dict[str, Any]] = {}
    for name, values in _upgrade(raw).items():
        if name not in sections:
            raise ConfigError(f"unknown config section {name!r} (known: {', '.join(sections)})")
        if not isinstance(values, dict):
            raise ConfigError(f"{name}: expected a table, got {type(values).__name__}")
        hints = typing.get_type_hints(sections[name].default_factory)  # type: ignore[arg-type]
        for key in values:
            if key not in hints:
                raise ConfigError(f"unknown config key {name}.{key}")
        typed[name] = {key: _check_type(f"{name}.{key}", value, hints[key]) for key, value in values.items()}
    return typed


def from_dict(raw: dict[str, Any]) -> Config:
    """Build a Config from nested dicts, checking every section, key and type, then the values together."""
    sections = {f.name: f.default_factory for f in dataclasses.fields(Config)}
    cfg = Config(**{name: sections[name](**values) for name, values in typed_sections(raw).items()})  # type: ignore[misc]
    validate(cfg)
    return cfg


def parse_override(text: str) -> tuple[list[str], Any]:
    """`train.lr=3e-4` -> (["train", "lr"], 0.0003). Values use TOML syntax; bare words are strings."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected section.key=value")
    key, raw = text.split("=", 1)
    path = key.strip().split(".")
    if len(path) != 2 or not all(path):
        raise ConfigError(f"override {text!r}: expected section.key=value")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except ValueError:  # not TOML (or an integer of more digits than Python parses): a bare word
        value = raw
    return path, value


def load(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Read a TOML (or resolved JSON) config, apply overrides, resolve defaults and validate."""
    return from_dict(load_raw(path, overrides))


def load_raw(path: str | Path | None = None, overrides: list[str] = ()) -> dict[str, Any]:
    """The sections and keys a config file and its overrides set, each of its type (`typed_sections`); how the
    values go together is checked when a Config is built."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"config file not found: {path}")
        text = read_text(path, "config file", limit=1 << 24)  # a regular file: a FIFO would block the reader
        try:
            raw = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
        except (ValueError, RecursionError) as e:  # ValueError: also an integer of more digits than Python parses
            raise ConfigError(f"{path}: not a valid config file: {e}") from None
    for ov in overrides:
        (section, key), value = parse_override(ov)
        if section in raw and not isinstance(raw[section], dict):
            raise ConfigError(f"{section}: expected a table")
        raw.setdefault(section, {})[key] = value
    return typed_sections(raw)


def resolve(cfg: Config, vocab_size: int) -> Config:
    """Fill the values that depend on the data or on other keys, so the saved config is complete."""
    cfg = dataclasses.replace(
        cfg,
        model=dataclasses.replace(cfg.model),
        train=dataclasses.replace(cfg.train),
    )
    if cfg.model.hf:  # the network's shape is the pretrained model's; the folder by its absolute path
        from softar.hf_folder import hf_shape

        cfg.model.hf = os.path.abspath(cfg.model.hf)
        for key, value in hf_shape(cfg.model.hf).items():
            given = getattr(cfg.model, key)
            if key == "vocab_size" and cfg.task.name:  # a task's markers join its vocabulary
                value = max(value, vocab_size)
            if given not in (value, getattr(ModelConfig, key)):
                raise ConfigError(f"model.{key}: {given} differs from the {value} of the model in {cfg.model.hf} "
                                  f"(its shape is read from the folder; leave model.{key} out)")
            setattr(cfg.model, key, value)
    if cfg.model.vocab_size == 0:
        cfg.model.vocab_size = vocab_size
    elif cfg.model.vocab_size < vocab_size:
        raise ConfigError(
            f"model.vocab_size: {cfg.model.vocab_size} is smaller than the data's vocabulary ({vocab_size})"
        )
    if cfg.model.d_embed == 0:
        cfg.model.d_embed = cfg.model.d_model
    if cfg.train.lr_decay_iters == 0:
        cfg.train.lr_decay_iters = cfg.train.max_iters
    if cfg.train.ckpt_interval == 0:
        cfg.train.ckpt_interval = cfg.train.eval_interval
    from softar.tasks.modes import MODES

    if cfg.task.name and MODES[cfg.task.mode].curriculum and cfg.task.stage_iters == 0:  # the curriculum, fixed now
        from softar.tasks.data import stage_iters

        cfg.task = dataclasses.replace(cfg.task, stage_iters=stage_iters(cfg.task, cfg.train.max_iters))
    try:  # a derived value obeys the rules a written one does: the saved config must load again
        validate(cfg)
    except ConfigError as e:
        raise ConfigError(f"{e} (a value derived from the config; set it, or the keys it follows, yourself)") from None
    return cfg


def validate(cfg: Config) -> None:
    m, t = cfg.model, cfg.train

    def need(ok: bool, key: str, msg: str) -> None:
        if not ok:
            raise ConfigError(f"{key}: {msg}")

    for key in ("n_layer", "n_head", "d_model", "block_size"):
        need(getattr(m, key) > 0, f"model.{key}", "must be positive")
    need(m.d_model % m.n_head == 0, "model.n_head", f"{m.n_head} does not divide model.d_model={m.d_model}")
    need(m.d_embed >= 0, "model.d_embed", "must be >= 0 (0 means d_model)")
    need(m.vocab_size >= 0, "model.vocab_size", "must be >= 0 (0 means from the data)")
    need(0.0 <= m.dropout < 1.0, "model.dropout", "must be in [0, 1)")
    need(m.rope_base > 0, "model.rope_base", "must be positive")
    if m.pos_emb == "rope":
        need((m.d_model // m.n_head) % 2 == 0, "model.pos_emb", "rope needs an even head dimension")
    need(m.embedding != "checkpoint" or bool(m.embedding_from), "model.embedding_from",
         "must name a run directory when model.embedding = 'checkpoint'")
    need(0 <= m.lora_rank <= 65536, "model.lora_rank", "must be in [0, 65536] (0: no adapters)")
    need(m.lora_rank == 0 or bool(m.hf), "model.lora_rank", "LoRA adapts a pretrained model: it needs model.hf")
    need(m.lora_alpha > 0, "model.lora_alpha", "must be positive")
    need(m.dtype == "float32" or bool(m.hf), "model.dtype", "bfloat16 weights are for model.hf; softAR's GPT computes "
         "in bfloat16 with train.dtype = 'bfloat16' (autocast over float32 weights)")
    if m.hf:
        need(m.embedding == "learned" and not (m.vector_head or m.collapse_head), "model.hf",
             "a Hugging Face model brings its own embeddings and has no vector or collapse head")
        from softar.tasks.modes import MODES

        cached = cfg.task.name and MODES.get(cfg.task.mode) and MODES[cfg.task.mode].slot == "<thought>" or \
            cfg.context.soft and cfg.context.soft_fill == "rollout"
        need(not (t.checkpointing and cached), "train.checkpointing", "transformers drops the KV cache under its "
             "gradient checkpointing, and continuous thoughts (and a soft-region rollout) train through it: turn one "
             "off")
        need(not (cfg.task.recall_iters or cfg.task.recall_every), "task.recall_iters", "the recall warm-up is "
             "written in softAR's task vocabulary; a pretrained model (model.hf) starts from its own pretraining")
    need(bool(cfg.data.dir), "data.dir", "must not be empty")
    lc = cfg.loss
    need(cfg.data.targets in ("all", "queries"), "data.targets", f"expected 'all' or 'queries', got "
         f"{cfg.data.targets!r}")
    if cfg.data.targets == "queries":  # the others' targets are embeddings, which a masked target has none of
        need(not (cfg.task.name or lc.mse or lc.cosine or lc.infonce or lc.vmf or lc.collapse), "data.targets",
             "'queries' trains a language model's cross-entropy alone (no task.name, no loss but loss.ce)")
        need(cfg.context.fill_draw == 0, "data.targets", "'queries' keeps the targets whose fact is in the context, "
             "which context.fill_draw cuts short")
    for key in ("ce", "mse", "cosine", "infonce", "vmf", "collapse"):
        need(getattr(lc, key) >= 0, f"loss.{key}", "must be >= 0")
    need(lc.ce + lc.mse + lc.cosine + lc.infonce + lc.vmf > 0, "loss.ce", "at least one of loss.ce, loss.mse, "
         "loss.cosine, loss.infonce, loss.vmf must be positive")
    need(lc.infonce_temperature > 0, "loss.infonce_temperature", "must be positive")
    need(0 <= lc.soft_inputs <= 1, "loss.soft_inputs", "must be in [0, 1]")
    for key in ("mse", "cosine", "infonce", "vmf"):
        need(getattr(lc, key) == 0 or m.vector_head, f"loss.{key}", "needs model.vector_head = true")
    need(lc.collapse == 0 or m.collapse_head, "loss.collapse", "needs model.collapse_head = true")
    need(-1 <= m.collapse_layer <= m.n_layer, "model.collapse_layer", f"must be in [-1, model.n_layer={m.n_layer}]")
    for key, default in (("collapse_layer", -1), ("collapse_mix", False)):
        need(getattr(m, key) == default or m.collapse_head, f"model.{key}", "needs model.collapse_head = true")
    need(cfg.soft.top_k >= 0, "soft.top_k", "must be >= 0")
    need(0 <= cfg.soft.noise_scale <= 100, "soft.noise_scale", "must be in [0, 100]")
    for key in ("max_iters", "batch_size", "grad_accum", "eval_interval", "eval_iters", "log_interval",
                "keep_last", "max_bad_steps"):
        need(getattr(t, key) > 0, f"train.{key}", "must be positive")
    for key in ("warmup_iters", "lr_decay_iters", "ckpt_interval", "threads", "seed"):
        need(getattr(t, key) >= 0, f"train.{key}", "must be >= 0")
    need(t.seed < 2**63 - 2**20, "train.seed", "must be below 2**63 - 2**20 (seeds are offset per rank and step)")
    need(t.threads <= 4096, "train.threads", "must be at most 4096")
    for key, high in (("grad_accum", 4096), ("eval_iters", 100_000), ("batch_size", 2**20), ("keep_last", 10_000),
                      ("max_iters", 2**31), ("warmup_iters", 2**31), ("lr_decay_iters", 2**31)):
        need(getattr(t, key) <= high, f"train.{key}", f"must be at most {high}")
    for key, high in (("n_layer", 10_000), ("n_head", 10_000), ("d_model", 2**20), ("block_size", 2**24)):
        need(getattr(m, key) <= high, f"model.{key}", f"must be at most {high}")
    need(t.lr > 0, "train.lr", "must be positive")
    need(0 <= t.min_lr <= t.lr, "train.min_lr", "must be in [0, train.lr]")
    need(t.weight_decay >= 0, "train.weight_decay", "must be >= 0")
    need(0 <= t.beta1 < 1, "train.beta1", "must be in [0, 1)")
    need(0 <= t.beta2 < 1, "train.beta2", "must be in [0, 1)")
    need(t.grad_clip >= 0, "train.grad_clip", "must be >= 0 (0 disables clipping)")
    c = cfg.context
    need(c.aggregate in (0, 1), "context.aggregate", "must be 0 or 1")
    for key in ("segments", "soft", "max_history"):
        need(getattr(c, key) >= 0, f"context.{key}", "must be >= 0")
    need(0 < c.segment_len <= 2**24, "context.segment_len", "must be in [1, 2**24]")
    need(0 < c.segment_growth <= 16, "context.segment_growth", "must be in [1, 16]")
    need(c.segment_len * c.segment_growth ** max(c.segments - 1, 0) <= 2**30, "context.segments",
         "the oldest segment would span more than 2**30 tokens")
    need(c.max_history <= 2**30, "context.max_history", "must be at most 2**30")
    need(0 < c.decay < 1, "context.decay", "must be in (0, 1)")
    need(0 <= c.fill_draw <= 1, "context.fill_draw", "must be in [0, 1]")
    hard = m.block_size - c.aggregate - c.segments - c.soft
    need(c.fill_draw == 0 or hard >= 2, "context.fill_draw", "needs at least 2 hard slots to draw a partial fill")
    newest = c.soft or hard  # the region new tokens enter
    need(c.shift_every >= 1 and (c.plain and c.shift_every == 1 or c.shift_every <= max(newest, 1)),
         "context.shift_every", "must be 1 for a plain model" if c.plain else
         f"must be in [1, {max(newest, 1)}] (the {'soft' if c.soft else 'hard'} region's slots)")
    need(c.aggregate + c.segments + c.soft < m.block_size, "model.block_size",
         f"{m.block_size} slots leave no hard slot after context.aggregate + context.segments + context.soft = "
         f"{c.aggregate + c.segments + c.soft}")
    need(c.plain or c.max_history > 0 or c.soft > 0, "context.max_history",
         "must be positive when the layout has aggregate or segment slots")
    # context.memory, soft.* and rl.policy name registry entries: softar.soft.model.check_names checks them
    k = cfg.task
    from softar.tasks import TASK_NAMES
    from softar.tasks.modes import MODES

    need(not k.name or k.name in TASK_NAMES, "task.name", f"expected '' or one of {', '.join(TASK_NAMES)}, got "
         f"{k.name!r}")
    need(k.mode in MODES, "task.mode", f"expected one of {', '.join(map(repr, MODES))}, got {k.mode!r}")
    if k.name:
        need(c.plain, "task.name", "reasoning tasks train a plain model (context.aggregate = segments = soft = 0)")
        need(lc.ce > 0 and lc.mse == lc.cosine == lc.infonce == lc.vmf == lc.collapse == 0, "task.name",
             "reasoning tasks train with loss.ce only")
        need(lc.soft_inputs == 0, "loss.soft_inputs", "must be 0 for a reasoning task")
        need(t.parallel == "ddp", "train.parallel", "reasoning tasks run with ddp (their evaluation reads the "
             "unsharded model)")
    for key, low, high in (("thoughts_per_step", 1, 64), ("max_stage", 0, 64), ("stage_iters", 0, 2**31),
                           ("pauses", 0, 4096), ("eval_examples", 1, 10**6), ("max_answer_tokens", 1, 4096),
                           ("recall_pairs", 1, 62), ("depth_iters", 0, 2**31),
                           ("recall_every", 0, 2**31)):
        need(low <= getattr(k, key) <= high, f"task.{key}", f"must be in [{low}, {high}]")
    need(0 <= k.recall_iters < max(t.max_iters, 1), "task.recall_iters", f"must be in [0, train.max_iters) "
         f"(leaving steps for the task), got {k.recall_iters}")
    need(not k.recall_iters or k.name, "task.recall_iters", "is a reasoning task's warm-up: set task.name too")
    need(k.recall_lr == 0 or k.recall_iters and t.min_lr <= k.recall_lr <= 1, "task.recall_lr",
         f"is the warm-up's peak: 0 (train.lr), or in [train.min_lr, 1] with task.recall_iters, got {k.recall_lr}")
    need(k.recall_every != 1, "task.recall_every", "1 would train recall only: 0 (never) or 2 and up")
    need(not k.recall_every or k.name, "task.recall_every", "is a reasoning task's replay: set task.name too")
    need(not k.depth_iters or k.name, "task.depth_iters", "is a reasoning task's curriculum: set task.name too")
    need(not k.stage_reset or k.name and MODES[k.mode].curriculum, "task.stage_reset", "resets the optimizer at "
         "each stage of a curriculum mode's task (thoughts, pause_curriculum)")
    need(not k.depths or k.name, "task.depths", "are a reasoning task's: set task.name too")
    need(len(set(k.depths)) == len(k.depths) and all(1 <= d <= 64 for d in k.depths), "task.depths",
         f"must be distinct depths in [1, 64], got {k.depths}")
    r = cfg.rl
    for key, low, high in (("group_size", 2, 4096), ("inner_steps", 1, 64), ("eval_samples", 1, 4096)):
        need(low <= getattr(r, key) <= high, f"rl.{key}", f"must be in [{low}, {high}]")
    need(0 < r.clip < 1, "rl.clip", "must be in (0, 1)")
    need(r.kl_coef >= 0, "rl.kl_coef", "must be >= 0")
    need(0 < r.sigma <= 100, "rl.sigma", "must be in (0, 100]")
    need(1e-3 <= r.temperature <= 1e3, "rl.temperature", "must be in [1e-3, 1e3]")
    from softar.tasks.rewards import REWARDS

    need(r.reward in REWARDS, "rl.reward", f"expected one of {', '.join(REWARDS)}, got {r.reward!r}")


def seeded(path: str, seed: int) -> str:
    """A run path for a seed: "runs/w32_s{seed}" names one run per seed (train.init_from, rl.init_from)."""
    return path.replace("{seed}", str(seed))


def diff(a: Config, b: Config) -> list[str]:
    """Dotted keys whose values differ between two configs."""
    da, db = a.to_dict(), b.to_dict()
    return [f"{s}.{k}" for s in da for k in da[s] if da[s][k] != db[s][k]]
