"""Generation from the policy's own megatron-core weights, with Qwen3's thinking budget.

    python -m recipes.generate checkpoint=runs/tiny/sft_cold_start tokenizer=data/tokenizer \\
        input=prompts.jsonl output=answers.jsonl thinking_budget=256 enable_thinking=true

`generate()` is the helper that RL, distillation and evaluation call; this module's CLI
runs it over a prompt file. It decodes with megatron-core's static KV cache where
`kv_cache_usable` allows (one model chunk per rank and CP=1: any TP, with sequence
parallelism off for the decode, any PP, EP; under FP8 the decode rows are padded to the
FP8 multiple), in chunks of rows whose cache fits a memory budget, by recomputing the whole
prefix otherwise (VPP, CP), with expert-parallel ranks in lockstep, and returns every
sampled token's log-prob.

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

`backend=vllm` has the CLI generate with the vLLM engine instead (recipes/rollout: vLLM in
each rank's process, given the checkpoint's weights in memory); greedy ids are the same.
"""

from __future__ import annotations

import contextlib
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

    def thinking_at_end(self, prompt: list[int]) -> int | None:
        """Thinking tokens a prompt already holds after an unclosed `<think>` (a prompt
        that prefills "<think>\\n"); None when it does not end inside a think block."""
        opened = [j for j, t in enumerate(prompt) if t == self.think_open]
        if opened and self.think_close not in prompt[opened[-1]:]:
            return len(prompt) - 1 - opened[-1]
        return None


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


def _pick(logits: torch.Tensor, s: Sampling, generator: torch.Generator | None = None,
          uniforms: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(next ids, their log-probs) from [n, vocab] float32 logits. Sampling draws one
    uniform per row: `uniforms` [n, 1] float64 when given (`_row_uniforms`), else from
    `generator`."""
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
    if uniforms is None:
        uniforms = torch.rand(len(probs), 1, generator=generator, dtype=torch.float64)
    ids = _inverse_cdf(probs, uniforms)
    return ids, logp.gather(-1, ids[:, None])[:, 0]


def _inverse_cdf(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """One draw per row of [n, vocab] unnormalised `probs`, on their device, from one
    uniform per row (`uniforms` [n, 1] float64, on the CPU) against the running sum:
    torch.multinomial (and Gumbel-max) draw a random number per vocabulary entry, which at
    151,936 entries made CPU sampling several times slower than the model's whole decode
    step. The uniforms come from CPU generators, so a seed gives the same draws on any
    device."""
    cdf = probs.float().cumsum(-1)
    u = (uniforms.to(cdf.device) * cdf[:, -1:].double()).float()
    # right=True: the first entry whose running sum exceeds u, which always has mass
    return torch.searchsorted(cdf, u, right=True)[:, 0].clamp_max(probs.shape[-1] - 1)


def _row_uniforms(seed: int, position: int, rows: slice, batch: int) -> torch.Tensor:
    """The sampling uniforms [rows, 1] of the tokens at `position` for `rows` of a
    generate() call of `batch` prompts: a function of (seed, position, row) alone, so a
    row draws the same numbers whichever chunk decodes it and whatever else is in it."""
    generator = torch.Generator().manual_seed((seed * 2_147_483_647 + position) % 2**64)
    return torch.rand(batch, 1, generator=generator, dtype=torch.float64)[rows]


class _Recompute:
    """Next-token logits by running the whole prefix again (any TP/PP/VPP/CP/EP layout)."""

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
    one token per step. One model chunk per rank (no VPP) and CP=1; at PP > 1 each stage
    keeps the cache of its own layers and hands its hidden states [tokens, rows, hidden] to
    the next stage with a plain send/recv on the pipeline group (`_stage_forward`). The
    caller runs it inside `model.inference.sequence_parallel_off`: a decode step's single
    token per row cannot be split over TP ranks."""

    def __init__(self, chunks, batch: int, max_length: int):
        from megatron.core.inference.contexts import StaticInferenceContext

        self.model = chunks[0]
        self.model.eval()
        self.context = StaticInferenceContext(batch, max_length)
        self.done = 0   # positions already in the cache

    def __call__(self, tokens: torch.Tensor, cur: int) -> torch.Tensor | None:
        chunk = tokens[:, self.done:cur]
        positions = torch.arange(self.done, cur, device=chunk.device).expand_as(chunk)
        if self.done:
            self.context.enable_decode_mode()
        logits = _stage_forward(self.model, chunk, positions, self.context)
        self.context.sequence_len_offset = self.done = cur
        return None if logits is None else logits[:, -1]


def _stage_forward(model, tokens: torch.Tensor, positions: torch.Tensor, context) -> torch.Tensor | None:
    """This pipeline stage's forward of `tokens` [rows, n] with the inference `context`:
    hidden states from the previous stage in, to the next stage out. Logits [rows, 1 (the
    context materialises the last position only), vocab] on the last stage, None on the
    others. Blocking send/recv in stage order cannot deadlock: a stage only waits for the
    one before it."""
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.utils import get_attr_wrapped_model, get_model_config

    pp = parallel_state.get_pipeline_model_parallel_world_size()
    if pp > 1 and not parallel_state.is_pipeline_first_stage(ignore_virtual=True):
        config = get_model_config(model)
        hidden = torch.empty(tokens.shape[1], tokens.shape[0], config.hidden_size,
                             dtype=config.pipeline_dtype, device=tokens.device)
        dist.recv(hidden, src=parallel_state.get_pipeline_model_parallel_prev_rank(),
                  group=parallel_state.get_pipeline_model_parallel_group())
        get_attr_wrapped_model(model, "set_input_tensor")(hidden)
    out = model(tokens, positions, None, inference_context=context, runtime_gather_output=True)
    if pp > 1 and not parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        dist.send(out.contiguous(), dst=parallel_state.get_pipeline_model_parallel_next_rank(),
                  group=parallel_state.get_pipeline_model_parallel_group())
        return None
    return out


def _idle_forward(chunks) -> None:
    """A forward of one dummy token through every stage, through megatron-core's schedule
    (`forward_only`, any layout), for a rank whose rows are done while ranks it exchanges
    MoE tokens with still decode: each forward is one round of the expert all-to-alls.
    The interleaved (VPP) schedule needs at least pp micro-batches, so it gets pp rows."""
    from megatron.core import parallel_state

    from model.inference import forward_only

    rows = parallel_state.get_pipeline_model_parallel_world_size() if len(chunks) > 1 else 1
    forward_only(chunks, torch.zeros(rows, 1, dtype=torch.long), None, lambda logits: None,
                 mask=torch.ones(rows, 1, dtype=torch.bool))


def kv_cache_usable(chunks) -> bool:
    """Whether `generate` can decode these chunks with megatron-core's static KV cache: one
    chunk per rank (the interleaved schedule's virtual stages are not served) and no
    context parallelism (the static cache holds whole sequences). PP, TP, sequence
    parallelism (turned off for the decode) and EP are served."""
    from megatron.core import parallel_state

    return len(chunks) == 1 and parallel_state.get_context_parallel_world_size() == 1


# Share of the free accelerator (or host) memory one chunk's KV cache and per-token
# records may take when `max_cache_bytes` is not given. The rest is left to what else
# grows with the chunk: the prefill's activations, vocabulary-sized logits and sampling
# tensors per row, and the caller's own allocations.
CACHE_MEMORY_FRACTION = 0.5


def decode_row_bytes(chunks, length: int, top_k_logprobs: int = 0) -> int:
    """Bytes one row of a cached decode of `length` positions holds on this rank: its
    static KV cache (`model.inference.kv_cache_bytes_per_row` for this stage's layers) and
    `generate`'s per-token records (id, log-prob, forced flag, and the top-k ids and
    log-probs)."""
    from megatron.core import parallel_state
    from megatron.core.utils import get_attr_wrapped_model, get_model_config

    from model.inference import kv_cache_bytes_per_row

    config = get_model_config(chunks[0])
    layers = len(get_attr_wrapped_model(chunks[0], "decoder").layers)
    kv = kv_cache_bytes_per_row(layers, config.num_query_groups, parallel_state.get_tensor_model_parallel_world_size(),
                                config.kv_channels, length, config.params_dtype.itemsize)
    return kv + length * (8 + 4 + 1 + top_k_logprobs * (8 + 4))


def chunk_rows(row_bytes: int, budget: int, multiple: int = 1) -> int:
    """Rows per chunk whose decode state fits `budget` bytes at `row_bytes` a row, rounded
    down to `multiple` (FP8's row multiple, `model.inference.decode_rows`: a chunk is padded
    to it, so a smaller one would hold as much cache for fewer prompts). At least one
    (padded) chunk's worth: it always runs, and one that does not fit fails on its
    allocation."""
    rows = budget // row_bytes
    return max(multiple, rows - rows % multiple)


def decode_budget(device: torch.device) -> int:
    """`CACHE_MEMORY_FRACTION` of the memory free for a decode on `device`: on a GPU what
    the driver has free plus what PyTorch's allocator holds unused; on the CPU the host's
    available memory."""
    if device.type == "cuda":
        unused = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        free = torch.cuda.mem_get_info(device)[0] + unused
    else:
        import psutil

        free = psutil.virtual_memory().available
    return int(free * CACHE_MEMORY_FRACTION)


def lockstep_group(chunks):
    """The process group whose ranks must make the same number of model forwards, or None
    when only this rank's model-parallel group (which shares its prompts, and so its
    schedule) takes part in its collectives.

    The MoE token all-to-alls and gathers run over megatron-core's expert groups (EP and
    expert TP, `get_expert_tensor_and_model_parallel_group`). When those reach ranks of
    other data-parallel replicas, which decode other prompts (EP=8 at TP=4, CP=1: each
    expert group spans two replicas), every one of those ranks must run each forward: the
    group is `get_expert_tensor_model_pipeline_parallel_group` (the expert groups of every
    pipeline stage; megatron-core builds dense and expert layouts on the same pipeline
    groups, so it holds whole model-parallel groups). Should a layout's model-parallel
    group not lie inside it, the whole world steps together."""
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.utils import get_model_config

    if not dist.is_initialized() or dist.get_world_size() == 1 or get_model_config(chunks[0]).num_moe_experts is None:
        return None
    replica = set(dist.get_process_group_ranks(parallel_state.get_model_parallel_group()))
    if parallel_state.get_context_parallel_world_size() > 1:
        replica |= set(dist.get_process_group_ranks(parallel_state.get_context_parallel_group()))
    experts = set(dist.get_process_group_ranks(parallel_state.get_expert_tensor_and_model_parallel_group()))
    if experts <= replica:
        return None
    group = parallel_state.get_expert_tensor_model_pipeline_parallel_group()
    return group if replica <= set(dist.get_process_group_ranks(group)) else dist.group.WORLD


def _all_reduce(values: list[int], op, group, device) -> list[int]:
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.long, device=device)
    dist.all_reduce(t, op=op, group=group)
    return t.tolist()


@torch.no_grad()
def generate(chunks, prompts: list[list[int]], max_new_tokens: int, stop: list[int],
             sampling: Sampling | None = None, budget: ThinkingBudget | None = None,
             vocab_limit: int | None = None, use_cache: bool = True, top_k_logprobs: int = 0,
             logprob_temperature: float = 1.0, max_cache_bytes: int | None = None) -> list[Generation]:
    """Continue every prompt; collective over the model-parallel group (same args
    everywhere), and under expert parallelism that spans data-parallel ranks over the
    ranks the MoE all-to-alls reach (`lockstep_group`), which may pass different prompts,
    or none.

    With `top_k_logprobs` k, every generated token also records the k most likely ids of
    softmax(logits / logprob_temperature) at its position and their log-probs (a
    teacher's output for distillation, recipes.distill). `vocab_limit` masks the model's
    padded vocabulary beyond the tokenizer's.

    KV cache: megatron-core's static inference context (`_Cached`) wherever
    `kv_cache_usable` holds: any TP (sequence parallelism turned off for the decode,
    `model.inference.sequence_parallel_off`), PP (each stage caches its own layers and
    hands hidden states on), EP. VPP and CP, and `use_cache=False`, recompute the whole
    prefix each token. Rows decode in chunks whose decode state (`decode_row_bytes`: the KV
    cache of prompt + max_new_tokens positions and the per-token records) fits
    `max_cache_bytes`, by default `CACHE_MEMORY_FRACTION` of the free memory; every rank of
    the model-parallel group takes the smallest rank's chunk size. Why chunks, not
    megatron-core's paged dynamic context: in 0.16.1 its attention asserts flash-attn
    >= 2.7.3 and it allocates on the CUDA device, so it cannot run on the CPU path.
    Recomputing needs no cache and decodes all rows as one chunk. Under FP8 the cached
    batch runs with idle rows up to FP8's row multiple (`model.inference.decode_rows`); the
    results are those of the prompts alone.

    Each chunk starts decoding at its shortest prompt's end; rows with longer prompts take
    their own prompt tokens until theirs ends. A row's results do not depend on the chunk
    it is in: greedy decoding gives the same tokens, and sampling draws each row's
    uniforms from (seed, position, row) (`_row_uniforms`), so a seed gives the same
    samples at any chunk size.

    The decode state (tokens, log-probs, forced flags, thinking counters, stop and length
    flags) stays in tensors on the model's device and is updated for all rows at once; a
    step's one transfer to the host is whether rows still run (reduced over
    `lockstep_group`, where ranks whose rows are done run idle forwards, `_idle_forward`,
    until every rank's are); each chunk's records come back once at its end.
    """
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.utils import get_model_config

    from model.inference import decode_rows, model_device, sequence_parallel_off

    s = (sampling or Sampling()).check()
    device = model_device(chunks)
    config = get_model_config(chunks[0])
    if any(len(p) < 1 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    cached = use_cache and kv_cache_usable(chunks)
    lockstep = lockstep_group(chunks)
    if cached:
        total = max((len(p) for p in prompts), default=1) + max_new_tokens
        budget_bytes = decode_budget(device) if max_cache_bytes is None else max_cache_bytes
        rows = chunk_rows(decode_row_bytes(chunks, total, top_k_logprobs), budget_bytes, decode_rows(config, 1))
        # the cache's rows are in every TP collective and every pipeline send: one size on
        # all ranks of the model-parallel group, whose free memory differs
        rows = _all_reduce([rows], dist.ReduceOp.MIN, parallel_state.get_model_parallel_group(), device)[0]
    else:
        rows = max(1, len(prompts))
    count = -(-len(prompts) // rows)
    if lockstep is not None:   # a rank with fewer prompts decodes as many (idle) chunks
        count = _all_reduce([count], dist.ReduceOp.MAX, lockstep, device)[0]
    size = -(-len(prompts) // count) if count else 0   # balanced chunks of at most `rows`
    decoder = _Decoder(chunks, s, budget, stop, vocab_limit, top_k_logprobs, logprob_temperature,
                       max_new_tokens, cached, lockstep, len(prompts), device)
    out = []
    with sequence_parallel_off(chunks) if cached else contextlib.nullcontext():
        for c in range(count):
            out += decoder.run(prompts[c * size:(c + 1) * size], c * size)
    return out


class _Decoder:
    """One chunk of `generate` at a time (see its docstring); the settings it was called with."""

    def __init__(self, chunks, s: Sampling, budget: ThinkingBudget | None, stop: list[int], vocab_limit,
                 top_k: int, logprob_temperature: float, max_new_tokens: int, cached: bool, lockstep,
                 batch: int, device):
        from megatron.core import parallel_state
        from megatron.core.utils import get_model_config

        self.chunks, self.s, self.budget, self.vocab_limit = chunks, s, budget, vocab_limit
        self.top_k, self.logprob_temperature, self.max_new_tokens = top_k, logprob_temperature, max_new_tokens
        self.cached, self.lockstep, self.batch, self.device = cached, lockstep, batch, device
        self.config = get_model_config(chunks[0])
        self.stop = torch.tensor(stop, dtype=torch.long, device=device)
        self.phrase = torch.tensor(budget.stop_phrase if budget else [], dtype=torch.long, device=device)
        self.last_stage = parallel_state.is_pipeline_last_stage(ignore_virtual=True)
        self.pp = parallel_state.get_pipeline_model_parallel_world_size()

    def _flags(self, running: torch.Tensor) -> tuple[bool, bool]:
        """(this rank's rows still run, any rank's that steps with it do): one transfer."""
        import torch.distributed as dist

        anywhere = running.clone()
        if self.lockstep is not None:
            dist.all_reduce(anywhere, op=dist.ReduceOp.MAX, group=self.lockstep)
        local, anywhere = torch.stack([running, anywhere]).tolist()
        return bool(local), bool(anywhere)

    def run(self, prompts: list[list[int]], first: int) -> list[Generation]:
        """Decode `prompts`, rows `first`... of the generate() call (their sampling uniforms);
        none: only idle forwards while the lockstep group's other ranks decode."""
        import torch.distributed as dist
        from megatron.core import parallel_state

        from model.inference import decode_rows

        n, dev, budget = len(prompts), self.device, self.budget
        if n == 0:
            local, anywhere = self._flags(torch.zeros((), dtype=torch.long, device=dev))
            while anywhere:
                _idle_forward(self.chunks)
                local, anywhere = self._flags(torch.zeros((), dtype=torch.long, device=dev))
            return []
        lengths_list = [len(p) for p in prompts]
        total = max(lengths_list) + self.max_new_tokens
        # FP8 decode: idle rows (token 0, never sampled) up to the GEMMs' row multiple
        rows = decode_rows(self.config, n) if self.cached else n
        host = torch.zeros(rows, total, dtype=torch.long)
        for i, p in enumerate(prompts):
            host[i, :len(p)] = torch.tensor(p)
        tokens = host.to(dev)
        lengths = torch.tensor(lengths_list, device=dev)
        step = _Cached(self.chunks, rows, total) if self.cached else _Recompute(self.chunks)
        logprobs = torch.zeros(n, total, dtype=torch.float32, device=dev)
        forced_at = torch.zeros(n, total, dtype=torch.bool, device=dev)
        tops = (torch.zeros(n, total, self.top_k, dtype=torch.long, device=dev),
                torch.zeros(n, total, self.top_k, dtype=torch.float32, device=dev)) if self.top_k else None
        generated = torch.zeros(n, dtype=torch.long, device=dev)
        finished = torch.full((n,), self.max_new_tokens < 1, dtype=torch.bool, device=dev)
        stopped = torch.zeros(n, dtype=torch.bool, device=dev)   # ended on a stop token
        # per row: tokens since an open <think> (-1: not thinking); the next stop-phrase
        # token to force (-1: none); whether the budget ran out
        thinking = [-1] * n
        forcing = [-1] * n
        budget_stopped = [False] * n
        phrase_start = 0 if len(self.phrase) else -1   # where a spent budget starts forcing
        if budget is not None:
            for i, p in enumerate(prompts):
                held = budget.thinking_at_end(p)
                if held is not None:
                    thinking[i] = held
                    if thinking[i] >= budget.tokens:
                        thinking[i], forcing[i], budget_stopped[i] = -1, phrase_start, True
        thinking = torch.tensor(thinking, device=dev)
        forcing = torch.tensor(forcing, device=dev)
        budget_stopped = torch.tensor(budget_stopped, device=dev)

        cur = min(lengths_list)
        local, anywhere = self._flags((~finished).any().long())
        while anywhere:
            if not local:
                _idle_forward(self.chunks)
                local, anywhere = self._flags(torch.zeros((), dtype=torch.long, device=dev))
                continue
            logits = step(tokens, cur)
            took = ~finished & (cur >= lengths)        # rows that take a generated token at cur
            forced = took & (forcing >= 0)
            picked = torch.zeros(2, n, dtype=torch.float64, device=dev)
            top = torch.zeros(2, n, self.top_k, dtype=torch.float64, device=dev)
            if self.last_stage:
                last = logits[:n].float()   # the idle rows' logits are dropped before sampling
                if self.vocab_limit is not None:
                    last[:, self.vocab_limit:] = -float("inf")
                uniforms = None if self.s.temperature == 0 else _row_uniforms(
                    self.s.seed, cur, slice(first, first + n), self.batch)
                ids, logp = _pick(last, self.s, uniforms=uniforms)
                if budget is not None and len(self.phrase):   # forced: its log-prob under the model
                    want = self.phrase[forcing.clamp(min=0)]
                    ids = torch.where(forced, want, ids)
                    logp = torch.where(forced, last.gather(-1, want[:, None])[:, 0] - last.logsumexp(-1), logp)
                picked = torch.stack([ids.double(), logp.double()])
                if self.top_k:
                    values, index = torch.log_softmax(last / self.logprob_temperature, -1).topk(self.top_k, -1)
                    top = torch.stack([index.double(), values.double()])
            if self.pp > 1:
                for x in (picked, top) if self.top_k else (picked,):
                    dist.broadcast(x, parallel_state.get_pipeline_model_parallel_last_rank(),
                                   group=parallel_state.get_pipeline_model_parallel_group())
            ids = picked[0].long()
            tokens[:n, cur] = torch.where(took, ids, tokens[:n, cur])
            logprobs[:, cur] = picked[1].float()
            forced_at[:, cur] = forced
            if self.top_k:
                tops[0][:, cur], tops[1][:, cur] = top[0].long(), top[1].float()
            generated += took.long()
            sampled = took & ~forced
            if budget is not None:
                close = sampled & (ids == budget.think_close)
                grow = sampled & ~close & (thinking >= 0)
                opens = sampled & ~close & (thinking < 0) & (ids == budget.think_open)
                thinking = torch.where(close, -1, torch.where(grow, thinking + 1, torch.where(opens, 0, thinking)))
                forcing = torch.where(forced, forcing + 1, forcing)
                forcing = torch.where(forcing >= len(self.phrase), -1, forcing)
                spent = sampled & (thinking >= budget.tokens)
                forcing = torch.where(spent, phrase_start, forcing)
                thinking = torch.where(spent, -1, thinking)
                budget_stopped |= spent
            hit = sampled & torch.isin(ids, self.stop)
            stopped |= hit
            finished |= hit | (took & (generated >= self.max_new_tokens))
            cur += 1
            local, anywhere = self._flags((~finished).any().long())

        # the chunk's records, back to the host once
        ends, stopped, budget_stopped = torch.stack([lengths + generated, stopped.long(),
                                                     budget_stopped.long()]).tolist()
        tokens, logprobs, forced_at = tokens[:n].tolist(), logprobs.tolist(), forced_at.tolist()
        tops = None if tops is None else (tops[0].cpu(), tops[1].cpu())
        out = []
        for i, (start, end) in enumerate(zip(lengths_list, ends)):
            g = Generation(tokens=tokens[i][start:end], logprobs=logprobs[i][start:end], forced=forced_at[i][start:end],
                           finish="stop" if stopped[i] else "length", budget_stopped=bool(budget_stopped[i]))
            if tops is not None:
                g.top_ids = list(tops[0][i, start:end].clone().unbind(0))
                g.top_logprobs = list(tops[1][i, start:end].clone().unbind(0))
            out.append(g)
        return out


# ----------------------------------------------------------------------------- CLI

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
    from recipes.rollout import settings_from

    rollout = settings_from({"backend": cfg.get("backend"), "vllm": cfg.get("vllm")}, "generate")
    return {"modes": modes or [None], "top_k": k, "temperature": temperature, "sampling": sampling,
            "ids": bool(cfg.get("ids")) or k > 0, "flags": bool(cfg.get("mode_flags")), "input": src,
            "output": Path(str(cfg.output)), "batch_size": int(cfg.batch_size),
            "kill_after": cfg.get("inject_kill_after_rows"),
            "max_rows": None if max_rows is None else int(max_rows), "rollout": rollout}


def _read_items(src: Path, modes: list) -> tuple[list, int]:
    """(row, prompt messages, mode) per input row and mode, in file order; unreadable rows."""
    from data_pipeline.chat import prompt_messages

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

    from data_pipeline.chat import prompt_ids
    from data_pipeline.distill_data import TopKWriter
    from data_pipeline.fusion import in_mode
    from data_pipeline.tokenizer import load_tokenizer
    from model.checkpoint import load_for_inference, read_model_config
    from model.config import ParallelConfig, from_dict
    from model.parallel import destroy_distributed, init_distributed, minimum_world_size, validate_layout
    from recipes.checkpointing import resolve_init_from
    from recipes.rollout import launch_problem, make_engine

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
        problem = launch_problem(opts["rollout"], model_cfg)
        if problem:
            raise ConfigError(problem)
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
    prompts_of = [prompt_ids(tokenizer, in_mode(m, mode, opts["flags"]) if mode else m,
                             mode != "no_think" if mode else bool(cfg.enable_thinking)) for _, m, mode in items]
    longest = max((len(p) for p in prompts_of), default=0) + int(cfg.max_new_tokens)
    engine = make_engine(opts["rollout"], chunks, model_cfg, tokenizer, longest, int(sampling.seed))
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
                prompts = prompts_of[b * size:(b + 1) * size]
                gens = engine.generate(prompts, int(cfg.max_new_tokens),
                                       dataclasses.replace(sampling, seed=sampling.seed * 1000003 + b), budget,
                                       top_k_logprobs=k, logprob_temperature=opts["temperature"])
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
    engine.close()
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
