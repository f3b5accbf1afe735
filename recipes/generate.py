"""Generation from the policy's own megatron-core weights, with Qwen3's thinking budget.

    python -m recipes.generate checkpoint=runs/tiny/sft_cold_start tokenizer=data/tokenizer \\
        input=prompts.jsonl output=answers.jsonl thinking_budget=256 enable_thinking=true

`generate()` is the helper that RL, distillation and evaluation call; this module's CLI
runs it over a prompt file. It decodes with megatron-core's static KV cache where
`kv_cache_usable` allows (one chunk, PP=1, CP=1, no SP; under FP8 the decode rows are padded
to the FP8 multiple), by recomputing the whole prefix otherwise, and returns every sampled
token's log-prob.

Thinking budget (Qwen3 report section 4.3): once a response has produced N tokens after
`<think>` without closing it, the report's instruction "Considering the limited time by
the user, ... directly now.\\n</think>.\\n\\n" is inserted (those tokens are marked forced)
and decoding continues to the answer. `enable_thinking=false` renders the prompt with an
empty think block, so the answer starts at once.

The CLI reads JSONL rows {"id"?, "messages": [...]} or {"prompt": "..."} (one user turn),
writes one row per prompt (per prompt and mode with `modes=[think,no_think]`), and on
restart skips the rows already in the output, writing exactly what an uninterrupted run
would have. Teacher data for strong-to-weak distillation (recipes.distill):

    python -m recipes.generate checkpoint=<teacher> tokenizer=data/tokenizer input=prompts.jsonl \\
        output=data/distill/teacher.jsonl modes=[think,no_think] top_k_logprobs=64
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from model.config import ConfigError


@dataclass
class Sampling:
    temperature: float = 0.0   # 0: greedy
    top_p: float = 1.0
    top_k: int = 0             # 0: no top-k cut
    seed: int = 0

    def check(self) -> "Sampling":
        if self.temperature < 0:
            raise ConfigError(f"sampling.temperature={self.temperature} must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"sampling.top_p={self.top_p} must be in (0, 1]")
        if self.top_k < 0:
            raise ConfigError(f"sampling.top_k={self.top_k} must be >= 0")
        return self


@dataclass
class ThinkingBudget:
    tokens: int                  # thinking tokens allowed after <think>
    think_open: int
    think_close: int
    stop_phrase: list[int]       # ids of chat.BUDGET_STOP (ends with </think>)


@dataclass
class Generation:
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    forced: list[bool] = field(default_factory=list)   # inserted by the budget, not sampled
    finish: str = "length"                             # "stop" or "length"
    budget_stopped: bool = False
    # with top_k_logprobs: the model's k most likely ids and their log-probs per token
    top_ids: list = field(default_factory=list)
    top_logprobs: list = field(default_factory=list)


def thinking_budget(tokenizer, tokens: int | None) -> ThinkingBudget | None:
    from data_pipeline.chat import BUDGET_STOP

    if tokens is None:
        return None
    if tokens < 0:
        raise ConfigError(f"thinking_budget={tokens} must be >= 0")
    ids = tokenizer.convert_tokens_to_ids(["<think>", "</think>"])
    return ThinkingBudget(tokens, ids[0], ids[1], tokenizer.encode(BUDGET_STOP, add_special_tokens=False))


def stop_ids(tokenizer) -> list[int]:
    return tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])


def _pick(logits: torch.Tensor, s: Sampling, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(next ids, their log-probs) from [n, vocab] float32 logits."""
    if s.temperature == 0:
        ids = logits.argmax(-1)
        return ids, torch.log_softmax(logits, -1).gather(-1, ids[:, None])[:, 0]
    scaled = logits / s.temperature
    logp = torch.log_softmax(scaled, -1)
    probs = logp.exp()
    if s.top_k or s.top_p < 1:
        keep = torch.ones_like(scaled, dtype=torch.bool)
        if s.top_k:
            kth = scaled.topk(min(s.top_k, scaled.shape[-1]), -1).values[:, -1:]
            keep &= scaled >= kth
        if s.top_p < 1:
            sorted_probs, order = probs.sort(-1, descending=True)
            # keep the smallest prefix whose mass reaches top_p (the first token always stays)
            outside = sorted_probs.cumsum(-1) - sorted_probs >= s.top_p
            keep &= ~torch.zeros_like(outside).scatter(-1, order, outside)
        probs = torch.where(keep, probs, 0.0)
    ids = _inverse_cdf(probs, generator)
    return ids, logp.gather(-1, ids[:, None])[:, 0]


def _inverse_cdf(probs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One draw per row of [n, vocab] unnormalised `probs`, on their device. One uniform per
    row against the running sum: torch.multinomial (and Gumbel-max) draw a random number
    per vocabulary entry, which at 151,936 entries made CPU sampling several times slower
    than the model's whole decode step. The uniforms come from the CPU `generator`, so a
    seed gives the same draws on any device."""
    cdf = probs.float().cumsum(-1)
    u = torch.rand(len(probs), 1, generator=generator, dtype=torch.float64).to(cdf.device)
    u = (u * cdf[:, -1:].double()).float()
    # right=True: the first entry whose running sum exceeds u, which always has mass
    return torch.searchsorted(cdf, u, right=True)[:, 0].clamp_max(probs.shape[-1] - 1)


class _Recompute:
    """Next-token logits by running the whole prefix again (any TP/PP/EP layout)."""

    def __init__(self, chunks):
        self.chunks = chunks

    def __call__(self, tokens: torch.Tensor, cur: int) -> torch.Tensor | None:
        from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

        from model.inference import forward_only

        # only the last position is projected onto the vocabulary and gathered (forward_only
        # pads the prefix to what sequence and context parallelism split)
        last = torch.zeros(len(tokens), cur, dtype=torch.bool)
        last[:, cur - 1] = True
        out = forward_only(self.chunks, tokens[:, :cur], None, gather_from_tensor_model_parallel_region, mask=last)
        return None if out is None else torch.cat(out, dim=0)


class _Cached:
    """Next-token logits with megatron-core's static KV cache: the prompt prefix once, then
    one token per step. Needs one pipeline stage and no sequence parallelism (a single
    decoded token cannot be split over TP ranks)."""

    def __init__(self, chunks, batch: int, max_length: int):
        from megatron.core.inference.contexts import StaticInferenceContext

        self.model = chunks[0]
        self.model.eval()
        self.context = StaticInferenceContext(batch, max_length)
        self.done = 0   # positions already in the cache

    def __call__(self, tokens: torch.Tensor, cur: int) -> torch.Tensor:
        from model.inference import model_device

        chunk = tokens[:, self.done:cur].to(model_device([self.model]))
        positions = torch.arange(self.done, cur, device=chunk.device).expand_as(chunk)
        if self.done:
            self.context.enable_decode_mode()
        logits = self.model(chunk, positions, None, inference_context=self.context, runtime_gather_output=True)
        self.context.sequence_len_offset = self.done = cur
        return logits[:, -1]


def kv_cache_usable(chunks) -> bool:
    from megatron.core import parallel_state

    config = chunks[0].config
    # megatron-core's static KV cache holds whole sequences: context parallelism, which
    # splits them over ranks, recomputes the prefix instead
    return (len(chunks) == 1 and parallel_state.get_pipeline_model_parallel_world_size() == 1
            and parallel_state.get_context_parallel_world_size() == 1
            and not (config.sequence_parallel and parallel_state.get_tensor_model_parallel_world_size() > 1))


@torch.no_grad()
def generate(chunks, prompts: list[list[int]], max_new_tokens: int, stop: list[int],
             sampling: Sampling | None = None, budget: ThinkingBudget | None = None,
             vocab_limit: int | None = None, use_cache: bool = True, top_k_logprobs: int = 0,
             logprob_temperature: float = 1.0) -> list[Generation]:
    """Continue every prompt; collective over the model-parallel group (same args everywhere).

    With `top_k_logprobs` k, every generated token also records the k most likely ids of
    softmax(logits / logprob_temperature) at its position and their log-probs (a
    teacher's output for distillation, recipes.distill). Decoding starts at the shortest prompt's end; rows with longer prompts take their own
    prompt tokens until theirs ends (one batch, one KV cache). `vocab_limit` masks the
    model's padded vocabulary beyond the tokenizer's. `use_cache=False`, or a layout the
    cache does not serve (PP, TP with sequence parallelism, or CP), recomputes the prefix.
    Under FP8 the cached batch runs with idle rows up to FP8's row multiple
    (`model.inference.decode_rows`); the results are those of the prompts alone.
    """
    import torch.distributed as dist
    from megatron.core import parallel_state

    from model.inference import decode_rows, model_device

    s = (sampling or Sampling()).check()
    generator = torch.Generator().manual_seed(s.seed)
    device = model_device(chunks)
    lengths = [len(p) for p in prompts]
    if min(lengths) < 1:
        raise ValueError("every prompt needs at least one token")
    total = max(lengths) + max_new_tokens
    cached = use_cache and kv_cache_usable(chunks)
    # FP8 decode: idle rows (token 0, never sampled) up to the GEMMs' row multiple
    rows = decode_rows(chunks[0].config, len(prompts)) if cached else len(prompts)
    tokens = torch.zeros(rows, total, dtype=torch.long)
    for i, p in enumerate(prompts):
        tokens[i, :len(p)] = torch.tensor(p)
    step = _Cached(chunks, rows, total) if cached else _Recompute(chunks)
    out = [Generation() for _ in prompts]
    finished = [False] * len(prompts)
    # per row: tokens since an open <think> (None: not thinking), forced tokens to insert
    thinking: list[int | None] = [None] * len(prompts)
    queued: list[list[int]] = [[] for _ in prompts]

    def spend_budget(i: int) -> None:
        if budget is not None and thinking[i] is not None and thinking[i] >= budget.tokens:
            queued[i], thinking[i] = list(budget.stop_phrase), None
            out[i].budget_stopped = True

    if budget is not None:
        for i, p in enumerate(prompts):
            opened = [j for j, t in enumerate(p) if t == budget.think_open]
            if opened and budget.think_close not in p[opened[-1]:]:
                thinking[i] = len(p) - 1 - opened[-1]   # a prompt that prefills "<think>\n"
                spend_budget(i)

    last_stage = parallel_state.is_pipeline_last_stage(ignore_virtual=True)
    for cur in range(min(lengths), total):
        if all(finished):
            break
        logits = step(tokens, cur)
        picked = torch.zeros(2, len(prompts), dtype=torch.float64, device=device)
        tops = torch.zeros(2, len(prompts), top_k_logprobs, dtype=torch.float64, device=device)
        if last_stage:
            last = logits[:len(prompts)].float()   # the idle rows' logits are dropped before sampling
            if vocab_limit is not None:
                last[:, vocab_limit:] = -float("inf")
            ids, logp = _pick(last, s, generator)
            for i in range(len(prompts)):
                if queued[i] and cur >= lengths[i]:   # forced: its log-prob under the model
                    ids[i] = queued[i][0]
                    logp[i] = torch.log_softmax(last[i], -1)[queued[i][0]]
            picked = torch.stack([ids.double(), logp.double()]).to(device)
            if top_k_logprobs:
                values, top = torch.log_softmax(last / logprob_temperature, -1).topk(top_k_logprobs, -1)
                tops = torch.stack([top.double(), values.double()]).to(device)
        if parallel_state.get_pipeline_model_parallel_world_size() > 1:
            for x in (picked, tops) if top_k_logprobs else (picked,):
                dist.broadcast(x, parallel_state.get_pipeline_model_parallel_last_rank(),
                               group=parallel_state.get_pipeline_model_parallel_group())
        for i, g in enumerate(out):
            if cur < lengths[i] or finished[i]:
                continue   # still reading its prompt, or done
            token, forced = int(picked[0, i]), bool(queued[i])
            if forced:
                queued[i].pop(0)
            tokens[i, cur] = token
            g.tokens.append(token)
            g.logprobs.append(float(picked[1, i]))
            g.forced.append(forced)
            if top_k_logprobs:
                g.top_ids.append(tops[0, i].long().cpu())
                g.top_logprobs.append(tops[1, i].float().cpu())
            if budget is not None and not forced:
                if token == budget.think_close:
                    thinking[i] = None
                elif thinking[i] is not None:
                    thinking[i] += 1
                elif token == budget.think_open:
                    thinking[i] = 0
                spend_budget(i)
            if token in stop and not forced:
                g.finish, finished[i] = "stop", True
            elif len(g.tokens) >= max_new_tokens:
                finished[i] = True
    return out


# ----------------------------------------------------------------------------- CLI

def prompt_messages(row: dict) -> list[dict]:
    if isinstance(row.get("messages"), list):
        msgs = row["messages"]
        # a training conversation: prompt with everything before its final assistant turn
        return msgs[:-1] if msgs and msgs[-1].get("role") == "assistant" else msgs
    if isinstance(row.get("prompt"), str):
        return [{"role": "user", "content": row["prompt"]}]
    raise ValueError("row has neither 'messages' nor 'prompt'")


def prompt_ids(tokenizer, messages: list[dict], enable_thinking: bool = True) -> list[int]:
    """The prompt's tokens in the Qwen3 chat format, ending in the generation prompt."""
    from data_pipeline.chat import render

    return tokenizer.encode(render(messages, add_generation_prompt=True, enable_thinking=enable_thinking).text,
                            add_special_tokens=False)


def response_text(tokenizer, generation: Generation, stop: list[int]) -> str:
    """The generated assistant turn as text, without its stop token."""
    return tokenizer.decode([t for t in generation.tokens if t not in stop], skip_special_tokens=False)


def split_response(text: str) -> tuple[str | None, str]:
    """(thinking, answer) of a generated assistant turn."""
    if "</think>" in text:
        head, _, tail = text.partition("</think>")
        return head.split("<think>")[-1].strip("\n"), tail.lstrip(".\n")
    return None, text


def _resume_point(path: Path) -> tuple[set, int]:
    """(keys of the complete rows in an output, top-k records those rows point to). A last
    line cut by a crash is removed first, so that appending starts on a fresh line."""
    done, records = set(), 0
    if not path.is_file():
        return done, records
    data = path.read_bytes()
    cut = data.rfind(b"\n") + 1
    if cut < len(data):
        with open(path, "r+b") as f:
            f.truncate(cut)
    for line in data[:cut].decode("utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
            done.add(_key(row["id"], row.get("mode")))
        except (json.JSONDecodeError, KeyError, TypeError):
            continue   # an unreadable row is generated again
        if isinstance(row.get("topk_offset"), int) and isinstance(row.get("response_ids"), list):
            records = max(records, row["topk_offset"] + len(row["response_ids"]))
    return done, records


def _key(row_id, mode) -> str:
    return json.dumps([row_id, mode])


def _settings(cfg) -> dict:
    """The CLI's validated settings (ConfigError on the first bad one)."""
    from omegaconf import OmegaConf

    from data_pipeline.fusion import MODES
    from model.config import from_dict

    for key in ("checkpoint", "tokenizer", "input", "output"):
        if cfg.get(key) in (None, "", "???"):
            raise ConfigError(f"{key}= is required")
    modes = list(cfg.get("modes") or [])
    if any(m not in MODES for m in modes) or len(set(modes)) != len(modes):
        raise ConfigError(f"modes={modes} must list distinct modes of {', '.join(MODES)}")
    k, temperature = int(cfg.get("top_k_logprobs") or 0), float(cfg.get("logprob_temperature", 1.0))
    if k < 0 or temperature <= 0:
        raise ConfigError(f"top_k_logprobs={k} must be >= 0 and logprob_temperature={temperature} > 0")
    if int(cfg.max_new_tokens) < 1 or int(cfg.batch_size) < 1:
        raise ConfigError("max_new_tokens and batch_size must be >= 1")
    max_rows = cfg.get("max_rows")
    if max_rows is not None and int(max_rows) < 1:
        raise ConfigError(f"max_rows={max_rows} must be >= 1 (null: every row)")
    src = Path(str(cfg.input))
    if not src.is_file():
        raise ConfigError(f"input={src} does not exist")
    sampling = from_dict(Sampling, OmegaConf.to_container(cfg.sampling, resolve=True), "sampling").check()
    return {"modes": modes or [None], "top_k": k, "temperature": temperature, "sampling": sampling,
            "ids": bool(cfg.get("ids")) or k > 0, "flags": bool(cfg.get("mode_flags")), "input": src,
            "output": Path(str(cfg.output)), "batch_size": int(cfg.batch_size),
            "kill_after": cfg.get("inject_kill_after_rows"),
            "max_rows": None if max_rows is None else int(max_rows)}


def _read_items(src: Path, modes: list) -> tuple[list, int]:
    """(row, prompt messages, mode) per input row and mode, in file order; unreadable rows."""
    items, bad = [], 0
    for n, line in enumerate(src.read_text(encoding="utf-8").split("\n")):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            row.setdefault("id", n)
            messages = prompt_messages(row)
        except (json.JSONDecodeError, ValueError, AttributeError):
            bad += 1
            continue
        items += [(row, messages, mode) for mode in modes]
    return items, bad


def run_cli(cfg) -> int:
    """Validate, (re)launch, generate. Returns the exit code.

    Items (one per input row and mode) are cut into batches by their position in the
    input, and batch b samples with seed `sampling.seed * 1000003 + b`: a restart, which
    regenerates only batches with rows missing from the output, writes exactly the rows an
    uninterrupted run would have written, in the same order."""
    import contextlib
    import dataclasses
    import signal

    from omegaconf import OmegaConf

    from data_pipeline.distill_data import TopKWriter
    from data_pipeline.fusion import in_mode
    from data_pipeline.tokenizer import load_tokenizer
    from model.checkpoint import load_for_inference, read_model_config
    from model.config import ParallelConfig, from_dict
    from model.parallel import destroy_distributed, init_distributed, minimum_world_size, validate_layout
    from recipes.checkpointing import resolve_init_from

    try:
        opts = _settings(cfg)
        ckpt = resolve_init_from(str(cfg.checkpoint), Path.cwd())
        model_cfg = read_model_config(ckpt)
        par = from_dict(ParallelConfig, OmegaConf.to_container(cfg.parallel, resolve=True), "parallel")
        nprocs = minimum_world_size(par)
        validate_layout(model_cfg, par, int(os.environ.get("WORLD_SIZE", nprocs)))
        tokenizer = load_tokenizer(cfg.tokenizer)
        budget = thinking_budget(tokenizer, cfg.thinking_budget)
        if opts["top_k"] > len(tokenizer):
            raise ConfigError(f"top_k_logprobs={opts['top_k']} is more than the tokenizer's {len(tokenizer)} tokens")
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if "WORLD_SIZE" not in os.environ and nprocs > 1:
        from model.launch import relaunch_if_needed

        relaunch_if_needed("recipes.generate", sys.argv[1:], nprocs)

    import torch.distributed as dist

    sampling, k, out_path = opts["sampling"], opts["top_k"], opts["output"]
    init_distributed(par, seed=int(sampling.seed), model=model_cfg)
    rank0 = dist.get_rank() == 0
    chunks = load_for_inference(ckpt, par, model_cfg)

    items, bad = _read_items(opts["input"], opts["modes"])
    if opts["max_rows"] is not None:   # items are row-major: each row's modes together
        items = items[:opts["max_rows"] * len(opts["modes"])]
    resume = [None]
    if rank0:   # rank 0 alone reads (and repairs) the output; the others get its answer
        out_path.parent.mkdir(parents=True, exist_ok=True)
        resume = [_resume_point(out_path)]
    dist.broadcast_object_list(resume, src=0)
    done, records = resume[0]
    todo = [_key(row["id"], mode) not in done for row, _, mode in items]
    if rank0 and bad:
        print(f"skipped {bad} unreadable input rows", file=sys.stderr)
    bar = None
    if rank0 and cfg.progress:
        from tqdm import tqdm

        bar = tqdm(total=len(items), initial=len(items) - sum(todo), desc="generating", unit=" response")
    writer = TopKWriter(out_path, k, opts["temperature"], records) if rank0 and k else None
    stop = stop_ids(tokenizer)
    written, size = 0, opts["batch_size"]
    batches = [b for b, start in enumerate(range(0, len(items), size)) if any(todo[start:start + size])]
    # Batches are dealt over data-parallel ranks; rank 0 writes them in order.
    dp, dp_rank, gather = data_parallel_share()
    with open(out_path, "a", encoding="utf-8") if rank0 else contextlib.nullcontext() as f:
        for first in range(0, len(batches), dp):
            wave = batches[first:first + dp]
            mine = []
            if dp_rank < len(wave):
                b = wave[dp_rank]
                part = items[b * size:(b + 1) * size]
                prompts = [prompt_ids(tokenizer, in_mode(m, mode, opts["flags"]) if mode else m,
                                      mode != "no_think" if mode else bool(cfg.enable_thinking)) for _, m, mode in part]
                gens = generate(chunks, prompts, int(cfg.max_new_tokens), stop,
                                dataclasses.replace(sampling, seed=sampling.seed * 1000003 + b), budget,
                                vocab_limit=len(tokenizer), top_k_logprobs=k, logprob_temperature=opts["temperature"])
                mine = [(prompt, g.tokens, g.finish, g.budget_stopped, response_text(tokenizer, g, stop),
                         (torch.stack(g.top_ids).numpy(), torch.stack(g.top_logprobs).numpy()) if k else None)
                        for prompt, g in zip(prompts, gens)]
            results = gather(mine)
            if not rank0:
                continue
            for b, done_batch in zip(wave, results):
                start = b * size
                for (row, _, mode), want, (prompt, tokens, finish, stopped, text, tops) in zip(
                        items[start:start + size], todo[start:start + size], done_batch):
                    if not want:
                        continue
                    thinking_text, answer = split_response(text)
                    out = {**{key: v for key, v in row.items() if key != "messages"}, "response": text,
                           "thinking": thinking_text, "answer": answer, "tokens": len(tokens), "finish": finish,
                           "budget_stopped": stopped}
                    if mode is not None:
                        out["mode"] = mode
                    if opts["ids"]:
                        out["prompt_ids"], out["response_ids"] = prompt, tokens
                    if writer is not None:   # the records first: a row on disk always has its records
                        out["topk_offset"] = writer.append(*tops)
                        writer.flush()
                    line = json.dumps(out, ensure_ascii=False) + "\n"
                    if opts["kill_after"] is not None and written == int(opts["kill_after"]):
                        f.write(line[:len(line) // 2])   # fault injection: die in the middle of a row
                        f.flush()
                        os.kill(os.getpid(), signal.SIGKILL)
                    f.write(line)
                    written += 1
                f.flush()
                if bar is not None:
                    bar.update(sum(todo[start:start + size]))
    if writer is not None:
        writer.close()
    if bar is not None:
        bar.close()
    destroy_distributed()
    return 0


def data_parallel_share() -> tuple[int, int, object]:
    """(ways, index, gather) for dealing generation work over the data-parallel ranks:
    this rank takes every `ways`-th piece from `index`, and gather(this rank's results)
    gives every rank's, in rank order, on every rank. Under expert parallelism, whose
    all-to-alls span DP ranks and need the same forward calls on each, every rank takes
    everything (ways 1)."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    dp = parallel_state.get_data_parallel_world_size()
    if dp == 1 or parallel_state.get_expert_model_parallel_world_size() > 1:
        return 1, 0, lambda local: [local]
    group = parallel_state.get_data_parallel_group()

    def gather(local):
        shares = [None] * dp
        dist.all_gather_object(shares, local, group=group)
        return shares

    return dp, parallel_state.get_data_parallel_rank(), gather


def main() -> None:
    from model.launch import hydra_cli

    hydra_cli("generate", run_cli, usage=__doc__)


if __name__ == "__main__":
    main()
