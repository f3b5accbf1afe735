"""Single-process worker: model checkpoints move between the local and the Transformer
Engine layer specs (model.checkpoint.load_sharded), for `tiny` and `tiny_moe`.

    python tests/workers/spec_checkpoints.py --work DIR --out R.json

TE cannot be built on CPU, so the sharded state dict the TE spec asks for is derived: the
local model's own (its keys already follow the TE spec: `input_layernorm` and the dense
`pre_mlp_layernorm` are saved as the fused `linear_qkv.layer_norm_weight` and
`linear_fc1.layer_norm_weight`, and megatron-core's local linears save the TE linears'
`_extra_state`), plus one `_extra_state` ShardedObject beside the weight of every norm the
local spec keeps as a module of its own (key `...layernorm.weight`: QK-norm, the MoE
pre-MLP norm, the final norm). Those are the TENorm modules of megatron-core's
`get_gpt_layer_with_transformer_engine_spec` (`backend.layer_norm()`, also for `q_layernorm`
and `k_layernorm`) and of our block_spec, and TE's ops-based RMSNorm (TE >= 1.13) keeps an
`_extra_state` (a uint8 tensor, empty without FP8), stacked over layers like the weight.

1. A local checkpoint loads into the TE request: every weight arrives, and the TENorm
   extra states come back as None (what TE's set_extra_state reads as "nothing to load").
2. A checkpoint holding TE's extra states (norms and linears carrying FP8-like payloads)
   loads into a local model with model.checkpoint.load_model.
3. Only those may be absent: a request with another extra state the checkpoint lacks
   (TE attention's, which ours never saves) still fails.
"""

import argparse
import json
import pickle
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from model.config import ParallelConfig, load_model_config  # noqa: E402
from model.parallel import destroy_distributed, init_distributed, reset_model_parallel  # noqa: E402
from tests.conftest import TEST_VOCAB  # noqa: E402


def te_payload() -> torch.Tensor:
    """An extra state as TE saves it with FP8 metadata: a pickled dict as a uint8 tensor."""
    return torch.frombuffer(bytearray(pickle.dumps({"forward": {"recipe": "delayed", "amax": [1.0]}})),
                            dtype=torch.uint8)


def te_request(chunks, payload=None) -> dict:
    """The sharded state dict the TE spec would ask for (module docstring), each extra
    state holding `payload`."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor

    from model.checkpoint import model_sharded_state_dict

    request = model_sharded_state_dict(chunks)
    for model in request.values():
        for name, value in list(model.items()):
            if isinstance(value, ShardedObject) and value.key.endswith("._extra_state"):
                value.data = payload   # the linears' extra states, None in the local spec
            if isinstance(value, ShardedTensor) and value.key.endswith("layernorm.weight"):
                axes = value.prepend_axis_num   # the stacked layer axis, if any
                model[name[:-len("weight")] + "_extra_state"] = ShardedObject(
                    value.key[:-len("weight")] + "_extra_state", payload,
                    value.global_shape[:axes] or (1,), value.global_offset[:axes] or (0,), value.replica_id)
    return request


def weights(chunks) -> dict:
    return {k: v.clone() for k, v in chunks[0].state_dict().items() if isinstance(v, torch.Tensor)}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--work", required=True)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    from megatron.core.dist_checkpointing.mapping import ShardedObject
    from torch.distributed.checkpoint.api import CheckpointException

    from model.builder import build_model
    from model.checkpoint import load_model, load_sharded, save_sharded, save_model

    work, results = Path(args.work), {}
    for name in ("tiny", "tiny_moe"):
        cfg, layout = load_model_config(name, vocab_size=TEST_VOCAB, num_layers=2), ParallelConfig()
        init_distributed(layout, seed=1, model=cfg)
        source = build_model(cfg, layout)
        save_model(source, work / f"{name}_local", cfg)
        other = build_model(cfg, layout)   # different random weights, to load into
        r = {"te_only": sorted({v.key for v in te_request(other)["model"].values()
                                if isinstance(v, ShardedObject) and v.data is None and "layernorm" in v.key})}

        # 1. local checkpoint -> the TE request
        request = te_request(other)
        loaded = load_sharded(request, work / f"{name}_local")["model"]
        want = weights(source)
        r["local_to_te_weights_equal"] = all(torch.equal(loaded[k], want[k]) for k in want)
        r["local_to_te_extra_states"] = sorted({str(loaded[k]) for k in loaded if k.endswith("layernorm._extra_state")})

        # 2. a checkpoint with TE's extra states -> the local spec
        save_sharded(te_request(other, te_payload()), work / f"{name}_te", cfg)
        fresh = build_model(cfg, layout)
        load_model(fresh, work / f"{name}_te")
        want = weights(other)
        r["te_to_local_weights_equal"] = all(torch.equal(v, want[k]) for k, v in weights(fresh).items())

        # 3. any other missing extra state still fails
        request = te_request(other)
        request["model"]["decoder.layers.0.self_attention.core_attention._extra_state"] = ShardedObject(
            "decoder.layers.self_attention.core_attention._extra_state", None, (2,), (0,), 0)
        request["model"]["decoder.layers.1.self_attention.core_attention._extra_state"] = ShardedObject(
            "decoder.layers.self_attention.core_attention._extra_state", None, (2,), (1,), 0)
        try:
            load_sharded(request, work / f"{name}_local")
            r["other_missing_refused"] = False
        except CheckpointException as e:   # torch DCP's missing-key error (a BaseException)
            r["other_missing_refused"] = "Missing key in checkpoint state_dict: decoder.layers.self_attention." \
                                         "core_attention._extra_state" in str(e)
        results[name] = r
        reset_model_parallel()
    Path(args.out).write_text(json.dumps(results, indent=2))
    destroy_distributed()


if __name__ == "__main__":
    main()
