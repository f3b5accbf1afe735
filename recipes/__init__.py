"""Training stages. `recipes.engine` is the Megatron engine every stage trains through.

Whatever composes hydra_conf/config.yaml imports recipes.schema first, which registers its
typed root (the stage CLIs, recipes.pipeline, the tests). Not this package's import: that
would load torch (through the schema's GRPO and distillation sections) into every process
that imports any recipes module, such as the math verifier's worker."""
