"""The Megatron-core policy model: builder, CPU compatibility layer, fused log-probs, packing,
training step. Import the submodules directly (``megatron_skpo.model.builder`` etc.): importing
this package does not import megatron-core."""
