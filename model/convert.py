"""HF <-> megatron-core checkpoint conversion for Qwen3 and Qwen3-MoE.

    python -m model.convert hf-to-mcore --hf-dir DIR --out CKPT [--tp N --pp N --ep N]
    python -m model.convert mcore-to-hf --ckpt CKPT --out DIR
    python -m model.convert ds-to-mcore --ckpt DS_CKPT --out CKPT    (model/ds_convert.py)

hf-to-mcore builds the model at the requested layout (re-launching itself on
tp*pp*... processes when needed), fills every rank's shard straight from the HF
tensors and writes a megatron-core distributed checkpoint, which loads at any layout.

mcore-to-hf builds no model: it reads the checkpoint one layer at a time and writes
HF safetensors shards, an index and a `config.json` that transformers loads as
Qwen3ForCausalLM / Qwen3MoeForCausalLM. Both directions are bit-exact.

All tensor-name knowledge lives in `rules(cfg)`: one row per megatron-core checkpoint key,
with the HF tensors it is made of and how (copy, concatenate, interleave QKV).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from model.config import ConfigError, ModelConfig, ParallelConfig, from_hf_config, read_hf_config, to_hf_config
from model.hf_io import AUX_FILES, HFShardWriter, HFWeights

# ------------------------------------------------------------------------- tensor rules


def _qkv_to_mcore(cfg: ModelConfig, q, k, v):
    # megatron-core groups QKV per KV head: [q heads of group g | k_g | v_g] for each g.
    groups, hn = cfg.num_query_groups, cfg.kv_channels
    h = q.shape[-1]
    q = q.view(groups, -1, h)
    return torch.cat([q, k.view(groups, hn, h), v.view(groups, hn, h)], dim=1).reshape(-1, h)


def _qkv_from_mcore(cfg: ModelConfig, w):
    groups, hn = cfg.num_query_groups, cfg.kv_channels
    per_group = cfg.num_attention_heads // groups
    h = w.shape[-1]
    w = w.view(groups, (per_group + 2) * hn, h)
    q, k, v = torch.split(w, [per_group * hn, hn, hn], dim=1)
    return [q.reshape(-1, h), k.reshape(-1, h), v.reshape(-1, h)]


def _copy_to_mcore(cfg, t):
    return t


def _copy_from_mcore(cfg, t):
    return [t]


def _cat_to_mcore(cfg, gate, up):
    # megatron-core's SwiGLU fc1 holds [gate; up]; under TP its checkpoint factory keeps that order.
    return torch.cat([gate, up], dim=0)


def _cat_from_mcore(cfg, t):
    return list(torch.chunk(t, 2, dim=0))


@dataclass(frozen=True)
class Rule:
    key: str                      # megatron-core checkpoint key
    hf: tuple[str, ...]           # HF tensor names; {i} = layer, {e} = expert
    to_mcore: Callable
    from_mcore: Callable
    scope: str = "layer"          # "global", "layer" or "expert"


_L = "model.layers.{i}."
_ATTENTION = [
    Rule("decoder.layers.self_attention.linear_qkv.layer_norm_weight", (_L + "input_layernorm.weight",),
         _copy_to_mcore, _copy_from_mcore),
    Rule("decoder.layers.self_attention.linear_qkv.weight",
         (_L + "self_attn.q_proj.weight", _L + "self_attn.k_proj.weight", _L + "self_attn.v_proj.weight"),
         _qkv_to_mcore, _qkv_from_mcore),
    Rule("decoder.layers.self_attention.q_layernorm.weight", (_L + "self_attn.q_norm.weight",),
         _copy_to_mcore, _copy_from_mcore),
    Rule("decoder.layers.self_attention.k_layernorm.weight", (_L + "self_attn.k_norm.weight",),
         _copy_to_mcore, _copy_from_mcore),
    Rule("decoder.layers.self_attention.linear_proj.weight", (_L + "self_attn.o_proj.weight",),
         _copy_to_mcore, _copy_from_mcore),
]
_DENSE_MLP = [
    Rule("decoder.layers.mlp.linear_fc1.layer_norm_weight", (_L + "post_attention_layernorm.weight",),
         _copy_to_mcore, _copy_from_mcore),
    Rule("decoder.layers.mlp.linear_fc1.weight", (_L + "mlp.gate_proj.weight", _L + "mlp.up_proj.weight"),
         _cat_to_mcore, _cat_from_mcore),
    Rule("decoder.layers.mlp.linear_fc2.weight", (_L + "mlp.down_proj.weight",),
         _copy_to_mcore, _copy_from_mcore),
]
_MOE_MLP = [
    Rule("decoder.layers.pre_mlp_layernorm.weight", (_L + "post_attention_layernorm.weight",),
         _copy_to_mcore, _copy_from_mcore),
    Rule("decoder.layers.mlp.router.weight", (_L + "mlp.gate.weight",), _copy_to_mcore, _copy_from_mcore),
    Rule("decoder.layers.mlp.experts.experts.linear_fc1.weight",
         (_L + "mlp.experts.{e}.gate_proj.weight", _L + "mlp.experts.{e}.up_proj.weight"),
         _cat_to_mcore, _cat_from_mcore, scope="expert"),
    Rule("decoder.layers.mlp.experts.experts.linear_fc2.weight", (_L + "mlp.experts.{e}.down_proj.weight",),
         _copy_to_mcore, _copy_from_mcore, scope="expert"),
]


def rules(cfg: ModelConfig) -> list[Rule]:
    out = [
        Rule("embedding.word_embeddings.weight", ("model.embed_tokens.weight",),
             _copy_to_mcore, _copy_from_mcore, scope="global"),
        Rule("decoder.final_layernorm.weight", ("model.norm.weight",),
             _copy_to_mcore, _copy_from_mcore, scope="global"),
    ]
    if not cfg.tie_word_embeddings:
        out.append(Rule("output_layer.weight", ("lm_head.weight",), _copy_to_mcore, _copy_from_mcore,
                        scope="global"))
    return out + _ATTENTION + (_MOE_MLP if cfg.is_moe else _DENSE_MLP)


def _names(rule: Rule, layer: int | None = None, expert: int | None = None) -> list[str]:
    return [n.format(i=layer, e=expert) for n in rule.hf]


def expected_hf_names(cfg: ModelConfig) -> set[str]:
    names = set()
    for rule in rules(cfg):
        layers = [None] if rule.scope == "global" else range(cfg.num_layers)
        experts = range(cfg.num_experts) if rule.scope == "expert" else [None]
        for i in layers:
            for e in experts:
                names.update(_names(rule, i, e))
    return names


def check_hf_tensors(hf: HFWeights, cfg: ModelConfig) -> None:
    """Every tensor the architecture needs is present, and nothing unknown is left over."""
    expected = expected_hf_names(cfg)
    missing = sorted(n for n in expected if not hf.has(n))
    if missing:
        raise ConfigError(f"{hf.dir}: {len(missing)} tensors missing for {cfg.name}, e.g. {missing[:3]}")
    used = {hf.stored_names_for(n) for n in expected}
    ignorable = {"lm_head.weight"} if cfg.tie_word_embeddings else set()
    extra = sorted(hf.names() - used - ignorable)
    if extra:
        raise ConfigError(f"{hf.dir}: {len(extra)} tensors this converter does not map, e.g. {extra[:3]}")


# --------------------------------------------------------------------------- hf -> mcore


def fill_from_hf(chunks, hf: HFWeights, cfg: ModelConfig) -> None:
    """Copy this rank's shard of every parameter from the HF tensors."""
    from model.checkpoint import iter_sharded_tensors, model_sharded_state_dict

    by_key = {r.key: r for r in rules(cfg)}
    cache: dict[tuple, torch.Tensor] = {}
    with torch.no_grad():
        for sh in iter_sharded_tensors(model_sharded_state_dict(chunks)):
            rule = by_key.get(sh.key)
            if rule is None:
                raise ConfigError(f"no conversion rule for megatron-core tensor {sh.key}")
            index = sh.global_offset[: sh.prepend_axis_num]
            layer = index[0] if rule.scope != "global" else None
            expert = index[1] if rule.scope == "expert" else None
            ident = (rule.key, layer, expert)
            if ident not in cache:
                if len(cache) > 64:  # bounded: at most a few layers' tensors in flight
                    cache.clear()
                cache[ident] = rule.to_mcore(cfg, *(hf.get(n) for n in _names(rule, layer, expert)))
            full = cache[ident]
            local = full[tuple(sh.global_slice()[sh.prepend_axis_num:])]
            if local.shape != sh.data.shape:
                raise ConfigError(f"{sh.key}: HF gives {tuple(local.shape)}, model expects {tuple(sh.data.shape)}")
            sh.data.copy_(local)


def hf_tensors(chunks, cfg: ModelConfig, group=None):
    """Collective over `group` (default: the world): the model's current weights as HF
    (name, tensor) pairs, global tensors first and then one layer at a time, the same on
    every rank. Nothing touches disk: an in-memory weight sync (recipes/rollout) consumes
    this as it is produced, so at most one layer's full tensors exist at once.

    Every rank places the shards it is the main replica of (megatron-core's replica ids:
    DP copies and TP-replicated norms place nothing) into a zeroed full tensor per
    checkpoint key, layer and expert, and a sum over the group completes it: one rule for
    TP, PP, VPP and EP shards, whatever layout built the chunks. The names come from
    `rules(cfg)`, as for the files.
    """
    import torch.distributed as dist
    from megatron.core.dist_checkpointing.mapping import is_main_replica

    from model.checkpoint import iter_sharded_tensors, model_sharded_state_dict

    from megatron.core.utils import unwrap_model

    chunks = [unwrap_model(c) for c in chunks]   # DDP's wrapper would prefix every key with `module.`
    by_key = {r.key: r for r in rules(cfg)}
    mine: dict[tuple, list] = {}   # (key, layer, expert) -> this rank's main-replica shards
    shapes: dict[str, tuple] = {}  # key -> (shape of one layer's / expert's tensor, dtype)
    device = next(chunks[0].parameters()).device
    for sh in iter_sharded_tensors(model_sharded_state_dict(chunks)):
        if sh.key not in by_key:
            raise ConfigError(f"no conversion rule for megatron-core tensor {sh.key}")
        n = sh.prepend_axis_num   # the layer axis, and the expert axis for experts
        shapes[sh.key] = (tuple(sh.global_shape[n:]), sh.data.dtype)
        if is_main_replica(sh.replica_id):
            mine.setdefault((sh.key, *sh.global_offset[:n]), []).append(sh)
    # Under PP a rank sees only its own layers: every rank learns every key's shape once.
    distributed = dist.is_initialized() and dist.get_world_size(group) > 1
    if distributed:
        everyone = [None] * dist.get_world_size(group)
        dist.all_gather_object(everyone, shapes, group=group)
        for s in everyone:
            shapes.update(s)

    def full(key: str, *index: int) -> torch.Tensor:
        shape, dtype = shapes[key]
        out = torch.zeros(shape, dtype=dtype, device=device)
        for sh in mine.get((key, *index), ()):
            out[sh.global_slice()[sh.prepend_axis_num:]] = sh.data.detach()
        if distributed:
            dist.all_reduce(out, group=group)
        return out

    with torch.no_grad():
        for rule in rules(cfg):
            if rule.scope == "global":
                yield from zip(_names(rule), rule.from_mcore(cfg, full(rule.key)))
        for i in range(cfg.num_layers):
            for rule in rules(cfg):
                experts = range(cfg.num_experts) if rule.scope == "expert" else [None] if rule.scope == "layer" else []
                for e in experts:
                    tensor = full(rule.key, i) if e is None else full(rule.key, i, e)
                    yield from zip(_names(rule, i, e), rule.from_mcore(cfg, tensor))


def read_hf_model(hf_dir: str | Path, par: ParallelConfig) -> tuple[ModelConfig, HFWeights]:
    """Every input check, cheap and in one process: config, layout, tensor names."""
    from model.parallel import validate_layout

    cfg = from_hf_config(read_hf_config(hf_dir), name=Path(hf_dir).name)
    validate_layout(cfg, par)
    hf = HFWeights(hf_dir)
    check_hf_tensors(hf, cfg)
    return cfg, hf


def hf_to_mcore(hf_dir: str | Path, out: str | Path, par: ParallelConfig) -> Path:
    """Collective: convert an HF directory into a megatron-core checkpoint at `out`."""
    from model.builder import build_model
    from model.checkpoint import save_model
    from model.parallel import init_distributed

    cfg, hf = read_hf_model(hf_dir, par)
    init_distributed(par, model=cfg)
    chunks = build_model(cfg, par, dtype=hf.dtype(), perform_initialization=False)
    fill_from_hf(chunks, hf, cfg)
    save_model(chunks, out, cfg, extra={"source": str(Path(hf_dir).resolve())})
    import torch.distributed as dist

    if dist.get_rank() == 0:
        _copy_aux_files(Path(hf_dir), Path(out) / "hf_extra")
    return Path(out)


def _copy_aux_files(src: Path, dst: Path) -> None:
    present = [f for f in AUX_FILES if (src / f).is_file()]
    if present:
        dst.mkdir(parents=True, exist_ok=True)
        for f in present:
            shutil.copy2(src / f, dst / f)


# --------------------------------------------------------------------------- mcore -> hf


def mcore_to_hf(ckpt: str | Path, out: str | Path, cfg: ModelConfig | None = None,
                max_shard_bytes: int = 5 * 2**30, progress: bool = True,
                finish: Callable[[Path], None] | None = None) -> Path:
    """Write an HF directory from a megatron-core checkpoint, one layer in memory at a time.

    It is written as `<out>.tmp` and renamed to `out` when complete; `finish(directory)`,
    when given, adds the caller's own files (a tokenizer, a generation config) before that
    rename, so that they appear with the weights or not at all."""
    from tqdm import tqdm

    from model.checkpoint import is_checkpoint, load_tensors, read_model_config, tensor_shapes

    ckpt, out = Path(ckpt), Path(out)
    if not is_checkpoint(ckpt):
        raise ConfigError(f"{ckpt} is not a megatron-core distributed checkpoint (no metadata.json)")
    cfg = cfg or read_model_config(ckpt)
    shapes = tensor_shapes(ckpt)
    all_rules = rules(cfg)
    _check_shapes(all_rules, shapes, cfg, ckpt)

    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    writer = HFShardWriter(tmp, max_shard_bytes)

    def emit(rule: Rule, tensor: torch.Tensor, layer: int | None):
        experts = range(tensor.shape[0]) if rule.scope == "expert" else [None]
        for e in experts:
            parts = rule.from_mcore(cfg, tensor[e] if e is not None else tensor)
            for name, part in zip(_names(rule, layer, e), parts):
                writer.add(name, part)

    global_rules = [r for r in all_rules if r.scope == "global"]
    loaded = load_tensors(ckpt, {r.key: (*shapes[r.key], ()) for r in global_rules})
    for r in global_rules:
        emit(r, loaded[r.key], None)
    layer_rules = [r for r in all_rules if r.scope != "global"]
    for i in tqdm(range(cfg.num_layers), desc="mcore-to-hf", unit="layer", disable=not progress):
        loaded = load_tensors(ckpt, {r.key: (*shapes[r.key], (i,)) for r in layer_rules})
        for r in layer_rules:
            emit(r, loaded[r.key], i)
    writer.close()

    dtype = str(shapes["embedding.word_embeddings.weight"][1]).removeprefix("torch.")
    (tmp / "config.json").write_text(json.dumps(to_hf_config(cfg, dtype), indent=2) + "\n")
    extra = ckpt / "hf_extra"
    if extra.is_dir():
        for f in extra.iterdir():
            shutil.copy2(f, tmp / f.name)
    if finish is not None:
        finish(tmp)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def _check_shapes(all_rules: list[Rule], shapes: dict, cfg: ModelConfig, ckpt: Path) -> None:
    missing = [r.key for r in all_rules if r.key not in shapes]
    if missing:
        raise ConfigError(f"{ckpt} lacks {missing[0]} (and {len(missing) - 1} more) for {cfg.name}")
    layers = shapes["decoder.layers.self_attention.linear_proj.weight"][0][0]
    if layers != cfg.num_layers:
        raise ConfigError(f"{ckpt} has {layers} layers but the config says {cfg.num_layers}")


# ----------------------------------------------------------------------------------- CLI


def _parse(argv):
    p = argparse.ArgumentParser(prog="python -m model.convert", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("hf-to-mcore", help="HF directory -> megatron-core distributed checkpoint")
    a.add_argument("--hf-dir", required=True)
    a.add_argument("--out", required=True)
    a.add_argument("--tp", type=int, default=1)
    a.add_argument("--pp", type=int, default=1)
    a.add_argument("--ep", type=int, default=1)
    a.add_argument("--etp", type=int, default=None, help="expert TP (default: 1 when ep > 1, else tp)")
    a.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    b = sub.add_parser("mcore-to-hf", help="megatron-core distributed checkpoint -> HF directory")
    b.add_argument("--ckpt", required=True)
    b.add_argument("--out", required=True)
    b.add_argument("--model", default=None, help="hydra model name, for checkpoints without qwen3_model.json")
    b.add_argument("--max-shard-gb", type=float, default=5.0)
    b.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    c = sub.add_parser("ds-to-mcore", help="DeepSpeed training checkpoint (ZeRO-1/2/3) -> megatron-core checkpoint")
    c.add_argument("--ckpt", required=True)
    c.add_argument("--out", required=True)
    c.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    return p.parse_args(argv)


def main(argv=None) -> int:
    from model.launch import relaunch_if_needed

    args = _parse(argv if argv is not None else sys.argv[1:])
    try:
        out = Path(args.out)
        if out.exists() and any(out.iterdir()) and not args.overwrite:
            raise ConfigError(f"{out} exists and is not empty; pass --overwrite to replace it")
        if args.cmd == "hf-to-mcore":
            etp = args.etp if args.etp is not None else (1 if args.ep > 1 else args.tp)
            par = ParallelConfig(tp=args.tp, pp=args.pp, ep=args.ep, etp=etp, sp=args.tp > 1)
            from model.parallel import minimum_world_size

            nprocs = minimum_world_size(par)
            if "WORLD_SIZE" not in os.environ and nprocs > 1:
                # Fail on bad input here, before any rank starts (hf_to_mcore checks otherwise).
                read_hf_model(args.hf_dir, par)
            relaunch_if_needed("model.convert", argv if argv is not None else sys.argv[1:], nprocs)
            hf_to_mcore(args.hf_dir, args.out, par)
            from model.parallel import destroy_distributed

            destroy_distributed()
        elif args.cmd == "ds-to-mcore":
            from model.ds_convert import ds_to_mcore

            ds_to_mcore(args.ckpt, args.out)
        else:
            from model.config import load_model_config

            cfg = load_model_config(args.model) if args.model else None
            mcore_to_hf(args.ckpt, args.out, cfg, max_shard_bytes=int(args.max_shard_gb * 2**30))
    except ConfigError as e:  # includes LayoutError
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
