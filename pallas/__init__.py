"""GPU kernels for MSA (Pallas, Triton lowering; interpret mode off a GPU). See docs/design.md.

index_topk: the fused indexer (select_blocks). sparse_attention / sparse_attention_bwd: the main
branch, forward (+ custom_vjp) and backward. index_kl: the KL loss of the index branch. kv_outer:
the machinery those three share. common: constants and small helpers. triton_smem: the Triton
kernels' shared memory on an H100 / H200, measured on a CPU.
"""
