"""The Multiverse engine on vLLM 0.32 V1: fork on Map, branches as ordinary
requests on shared prefix blocks, merge without recompute.

One vLLM class is wrapped per module, and every module that touches vLLM
internals imports them through :mod:`.vllm_compat`, which pins the version.
"""
