"""Training stages. `recipes.engine` is the Megatron engine every stage trains through."""
