// The merge's token-slot KV copy: one launch for all pairs in all layers.
//
// Semantics: copy_token_slots_torch in vllm_multiverse/kernels/kv_copy.py.
// Each layer's cache is vLLM's logical view [num_blocks, num_heads, n, C]
// (C = 2 * head_size, K then V) with arbitrary strides; slot s is kernel
// block s / n at offset s % n, and a pair copies kv[db, :, do, :] =
// kv[sb, :, so, :]. Sources and destinations are disjoint, destinations
// distinct, so the order of the copies does not matter.
//
// Grid: x over pairs, y over layers (each grid-strided); a block's threads
// walk the token's heads x content in units of U. When the content axis is
// contiguous the unit is the widest of 16/8/4/2 bytes that divides the row
// and every address and stride (16-byte loads and stores for bf16 heads of
// 4k elements), else it is the element. Heads are folded into one row when
// they are contiguous too (vLLM's NHD orders). A copy moves bytes: dtype
// does not matter, only the element size.
//
// No torch here: `nvcc -c kv_copy.cu` builds it. With
// -DMULTIVERSE_HOST_EMULATION it also exports a host function that runs the
// same per-block code over host memory (tests/test_csrc_host_emulation.py).

#include <cstdint>

#include <cuda_runtime.h>

#include "ops.h"

namespace vllm_multiverse {
namespace kv_copy {

// What one block copies for one (pair, layer): `rows` runs of
// `units_per_row` units of `unit` bytes; strides in units.
struct Plan {
  int64_t unit;
  int64_t num_slots;
  int64_t block_size;
  int64_t rows;
  int64_t units_per_row;
  int64_t stride_block;
  int64_t stride_row;
  int64_t stride_token;
  int64_t stride_unit;
};

// Host only: the plan of a call, or false if the arguments are invalid.
inline bool make_plan(uint64_t layer_ptr_or, int64_t num_blocks,
                      int64_t num_heads, int64_t block_size, int64_t content,
                      int64_t elem_size, int64_t stride_block,
                      int64_t stride_head, int64_t stride_token,
                      int64_t stride_content, Plan* plan) {
  if (!(elem_size == 1 || elem_size == 2 || elem_size == 4 || elem_size == 8))
    return false;
  if (num_blocks < 0 || num_heads < 0 || block_size <= 0 || content < 0)
    return false;
  if (stride_block < 0 || stride_head < 0 || stride_token < 0 ||
      stride_content < 0)
    return false;

  int64_t rows = num_heads;
  int64_t row_elems = content;
  int64_t stride_row = stride_head;
  if (stride_content == 1 && (num_heads == 1 || stride_head == content)) {
    // The token's heads are one contiguous run.
    rows = 1;
    row_elems = num_heads * content;
    stride_row = 0;
  }

  int64_t unit = elem_size;
  if (stride_content == 1) {
    const int64_t row_bytes = row_elems * elem_size;
    const int64_t widths[4] = {16, 8, 4, 2};
    for (int64_t w : widths) {
      if (w <= elem_size) break;
      if (row_bytes % w == 0 && layer_ptr_or % static_cast<uint64_t>(w) == 0 &&
          (stride_block * elem_size) % w == 0 &&
          (stride_row * elem_size) % w == 0 &&
          (stride_token * elem_size) % w == 0) {
        unit = w;
        break;
      }
    }
  }

  plan->unit = unit;
  plan->num_slots = num_blocks * block_size;
  plan->block_size = block_size;
  plan->rows = rows;
  if (unit > elem_size) {
    // Content axis contiguous; strides are whole numbers of units.
    plan->units_per_row = row_elems * elem_size / unit;
    plan->stride_block = stride_block * elem_size / unit;
    plan->stride_row = stride_row * elem_size / unit;
    plan->stride_token = stride_token * elem_size / unit;
    plan->stride_unit = 1;
  } else {
    plan->units_per_row = row_elems;
    plan->stride_block = stride_block;
    plan->stride_row = stride_row;
    plan->stride_token = stride_token;
    plan->stride_unit = stride_content;
  }
  return true;
}

// Threads per block: the token's units, rounded up to a warp, at most 256.
inline int threads_for(const Plan& plan) {
  const int64_t total = plan.rows * plan.units_per_row;
  int64_t t = (total + 31) / 32 * 32;
  if (t < 32) t = 32;
  if (t > 256) t = 256;
  return static_cast<int>(t);
}

// One (pair, layer): thread `tid` of `nthreads` copies its share of the
// token's units from slot s to slot d of the layer at `base`. False, copying
// nothing, for a slot outside the cache: the host checks every pair before
// the launch (kernels/kv_copy.py, no device sync), so one here is a
// bookkeeping bug that must stop the engine, never a copy to skip.
template <typename U>
__host__ __device__ inline bool copy_slot(const Plan& plan, U* base, int64_t s,
                                          int64_t d, int64_t tid,
                                          int64_t nthreads) {
  if (s < 0 || s >= plan.num_slots || d < 0 || d >= plan.num_slots)
    return false;
  const int64_t src_off = (s / plan.block_size) * plan.stride_block +
                          (s % plan.block_size) * plan.stride_token;
  const int64_t dst_off = (d / plan.block_size) * plan.stride_block +
                          (d % plan.block_size) * plan.stride_token;
  const U* src = base + src_off;
  U* dst = base + dst_off;
  if (plan.rows == 1) {
    for (int64_t i = tid; i < plan.units_per_row; i += nthreads) {
      dst[i * plan.stride_unit] = src[i * plan.stride_unit];
    }
    return true;
  }
  const int64_t total = plan.rows * plan.units_per_row;
  for (int64_t i = tid; i < total; i += nthreads) {
    const int64_t r = i / plan.units_per_row;
    const int64_t c = i - r * plan.units_per_row;
    const int64_t o = r * plan.stride_row + c * plan.stride_unit;
    dst[o] = src[o];
  }
  return true;
}

template <typename U>
__global__ void copy_kv_slots_kernel(const int64_t* __restrict__ layer_ptrs,
                                     int64_t num_layers,
                                     const int64_t* __restrict__ src,
                                     int64_t src_stride,
                                     const int64_t* __restrict__ dst,
                                     int64_t dst_stride, int64_t num_pairs,
                                     Plan plan) {
  for (int64_t layer = blockIdx.y; layer < num_layers; layer += gridDim.y) {
    U* base = reinterpret_cast<U*>(static_cast<uintptr_t>(layer_ptrs[layer]));
    for (int64_t p = blockIdx.x; p < num_pairs; p += gridDim.x) {
      if (!copy_slot<U>(plan, base, src[p * src_stride], dst[p * dst_stride],
                        threadIdx.x, blockDim.x))
        __trap();  // the step fails at its next sync, loudly
    }
  }
}

template <typename U>
cudaError_t launch(const int64_t* layer_ptrs, int64_t num_layers,
                   const int64_t* src, int64_t src_stride, const int64_t* dst,
                   int64_t dst_stride, int64_t num_pairs, const Plan& plan,
                   cudaStream_t stream) {
  const int64_t max_x = 2147483647;
  const int64_t max_y = 65535;
  const dim3 grid(static_cast<unsigned>(num_pairs < max_x ? num_pairs : max_x),
                  static_cast<unsigned>(num_layers < max_y ? num_layers : max_y));
  copy_kv_slots_kernel<U><<<grid, threads_for(plan), 0, stream>>>(
      layer_ptrs, num_layers, src, src_stride, dst, dst_stride, num_pairs,
      plan);
  return cudaGetLastError();
}

}  // namespace kv_copy

cudaError_t launch_copy_kv_slots(const int64_t* layer_ptrs, int64_t num_layers,
                                 uint64_t layer_ptr_or, const int64_t* src,
                                 int64_t src_stride, const int64_t* dst,
                                 int64_t dst_stride, int64_t num_pairs,
                                 int64_t num_blocks, int64_t num_heads,
                                 int64_t block_size, int64_t content,
                                 int64_t elem_size, int64_t stride_block,
                                 int64_t stride_head, int64_t stride_token,
                                 int64_t stride_content, cudaStream_t stream) {
  using namespace kv_copy;
  Plan plan;
  if (!make_plan(layer_ptr_or, num_blocks, num_heads, block_size, content,
                 elem_size, stride_block, stride_head, stride_token,
                 stride_content, &plan))
    return cudaErrorInvalidValue;
  if (num_layers <= 0 || num_pairs <= 0 || plan.rows * plan.units_per_row == 0)
    return cudaSuccess;
  switch (plan.unit) {
    case 1:
      return launch<uint8_t>(layer_ptrs, num_layers, src, src_stride, dst,
                             dst_stride, num_pairs, plan, stream);
    case 2:
      return launch<uint16_t>(layer_ptrs, num_layers, src, src_stride, dst,
                              dst_stride, num_pairs, plan, stream);
    case 4:
      return launch<uint32_t>(layer_ptrs, num_layers, src, src_stride, dst,
                              dst_stride, num_pairs, plan, stream);
    case 8:
      return launch<uint2>(layer_ptrs, num_layers, src, src_stride, dst,
                           dst_stride, num_pairs, plan, stream);
    case 16:
      return launch<uint4>(layer_ptrs, num_layers, src, src_stride, dst,
                           dst_stride, num_pairs, plan, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace vllm_multiverse

#ifdef MULTIVERSE_HOST_EMULATION
namespace {
// False where the kernel would trap.
template <typename U>
bool emulate(const int64_t* layer_ptrs, int64_t num_layers, const int64_t* src,
             int64_t src_stride, const int64_t* dst, int64_t dst_stride,
             int64_t num_pairs, const vllm_multiverse::kv_copy::Plan& plan) {
  const int nthreads = vllm_multiverse::kv_copy::threads_for(plan);
  for (int64_t layer = 0; layer < num_layers; ++layer) {
    U* base = reinterpret_cast<U*>(static_cast<uintptr_t>(layer_ptrs[layer]));
    for (int64_t p = 0; p < num_pairs; ++p) {
      for (int tid = 0; tid < nthreads; ++tid) {
        if (!vllm_multiverse::kv_copy::copy_slot<U>(
                plan, base, src[p * src_stride], dst[p * dst_stride], tid,
                nthreads))
          return false;
      }
    }
  }
  return true;
}
}  // namespace

// The kernel's per-block code run over host memory, block by block and
// thread by thread, with the launcher's plan. Returns the unit in bytes the
// launcher would use, -1 for arguments it would refuse, -2 where the kernel
// traps (a slot outside the cache).
extern "C" int64_t multiverse_host_copy_kv_slots(
    const int64_t* layer_ptrs, int64_t num_layers, uint64_t layer_ptr_or,
    const int64_t* src, int64_t src_stride, const int64_t* dst,
    int64_t dst_stride, int64_t num_pairs, int64_t num_blocks,
    int64_t num_heads, int64_t block_size, int64_t content, int64_t elem_size,
    int64_t stride_block, int64_t stride_head, int64_t stride_token,
    int64_t stride_content) {
  using namespace vllm_multiverse::kv_copy;
  Plan plan;
  if (!make_plan(layer_ptr_or, num_blocks, num_heads, block_size, content,
                 elem_size, stride_block, stride_head, stride_token,
                 stride_content, &plan))
    return -1;
  bool ok;
  switch (plan.unit) {
    case 1:
      ok = emulate<uint8_t>(layer_ptrs, num_layers, src, src_stride, dst, dst_stride,
                       num_pairs, plan);
      break;
    case 2:
      ok = emulate<uint16_t>(layer_ptrs, num_layers, src, src_stride, dst,
                        dst_stride, num_pairs, plan);
      break;
    case 4:
      ok = emulate<uint32_t>(layer_ptrs, num_layers, src, src_stride, dst,
                        dst_stride, num_pairs, plan);
      break;
    case 8:
      ok = emulate<uint2>(layer_ptrs, num_layers, src, src_stride, dst, dst_stride,
                     num_pairs, plan);
      break;
    case 16:
      ok = emulate<uint4>(layer_ptrs, num_layers, src, src_stride, dst, dst_stride,
                     num_pairs, plan);
      break;
    default:
      return -1;
  }
  return ok ? plan.unit : -2;
}
#endif  // MULTIVERSE_HOST_EMULATION
