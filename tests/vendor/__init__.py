"""Files copied byte for byte from other projects (tests/test_vllm_views.py checks vLLM's)."""
