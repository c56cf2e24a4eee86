"""Device-side pieces of the engine that need no vLLM: the merge's token-slot
KV copy, the Multiverse mask of masked rows as FlashInfer's packed bit mask,
and FlashInfer's masked paged prefill over them.

Each op has a pure-torch version with the same semantics (what the CPU tests
check, and what runs where the compiled ``vllm_multiverse._C`` is absent)
and, for CUDA tensors, a kernel from ``csrc/``. Nothing here imports vLLM, so
``scripts/gpu_check.sh`` runs it on a GPU machine that has none.
"""
