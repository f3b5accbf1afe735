"""Qwen3 on megatron-core: configs, specs, builder, conversion and checkpoints."""
