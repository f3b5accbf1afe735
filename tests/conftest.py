"""Shared fixtures: tiny random HF Qwen3 models and multi-process launches.

The reference models are HF transformers' own Qwen3ForCausalLM / Qwen3MoeForCausalLM
with random weights (no hub download). Multi-process checks run real megatron-core
under torchrun with gloo; each launch costs several seconds of interpreter start, so
workers loop over layouts inside one launch.

`make test` runs the files in two pytest-xdist workers (`--dist loadfile`: a file's
module fixtures stay in one worker). The session fixtures below are built once for the
whole run through `built_once`, whichever worker asks first.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from filelock import FileLock

import recipes.schema  # noqa: F401  (registers hydra_conf/config.yaml's typed root for every test)

REPO = Path(__file__).resolve().parent.parent
TEST_VOCAB = 2048  # small vocabulary keeps the HF references fast; tiny's own is 151,936
# The learning tests' seed (data, initial weights, training): 0 is what the suite runs and
# their bars were set on; QWEN3_TEST_SEED=1 (2, 3, ...) reruns them with other draws, to
# measure the spread the bars must leave room for (see README, "Learning tests").
TEST_SEED = int(os.environ.get("QWEN3_TEST_SEED", "0"))


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))])
    # One thread per process: most commands start one rank per core.
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONWARNINGS"] = "ignore"
    return env


def built_once(tmp_path_factory, name: str, build) -> Path:
    """`build(directory)`'s result, computed once per test session: under pytest-xdist the
    first worker that asks builds it under a file lock and the others wait and reuse it
    (the arithmetic cold start alone is minutes of CPU). `build` returns a path."""
    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base   # workers: <session>/popen-gwN
    record = shared / f"{name}.built"
    with FileLock(str(shared / f"{name}.lock")):
        if not record.exists():
            directory = shared / name
            directory.mkdir(exist_ok=True)
            record.write_text(str(build(directory)))
    return Path(record.read_text())


def run(cmd: list[str], timeout: int = 600, check: bool = True, threads: int | None = None
        ) -> subprocess.CompletedProcess:
    """Run a command from the repo root; on failure show the end of its output. `threads`:
    OMP threads for a single-process command that may have the machine to itself."""
    env = _env() if threads is None else {**_env(), "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        tail = (proc.stdout + proc.stderr)[-6000:]
        raise AssertionError(f"{' '.join(map(str, cmd))} exited {proc.returncode}:\n{tail}")
    return proc


def python_module(module: str, *args, **kw) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", module, *map(str, args)], **kw)


def torchrun(script: str, *args, nprocs: int = 2, timeout: int = 900) -> subprocess.CompletedProcess:
    # With CUDA every rank needs its own GPU (NCCL); without it, ranks share the CPU (gloo).
    if torch.cuda.is_available() and torch.cuda.device_count() < nprocs:
        pytest.skip(f"needs {nprocs} GPUs, found {torch.cuda.device_count()}")
    return run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                f"--nproc-per-node={nprocs}", str(REPO / script), *map(str, args)], timeout=timeout)


def parity(hf_dirs: dict, converted: dict, cases: dict, out: Path, nprocs: int = 2) -> dict:
    """{variant: {layout: metrics}} of tests/workers/parity.py for `cases` ({variant:
    [layout, ...]}), in one torchrun launch."""
    args = [a for v, layouts in cases.items() for a in ("--case", v, hf_dirs[v], converted[v], ",".join(layouts))]
    torchrun("tests/workers/parity.py", "--out", out, *args, nprocs=nprocs)
    return read_json(out)


def cli_error(proc: subprocess.CompletedProcess) -> str:
    """The one `error:` line a stage command stopped with before launching (exit code 2)."""
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr[-2000:]
    return errors[0]


def config_error(cmd: list) -> str:
    """The one-line ConfigError a stage command (`python -m recipes.<recipe> overrides...`)
    stops with before launching anything, checked in this process: the same config
    composition and the same checks (recipes.train.validate), without an interpreter start.
    Each test file keeps one real CLI launch of its recipe for the exit code and stderr."""
    import importlib

    from model.config import ConfigError
    from model.launch import compose
    from recipes.train import validate

    recipe = importlib.import_module(str(cmd[cmd.index("-m") + 1])).RECIPE
    with pytest.raises(ConfigError) as e:   # the CLI's composition (model.launch.hydra_cli), then its checks
        validate(compose("config", [str(a) for a in cmd[cmd.index("-m") + 2:]]), recipe)
    assert "\n" not in str(e.value)
    return str(e.value)


def make_hf_model(out: Path, model: str, dtype: torch.dtype = torch.float32, seed: int = 0,
                  weight_std: float = 0.08, norm_std: float = 0.3, **overrides) -> Path:
    """Save a random HF Qwen3 model built from our hydra config `model` (+ overrides).

    By default weights are drawn wider than HF's init so that logits and MoE routing are
    far from uniform, and norm weights are not all ones, so that every tensor matters
    (parity tests); a model meant to be trained wants weight_std=0.02, norm_std=0.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    from model.config import load_model_config, to_hf_config

    cfg = load_model_config(model, **{"vocab_size": TEST_VOCAB, **overrides})
    hf_cfg = AutoConfig.for_model(**to_hf_config(cfg, str(dtype).removeprefix("torch.")))
    torch.manual_seed(seed)
    m = AutoModelForCausalLM.from_config(hf_cfg)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "norm" in name:
                p.normal_(1.0, norm_std)
            elif "mlp.gate." in name:  # router: confident, varied expert choice
                p.normal_(0.0, 0.5)
            else:
                p.normal_(0.0, weight_std)
    m.to(dtype).save_pretrained(out)
    return out


HF_VARIANTS = {
    # name: (hydra model, dtype, overrides)
    "dense_tied": ("tiny", torch.float32, {}),
    "dense_untied": ("tiny", torch.float32, {"tie_word_embeddings": False}),
    "moe": ("tiny_moe", torch.float32, {}),
    # norm_topk_prob=false: top-k of the softmax over all experts, not renormalised.
    "moe_nonorm": ("tiny_moe", torch.float32, {"moe_norm_topk_prob": False}),
    "dense_bf16": ("tiny", torch.bfloat16, {}),
    "moe_bf16": ("tiny_moe", torch.bfloat16, {}),
    # tiny at its own 151,936 rows: the real vocabulary's parity and round trip
    "dense_full_vocab": ("tiny", torch.float32, {"vocab_size": 151936}),
}


@pytest.fixture(scope="session")
def hf_dirs(tmp_path_factory) -> dict[str, Path]:
    def build(root):
        for name, (model, dtype, over) in HF_VARIANTS.items():
            make_hf_model(root / name, model, dtype, **over)
        return root

    root = built_once(tmp_path_factory, "hf", build)
    return {name: root / name for name in HF_VARIANTS}


@pytest.fixture(scope="session")
def converted(hf_dirs, tmp_path_factory) -> dict[str, Path]:
    """Each HF variant converted by the CLI's entry point at TP=PP=EP=1, all in one process
    (one interpreter start each cost about 6 s)."""
    def build(root):
        calls = [["hf-to-mcore", "--hf-dir", str(hf), "--out", str(root / name)] for name, hf in hf_dirs.items()]
        run([sys.executable, "-c", "import sys\nfrom model.convert import main\n"
             f"sys.exit(max(main(argv) for argv in {calls!r}))"])
        return root

    root = built_once(tmp_path_factory, "mcore", build)
    return {name: root / name for name in hf_dirs}


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


@pytest.fixture(scope="session")
def qwen3_tokenizer_dir(tmp_path_factory) -> Path:
    """The Qwen3 tokenizer, built from the packaged ranks and saved once per session."""
    from data_pipeline.tokenizer import save_qwen3_tokenizer

    return built_once(tmp_path_factory, "tokenizer", lambda root: save_qwen3_tokenizer(root / "qwen3"))


@pytest.fixture(scope="session")
def mini_tokenizer_dir(tmp_path_factory) -> Path:
    """The mini tokenizer (data_pipeline.tokenizer --mini: 4,096 ids in the Qwen3 format),
    learnt from the generated corpus once per session: the learning tests' vocabulary."""
    from data_pipeline.tokenizer import save_mini_tokenizer

    return built_once(tmp_path_factory, "mini_tokenizer", lambda root: save_mini_tokenizer(root / "mini"))


def _pretraining_data(root: Path, tokenizer_dir: Path) -> Path:
    """The generated corpus preprocessed with `tokenizer_dir`: general/code/math datasets
    for S1/S2, and `long` split into length buckets [64,128) and [128,256) for the S3
    smoke (the real S3 buckets, 4K-16K and 16K-32K, scaled down 64x)."""
    from data_pipeline.corpus import write_corpus
    from data_pipeline.preprocess import preprocess

    # the tokenizer beside the data, where data.root's default `tokenizer` and the
    # end-of-document id (data.eod_id: null) are read from
    shutil.copytree(tokenizer_dir, root / "tokenizer")
    files = write_corpus(root / "corpus", seed=0, scale=1)
    for name in ("general", "code", "math"):
        preprocess([files[name]], root / name, tokenizer_dir, progress=False)
    preprocess([files["long"]], root / "long", tokenizer_dir, length_buckets=[64, 128, 256], progress=False)
    return root


@pytest.fixture(scope="session")
def pretrain_data(tmp_path_factory, qwen3_tokenizer_dir) -> Path:
    """Pretraining data in the real tokenizer's 151,669 ids (`tiny`, `tiny_moe`)."""
    return built_once(tmp_path_factory, "pretrain_data", lambda root: _pretraining_data(root, qwen3_tokenizer_dir))


@pytest.fixture(scope="session")
def mini_pretrain_data(tmp_path_factory, mini_tokenizer_dir) -> Path:
    """The same pretraining data in the mini tokenizer's ids (`mini`: vocab_size null reads
    the tokenizer under data.root), for the launch tests, whose point is not the vocabulary."""
    return built_once(tmp_path_factory, "mini_pretrain_data", lambda root: _pretraining_data(root, mini_tokenizer_dir))


def pretrain_command(run_root: Path, data_root: Path, *overrides, nprocs: int | None = None) -> list[str]:
    """`python -m recipes.pretrain` on a tiny CPU-sized config (seq 64, 4 samples per step).

    With `nprocs`, the recipe is started as one process and re-launches itself under
    torchrun, as a user on a workstation would run it. Later overrides win.
    """
    args = ["model=tiny", f"run.root={run_root}", f"data.root={data_root}", "trainer.seq_length=64",
            "trainer.global_batch_size=4", "trainer.micro_batch_size=1", "trainer.log_interval=1",
            "optim.lr=1e-3", "optim.min_lr=1e-4", "optim.warmup_steps=0", "logging.progress=false",
            "logging.wandb.mode=disabled", *overrides]
    if nprocs:
        args.append(f"trainer.nprocs={nprocs}")
    return [sys.executable, "-m", "recipes.pretrain", *map(str, args)]


def pretrain(run_root: Path, data_root: Path, *overrides, nprocs: int | None = None, check: bool = True,
             timeout: int = 600) -> subprocess.CompletedProcess:
    return run(pretrain_command(run_root, data_root, *overrides, nprocs=nprocs), check=check, timeout=timeout)


def start_pretrain(run_root: Path, data_root: Path, *overrides) -> subprocess.Popen:
    """The command `pretrain` runs, as a process a test can signal (stderr piped)."""
    return subprocess.Popen(pretrain_command(run_root, data_root, *overrides), cwd=REPO, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def sigkill_resume(run_root: Path, data_root: Path, model: str, *overrides, steps: int = 8) -> dict:
    """`trainer.max_steps=steps` of pretraining killed with SIGKILL once step 3 is logged (then
    somewhere between the end of step 3 and a later step, possibly mid-save), and resumed by
    the same command; beside it a reference run that never saves (saving must not change what
    a run computes either). Returns both runs' losses per step, the step resumed from, the
    stage directory and the resumed run's stderr, for the test's own checks."""
    import signal
    import time

    from recipes.run_log import read_metrics

    common = [f"model={model}", f"trainer.max_steps={steps}", *overrides]
    ref = start_pretrain(run_root / "ref", data_root, *common, "trainer.save_interval=100000")
    victim = start_pretrain(run_root / "victim", data_root, *common)
    stage = run_root / "victim" / model / "pretrain_s1"
    deadline = time.time() + 300
    while 3 not in read_metrics(stage) and time.time() < deadline and victim.poll() is None:
        time.sleep(0.02)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert victim.returncode == -signal.SIGKILL, victim.stderr.read()[-3000:]
    assert not (stage / "final.json").exists(), "the run finished before it was killed"
    killed_at = max(read_metrics(stage))
    resumed_from = int((stage / "latest").read_text().strip().removeprefix("iter_"))
    assert 2 <= resumed_from <= killed_at < steps
    assert ref.wait() == 0, ref.stderr.read()[-3000:]
    proc = pretrain(run_root / "victim", data_root, *common)
    return {"expected": stage_losses(run_root / "ref" / model / "pretrain_s1"), "got": stage_losses(stage),
            "resumed_from": resumed_from, "stage": stage, "stderr": proc.stderr}


def stage_losses(stage_dir: Path) -> dict[int, float]:
    """{step: loss} of a stage's metrics.jsonl."""
    from recipes.run_log import read_metrics

    return {step: m["loss"] for step, m in read_metrics(stage_dir).items()}


# ---- the arithmetic task shared by the SFT, RL and distillation tests ----

TRAIN_PROBLEMS, HELD_OUT = 1200, 40
STEPS = 200
# `mini` (tiny's body, untied, the mini tokenizer's 4,096 ids). Every training conversation
# is 47 mini tokens (46 next-token positions): two fill a row exactly.
SFT_ARGS = ["model=mini", "trainer.seq_length=92", "trainer.global_batch_size=8",
            "trainer.micro_batch_size=8", f"trainer.max_steps={STEPS}", f"trainer.save_interval={STEPS}",
            "trainer.log_interval=10", "optim.lr=3e-3", "optim.min_lr=3e-4", "optim.warmup_steps=5",
            f"seed={1234 + TEST_SEED}", "logging.progress=false", "logging.wandb.mode=disabled"]
# A well-formed Qwen3 thinking answer: the think block, then the answer in \boxed{}.
WELL_FORMED = re.compile(r"<think>\n[^<]+\n</think>\n\n\\boxed\{\d+\}")


def write_jsonl(path, rows) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture(scope="session")
def arith_task(tmp_path_factory):
    """Two-digit additions without carries (train, and held-out pairs never trained on) and
    a random `mini` base converted from HF."""
    from data_pipeline.corpus import addition_problems
    from data_pipeline.tokenizer import MINI_VOCAB

    def build(root):
        train = addition_problems(TRAIN_PROBLEMS, 2, seed=2 * TEST_SEED, with_carries=False)
        held = addition_problems(HELD_OUT, 2, seed=2 * TEST_SEED + 1, exclude={tuple(r["pair"]) for r in train},
                                 with_carries=False)
        write_jsonl(root / "train.jsonl", train)
        write_jsonl(root / "held.jsonl", held)
        hf = make_hf_model(root / "base_hf", "mini", vocab_size=MINI_VOCAB, weight_std=0.02, norm_std=0.0,
                           seed=TEST_SEED)
        python_module("model.convert", "hf-to-mcore", "--hf-dir", hf, "--out", root / "base")
        return root

    # Shared by the SFT, RL and distillation tests, each writing under its own names.
    return built_once(tmp_path_factory, "arith", build)


def arith_sft_command(task, tokenizer, *overrides) -> list:
    return [sys.executable, "-m", "recipes.sft", f"run.root={task / 'runs'}", "run.name=arith",
            f"tokenizer={tokenizer}", *SFT_ARGS, *map(str, overrides)]


def arith_sft(task, tokenizer, *overrides, check=True, threads: int = 1):
    return run(arith_sft_command(task, tokenizer, *overrides), check=check, timeout=1200, threads=threads)


def evaluate(task, tokenizer, checkpoint, name, held: str = "held.jsonl", max_new_tokens: int = 40,
             well_formed: re.Pattern = WELL_FORMED) -> dict:
    """Greedy answers to held-out problems: exact match (math verifier) and format rate."""
    from recipes.rewards.math import math_reward

    out = task / f"{name}.jsonl"
    python_module("recipes.generate", f"checkpoint={checkpoint}", f"tokenizer={tokenizer}", f"input={task / held}",
                  f"output={out}", f"max_new_tokens={max_new_tokens}", "batch_size=40", "progress=false")
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == len((task / held).read_text().splitlines())
    return {"exact_match": sum(math_reward(r["answer"], r["reference"]) for r in rows) / len(rows),
            "well_formed": sum(bool(well_formed.fullmatch(r["response"])) for r in rows) / len(rows)}


@pytest.fixture(scope="session")
def arith_cold_start(arith_task, mini_tokenizer_dir, tmp_path_factory):
    """Cold-start SFT of the arithmetic task: tests/test_sft.py checks what it learned,
    tests/test_rl.py starts its own SFT + RL from it (a model that knows the chat format),
    and tests/test_distill.py uses it as the teacher."""
    task = arith_task
    # One thread, as the RL learning test that starts from this model was measured with: two
    # threads are 1.6x faster here, but change the float sums, and with them RL's trajectory.
    def build(_):
        arith_sft(task, mini_tokenizer_dir, "stage=sft_cold_start", f"init_from={task / 'base'}",
                  f"sft.data.files=[{task / 'train.jsonl'}]")
        return task / "runs" / "arith" / "sft_cold_start"

    return built_once(tmp_path_factory, "arith_cold_start", build)


# The files that take minutes go to the two workers first, longest first, so that neither
# is left with one of them at the end (`make test` keeps this order: --no-loadscope-reorder).
# RL and distillation both wait for the arithmetic cold start, which the first of them builds.
LONG_FILES_FIRST = ("test_rl.py", "test_pipeline.py", "test_resume.py", "test_parity.py", "test_distill.py",
                    "test_vllm.py", "test_convert.py", "test_train_step.py", "test_moe_balance.py",
                    "test_sft_data.py", "test_slurm.py", "test_pretrain.py", "test_context_parallel.py",
                    "test_generate_scale.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONG_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))   # stable: files stay whole
