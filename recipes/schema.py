"""The typed root config: every section of hydra_conf/config.yaml as a dataclass.

The dataclasses are the one home of each setting's type and default; `register()` stores
the root (`Config`) in Hydra's ConfigStore as `config_schema`, which config.yaml lists
first in its defaults, so the yaml files only hold what differs (config.yaml: the paths
in this checkout; a stage file: its stage's settings). Composition is then checked by
OmegaConf: `trainer.max_steps=abc` is a wrong type, `trainer.max_stepz=3` (with or
without `+`) an unknown key, both before anything reads the config. Ranges and choices
are checked by the sections' own `check`/`problems` (recipes.train.validate).

Importing this module registers the schema; whatever composes config.yaml imports it
first: the stage CLIs (recipes.pretrain, sft, rl, distill, through model.launch.hydra_cli),
recipes.pipeline and the tests (a composition without it fails loudly: config.yaml names
`config_schema`). Nothing here may import megatron-core (or the stage CLIs
themselves): the schema is read before a bad command line is refused, which must stay
one line and fast.

Where a section has a home of its own, that is where its dataclass lives: `trainer:` is
recipes.train.TrainerConfig, `rl.grpo:` recipes.grpo.GRPOConfig, `distill.loss:`
recipes.distill_loss.DistillLoss. The optimizer's and DeepSpeed's settings live here
rather than beside their engines, which import megatron-core; recipes.engine and
recipes.deepspeed_engine re-export them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING

from model.config import ConfigError
from recipes.distill_loss import DistillLoss
from recipes.grpo import GRPOConfig
from recipes.rollout import DEFAULT_BACKEND, RolloutConfig, VLLMSettings
from recipes.train import TrainerConfig

SCHEMA_NAME = "config_schema"
BACKENDS = ("megatron", "deepspeed")


# ----------------------------------------------------------------------------- optim, deepspeed

@dataclass
class OptimConfig:
    """The `optim:` section (AdamW and the LR schedule)."""

    lr: float = 3e-4
    min_lr: float = 3e-5
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    use_distributed_optimizer: bool = True
    # LR schedule (megatron-core's OptimizerParamScheduler), in optimizer steps.
    # Warmup: warmup_steps when set, else warmup_fraction of the decay length.
    warmup_steps: int | None = None
    warmup_fraction: float = 0.0
    # "constant", "linear", "cosine", "inverse-square-root" or "WSD".
    decay_style: str = "cosine"
    # Steps from the start to the end of decay; None means the stage's max_steps.
    decay_steps: int | None = None
    # WSD only: length of the final decay phase (fraction of decay_steps) and its shape.
    wsd_decay_fraction: float = 0.1
    wsd_decay_style: str = "linear"
    # On resume, a schedule other than the checkpoint's (a raised max_steps, a new lr) is
    # refused; true rebuilds it for the new settings, at the step reached.
    override_schedule: bool = False

    def check(self) -> "OptimConfig":
        styles = ("constant", "linear", "cosine", "inverse-square-root", "WSD")
        if self.decay_style not in styles:
            raise ConfigError(f"optim.decay_style={self.decay_style!r} is not one of {styles}")
        if not self.lr > 0:
            raise ConfigError(f"optim.lr={self.lr} must be > 0")
        if not 0 <= self.min_lr <= self.lr:
            raise ConfigError(f"optim.min_lr={self.min_lr} must be in [0, optim.lr={self.lr}]")
        if not 0 < self.wsd_decay_fraction <= 1:
            raise ConfigError(f"optim.wsd_decay_fraction={self.wsd_decay_fraction} must be in (0, 1]")
        if not 0 <= self.warmup_fraction < 1:
            raise ConfigError(f"optim.warmup_fraction={self.warmup_fraction} must be in [0, 1)")
        for name in ("warmup_steps", "decay_steps"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise ConfigError(f"optim.{name}={getattr(self, name)} must be >= 0 (or null)")
        if self.weight_decay < 0 or self.clip_grad < 0 or self.adam_eps <= 0:
            raise ConfigError(f"optim.weight_decay={self.weight_decay} and clip_grad={self.clip_grad} must be >= 0, "
                              f"adam_eps={self.adam_eps} > 0")
        if not (0 <= self.adam_beta1 < 1 and 0 <= self.adam_beta2 < 1):
            raise ConfigError(f"optim.adam_beta1={self.adam_beta1} and adam_beta2={self.adam_beta2} must be in [0, 1)")
        return self

    def schedule(self, max_steps: int) -> tuple[int, int]:
        """(warmup steps, decay steps) for a stage of `max_steps` steps."""
        decay = self.decay_steps or max_steps
        warmup = self.warmup_steps if self.warmup_steps is not None else round(self.warmup_fraction * decay)
        if warmup >= decay and self.decay_style != "constant":
            raise ConfigError(f"optim warmup ({warmup} steps) must be shorter than the decay length "
                              f"{decay} (optim.decay_steps or trainer.max_steps)")
        return warmup, decay


@dataclass
class DeepSpeedSettings:
    """The `deepspeed:` section: trainer.backend=deepspeed only (recipes/deepspeed_engine.py).
    TP=PP=CP=EP=1; batch sizes, AdamW, clipping and bf16 come from trainer/optim/precision."""

    zero_stage: int = 2
    # Optimizer state (ZeRO >= 1) and parameters (ZeRO-3) on the host: "none" or "cpu".
    offload_optimizer: str = "none"
    offload_param: str = "none"
    reduce_bucket_size: int = 500_000_000
    allgather_bucket_size: int = 500_000_000
    overlap_comm: bool = False
    # A DeepSpeed JSON file laid over the generated config (its keys win), for anything
    # not mapped here. Batch sizes, optimizer and precision still come from our config.
    config: str | None = None


# ----------------------------------------------------------------------------- run, data, logging, stage

@dataclass
class RunConfig:
    """<root>/<name>/<stage.name>/ holds checkpoints/, latest, final.json, metrics.jsonl and
    the resolved config.yaml. Stages of one run find each other by name."""

    # set in config.yaml: a directory of this checkout, through its ${repo:} resolver
    root: str = MISSING
    name: str = "${model.name}"


@dataclass
class DataConfig:
    """Pretraining data: preprocessed datasets (python -m data_pipeline.preprocess)."""

    # set in config.yaml (data/ in this checkout); blend keys and length_mix.prefix are
    # output prefixes relative to it (or absolute)
    root: str = MISSING
    # {prefix: weight}. Untyped (Any), as are the other mappings that may be null: Hydra
    # cannot merge a command line's `key={...}` into a typed mapping that is null (OmegaConf
    # 2.3 fails inside the merge), and S3 sets blend null, S1 length_mix null.
    # recipes.data.blend_spec checks both.
    blend: Any = None
    # {prefix, buckets: [edges], weights: [one per bucket]}: samples drawn by document
    # length from the buckets `preprocess --length-buckets` wrote (<prefix>_len<lo>-<hi>)
    length_mix: Any = None
    # <|endoftext|>, appended after every document by the preprocessor; null: the
    # tokenizer's own id.
    eod_id: int | None = None
    eod_mask_loss: bool = False
    # Sample-index cache; default <stage dir>/data_cache.
    cache_dir: str | None = None


@dataclass
class WandbConfig:
    # offline (files under the stage directory, `wandb sync` later), online, disabled
    mode: str = "offline"
    project: str = "qwen3-recipe"
    entity: str | None = None


@dataclass
class LoggingConfig:
    progress: bool = True
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class StageConfig:
    """Set by every hydra_conf/stage/ file."""

    name: str = MISSING
    # the recipes/<recipe>.py whose RECIPE runs the stage (recipes.train.recipe_for)
    recipe: str = MISSING
    # an earlier stage of this run, a stage directory or a checkpoint directory; null:
    # random weights (the top-level init_from= wins over it)
    init_from: str | None = None


# ----------------------------------------------------------------------------- recipe sections

@dataclass
class SFTData:
    # chat JSONL: {"messages": [...], "tools": [...]} (data_pipeline/chat.py)
    files: list[str] = MISSING
    # several conversations per row, attention kept inside each (on the TE path one row
    # per micro-batch); false: one conversation per row, plain causal rows
    pack: bool = True
    # a conversation longer than seq_length: drop it, or truncate it
    overlength: str = "drop"
    # default: <stage dir>/data_cache
    cache_dir: str | None = None


@dataclass
class SFTConfig:
    """`sft:`, the SFT stages' section (recipes/sft.py)."""

    data: SFTData = field(default_factory=SFTData)


@dataclass
class PromptFiles:
    # RL-format JSONL rows {"prompt" | "messages", "reference", "reward"?} (data_pipeline/rl_data.py)
    files: list[str] = MISSING


@dataclass
class RLEval:
    """Held-out prompts in the RL format: the mean reward of `samples` rollouts per prompt
    (rollout sampling settings, one fixed seed) before the first update, every `interval`
    steps (0: no others) and after the last, logged as rl/eval_reward and rl/eval_accuracy."""

    files: list[str] = field(default_factory=list)
    samples: int = 1
    interval: int = 0


@dataclass
class JudgeConfig:
    # a Qwen3 chat checkpoint that grades a response against the reference answer
    checkpoint: str | None = None
    max_new_tokens: int = 32


@dataclass
class SandboxConfig:
    # the `code` rewards run programs in recipes/rewards/sandbox.py; where its kernel
    # isolation (namespaces, allow-list root, cgroup) is unavailable the stage refuses to
    # start, unless this is false (then only the audit hook and rlimits hold: docs/RL.md)
    require_isolation: bool = True


@dataclass
class RLConfig:
    """`rl:`, the RL stages' section (recipes/rl.py)."""

    data: PromptFiles = field(default_factory=PromptFiles)
    eval: RLEval = field(default_factory=RLEval)
    # a row without its own "reward": names, or {name, weight} entries (recipes/rewards)
    rewards: list[Any] = field(default_factory=lambda: ["math"])
    # model-based rewards (recipes/rewards/model_based.py), for rows naming them:
    # `reward_model`: a directory written by RewardModel.save (a Qwen3 checkpoint + value head)
    reward_model: str | None = None
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    sandbox: SandboxConfig = field(default_factory=SandboxConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    # which engine samples the rollouts (recipes/rollout): megatron or vllm
    rollout: RolloutConfig = field(default_factory=RolloutConfig)


@dataclass
class RolloutSettings:
    """`distill.rollout:`, the student's sampling: on-policy training and held-out evaluation."""

    # prompts per step, one response each (on-policy: trainer.global_batch_size)
    prompts_per_step: int = 64
    max_new_tokens: int = 1024
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    thinking_budget: int | None = None
    # every prompt is used in each mode: think, and no_think (the empty think block)
    modes: list[str] = field(default_factory=lambda: ["think", "no_think"])
    # also end the last user turn with /think or /no_think (the fusion stage's soft switch)
    flags: bool = True
    # the engine that samples the student (recipes/rollout): megatron or vllm
    backend: str = DEFAULT_BACKEND
    vllm: VLLMSettings = field(default_factory=VLLMSettings)

    def engine(self) -> RolloutConfig:
        from recipes.rollout import settings_from

        return settings_from({"backend": self.backend, "vllm": self.vllm}, "distill.rollout")

    def problems(self, seq_length: int) -> list[str]:
        from data_pipeline.fusion import MODES

        p = []
        if self.prompts_per_step < 1 or self.max_new_tokens < 1:
            p.append(f"distill.rollout.prompts_per_step={self.prompts_per_step} and max_new_tokens="
                     f"{self.max_new_tokens} must be >= 1")
        if self.max_new_tokens >= seq_length:
            p.append(f"distill.rollout.max_new_tokens={self.max_new_tokens} leaves no room for a prompt in "
                     f"trainer.seq_length={seq_length}")
        if not self.modes or any(m not in MODES for m in self.modes) or len(set(self.modes)) != len(self.modes):
            p.append(f"distill.rollout.modes={list(self.modes)} must list distinct modes of {', '.join(MODES)}")
        if self.temperature <= 0 or not 0 < self.top_p <= 1 or self.top_k < 0:
            p.append(f"distill.rollout.temperature={self.temperature} must be > 0, top_p={self.top_p} in (0, 1] "
                     f"and top_k={self.top_k} >= 0")
        return p

    def sampler(self) -> GRPOConfig:
        """The RL task's rollout settings: one sample per prompt, token-mean loss."""
        return GRPOConfig(prompts_per_rollout=self.prompts_per_step, group_size=1,
                          max_new_tokens=self.max_new_tokens, thinking_budget=self.thinking_budget,
                          temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, reference=False,
                          kl_coef=0.0, dynamic_sampling=False, recompute_old_logprobs=False, loss_agg="token-mean")


@dataclass
class DistillEval:
    """Held-out RL-format prompts (needs teacher=): accuracy, length and reverse KL to the
    teacher per mode, before the first update, every `interval` steps and after the last."""

    files: list[str] = field(default_factory=list)
    samples: int = 1
    interval: int = 0
    # sampling temperature of the evaluated responses; 0: greedy
    temperature: float = 0.0


@dataclass
class DistillConfig:
    """`distill:`, the distillation stages' section (recipes/distill.py)."""

    # off_policy or on_policy
    phase: str = MISSING
    # default teacher when the top-level teacher= is not given
    teacher: str | None = None
    # the teacher's layout (parallel keys, checked as a ParallelConfig); null: the
    # student's (the only one supported). Any: see DataConfig.blend.
    teacher_parallel: Any = None
    # off-policy: recipes.generate outputs; on-policy: RL-format prompts
    data: PromptFiles = field(default_factory=PromptFiles)
    loss: DistillLoss = field(default_factory=DistillLoss)
    # the verifier for held-out accuracy (RL prompt format, recipes/rewards)
    rewards: list[Any] = field(default_factory=lambda: ["math"])
    rollout: RolloutSettings = field(default_factory=RolloutSettings)
    eval: DistillEval = field(default_factory=DistillEval)


# ----------------------------------------------------------------------------- root

@dataclass
class Config:
    """hydra_conf/config.yaml. `model` and `parallel` are config groups checked by
    model.config (ModelConfig, ParallelConfig) when a stage reads them; here they are plain
    mappings so that a model file keeps its own keys."""

    model: dict[str, Any] = MISSING
    parallel: dict[str, Any] = MISSING
    stage: StageConfig = field(default_factory=StageConfig)
    seed: int = 1234
    # auto (bf16 on GPU, fp32 on CPU), fp32, bf16, fp8_delayed, fp8_tensorwise, fp8_blockwise,
    # mxfp8 (Blackwell). FP8 needs Transformer Engine on a CUDA GPU.
    precision: str = "auto"
    # Weights to start the stage from, overriding stage.init_from: a stage name of this
    # run (pretrain_s3), a stage directory of any run, or a checkpoint directory (e.g. one
    # written by `python -m model.convert hf-to-mcore`). Ignored when the stage resumes
    # from its own latest checkpoint.
    init_from: str | None = None
    # The HF tokenizer directory every stage reads; set in config.yaml (under data.root).
    tokenizer: str = MISSING
    # The teacher of the distillation stages (recipes/distill.py), in the same forms as
    # init_from: a flagship's post-trained stage, or a converted HF Qwen3 checkpoint.
    teacher: str | None = None
    run: RunConfig = field(default_factory=RunConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    deepspeed: DeepSpeedSettings = field(default_factory=DeepSpeedSettings)
    data: DataConfig = field(default_factory=DataConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    # The recipes' own sections. Optional: a stage file that sets one gets it typed, with
    # these defaults; the others stay null, so a pretraining stage's resolved config.yaml
    # does not carry RL or distillation settings it never reads, and a recipe can tell
    # "this stage has no such section" (a wrong recipe for the stage) by `is None`. (So a
    # command line cannot set `rl.grpo.group_size=` on a stage without `rl:`, which
    # model.launch.compose reports as such.)
    sft: SFTConfig | None = None
    rl: RLConfig | None = None
    distill: DistillConfig | None = None


def register() -> None:
    """Store the root schema in Hydra's ConfigStore (idempotent)."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name=SCHEMA_NAME, node=Config)


register()
