"""The distillation objective: divergences between a teacher's top-k and a student, per
token. Pure tensor math, no model and no distributed state (the student's log-probs at the
teacher's ids come from model.inference.logprobs_at, which handles the vocab-parallel
split), so every formula is checked on fixed tensors (tests/test_distill.py).

The teacher is known by its k most likely tokens (ids and log-probs at the distillation
temperature T). Both distributions are coarsened onto the same k + 1 outcomes: the
teacher's k tokens, and "any other token", whose probability is 1 minus the mass of the
k. Every divergence below is computed exactly on those k + 1 outcomes; with k equal to
the vocabulary it is the full-vocabulary divergence, and for smaller k it is a lower bound
of it (merging outcomes never increases a divergence), so teacher and student are
compared on one consistent footing.

With t the teacher's and s the student's k + 1 probabilities:
    forward   KL(t || s) = sum t (log t - log s)        (off-policy default: mass covering)
    reverse   KL(s || t) = sum s (log s - log t)        (on-policy default: mode seeking)
    jsd       beta KL(t || m) + (1 - beta) KL(s || m),  m = beta t + (1 - beta) s
              (the generalised Jensen-Shannon divergence of on-policy distillation, GKD:
              a mix of the two directions that stays finite)

Per token: ce_weight * CE(target) + kl_weight * T^2 * divergence. The T^2 keeps the
divergence's gradient on the same scale as the CE's when T > 1 (Hinton et al.); the CE
is at temperature 1 on the token the row holds (the teacher's, off-policy).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

DIVERGENCES = ("forward", "reverse", "jsd")


def rest_floor(dtype: torch.dtype) -> float:
    """Floor of the "any other token" probability: the resolution of `dtype` log-probs
    near 0, below which a rest mass cannot be told from 0 (the log-probs' own rounding is
    that large). A floor far below it (1e-12 before) turned rounding into a log of -27.6,
    far below the true one, and the reverse KL of peaked teachers rose up to 10 nats above
    the full-vocabulary value it must stay under."""
    return torch.finfo(dtype).eps


@dataclass
class DistillLoss:
    ce_weight: float = 0.0
    kl_weight: float = 1.0
    divergence: str = "forward"
    jsd_beta: float = 0.5
    temperature: float = 1.0
    # teacher tokens kept per position
    top_k: int = 64

    def problems(self) -> list[str]:
        p = []
        if self.divergence not in DIVERGENCES:
            p.append(f"distill.loss.divergence={self.divergence!r} must be one of {', '.join(DIVERGENCES)}")
        if not 0 < self.jsd_beta < 1:
            p.append(f"distill.loss.jsd_beta={self.jsd_beta} must be in (0, 1)")
        if self.temperature <= 0:
            p.append(f"distill.loss.temperature={self.temperature} must be > 0")
        if self.top_k < 1:
            p.append(f"distill.loss.top_k={self.top_k} must be >= 1")
        if self.ce_weight < 0 or self.kl_weight < 0 or self.ce_weight + self.kl_weight == 0:
            p.append(f"distill.loss.ce_weight={self.ce_weight} and kl_weight={self.kl_weight} must be >= 0, "
                     "not both 0")
        return p


def with_rest(logp: torch.Tensor) -> torch.Tensor:
    """[..., k] log-probs of k tokens -> [..., k + 1], the last being every other token.

    The rest is log(1 - exp(logsumexp(logp))) through expm1, in float64: `1 - sum(exp)`
    in float32 cancels to 0 or below whenever the k hold all but ~1e-7 of the mass."""
    mass = torch.logsumexp(logp.double(), -1, keepdim=True)
    rest = (-torch.expm1(mass)).clamp(min=rest_floor(logp.dtype)).log()
    return torch.cat([logp, rest.to(logp.dtype)], -1)


def _kl(p_log: torch.Tensor, q_log: torch.Tensor) -> torch.Tensor:
    return (p_log.exp() * (p_log - q_log)).sum(-1)


def divergence(teacher_logp: torch.Tensor, student_logp: torch.Tensor, kind: str,
               beta: float = 0.5) -> torch.Tensor:
    """Per-token divergence between [..., k] log-probs of the same k tokens (the teacher's
    top k), on the k + 1 outcomes of the module docstring."""
    t, s = with_rest(teacher_logp), with_rest(student_logp)
    if kind == "forward":
        return _kl(t, s)
    if kind == "reverse":
        return _kl(s, t)
    if kind == "jsd":
        m = torch.logsumexp(torch.stack([t + torch.log(torch.tensor(beta)), s + torch.log(torch.tensor(1 - beta))]),
                            0)
        return beta * _kl(t, m) + (1 - beta) * _kl(s, m)
    raise ValueError(f"unknown divergence {kind!r}")


def per_token(student_logits: torch.Tensor, targets: torch.Tensor, teacher_logp: torch.Tensor,
              teacher_ids: torch.Tensor, c: DistillLoss, vocab_limit: int | None = None
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, CE, divergence) per position, [n] each, from the student's vocab-parallel
    logits [n, vocab / tp] at n loss positions, the tokens they predict [n], and the
    teacher's top k there ([n, k'] log-probs at c.temperature and ids, k' >= c.top_k)."""
    from model.inference import logprobs_at

    t_logp, t_ids = teacher_logp[..., :c.top_k].float(), teacher_ids[..., :c.top_k].long()
    if c.temperature == 1.0:   # one softmax for both terms
        both = logprobs_at(student_logits, torch.cat([targets[:, None].long(), t_ids], -1), 1.0, vocab_limit)
        target_logp, s_logp = both[:, 0], both[:, 1:]
    else:
        target_logp = logprobs_at(student_logits, targets[:, None], 1.0, vocab_limit)[:, 0]
        s_logp = logprobs_at(student_logits, t_ids, c.temperature, vocab_limit)
    ce = -target_logp
    div = divergence(t_logp.to(s_logp.device), s_logp, c.divergence, c.jsd_beta)
    loss = c.ce_weight * ce + c.kl_weight * c.temperature ** 2 * div
    return loss, ce.detach(), div.detach()
