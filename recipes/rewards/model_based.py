"""Model-based rewards: a reward model (no reference) and an LLM judge (with a reference).

Qwen3's general RL scores a response three ways: rules (`math` and the other verifiers),
a judge LLM that sees a reference answer, and a reward model that sees none. This module
holds the last two.

Reward model (`RewardModel`): a Qwen3 GPTModel built from a checkpoint's own model config
plus a value head `Linear(hidden, 1)`. The reward of a token sequence is the head applied
to the final-layernorm hidden state at its last token. A reward-model directory is a
normal megatron-core model checkpoint (so every tool that reads checkpoints reads it)
with `value_head.pt` and `reward_model.json` beside the weights.
`fit_value_head` fits the head in closed form (ridge regression on the frozen features).

Judge (`Judge`): `judge(prompt, response, reference) -> float in [0, 1]`.
`GenerativeJudge` asks a Qwen3 model, greedily, to grade the response against the
reference and parses "Score: N/10" (or the final number) from its reply; a reply with no
usable score is 0.0 and counted in `parse_failures`.

Registry names (`reference` is what the data row carries):
- `reward_model`: reference = the prompt (a string, a message list, or {"prompt": ...});
  scored by the `ModelReward` installed with `use_reward_model` (the RL stage builds it
  from its config). Batched scoring: `ModelReward.score_batch(prompts, responses)`.
- `judge`: reference = {"prompt": ..., "reference": ...} (the prompt in any of those
  forms); graded by the judge installed with `use_judge`.
Both register a reference check, so the RL data reader skips rows that lack the prompt.

Layouts: the reward model runs with no model parallelism (TP=PP=CP=EP=1, any number of
data-parallel ranks, each scoring its own rollouts); other layouts are refused.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import string
from pathlib import Path
from typing import Any, Protocol

from model.config import ConfigError, ModelConfig, ParallelConfig
from recipes.rewards import register
from recipes.rewards.math import final_part

VALUE_HEAD_FILE = "value_head.pt"
REWARD_MODEL_FILE = "reward_model.json"


# ----------------------------------------------------------------------------- reward model

def _data_parallel_only(model_cfg: ModelConfig) -> None:
    """Start a one-rank world if there is none; refuse a model-parallel one."""
    from megatron.core import parallel_state

    from model.parallel import init_distributed

    if not parallel_state.model_parallel_is_initialized():
        init_distributed(ParallelConfig(), model=model_cfg)
        return
    sizes = {"TP": parallel_state.get_tensor_model_parallel_world_size(),
             "PP": parallel_state.get_pipeline_model_parallel_world_size(),
             "CP": parallel_state.get_context_parallel_world_size(),
             "EP": parallel_state.get_expert_model_parallel_world_size()}
    split = {k: v for k, v in sizes.items() if v > 1}
    if split:
        raise ConfigError("the reward model runs without model parallelism (TP=PP=CP=EP=1); this process "
                          f"has {', '.join(f'{k}={v}' for k, v in split.items())}")


def _checkpoint_config(path: Path, what_it_is_not: str) -> ModelConfig:
    from model.checkpoint import is_checkpoint, read_model_config

    if not is_checkpoint(path):
        raise ConfigError(f"{path} is not {what_it_is_not}")
    return read_model_config(path)


def _read_value_head(rm_dir: Path, hidden_size: int) -> dict:
    import torch

    path = rm_dir / VALUE_HEAD_FILE
    if not path.is_file():
        raise ConfigError(f"{rm_dir} has no {VALUE_HEAD_FILE}: not a reward-model directory "
                          "(RewardModel.save writes one)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same user error
        raise ConfigError(f"{path} is not a readable value head ({type(e).__name__}: {e})") from e
    shapes = {"weight": (1, hidden_size), "bias": (1,)}
    if not (isinstance(state, dict) and set(state) == set(shapes)
            and all(isinstance(state[k], torch.Tensor) and tuple(state[k].shape) == s for k, s in shapes.items())):
        raise ConfigError(f"{path} is not a value head for hidden size {hidden_size}: "
                          f"expected weight [1, {hidden_size}] and bias [1]")
    if not all(torch.isfinite(t).all() for t in state.values()):
        raise ConfigError(f"{path} holds non-finite values")
    return state


class RewardModel:
    """A Qwen3 GPTModel plus a value head; `score` gives one float per token sequence."""

    def __init__(self, chunks, model_cfg: ModelConfig, head, info: dict | None = None):
        self.gpt = chunks[0]
        self.chunks = chunks
        self.model_cfg = model_cfg
        self.head = head
        self.info = dict(info or {})
        if self.gpt.decoder.final_layernorm is None:
            raise ConfigError("the reward model needs the decoder's final layernorm (a last pipeline stage)")

    @classmethod
    def from_checkpoint(cls, ckpt_dir: str | Path, dtype=None) -> "RewardModel":
        """A language-model checkpoint with a zero value head (to be fitted or trained)."""
        import torch

        ckpt_dir = Path(ckpt_dir)
        cfg = _checkpoint_config(ckpt_dir, "a megatron-core model checkpoint (no metadata.json)")
        head = {"weight": torch.zeros(1, cfg.hidden_size), "bias": torch.zeros(1)}
        return cls._build(ckpt_dir, cfg, head, {}, dtype)

    @classmethod
    def load(cls, rm_dir: str | Path, dtype=None) -> "RewardModel":
        """A directory written by `save`. The head is checked before the model is built."""
        rm_dir = Path(rm_dir)
        cfg = _checkpoint_config(rm_dir, "a reward-model directory (no model checkpoint in it)")
        head = _read_value_head(rm_dir, cfg.hidden_size)
        info_path = rm_dir / REWARD_MODEL_FILE
        info = json.loads(info_path.read_text()).get("fit", {}) if info_path.is_file() else {}
        return cls._build(rm_dir, cfg, head, info, dtype)

    @classmethod
    def _build(cls, ckpt_dir: Path, cfg: ModelConfig, head_state: dict, info: dict, dtype) -> "RewardModel":
        import torch

        from model.builder import build_model
        from model.checkpoint import checkpoint_dtype, load_model
        from model.inference import model_device

        _data_parallel_only(cfg)
        # No random init: the weights are loaded next, and a policy's RNG stream stays untouched.
        chunks = build_model(cfg, ParallelConfig(), dtype or checkpoint_dtype(ckpt_dir),
                             perform_initialization=False)
        load_model(chunks, ckpt_dir)
        for c in chunks:
            c.eval()
            c.requires_grad_(False)
        head = torch.nn.Linear(cfg.hidden_size, 1, dtype=torch.float32)
        head.load_state_dict(head_state)
        return cls(chunks, cfg, head.to(model_device(chunks)), info)

    def save(self, rm_dir: str | Path) -> Path:
        """Collective: weights, head and description, all renamed into place at once."""
        import torch
        import torch.distributed as dist

        from model.checkpoint import save_model

        final = Path(rm_dir)
        staging = final.with_name(final.name + ".rm.tmp")
        rank0 = not dist.is_initialized() or dist.get_rank() == 0
        save_model(self.chunks, staging, self.model_cfg)
        if rank0:
            torch.save({k: v.detach().cpu().float() for k, v in self.head.state_dict().items()},
                       staging / VALUE_HEAD_FILE)
            (staging / REWARD_MODEL_FILE).write_text(json.dumps({
                "kind": "qwen3 reward model",
                "value_head": VALUE_HEAD_FILE,
                "feature": "final-layernorm hidden state at the last token",
                "hidden_size": self.model_cfg.hidden_size,
                "fit": self.info,
            }, indent=2) + "\n")
            if final.exists():
                shutil.rmtree(final)
            os.replace(staging, final)
        if dist.is_initialized():
            dist.barrier()
        return final

    def features(self, token_lists: list[list[int]], batch_size: int = 8):
        """[n, hidden] float32 tensor: the final-layernorm hidden state at each sequence's last token."""
        import torch

        from model.inference import model_device, position_ids_for

        if any(len(t) == 0 for t in token_lists):
            raise ValueError("the reward model cannot score an empty token sequence")
        device = model_device(self.chunks)
        out = torch.empty(len(token_lists), self.model_cfg.hidden_size, dtype=torch.float32)
        # Similar lengths together: less padding.
        order = sorted(range(len(token_lists)), key=lambda i: len(token_lists[i]))
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            lengths = torch.tensor([len(token_lists[i]) for i in rows])
            tokens = torch.zeros(len(rows), int(lengths.max()), dtype=torch.long)
            for j, i in enumerate(rows):
                tokens[j, :lengths[j]] = torch.as_tensor(token_lists[i])
            # Right padding under causal attention leaves every real position unchanged.
            tokens = tokens.to(device)
            with torch.no_grad():
                hidden = self._decoder_output(tokens, position_ids_for(tokens))   # [seq, batch, hidden]
            out[rows] = hidden[lengths - 1, torch.arange(len(rows))].float().cpu()
        return out

    def _decoder_output(self, tokens, positions):
        # GPTModel._postprocess returns the decoder output untouched when post_process is off,
        # and the decoder applies its final layernorm on its own (it was built as the last
        # stage), so this skips only the vocabulary projection, the bulk of the cost.
        self.gpt.post_process = False
        try:
            return self.gpt(tokens, positions, attention_mask=None)
        finally:
            self.gpt.post_process = True

    def score(self, token_lists: list[list[int]], batch_size: int = 8) -> list[float]:
        import torch

        if not token_lists:
            return []
        x = self.features(token_lists, batch_size)
        with torch.no_grad():
            return self.head(x.to(self.head.weight.device)).squeeze(-1).cpu().tolist()


def fit_value_head(rm: RewardModel, token_lists: list[list[int]], targets: list[float],
                   l2: float = 1e-3) -> float:
    """Ridge regression of `targets` on the frozen features; sets the head, returns the
    training RMSE. The bias is not penalised (features and targets are centred)."""
    import torch

    if len(token_lists) != len(targets) or not targets:
        raise ValueError(f"need one target per sequence, got {len(targets)} for {len(token_lists)}")
    if l2 < 0:
        raise ValueError(f"l2={l2} must be >= 0")
    x = rm.features(token_lists).double()
    y = torch.tensor(targets, dtype=torch.float64)
    x_mean, y_mean = x.mean(0), y.mean()
    xc = x - x_mean
    gram = xc.T @ xc + l2 * torch.eye(x.shape[1], dtype=torch.float64)
    w = torch.linalg.lstsq(gram, xc.T @ (y - y_mean)).solution
    b = y_mean - x_mean @ w
    with torch.no_grad():
        rm.head.weight.copy_(w.to(rm.head.weight)[None])
        rm.head.bias.copy_(b.to(rm.head.bias)[None])
    rmse = float(((x @ w + b - y) ** 2).mean().sqrt())
    rm.info = {"method": "ridge", "l2": l2, "samples": len(targets), "train_rmse": rmse}
    return rmse


# ----------------------------------------------------------------------------- text in, reward out

def _prompt_messages(prompt: Any) -> list[dict]:
    """A prompt as messages: text (one user turn), a message list, or a data row."""
    from data_pipeline.chat import prompt_messages

    if isinstance(prompt, list) and all(isinstance(m, dict) for m in prompt):
        prompt = {"messages": prompt}
    elif isinstance(prompt, str):
        prompt = {"prompt": prompt}
    elif not isinstance(prompt, dict):
        raise ValueError(f"a prompt is text, messages or a row, not {type(prompt).__name__}")
    return prompt_messages(prompt)


def _question(prompt: Any) -> str:
    """A prompt's user turns as one text, for the judge; "" when it has none."""
    if isinstance(prompt, str):
        return prompt
    try:
        messages = _prompt_messages(prompt)
    except ValueError:
        return ""
    return "\n\n".join(m["content"] for m in messages
                        if m.get("role") == "user" and isinstance(m.get("content"), str))


class ModelReward:
    """Text in, reward out: (prompt, response) rendered as a Qwen3 chat that ends with the
    response's `<|im_end|>`, then scored by a `RewardModel`.

    Sequences over `max_tokens` keep their last `max_tokens` tokens: the head reads the
    end. Malformed responses (not a string) are scored as empty answers.
    """

    def __init__(self, rm: RewardModel | str | Path, tokenizer, max_tokens: int = 4096, batch_size: int = 8):
        self.rm = rm if isinstance(rm, RewardModel) else RewardModel.load(rm)
        self.tokenizer = tokenizer
        self.max_tokens = max_tokens
        self.batch_size = batch_size

    def tokens(self, prompt: Any, response: Any) -> list[int]:
        from data_pipeline.chat import render

        text = response if isinstance(response, str) else ""
        # Bounds the tokenizer's work on huge outputs; a token is rarely longer than 16 characters.
        text = text[-16 * self.max_tokens:]
        r = render(_prompt_messages(prompt) + [{"role": "assistant", "content": text}])
        ids = self.tokenizer(r.text[:r.loss_spans[-1][1]], add_special_tokens=False)["input_ids"]
        return list(ids)[-self.max_tokens:]

    def score_batch(self, prompts: list, responses: list) -> list[float]:
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts for {len(responses)} responses")
        return self.rm.score([self.tokens(p, r) for p, r in zip(prompts, responses)], self.batch_size)

    def __call__(self, response: Any, reference: Any) -> float:
        return self.score_batch([reference], [response])[0]


# ----------------------------------------------------------------------------- judge

class Judge(Protocol):
    def judge(self, prompt: str, response: str, reference: str) -> float:
        """How well `response` answers `prompt` given the `reference` answer, in [0, 1]."""
        ...


JUDGE_TEMPLATE = """You are grading a response to a question against a reference answer.

Question:
{prompt}

Reference answer:
{reference}

Response:
{response}

Judge whether the response is correct and complete in light of the reference answer. \
Reply with one line in the form "Score: N/10", where 10 means fully correct and 0 means \
wrong or no answer."""

_NUM = r"(\d+(?:\.\d+)?)"
_SCALED = _NUM + r"\s*(?:(?:/|out\s+of)\s*" + _NUM + r"|(%))?"
_LABELLED = re.compile(r"(?:score|rating|grade)\**\s*(?:is|[:=])?\s*\**\s*" + _SCALED, re.IGNORECASE)
# Not inside a word or a decimal, not a denominator, not negative.
_ANY = re.compile(r"(?<![\w./-])" + _SCALED)


def parse_score(text: Any, scale: float = 10.0) -> float | None:
    """A judge reply's score in [0, 1], or None when it has none.

    The last "Score: N" (also "Score: N/M", "N out of M", "N%"), else the final number in
    the text; a bare N is out of `scale`. A score outside [0, its scale] is no score.
    """
    if not isinstance(text, str):
        return None
    matches = list(_LABELLED.finditer(text)) or list(_ANY.finditer(text))
    if not matches:
        return None
    value, denominator, percent = matches[-1].groups()
    top = 100.0 if percent else float(denominator) if denominator else scale
    v = float(value)
    if not (math.isfinite(v) and math.isfinite(top)) or top <= 0 or not 0 <= v <= top:
        return None
    return v / top


class GenerativeJudge:
    """A Qwen3 model (megatron-core chunks) as judge: renders `template` as one user turn
    (non-thinking), decodes greedily for at most `max_new_tokens`, parses the score.

    The judge sees the response's final part (after `</think>`): the answer, not the
    reasoning. Counts: `calls`, `parse_failures` (a reply without a usable score, 0.0).
    """

    def __init__(self, chunks, tokenizer, template: str = JUDGE_TEMPLATE, max_new_tokens: int = 32,
                 scale: float = 10.0, max_prompt_tokens: int = 4096):
        fields = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
        if fields != {"prompt", "response", "reference"}:
            raise ConfigError("a judge template needs exactly the fields {prompt}, {response} and "
                              f"{{reference}}; got {sorted(fields)}")
        self.chunks = chunks
        self.tokenizer = tokenizer
        self.template = template
        self.max_new_tokens = max_new_tokens
        self.scale = scale
        self.max_prompt_tokens = max_prompt_tokens
        self.calls = 0
        self.parse_failures = 0

    def judge_prompt(self, prompt: Any, response: Any, reference: Any) -> list[int]:
        from data_pipeline.chat import render

        answer = final_part(response)[-16 * self.max_prompt_tokens:]   # "" unless a string
        content = self.template.format(prompt=_question(prompt), response=answer,
                                       reference="" if reference is None else str(reference))
        r = render([{"role": "user", "content": content}], add_generation_prompt=True, enable_thinking=False)
        ids = list(self.tokenizer(r.text, add_special_tokens=False)["input_ids"])
        # Over-long: drop the middle, keep the instructions at both ends.
        if len(ids) > self.max_prompt_tokens:
            half = self.max_prompt_tokens // 2
            ids = ids[:half] + ids[len(ids) - (self.max_prompt_tokens - half):]
        return ids

    def judge_batch(self, prompts: list, responses: list, references: list) -> list[float]:
        from recipes.generate import generate, stop_ids

        if not len(prompts) == len(responses) == len(references):
            raise ValueError("judge_batch needs as many prompts, responses and references")
        if not prompts:
            return []
        inputs = [self.judge_prompt(p, r, ref) for p, r, ref in zip(prompts, responses, references)]
        outputs = generate(self.chunks, inputs, self.max_new_tokens, stop_ids(self.tokenizer),
                           vocab_limit=len(self.tokenizer))
        scores = []
        for g in outputs:
            reply = self.tokenizer.decode(g.tokens, skip_special_tokens=True)
            value = parse_score(final_part(reply), self.scale)
            self.calls += 1
            if value is None:
                self.parse_failures += 1
            scores.append(0.0 if value is None else value)
        return scores

    def judge(self, prompt: str, response: str, reference: str) -> float:
        return self.judge_batch([prompt], [response], [reference])[0]


# ----------------------------------------------------------------------------- registry adapters

_active: dict[str, Any] = {"reward_model": None, "judge": None}


def use_reward_model(model_reward: ModelReward | None) -> None:
    """Install the ModelReward that the `reward_model` reward scores with (None: remove)."""
    _active["reward_model"] = model_reward


def use_judge(judge: Judge | None) -> None:
    """Install the Judge that the `judge` reward grades with (None: remove)."""
    _active["judge"] = judge


def _installed(name: str, how: str):
    if _active[name] is None:
        raise ConfigError(f"reward {name!r} has nothing to score with: call "
                          f"recipes.rewards.model_based.{how}(...) first")
    return _active[name]


def _prompt_problem(prompt: Any) -> str | None:
    try:
        messages = _prompt_messages(prompt)
    except ValueError as e:
        return str(e)
    return None if any(m.get("role") == "user" for m in messages) else "the prompt has no user turn"


def _judge_reference_problem(reference: Any) -> str | None:
    if not isinstance(reference, dict) or reference.get("reference") is None:
        return 'a judge reference is {"prompt": ..., "reference": <the reference answer>}'
    return _prompt_problem(reference.get("prompt"))


@register("reward_model", check_reference=_prompt_problem)
def reward_model_reward(response: str, reference: Any) -> float:
    """reference: the prompt (text, messages, or {"prompt": ...})."""
    return float(_installed("reward_model", "use_reward_model")(response, reference))


@register("judge", check_reference=_judge_reference_problem)
def judge_reward(response: str, reference: Any) -> float:
    """reference: {"prompt": ..., "reference": ...}."""
    ref = reference if isinstance(reference, dict) else {}
    return float(_installed("judge", "use_judge").judge(ref.get("prompt"), response, ref.get("reference")))
