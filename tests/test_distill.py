"""Strong-to-weak distillation end to end on CPU: a smaller student learns from the
arithmetic teacher, off-policy then on-policy.

The teacher is the arithmetic cold-start model (tests/conftest.py: `mini`, 4 dense
layers, hidden 128, untied, the mini tokenizer's 4,096 ids, trained by SFT on two-digit
addition with its column sums as the reasoning). The student is what the small path
distils into (hydra_conf/pipeline/mini_small.yaml): `mini_moe`, 8 experts top 2, here with
half the teacher's layers (2) and narrower attention heads; it starts from random weights
and has never seen the task. The teacher answers 800 training prompts greedily in thinking
mode with its top-16 log-probs per token (recipes.generate); the student learns those
off-policy (240 steps of 16 responses, the learning rate annealed from 3e-3 to 1e-4), then
samples its own answers, which the teacher scores token by token (reverse KL, 8 steps at
1e-4). The stage's held-out evaluation (40 problems in no training set, greedy, one seed)
measures the student's accuracy and its per-token KL to the teacher before the first
off-policy update, after the last one, and after the last on-policy one.

Measured (QWEN3_TEST_SEED: the data, initial weights and training seeds of teacher and
student; before -> after off-policy -> after on-policy; KL in nats per token):

    seed  teacher  student accuracy    held-out KL
    0     1.0      0 -> 1.0   -> 1.0    6.50 -> 0.0011 -> 0.0011
    1     0.95     0 -> 0.975 -> 0.975  6.32 -> 0.0049 -> 0.0046
    2     1.0      0 -> 1.0   -> 1.0    7.69 -> 0.0004 -> 0.0004
    3     1.0      0 -> 1.0   -> 1.0    7.10 -> 0.0008 -> 0.024

The student learns what the teacher knows, so its accuracy is asserted against the
teacher's. Its greedy answers can beat the teacher's: the teacher answered other problems,
and the student learnt its top-16 distribution at every token, not only its answers. The
on-policy phase does not add accuracy at this scale: 8 steps of 16 samples are noisy (one
sampled response far from the teacher moves the held-out KL, seed 3), and at a higher
learning rate (3e-4, 1e-3, measured on the full Qwen3 vocabulary) it cost accuracy.

Why these settings (seeds 0 and 3 unless said): the MoE student needs the 240 off-policy
steps. At 120, with the 150-step teacher the conftest had then, it was still on the loss
plateau where only the answer format is learnt at seed 0 (accuracy 0.025, KL 0.18), where
the same student made dense (`mini`, 2 layers) reached 0.975; at 240 the dense one scored
no better than the MoE one (0.975 and 0.95 against 1.0 and 0.95), so the test takes the
small path's architecture, for about 10 s more CPU. With 400 prompts and the rate ending at
1e-3, the student fitted its training responses (loss 0.003) but seed 3 ended at 0.85 on
the held-out problems (KL 0.13): twice the prompts cost five more generation batches, and
annealing to 1e-4 steadies the last weights (seed 0 with 800 prompts at 1e-3: 0.95, KL 0.03).

The other tests check the loss against plain torch at TP=2, the teacher-generation resume
after a kill, and the configurations that must fail before launch.
"""

from __future__ import annotations

import json
import math
import signal
import sys

import pytest

from recipes.run_log import read_metrics
from tests.conftest import TEST_SEED, cli_error, config_error, python_module, run, torchrun, write_jsonl

# The small path's student architecture (a dense teacher distilled into an MoE), half the
# teacher's depth and narrower heads, so that the student is the weaker model.
STUDENT = ["model=mini_moe", "model.num_layers=2", "model.kv_channels=32"]


# ---------------------------------------------------------------- the loss against plain torch

@pytest.fixture(scope="module")
def loss_at_tp2(tmp_path_factory):
    out = tmp_path_factory.mktemp("distill") / "loss.json"
    torchrun("tests/workers/distill.py", "--out", out)
    return json.loads(out.read_text())


def test_teacher_topk_over_tp_ranks_matches_torch(loss_at_tp2):
    for rank in loss_at_tp2:
        assert rank["topk_ids_equal"] and rank["topk_max_error"] < 1e-5


@pytest.mark.parametrize("kind", ["forward", "reverse", "jsd"])
@pytest.mark.parametrize("k", [4, 9])
def test_distillation_loss_matches_plain_torch(loss_at_tp2, kind, k):
    """CE + T^2 * divergence on the teacher's top k (k=9: the whole vocabulary, where the
    k+1-outcome form must be the plain divergence), values and per-rank gradients."""
    for rank in loss_at_tp2:
        r = rank[f"{kind}_k{k}"]
        assert r["value_error"] < 1e-4 and r["grad_error"] < 5e-5, r   # float32 log-probs
        assert r["mean"] > 1.0   # not trivially small values
    means = {rank[f"{x}_k{k}"]["mean"] for rank in loss_at_tp2[:1] for x in ("forward", "reverse", "jsd")}
    assert len({round(m, 4) for m in means}) == 3   # the three divergences differ


def test_off_policy_step_optimises_the_global_token_mean(loss_at_tp2):
    """At DP=2 with two micro-batches per rank of 2, 15, 5 and 15 response tokens, one
    off-policy step's gradient (megatron-core's schedule and DDP) is that of the whole
    global batch's token mean, the loss it logs. Returning (sum, tokens) per micro-batch
    instead optimised the mean of the four micro-batch means: a gradient 2.1 times the
    largest entry off."""
    for rank in loss_at_tp2:
        r = rank["global_mean"]
        assert r["loss"] == pytest.approx(r["ref_loss"], rel=1e-6)
        assert r["grad_error"] < 1e-5, r


def test_divergences_on_fixed_distributions():
    """Hand-computable cases: two outcomes kept of three, identical distributions, and
    the JSD's bound (log 2 for beta = 1/2)."""
    import torch

    from recipes.distill_loss import divergence, with_rest

    t = torch.log(torch.tensor([[0.5, 0.3]]))   # rest 0.2
    s = torch.log(torch.tensor([[0.25, 0.25]]))  # rest 0.5
    assert with_rest(t).exp().tolist()[0] == pytest.approx([0.5, 0.3, 0.2])
    p, q = torch.tensor([0.5, 0.3, 0.2]), torch.tensor([0.25, 0.25, 0.5])
    assert divergence(t, s, "forward").item() == pytest.approx((p * (p / q).log()).sum().item(), rel=1e-6)
    assert divergence(t, s, "reverse").item() == pytest.approx((q * (q / p).log()).sum().item(), rel=1e-6)
    for kind in ("forward", "reverse", "jsd"):
        assert divergence(t, t, kind).abs().item() < 1e-6
    far = torch.log(torch.tensor([[1.0 - 1e-9, 1e-9 / 2]])), torch.log(torch.tensor([[1e-9 / 2, 1.0 - 1e-9]]))
    assert divergence(*far, "jsd", 0.5).item() == pytest.approx(math.log(2), rel=1e-4)


@pytest.mark.parametrize("vocab, k", [(1000, 20), (32000, 64), (151936, 64)])
def test_top_k_divergences_stay_below_the_full_vocabulary_ones(vocab, k):
    """The k + 1-outcome divergences are lower bounds of the full-vocabulary ones, also for
    a peaked teacher (logits of std 3, times 4) whose top k hold all but ~1e-8 of the mass,
    with float32 log-probs as the model gives them. The full values are computed here from
    the whole vocabulary in float64. Before the rest mass was taken in log space (and
    floored at the float32 resolution), the reverse KL exceeded them by up to 2.3 nats on
    2-11% of these tokens."""
    import torch

    from recipes.distill_loss import divergence

    g = torch.Generator().manual_seed(vocab)
    z = torch.randn(64, vocab, generator=g) * 3
    t, s = (z * 4).log_softmax(-1), (z + 2 * torch.randn(64, vocab, generator=g)).log_softmax(-1)
    top, ids = t.topk(k, -1)
    t64, s64 = t.double(), s.double()

    def kl(p, q):
        return (p.exp() * (p - q)).sum(-1)

    m = torch.logsumexp(torch.stack([t64, s64]), 0) - math.log(2)
    full = {"forward": kl(t64, s64), "reverse": kl(s64, t64), "jsd": (kl(t64, m) + kl(s64, m)) / 2}
    for kind, value in full.items():
        excess = divergence(top, s.gather(-1, ids), kind, 0.5).double() - value
        assert excess.max() < 1e-4, (kind, excess.max().item(), (excess > 1e-4).float().mean().item())


# ---------------------------------------------------------------- teacher generation resumes

def generate(task, tokenizer, out, *overrides, check=True):
    return python_module("recipes.generate", f"checkpoint={task / 'base'}", f"tokenizer={tokenizer}",
                         f"input={task / 'gen_prompts.jsonl'}", f"output={out}", "modes=[think,no_think]",
                         "top_k_logprobs=8", "max_new_tokens=12", "batch_size=4", "sampling.temperature=1.0",
                         "sampling.seed=3", "progress=false", *overrides, check=check)


@pytest.mark.slow   # default-suite budget (README: make test-slow)
def test_teacher_generation_resumes_after_a_kill(arith_task, mini_tokenizer_dir, tmp_path):
    """Sampled generation in both modes with top-k records, killed (SIGKILL) in the middle
    of writing a row, then restarted: the finished rows are kept, the rest generated, and
    the output and its records are byte for byte those of an uninterrupted run."""
    from data_pipeline.distill_data import read_teacher_rows, topk_paths

    prompts = [json.loads(line) for line in (arith_task / "held.jsonl").read_text().splitlines()][:9]
    write_jsonl(arith_task / "gen_prompts.jsonl", prompts)
    whole, resumed = tmp_path / "whole.jsonl", tmp_path / "resumed.jsonl"
    generate(arith_task, mini_tokenizer_dir, whole)
    killed = generate(arith_task, mini_tokenizer_dir, resumed, "inject_kill_after_rows=7", check=False)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    lines = resumed.read_text().split("\n")
    assert len(lines) == 8 and lines[-1] and not lines[-1].endswith("}")   # 7 rows and half of the 8th
    generate(arith_task, mini_tokenizer_dir, resumed)
    assert resumed.read_bytes() == whole.read_bytes()
    for a, b in zip(topk_paths(whole), topk_paths(resumed)):
        assert a.read_bytes() == b.read_bytes(), a.name
    rows = [json.loads(line) for line in whole.read_text().splitlines()]
    assert len(rows) == 18 and [r["mode"] for r in rows[:2]] == ["think", "no_think"]
    data, skipped = read_teacher_rows([whole], seq_length=64, need_topk=True)
    assert len(data) == 18 and not skipped and data.k == 8
    # the records are the model's own top 8 at each sampled token: log-probs sorted, summing <= 1
    ids, logp = data.topk[0]
    assert len(ids) == sum(len(r["response_ids"]) for r in rows)
    assert (logp[:, :-1] >= logp[:, 1:]).all() and (logp <= 0).all()


# ---------------------------------------------------------------- configurations refused before launch

def distill(root, tokenizer, *overrides, check=True, timeout=1800):
    return run(distill_command(root, tokenizer, *overrides), check=check, timeout=timeout)


def distill_command(root, tokenizer, *overrides) -> list:
    return ([sys.executable, "-m", "recipes.distill", f"run.root={root / 'runs'}", f"tokenizer={tokenizer}",
                "trainer.seq_length=64", "trainer.global_batch_size=16", "trainer.micro_batch_size=16",
                "trainer.log_interval=1", "logging.progress=false", "logging.wandb.mode=disabled",
                "distill.rollout.max_new_tokens=40", "distill.rollout.prompts_per_step=16", "distill.rollout.flags=false",
                "distill.loss.top_k=16",
                *map(str, overrides)])


@pytest.mark.parametrize("override, message", [
    ("distill.teacher_parallel={tp: 2}", "distill.teacher_parallel {'tp': 2} differs from the student's layout"),
    ("teacher=null", "the on-policy phase needs the teacher in the job: set teacher="),
    ("distill.loss.divergence=kl9", "distill.loss.divergence='kl9' must be one of forward, reverse, jsd"),
    ("distill.rollout.prompts_per_step=8", "distill.rollout.prompts_per_step=8 must equal trainer.global_batch_size=16"),
    ("model.vocab_size=4224", "the teacher's vocab_size=4096 differs from the student's model.vocab_size=4224"),
])
def test_bad_config_fails_before_launch(tmp_path, arith_task, mini_tokenizer_dir, override, message):
    write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "What is 1+1?", "reference": "2"}])
    args = (tmp_path, mini_tokenizer_dir, "stage=distill_on_policy", "stage.init_from=null", "model=mini",
            f"teacher={arith_task / 'base'}", f"distill.data.files=[{tmp_path / 'prompts.jsonl'}]", override)
    if not override.startswith("distill.teacher_parallel"):   # in this process: recipes.train.validate
        assert message in config_error(distill_command(*args))
        return
    proc = distill(*args, check=False)   # one real launch: exit code 2 and one stderr line
    assert message in cli_error(proc)


# ---------------------------------------------------------------- the learning test

TEACHER_PROMPTS, OFF_STEPS, ON_STEPS = 800, 240, 8
LEARN = [*STUDENT, "distill.rollout.modes=[think]", "optim.warmup_steps=5", "trainer.log_interval=10",
         f"seed={1234 + TEST_SEED}"]


@pytest.fixture(scope="module")
def teacher_data(arith_task, arith_cold_start, mini_tokenizer_dir):
    """The teacher's answers to the training prompts, with its top-16 log-probs, and the
    held-out problems in the RL prompt format. Think mode only: this teacher was never
    taught to answer without its column sums (its no_think accuracy is 2/40 at seed 0), so its
    no_think answers would spend half the CPU budget teaching nothing about the task; the
    resume test above covers generating both modes."""
    from data_pipeline.corpus import addition_problems

    root = arith_task / "distill"
    root.mkdir(exist_ok=True)
    held = [json.loads(line) for line in (arith_task / "held.jsonl").read_text().splitlines()]
    train = addition_problems(TEACHER_PROMPTS, 2, seed=5 + 2 * TEST_SEED, exclude={tuple(r["pair"]) for r in held},
                              with_carries=False)
    write_jsonl(root / "prompts.jsonl", [{"messages": r["messages"][:1], "reference": r["reference"]} for r in train])
    write_jsonl(root / "held.jsonl", [{"messages": r["messages"][:1], "reference": r["reference"]} for r in held])
    python_module("recipes.generate", f"checkpoint={arith_cold_start}", f"tokenizer={mini_tokenizer_dir}",
                  f"input={root / 'prompts.jsonl'}", f"output={root / 'teacher.jsonl'}", "modes=[think]",
                  "top_k_logprobs=16", "max_new_tokens=40", "batch_size=80", "progress=false", timeout=1200)
    with (root / "teacher.jsonl").open("a") as f:   # rows the reader must skip and count, not fail on
        f.write("{not json\n")
        f.write(json.dumps({"id": "x", "response": "no ids"}) + "\n")
    return root


@pytest.mark.slow   # a learning test (README: "Learning tests")
def test_student_learns_the_task_from_the_teacher(teacher_data, arith_cold_start, mini_tokenizer_dir):
    root = teacher_data
    common = [f"teacher={arith_cold_start}", f"distill.eval.files=[{root / 'held.jsonl'}]", "distill.eval.interval=0",
              "run.name=student", *LEARN]
    off = distill(root, mini_tokenizer_dir, "stage=distill_off_policy", "stage.init_from=null",
                  f"distill.data.files=[{root / 'teacher.jsonl'}]", f"trainer.max_steps={OFF_STEPS}",
                  f"trainer.save_interval={OFF_STEPS}", "optim.lr=3e-3", "optim.min_lr=1e-4", *common)
    output = off.stdout + off.stderr
    assert (f"teacher data: {TEACHER_PROMPTS} responses, top-16 log-probs at temperature 1; skipped 2 rows "
            "(unreadable row or no token ids: 2)") in output
    on = distill(root, mini_tokenizer_dir, "stage=distill_on_policy", f"distill.data.files=[{root / 'prompts.jsonl'}]",
                 f"trainer.max_steps={ON_STEPS}", f"trainer.save_interval={ON_STEPS}", "optim.lr=1e-4",
                 "optim.min_lr=1e-4", *common)
    assert "initialised distill_on_policy from" in on.stdout + on.stderr
    runs = root / "runs" / "student"
    first = read_metrics(runs / "distill_off_policy")
    last = read_metrics(runs / "distill_on_policy")
    assert sorted(first) == list(range(1, OFF_STEPS + 1)) and sorted(last) == list(range(1, ON_STEPS + 1))
    for m in [*first.values(), *last.values()]:
        assert math.isfinite(m["loss"]) and math.isfinite(m["distill/kl"]) and math.isfinite(m["grad_norm"])
    for m in last.values():   # fresh student samples every step
        assert m["distill/response_length"] > 0 and 0 <= m["distill/accuracy"] <= 1
    before, after = first[1], last[ON_STEPS]
    assert before["distill/eval_step"] == 0 and after["distill/eval_step"] == ON_STEPS
    curve = {"teacher_accuracy": before["distill/teacher_eval_accuracy_think"],
             "accuracy": [before["distill/eval_accuracy_think"], first[OFF_STEPS]["distill/eval_accuracy_think"],
                          after["distill/eval_accuracy_think"]],
             "kl": [before["distill/eval_kl"], first[OFF_STEPS]["distill/eval_kl"], after["distill/eval_kl"]],
             "on_policy_kl": [round(last[k]["distill/kl"], 3) for k in sorted(last)]}
    (root / "distill_curve.json").write_text(json.dumps(curve))
    print(f"held-out (before, after off-policy, after on-policy): {curve}")
    # Each bar sits at least twice the spread over seeds 0-3 (module docstring) from seed 0's value.
    assert curve["teacher_accuracy"] >= 0.5   # the teacher knows the task ...
    assert curve["accuracy"][0] == 0   # ... the student does not
    # Student minus teacher: 0, +0.025, 0, 0 over the seeds, after either phase.
    assert curve["accuracy"][1] >= curve["teacher_accuracy"] - 0.2
    assert curve["accuracy"][2] >= curve["teacher_accuracy"] - 0.2
    # KL over the untrained student's: at most 0.0008 after off-policy, 0.0034 after on-policy.
    assert curve["kl"][1] <= 0.02 * curve["kl"][0] and curve["kl"][2] <= 0.02 * curve["kl"][0]
    # The on-policy phase keeps what the off-policy one reached: it added 0, -0.0003, 0 and
    # +0.023 nats per token (at lr 1e-3 on the full Qwen3 vocabulary it added 0.063). Not a
    # ratio: from 0.0008, seed 3's noisy step was 30 times that.
    assert curve["kl"][2] <= curve["kl"][1] + 0.05
