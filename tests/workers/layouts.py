"""The parallel layouts the multi-process tests run, by name (2 processes each, except
the 4-process ones used by the `slow` tests)."""

from model.config import ParallelConfig

LAYOUTS = {
    "tp1": ParallelConfig(),                                 # 2 ranks = data parallel 2
    "tp2": ParallelConfig(tp=2, sp=True),                    # SP: MoE with TP needs it
    "pp2": ParallelConfig(pp=2),
    "pp2vpp2": ParallelConfig(pp=2, vpp=2),
    "ep2": ParallelConfig(ep=2, etp=1),
    "tp2ep2": ParallelConfig(tp=2, ep=2, etp=1, sp=True),
    "cp2": ParallelConfig(cp=2),
    # 4 processes
    "tp2pp2": ParallelConfig(tp=2, pp=2, sp=True),
    "pp2ep2": ParallelConfig(pp=2, ep=2, etp=1),
    "tp2cp2": ParallelConfig(tp=2, cp=2, sp=True),
    "pp2cp2": ParallelConfig(pp=2, cp=2),
}
