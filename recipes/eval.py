"""Evaluate a checkpoint: the small eval the pipeline runs after every stage.

    python -m recipes.eval checkpoint=runs/tiny/sft_fusion tokenizer=data/tokenizer \
        lm_data=data/eval/lm.jsonl problems=data/eval/held.jsonl output=eval.json

Metrics (any whose input is not given is left out):
- `lm_loss`: mean next-token loss on held-out text (JSONL {"text"}), cut into rows of
  `lm_seq_length` tokens with <|endoftext|> between documents.
- per mode m in `modes` (think, no_think), on held-out verifiable problems (RL format:
  {"prompt" | "messages", "reference"}), answered greedily; thinking is the default, and
  no_think uses the soft switch (the last user turn ends with /no_think; the chat template
  itself forces nothing, so the model must write the empty think block):
  - `accuracy_<m>`: exact match of the final answer (recipes/rewards/math.py, math-verify);
  - `format_<m>`: the share of responses in the right form: `<think>\\n...\\n</think>\\n\\n`
    with reasoning inside for think, the empty think block for no_think, then an answer;
  - `response_tokens_<m>`: mean generated tokens.
- `expert_load_max_over_mean` (MoE): tokens routed to the busiest expert over the mean,
  worst layer, counted over the held-out text; `expert_load_max_over_mean_<m>` the same
  over the prompts and answers of mode m (the distribution a fine-tuned model now serves).
- `budget_curve` (with `thinking_budgets`): think-mode accuracy and mean thinking tokens at
  each budget (recipes/generate.py's thinking budget; null is no limit): the report's
  accuracy-against-thinking-budget curve.

The result goes to `output` as JSON (written atomically) and, with `wandb.mode` other than
disabled, to wandb.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
from pathlib import Path

import torch

from model.config import ConfigError

# The two forms of a Qwen3 answer: reasoning inside the think block, or the empty block.
_ANSWER = re.compile(r"<think>\n(?P<thinking>.*?)</think>\n\n(?P<answer>\S.*)", re.S)


def response_form(response: str) -> str | None:
    """"think" or "no_think" for a well-formed response, None otherwise."""
    m = _ANSWER.fullmatch(response.strip())
    if m is None:
        return None
    return "think" if m.group("thinking").strip() else "no_think"


def lm_rows(texts: list[str], tokenizer, seq_length: int, max_rows: int, eod: int) -> torch.Tensor:
    """[n, seq_length + 1] token rows from documents joined by `eod`."""
    stream: list[int] = []
    for text in texts:
        stream += tokenizer.encode(text, add_special_tokens=False) + [eod]
        if len(stream) >= max_rows * (seq_length + 1):
            break
    n = min(max_rows, len(stream) // (seq_length + 1))
    if n == 0:
        raise ConfigError(f"the held-out text holds {len(stream)} tokens, fewer than one row of {seq_length + 1}")
    return torch.tensor(stream[:n * (seq_length + 1)]).view(n, seq_length + 1)


def read_texts(path: Path) -> tuple[list[str], int]:
    """Documents of a JSONL {"text"} file, and how many rows were skipped."""
    texts, skipped = [], 0
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            text = json.loads(line)["text"]
        except (json.JSONDecodeError, KeyError, TypeError):
            skipped += 1
            continue
        if isinstance(text, str) and text.strip():
            texts.append(text)
        else:
            skipped += 1
    return texts, skipped


class ExpertCounts:
    """Tokens per expert per MoE layer, from the routers' routing maps during forward."""

    def __init__(self, chunks):
        from megatron.core.transformer.moe.router import TopKRouter

        self.counts: dict[str, torch.Tensor] = {}
        self.hooks = [module.register_forward_hook(self._hook(name))
                      for chunk in chunks for name, module in chunk.named_modules()
                      if isinstance(module, TopKRouter)]

    def _hook(self, name):
        def count(module, inputs, output):
            routing_map = output[1]
            total = routing_map.sum(0).double().cpu()
            self.counts[name] = self.counts.get(name, 0) + total
        return count

    def worst_ratio(self) -> float | None:
        for h in self.hooks:
            h.remove()
        ratios = [float(c.max() / c.mean().clamp(min=1e-9)) for c in self.counts.values()]
        return max(ratios) if ratios else None


def _lm_loss(chunks, rows: torch.Tensor) -> float | None:
    from model.inference import forward_token_logprobs

    logp = forward_token_logprobs(chunks, rows[:, :-1].contiguous(), rows[:, 1:].contiguous())
    return None if logp is None else float(-logp.double().mean())


def _answers(engine, tokenizer, items: list, mode: str, max_new_tokens: int, batch_size: int,
             budget_tokens: int | None = None) -> list[tuple[str, int, int]]:
    """(response text, response tokens, thinking tokens) per (row, messages) item, greedy
    from the rollout `engine`, the items shared out over data-parallel ranks. Thinking is
    Qwen3's default, so think-mode prompts carry no flag; no_think ones end with /no_think."""
    from data_pipeline.chat import prompt_ids
    from data_pipeline.fusion import in_mode
    from recipes.generate import Sampling, data_parallel_share, response_text, stop_ids, thinking_budget

    stop = stop_ids(tokenizer)
    budget = thinking_budget(tokenizer, budget_tokens)
    ways, index, gather = data_parallel_share()
    mine = list(range(index, len(items), ways))
    out = []
    for start in range(0, len(mine), batch_size):
        part = [items[i] for i in mine[start:start + batch_size]]
        prompts = [prompt_ids(tokenizer, in_mode(messages, mode, mode == "no_think"), enable_thinking=True)
                   for _, messages in part]
        gens = engine.generate(prompts, max_new_tokens, Sampling(), budget)
        out += [(response_text(tokenizer, g, stop), len(g.tokens), _thinking_tokens(tokenizer, g)) for g in gens]
    shares = gather(out)
    return [shares[i % ways][i // ways] for i in range(len(items))]


def _thinking_tokens(tokenizer, g) -> int:
    """Tokens the model itself wrote between <think> and </think> (the budget's forced
    stop phrase is not thinking)."""
    open_id, close_id = tokenizer.convert_tokens_to_ids(["<think>", "</think>"])
    if open_id not in g.tokens:
        return 0
    start = g.tokens.index(open_id) + 1
    end = g.tokens.index(close_id, start) if close_id in g.tokens[start:] else len(g.tokens)
    return sum(not forced for forced in g.forced[start:end])


def evaluate(chunks, tokenizer, *, lm_texts: list[str] | None = None, lm_seq_length: int = 256,
             lm_max_rows: int = 16, problems: list | None = None, modes: tuple = ("think", "no_think"),
             max_new_tokens: int = 64, batch_size: int = 32, thinking_budgets: list | None = None,
             progress=None, engine=None) -> dict:
    """The metrics of the module docstring for loaded model chunks; collective over the
    model-parallel group. `problems` are (row, messages) pairs with row["reference"].
    Answers come from the rollout `engine` (recipes/rollout) holding these weights, by
    default the built-in one on `chunks`; the expert load of the answers is counted only
    there (another engine's forwards are not the chunks')."""
    from recipes.generate import stop_ids
    from recipes.rewards.math import math_reward
    from recipes.rollout.megatron_engine import MegatronEngine

    engine = engine or MegatronEngine(chunks, stop_ids(tokenizer), len(tokenizer))

    metrics: dict = {}
    if lm_texts:
        experts = ExpertCounts(chunks)
        eod = tokenizer.convert_tokens_to_ids("<|endoftext|>")
        loss = _lm_loss(chunks, lm_rows(lm_texts, tokenizer, lm_seq_length, lm_max_rows, eod))
        ratio = experts.worst_ratio()
        if loss is not None:
            metrics["lm_loss"] = loss
        if ratio is not None:
            metrics["expert_load_max_over_mean"] = ratio
        if progress:
            progress("lm loss")
    for mode in (modes if problems else ()):
        experts = ExpertCounts(chunks)
        answers = _answers(engine, tokenizer, problems, mode, max_new_tokens, batch_size)
        ratio = experts.worst_ratio()
        if ratio is not None:
            metrics[f"expert_load_max_over_mean_{mode}"] = ratio
        metrics[f"accuracy_{mode}"] = sum(math_reward(text, row["reference"])
                                          for (row, _), (text, _, _) in zip(problems, answers)) / len(problems)
        metrics[f"format_{mode}"] = sum(response_form(text) == mode for text, _, _ in answers) / len(problems)
        metrics[f"response_tokens_{mode}"] = sum(n for _, n, _ in answers) / len(problems)
        if progress:
            progress(mode)
    curve = []
    for budget in (thinking_budgets or []) if problems else []:
        answers = _answers(engine, tokenizer, problems, "think", max_new_tokens, batch_size, budget)
        curve.append({"budget": budget,
                      "accuracy": sum(math_reward(text, row["reference"])
                                      for (row, _), (text, _, _) in zip(problems, answers)) / len(problems),
                      "thinking_tokens": sum(thinking for _, _, thinking in answers) / len(problems)})
        if progress:
            progress(f"budget {budget}")
    if curve:
        metrics["budget_curve"] = curve
    return metrics


def log_to_wandb(wandb_cfg: dict, name: str, metrics: dict, directory: Path, step: int | None = None) -> None:
    """One wandb record of scalar metrics (offline by default: `wandb sync` later)."""
    if (wandb_cfg or {}).get("mode", "disabled") == "disabled":
        return
    import wandb

    run = wandb.init(project=wandb_cfg.get("project"), entity=wandb_cfg.get("entity"), mode=wandb_cfg["mode"],
                     dir=str(directory), name=name, id=re.sub(r"[^\w.-]", "-", name), resume="allow",
                     settings=wandb.Settings(silent=True))
    run.log({f"eval/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))}, step=step)
    run.finish()


def _settings(cfg) -> dict:
    """Validated inputs (ConfigError on the first bad one), before any model is built."""
    from data_pipeline.fusion import MODES
    from recipes.generate import _read_items

    for key in ("checkpoint", "tokenizer", "output"):
        if cfg.get(key) in (None, "", "???"):
            raise ConfigError(f"{key}= is required")
    if not cfg.get("lm_data") and not cfg.get("problems"):
        raise ConfigError("nothing to evaluate: give lm_data= (held-out text) and/or problems= (held-out problems)")
    modes = list(cfg.modes or [])
    if any(m not in MODES for m in modes):
        raise ConfigError(f"modes={modes} must be among {', '.join(MODES)}")
    budgets = list(cfg.get("thinking_budgets") or [])
    if any(b is not None and int(b) < 0 for b in budgets):
        raise ConfigError(f"thinking_budgets={budgets} must be >= 0 (or null for no limit)")
    if int(cfg.lm_seq_length) < 2 or int(cfg.max_new_tokens) < 1 or int(cfg.samples) < 1:
        raise ConfigError("lm_seq_length must be >= 2, max_new_tokens and samples >= 1")
    out = {"modes": modes, "budgets": budgets, "texts": None, "problems": None, "skipped": {}}
    if cfg.get("lm_data"):
        path = Path(str(cfg.lm_data))
        if not path.is_file():
            raise ConfigError(f"lm_data={path} does not exist")
        out["texts"], out["skipped"]["lm_data"] = read_texts(path)
        if not out["texts"]:
            raise ConfigError(f"lm_data={path} holds no {{\"text\": ...}} row")
    if cfg.get("problems"):
        path = Path(str(cfg.problems))
        if not path.is_file():
            raise ConfigError(f"problems={path} does not exist")
        items, bad = _read_items(path, [None])
        usable = [(row, messages) for row, messages, _ in items if row.get("reference") not in (None, "")]
        out["skipped"]["problems"] = bad + len(items) - len(usable)
        if not usable:
            raise ConfigError(f"problems={path} holds no row with a prompt and a reference")
        out["problems"] = usable[:int(cfg.samples)]
    return out


def run_cli(cfg) -> int:
    from omegaconf import OmegaConf

    from data_pipeline.tokenizer import load_tokenizer
    from model.checkpoint import load_for_inference, read_model_config, write_atomic
    from model.config import ParallelConfig, from_dict
    from model.parallel import destroy_distributed, init_distributed, minimum_world_size, validate_layout
    from recipes.checkpointing import fingerprint, resolve_init_from
    from recipes.rollout import launch_problem, make_engine, settings_from

    try:
        opts = _settings(cfg)
        ckpt = resolve_init_from(str(cfg.checkpoint), Path.cwd())
        model_cfg = read_model_config(ckpt)
        par = from_dict(ParallelConfig, OmegaConf.to_container(cfg.parallel, resolve=True), "parallel")
        nprocs = minimum_world_size(par)
        validate_layout(model_cfg, par, int(os.environ.get("WORLD_SIZE", nprocs)))
        tokenizer = load_tokenizer(cfg.tokenizer)
        rollout = settings_from({"backend": cfg.backend, "vllm": cfg.vllm}, "eval")
        if problem := launch_problem(rollout, model_cfg):
            raise ConfigError(problem)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if "WORLD_SIZE" not in os.environ and nprocs > 1:
        from model.launch import relaunch_if_needed

        relaunch_if_needed("recipes.eval", sys.argv[1:], nprocs)

    import torch.distributed as dist

    init_distributed(par, seed=0, model=model_cfg)
    rank0 = dist.get_rank() == 0
    skipped = {k: v for k, v in opts["skipped"].items() if v}
    if rank0 and skipped:
        print(f"eval: skipped unreadable rows: {skipped}", file=sys.stderr)
    chunks = load_for_inference(ckpt, par, model_cfg)

    def progress(what: str) -> None:
        if rank0 and cfg.progress:
            print(f"eval {ckpt}: {what} done", file=sys.stderr, flush=True)

    engine = None
    if rollout.backend != "megatron":
        from data_pipeline.chat import prompt_ids

        # the longest prompt (a no_think one carries a few more tokens) and its answer
        longest = max((len(prompt_ids(tokenizer, m)) for _, m in opts["problems"] or ()), default=0)
        engine = make_engine(rollout, chunks, model_cfg, tokenizer, longest + 16 + int(cfg.max_new_tokens), 0)
    metrics = evaluate(chunks, tokenizer, lm_texts=opts["texts"], lm_seq_length=int(cfg.lm_seq_length),
                       lm_max_rows=int(cfg.lm_rows), problems=opts["problems"], modes=tuple(opts["modes"]),
                       max_new_tokens=int(cfg.max_new_tokens), batch_size=int(cfg.batch_size),
                       thinking_budgets=opts["budgets"], progress=progress, engine=engine)
    if rank0:
        result = {"checkpoint": str(ckpt.resolve()), "fingerprint": fingerprint(ckpt), "metrics": metrics,
                  "skipped_rows": skipped}
        out = Path(str(cfg.output))
        out.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(out, json.dumps(result, indent=2, allow_nan=True) + "\n")
        finite = {k: v for k, v in metrics.items() if isinstance(v, float) and math.isfinite(v)}
        log_to_wandb(OmegaConf.to_container(cfg.wandb, resolve=True), str(cfg.get("name") or ckpt.parent.name),
                     finite, out.parent)
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()}))
    destroy_distributed()
    return 0


def main() -> None:
    from model.launch import hydra_cli

    hydra_cli("eval", run_cli, usage=__doc__)


if __name__ == "__main__":
    main()
