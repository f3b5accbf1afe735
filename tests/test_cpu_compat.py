"""The CPU compatibility layer is inert when CUDA is present, effective without it,
and reached only through the two places that start megatron-core."""

import re
import sys
import textwrap

from tests.conftest import REPO, run


def python(code: str):
    return run([sys.executable, "-c", textwrap.dedent(code)])


def test_inert_when_cuda_is_available():
    out = python("""
        import torch
        torch.cuda.is_available = lambda: True      # pretend to be a GPU machine
        original = torch.cuda.current_device
        from model import cpu_compat
        assert cpu_compat.activate() is False
        assert not cpu_compat.is_active()
        assert torch.cuda.current_device is original
        assert torch._C._len_torch_function_stack() == 0
        print("inert")
    """).stdout
    assert out.strip() == "inert"


def test_cuda_requests_land_on_cpu():
    out = python("""
        import torch
        from model import cpu_compat
        assert cpu_compat.activate() is True and cpu_compat.activate() is True  # idempotent
        a = torch.zeros(3, device="cuda")
        b = torch.ones(2, device=torch.cuda.current_device())
        c = torch.arange(4).cuda()
        d = torch.ones(2).to("cuda")
        assert {t.device.type for t in (a, b, c, d)} == {"cpu"}
        assert torch.ones(1).type() == "torch.cuda.FloatTensor"
        assert torch.ones(1).type(torch.float64).dtype == torch.float64   # casts still work
        torch.cuda.manual_seed(5); x = torch.rand(2)
        torch.manual_seed(5); y = torch.rand(2)
        assert torch.equal(x, y)                                      # the CPU generator stands in
        with torch.cuda.stream(torch.cuda.Stream()):
            torch.cuda.current_stream().wait_stream(torch.cuda.Stream())
        print("cpu")
    """).stdout
    assert out.strip() == "cpu"


def test_only_the_entry_points_use_it():
    users = set()
    for path in REPO.glob("*/**/*.py"):
        if {".venv", "tests"} & set(path.parts) or path.name == "cpu_compat.py":
            continue
        if re.search(r"\bcpu_compat\b", path.read_text()):
            users.add(str(path.relative_to(REPO)))
    assert users == {"model/parallel.py", "model/builder.py"}
