// The Multiverse mask of a step's masked rows as FlashInfer's packed bits.
//
// Semantics: pack_masks_torch in vllm_multiverse/kernels/packed_mask.py.
// Masked row i has queries start .. start + q_len - 1 (token indices) and
// keys 0 .. kv_len - 1, kv_len = start + q_len; its bits are the row-major
// [q_len, kv_len] matrix, bit (r, k) set iff k <= start + r and (start + r,
// k) is in none of the row's rectangles (q0 <= q < q1 and k0 <= k < k1),
// little bit order, from byte byte_indptr[i]; the last byte's padding bits
// are 0.
//
// One thread per output byte: it finds its row by binary search over
// byte_indptr, then builds its 8 bits run by run (the bits of one query row
// are consecutive keys: causal bound and each rectangle clear a range of
// them), looping the row's rectangles once per run.
//
// No torch here: `nvcc -c packed_mask.cu` builds it. With
// -DMULTIVERSE_HOST_EMULATION it also exports a host function computing the
// same bytes on the CPU (tests/test_csrc_host_emulation.py).

#include <cstdint>

#include <cuda_runtime.h>

#include "ops.h"

namespace vllm_multiverse {
namespace packed_mask {

struct Args {
  const int32_t* starts;
  const int32_t* q_lens;
  const int32_t* byte_indptr;
  const int32_t* rect_indptr;
  const int32_t* rects;
  int64_t num_rows;
};

__host__ __device__ inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
__host__ __device__ inline int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }

// The largest i in [0, num_rows) with indptr[i] <= b (indptr ascending):
// the row holding byte b, skipping rows of no bytes.
__host__ __device__ inline int64_t find_row(const int32_t* indptr,
                                            int64_t num_rows, int64_t b) {
  int64_t lo = 0;
  int64_t hi = num_rows - 1;
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo + 1) / 2;
    if (static_cast<int64_t>(indptr[mid]) <= b) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  return lo;
}

// Bits [lo, hi) of a byte, 0 <= lo <= hi <= 8.
__host__ __device__ inline uint32_t bit_range(int64_t lo, int64_t hi) {
  return ((1u << hi) - 1u) & ~((1u << lo) - 1u);
}

// Output byte b.
__host__ __device__ inline uint8_t mask_byte(const Args& a, int64_t b) {
  if (a.num_rows <= 0) return 0;
  const int64_t i = find_row(a.byte_indptr, a.num_rows, b);
  const int64_t start = a.starts[i];
  const int64_t q_len = a.q_lens[i];
  const int64_t kv_len = start + q_len;
  if (q_len <= 0 || kv_len <= 0) return 0;
  const int64_t row_bits = q_len * kv_len;
  const int64_t e0 = (b - static_cast<int64_t>(a.byte_indptr[i])) * 8;
  if (e0 < 0 || e0 >= row_bits) return 0;
  const int64_t nbits = min64(8, row_bits - e0);
  const int64_t r0 = a.rect_indptr[i];
  const int64_t r1 = a.rect_indptr[i + 1];

  uint32_t bits = 0;
  int64_t j = 0;                    // bit of the byte
  int64_t r = e0 / kv_len;          // query row of bit j
  int64_t k = e0 - r * kv_len;      // key of bit j
  while (j < nbits) {
    const int64_t run = min64(nbits - j, kv_len - k);  // bits j.. in row r
    const int64_t q = start + r;
    // Causal: keys k .. k + run - 1 are visible up to q.
    const int64_t visible = max64(0, min64(run, q - k + 1));
    uint32_t m = bit_range(0, visible);
    for (int64_t t = r0; t < r1; ++t) {
      const int32_t* rect = a.rects + 4 * t;
      if (q < rect[0] || q >= rect[1]) continue;
      const int64_t lo = max64(rect[2], k) - k;
      const int64_t hi = min64(rect[3], k + run) - k;
      if (lo < hi) m &= ~bit_range(lo, hi);
    }
    bits |= m << j;
    j += run;
    r += 1;
    k = 0;
  }
  return static_cast<uint8_t>(bits);
}

__global__ void pack_masks_kernel(Args a, uint8_t* __restrict__ out,
                                  int64_t total_bytes) {
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
       b < total_bytes; b += step) {
    out[b] = mask_byte(a, b);
  }
}

}  // namespace packed_mask

cudaError_t launch_pack_masks(const int32_t* starts, const int32_t* q_lens,
                              const int32_t* byte_indptr,
                              const int32_t* rect_indptr, const int32_t* rects,
                              int64_t num_rows, uint8_t* out,
                              int64_t total_bytes, cudaStream_t stream) {
  if (total_bytes <= 0) return cudaSuccess;
  if (num_rows < 0) return cudaErrorInvalidValue;
  const packed_mask::Args args{starts, q_lens, byte_indptr, rect_indptr, rects,
                               num_rows};
  const int threads = 256;
  const int64_t max_blocks = 1 << 20;  // grid-strided past that
  int64_t blocks = (total_bytes + threads - 1) / threads;
  if (blocks > max_blocks) blocks = max_blocks;
  packed_mask::pack_masks_kernel<<<static_cast<unsigned>(blocks), threads, 0,
                                   stream>>>(args, out, total_bytes);
  return cudaGetLastError();
}

}  // namespace vllm_multiverse

#ifdef MULTIVERSE_HOST_EMULATION
// The kernel's per-byte code over host arrays.
extern "C" int multiverse_host_pack_masks(const int32_t* starts,
                                          const int32_t* q_lens,
                                          const int32_t* byte_indptr,
                                          const int32_t* rect_indptr,
                                          const int32_t* rects,
                                          int64_t num_rows, uint8_t* out,
                                          int64_t total_bytes) {
  if (num_rows < 0) return -1;
  const vllm_multiverse::packed_mask::Args args{starts,      q_lens, byte_indptr,
                                                rect_indptr, rects,  num_rows};
  for (int64_t b = 0; b < total_bytes; ++b) {
    out[b] = vllm_multiverse::packed_mask::mask_byte(args, b);
  }
  return 0;
}
#endif  // MULTIVERSE_HOST_EMULATION
