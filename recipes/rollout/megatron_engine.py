"""The built-in rollout engine: `recipes.generate.generate` on the policy's own
megatron-core chunks, at the training layout. It reads the training weights themselves,
so `sync_weights` only takes the chunks."""

from __future__ import annotations


class MegatronEngine:
    def __init__(self, chunks, stop: list[int], vocab_limit: int | None):
        self.chunks, self.stop, self.vocab_limit = chunks, stop, vocab_limit

    def generate(self, prompts, max_new_tokens, sampling, budget, top_k_logprobs: int = 0,
                 logprob_temperature: float = 1.0):
        from recipes.generate import generate

        # called with no prompts too: under expert parallelism this rank's idle forwards keep
        # the MoE all-to-alls of the ranks that do have prompts matched (recipes.generate)
        return generate(self.chunks, prompts, max_new_tokens, self.stop, sampling, budget,
                        vocab_limit=self.vocab_limit, top_k_logprobs=top_k_logprobs,
                        logprob_temperature=logprob_temperature)

    def sync_weights(self, chunks) -> None:
        self.chunks = chunks

    def close(self) -> None:
        pass
