"""``MultiverseCPUAttentionBackend``: vLLM 0.32.0's CPU attention, plus the
Multiverse mask where a step needs one.

vLLM 0.32 has no attention backend that takes a custom mask, and its CPU
platform always picks ``CPU_ATTN``; the plugin points that enum entry at
this subclass (``register_backend``, vLLM's custom-backend registration).
Batches with nothing to mask run the stock kernel untouched. Rows the runner
marked (``attn_metadata.multiverse_masks``: batch row -> boolean [q_len,
seq_len]) are recomputed after it with SDPA over the request's gathered
paged KV: a prompt that holds Parallel blocks, a merged request recomputed
after preemption, and sequential decoding. The KV write ran before
``forward``, so the cache already holds this step's keys and values. What
the masked path lacks (ALiBi, sinks, soft-capping, sliding windows) is
refused at start-up.
"""

from __future__ import annotations

import torch.nn.functional as F
from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend, CPUAttentionBackendImpl

from vllm_multiverse.vllm032.cpu.kv_layout import gather_kv


class MultiverseCPUAttentionImpl(CPUAttentionBackendImpl):
    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs):
        out = super().forward(layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs)
        rows = getattr(attn_metadata, "multiverse_masks", None)
        if not rows:
            return out
        qsl, seq_lens, table = attn_metadata.query_start_loc, attn_metadata.seq_lens, attn_metadata.block_table
        gqa = self.num_kv_heads != self.num_heads
        for r, allowed in rows.items():
            a, b, n = int(qsl[r]), int(qsl[r + 1]), int(seq_lens[r])
            k, v = gather_kv(kv_cache, table[r], n)
            o = F.scaled_dot_product_attention(
                query[a:b].transpose(0, 1),
                k.transpose(0, 1),
                v.transpose(0, 1),
                attn_mask=allowed,
                scale=self.scale,
                enable_gqa=gqa,
            )
            output[a:b] = o.transpose(0, 1).reshape(output[a:b].shape)
        return output


class MultiverseCPUAttentionBackend(CPUAttentionBackend):
    # get_name() stays "CPU_ATTN": vLLM looks the backend up by that name.

    @staticmethod
    def get_impl_cls() -> type[MultiverseCPUAttentionImpl]:
        return MultiverseCPUAttentionImpl
