// Launchers of the kernels in kv_copy.cu and packed_mask.cu.
//
// Plain C++ over raw device pointers, no torch: the .cu files compile with a
// bare `nvcc -c`, and torch_bindings.cpp (the only file that sees torch)
// checks the tensors and calls these. Each returns the launch's status
// (cudaGetLastError); a launch with nothing to do returns cudaSuccess.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace vllm_multiverse {

// The merge's token-slot copy, all layers in one launch.
//
// layer_ptrs: device int64[num_layers], the address of element [0, 0, 0, 0]
//   of each layer's logical view [num_blocks, num_heads, block_size, content]
//   (vLLM's per-layer cache: content = 2 * head_size, K then V). All layers
//   of one call share shape, strides (in elements) and element size.
// layer_ptr_or: the bitwise OR of all layer addresses, on the host: the
//   launcher vectorizes only when every address is aligned to the unit.
// src, dst: device int64 slots; pair p reads src[p * src_stride], writes
//   dst[p * dst_stride]. Slot s is kernel block s / block_size, offset
//   s % block_size. A pair with a slot outside [0, num_blocks * block_size)
//   is skipped (the torch version raises instead).
// elem_size: 1, 2, 4 or 8 bytes; the copy moves bytes, dtype does not matter.
cudaError_t launch_copy_kv_slots(const int64_t* layer_ptrs, int64_t num_layers,
                                 uint64_t layer_ptr_or, const int64_t* src,
                                 int64_t src_stride, const int64_t* dst,
                                 int64_t dst_stride, int64_t num_pairs,
                                 int64_t num_blocks, int64_t num_heads,
                                 int64_t block_size, int64_t content,
                                 int64_t elem_size, int64_t stride_block,
                                 int64_t stride_head, int64_t stride_token,
                                 int64_t stride_content, cudaStream_t stream);

// The packed Multiverse mask of num_rows masked rows (see packed_mask.py).
//
// starts, q_lens: device int32[num_rows]; row i's queries are tokens
//   starts[i] .. starts[i] + q_lens[i] - 1 against keys 0 .. kv_len - 1,
//   kv_len = starts[i] + q_lens[i].
// byte_indptr: device int32[num_rows + 1], row i's bytes start there.
// rect_indptr: device int32[num_rows + 1], row i's rectangles are
//   rects[rect_indptr[i] .. rect_indptr[i + 1]), each (q0, q1, k0, k1).
// rects: device int32[R * 4], contiguous.
// out: device uint8[total_bytes]; every byte is written (bytes past
//   byte_indptr[num_rows] are 0).
cudaError_t launch_pack_masks(const int32_t* starts, const int32_t* q_lens,
                              const int32_t* byte_indptr,
                              const int32_t* rect_indptr, const int32_t* rects,
                              int64_t num_rows, uint8_t* out,
                              int64_t total_bytes, cudaStream_t stream);

}  // namespace vllm_multiverse
