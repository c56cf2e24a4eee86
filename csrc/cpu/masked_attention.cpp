// Multiverse attention over vLLM 0.32's paged CPU KV cache ("vec" packing,
// float32), in place: no gather, hidden key ranges skipped rather than
// masked. The spec is sdpa_masked_rows (vllm_multiverse/kernels/
// masked_attention.py); tests/test_cpu_masked_kernel.py holds the two
// together.
//
// Cache of one layer: [blocks, kv_heads, bs, 2 * D]. Inside a (block, head)
// the keys come first, transposed ([D][bs]: the bs keys of one dimension
// side by side), then the values token-major ([bs][D]). Keys are read 32 at a
// time along a block, so scores are 32-wide vector FMAs with no transpose.
//
// A row is one request of the step: queries start..kv_len-1 against keys
// 0..kv_len-1, causal except its rectangles (q0, q1, k0, k1): queries
// q0..q1-1 do not see keys k0..k1-1. A row with no rectangle is causal
// attention, so a step's unmasked rows can go through here too.
//
// Work items are (row, kv head, tile of queries), the query heads of a KV
// head together (GQA: the K/V chunk is read once for all of them). Items are
// taken longest first from a shared counter: causal tiles cost more the
// later they sit, so a static split would leave one thread with most work.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace {

constexpr int kChunk = 32;  // keys per score pass: 4 AVX2 vectors
constexpr int kTile = 16;   // queries per work item of a long row
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// exp for 8 floats (Cephes' polynomial, as in avx_mathfun); inputs below
// about -87 give 0 or a denormal, which is what the softmax wants.
inline __m256 exp256(__m256 x) {
  const __m256 hi = _mm256_set1_ps(88.3762626647949f);
  const __m256 lo = _mm256_set1_ps(-88.3762626647949f);
  x = _mm256_max_ps(_mm256_min_ps(x, hi), lo);
  __m256 fx = _mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f));
  fx = _mm256_floor_ps(fx);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
  const __m256 z = _mm256_mul_ps(x, x);
  __m256 y = _mm256_set1_ps(1.9875691500E-4f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507E-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073E-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894E-2f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459E-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201E-1f));
  y = _mm256_fmadd_ps(y, z, x);
  y = _mm256_add_ps(y, _mm256_set1_ps(1.0f));
  __m256i e = _mm256_cvttps_epi32(fx);
  e = _mm256_slli_epi32(_mm256_add_epi32(e, _mm256_set1_epi32(0x7f)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

// Bits lo..hi-1 of a chunk starting at key c0 (clipped to the chunk).
inline uint32_t range_bits(int64_t lo, int64_t hi, int64_t c0) {
  lo = std::max<int64_t>(lo - c0, 0);
  hi = std::min<int64_t>(hi - c0, kChunk);
  if (lo >= hi) return 0;
  const uint64_t run = (hi - lo == 64) ? ~0ull : ((1ull << (hi - lo)) - 1);
  return static_cast<uint32_t>(run << lo);
}

// Scores of NQ query vectors against 32 keys: s[i][t] = q[i] . K[:, t].
template <int NQ>
inline void scores(const float* const* q, const float* k, int64_t bs, int64_t D, float* s) {
  __m256 a[NQ][4];
  for (int i = 0; i < NQ; ++i)
    for (int x = 0; x < 4; ++x) a[i][x] = _mm256_setzero_ps();
  for (int64_t d = 0; d < D; ++d) {
    const float* kd = k + d * bs;
    const __m256 k0 = _mm256_loadu_ps(kd), k1 = _mm256_loadu_ps(kd + 8);
    const __m256 k2 = _mm256_loadu_ps(kd + 16), k3 = _mm256_loadu_ps(kd + 24);
    for (int i = 0; i < NQ; ++i) {
      const __m256 b = _mm256_broadcast_ss(q[i] + d);
      a[i][0] = _mm256_fmadd_ps(b, k0, a[i][0]);
      a[i][1] = _mm256_fmadd_ps(b, k1, a[i][1]);
      a[i][2] = _mm256_fmadd_ps(b, k2, a[i][2]);
      a[i][3] = _mm256_fmadd_ps(b, k3, a[i][3]);
    }
  }
  for (int i = 0; i < NQ; ++i)
    for (int x = 0; x < 4; ++x) _mm256_storeu_ps(s + i * kChunk + 8 * x, a[i][x]);
}

// acc[i] += sum over the chunk's keys t in `any` of p[i][t] * V[t, :],
// NV vectors of the head dimension at a time.
template <int NQ, int NV>
inline void accumulate(float* const* acc, const float* p, const float* v, int64_t D, int64_t d0, uint32_t any) {
  __m256 a[NQ][NV];
  for (int i = 0; i < NQ; ++i)
    for (int x = 0; x < NV; ++x) a[i][x] = _mm256_loadu_ps(acc[i] + d0 + 8 * x);
  while (any) {
    const int t = __builtin_ctz(any);
    any &= any - 1;
    const float* vt = v + t * D + d0;
    __m256 vv[NV];
    for (int x = 0; x < NV; ++x) vv[x] = _mm256_loadu_ps(vt + 8 * x);
    for (int i = 0; i < NQ; ++i) {
      const __m256 b = _mm256_broadcast_ss(p + i * kChunk + t);
      for (int x = 0; x < NV; ++x) a[i][x] = _mm256_fmadd_ps(b, vv[x], a[i][x]);
    }
  }
  for (int i = 0; i < NQ; ++i)
    for (int x = 0; x < NV; ++x) _mm256_storeu_ps(acc[i] + d0 + 8 * x, a[i][x]);
}

template <int NQ>
inline void accumulate_all(float* const* acc, const float* p, const float* v, int64_t D, uint32_t any) {
  int64_t d0 = 0;
  for (; d0 + 32 <= D; d0 += 32) accumulate<NQ, 4>(acc, p, v, D, d0, any);
  for (; d0 < D; d0 += 8) accumulate<NQ, 1>(acc, p, v, D, d0, any);
}

// Dispatch on how many query vectors go together (at most 3: 12 score
// accumulators and 4 key vectors fill the 16 AVX2 registers).
inline void scores_n(int n, const float* const* q, const float* k, int64_t bs, int64_t D, float* s) {
  if (n == 3) scores<3>(q, k, bs, D, s);
  else if (n == 2) scores<2>(q, k, bs, D, s);
  else scores<1>(q, k, bs, D, s);
}

inline void accumulate_n(int n, float* const* acc, const float* p, const float* v, int64_t D, uint32_t any) {
  if (n == 3) accumulate_all<3>(acc, p, v, D, any);
  else if (n == 2) accumulate_all<2>(acc, p, v, D, any);
  else accumulate_all<1>(acc, p, v, D, any);
}

struct Item {
  int64_t row, q0, nq, head, cost;
};

}  // namespace

// query [T, Hq, D], output [T, Hq, D] (strided over tokens and heads,
// contiguous over D), kv_cache [blocks, Hk, bs, 2D] contiguous, all float32.
// Per row (int32): q_offsets (its first query in the batch), q_lens,
// kv_lens, block_table [rows, width] (kernel blocks), rect_indptr
// [rows + 1] into rects [R, 4].
void masked_attention(const at::Tensor& query, const at::Tensor& kv_cache, const at::Tensor& output,
                      const at::Tensor& q_offsets, const at::Tensor& q_lens, const at::Tensor& kv_lens,
                      const at::Tensor& block_table, const at::Tensor& rect_indptr, const at::Tensor& rects,
                      double scale) {
  TORCH_CHECK(query.dtype() == at::kFloat && kv_cache.dtype() == at::kFloat &&
                  output.dtype() == at::kFloat,
              "masked_attention: float32 only");
  TORCH_CHECK(query.dim() == 3 && output.dim() == 3 && kv_cache.dim() == 4, "masked_attention: bad ranks");
  TORCH_CHECK(query.stride(2) == 1 && output.stride(2) == 1 && kv_cache.is_contiguous(),
              "masked_attention: head dimension must be contiguous");
  for (const auto* t : {&q_offsets, &q_lens, &kv_lens, &block_table, &rect_indptr, &rects})
    TORCH_CHECK(t->dtype() == at::kInt && t->is_contiguous(), "masked_attention: int32 contiguous indices");
  const int64_t Hq = query.size(1), D = query.size(2);
  const int64_t Hk = kv_cache.size(1), bs = kv_cache.size(2);
  TORCH_CHECK(kv_cache.size(3) == 2 * D && Hq % Hk == 0, "masked_attention: cache shape");
  TORCH_CHECK(bs % kChunk == 0 && D % 8 == 0, "masked_attention: block size % 32 and head size % 8");
  const int64_t G = Hq / Hk;
  const int64_t rows = q_lens.size(0);
  const int64_t width = block_table.size(1);
  TORCH_CHECK(q_offsets.size(0) == rows && kv_lens.size(0) == rows && block_table.size(0) == rows &&
                  rect_indptr.size(0) == rows + 1 && rects.size(-1) == 4,
              "masked_attention: per-row inputs of different lengths");

  const float* qp = query.data_ptr<float>();
  const float* kvp = kv_cache.data_ptr<float>();
  float* op = output.data_ptr<float>();
  const int32_t* qoff = q_offsets.data_ptr<int32_t>();
  const int32_t* qlen = q_lens.data_ptr<int32_t>();
  const int32_t* kvlen = kv_lens.data_ptr<int32_t>();
  const int32_t* table = block_table.data_ptr<int32_t>();
  const int32_t* rind = rect_indptr.data_ptr<int32_t>();
  const int32_t* rect = rects.data_ptr<int32_t>();
  const int64_t qs0 = query.stride(0), qs1 = query.stride(1);
  const int64_t os0 = output.stride(0), os1 = output.stride(1);
  const float fscale = static_cast<float>(scale);

  std::vector<Item> items;
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t start = kvlen[r] - qlen[r];
    TORCH_CHECK(start >= 0 && (kvlen[r] + bs - 1) / bs <= width, "masked_attention: row ", r, " out of its table");
    for (int64_t q0 = 0; q0 < qlen[r]; q0 += kTile) {
      const int64_t nq = std::min<int64_t>(kTile, qlen[r] - q0);
      for (int64_t h = 0; h < Hk; ++h) items.push_back({r, q0, nq, h, nq * (start + q0 + nq)});
    }
  }
  std::sort(items.begin(), items.end(), [](const Item& a, const Item& b) { return a.cost > b.cost; });

  std::atomic<int64_t> next{0};
  const int64_t n_items = static_cast<int64_t>(items.size());
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), std::max<int64_t>(n_items, 1));
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    const int64_t nv = kTile * G;  // query vectors of a tile
    std::vector<float> qbuf(nv * D), acc(nv * D), s(nv * kChunk), m(nv), l(nv);
    std::vector<uint32_t> bits(kTile);
    std::vector<std::pair<int64_t, int64_t>> hidden;
    std::vector<int64_t> hidden_at(kTile + 1);
    for (int64_t w; (w = next.fetch_add(1)) < n_items;) {
      const Item& it = items[w];
      const int64_t start = kvlen[it.row] - qlen[it.row];
      const int64_t n = it.nq * G;
      // Scaled queries of the tile, vector i = query i / G, head h * G + i % G.
      for (int64_t i = 0; i < n; ++i) {
        const float* src = qp + (qoff[it.row] + it.q0 + i / G) * qs0 + (it.head * G + i % G) * qs1;
        for (int64_t d = 0; d < D; ++d) qbuf[i * D + d] = src[d] * fscale;
      }
      std::fill(acc.begin(), acc.begin() + n * D, 0.0f);
      std::fill(m.begin(), m.begin() + n, kNegInf);
      std::fill(l.begin(), l.begin() + n, 0.0f);
      // Each query's hidden key ranges, from the rectangles covering it.
      hidden.clear();
      for (int64_t j = 0; j < it.nq; ++j) {
        hidden_at[j] = static_cast<int64_t>(hidden.size());
        const int64_t t = start + it.q0 + j;
        for (int32_t x = rind[it.row]; x < rind[it.row + 1]; ++x) {
          const int32_t* rc = rect + 4 * x;
          if (rc[0] <= t && t < rc[1] && rc[2] < rc[3]) hidden.emplace_back(rc[2], rc[3]);
        }
      }
      hidden_at[it.nq] = static_cast<int64_t>(hidden.size());
      const int64_t end = start + it.q0 + it.nq;  // keys any query of the tile may see
      const int32_t* blocks = table + it.row * width;
      for (int64_t c0 = 0; c0 < end; c0 += kChunk) {
        uint32_t any = 0;
        for (int64_t j = 0; j < it.nq; ++j) {
          uint32_t b = range_bits(0, start + it.q0 + j + 1, c0);
          for (int64_t x = hidden_at[j]; x < hidden_at[j + 1] && b; ++x)
            b &= ~range_bits(hidden[x].first, hidden[x].second, c0);
          bits[j] = b;
          any |= b;
        }
        if (!any) continue;  // hidden or in the future for the whole tile
        const float* base = kvp + ((static_cast<int64_t>(blocks[c0 / bs]) * Hk + it.head) * bs) * 2 * D;
        const float* k = base + (c0 % bs);
        const float* v = base + bs * D + (c0 % bs) * D;
        for (int64_t i0 = 0; i0 < n; i0 += 3) {
          const int g = static_cast<int>(std::min<int64_t>(3, n - i0));
          const float* qv[3];
          float* av[3];
          uint32_t group_any = 0;
          for (int i = 0; i < g; ++i) {
            qv[i] = qbuf.data() + (i0 + i) * D;
            av[i] = acc.data() + (i0 + i) * D;
            group_any |= bits[(i0 + i) / G];
          }
          if (!group_any) continue;
          float* sv = s.data() + i0 * kChunk;
          scores_n(g, qv, k, bs, D, sv);
          for (int i = 0; i < g; ++i) {
            const int64_t vi = i0 + i;
            const uint32_t b = bits[vi / G];
            float* si = sv + i * kChunk;
            if (!b) {
              std::fill(si, si + kChunk, 0.0f);
              continue;
            }
            float cmax = kNegInf;
            for (uint32_t x = b; x; x &= x - 1) cmax = std::max(cmax, si[__builtin_ctz(x)]);
            const float mnew = std::max(m[vi], cmax);
            if (mnew > m[vi]) {
              const float alpha = m[vi] == kNegInf ? 0.0f : std::exp(m[vi] - mnew);
              if (alpha != 1.0f) {
                l[vi] *= alpha;
                const __m256 a = _mm256_set1_ps(alpha);
                for (int64_t d = 0; d < D; d += 8)
                  _mm256_storeu_ps(av[i] + d, _mm256_mul_ps(a, _mm256_loadu_ps(av[i] + d)));
              }
              m[vi] = mnew;
            }
            const __m256 mv = _mm256_set1_ps(mnew);
            for (int x = 0; x < kChunk; x += 8)
              _mm256_storeu_ps(si + x, exp256(_mm256_sub_ps(_mm256_loadu_ps(si + x), mv)));
            float sum = 0.0f;
            for (int t = 0; t < kChunk; ++t) {
              if (!(b >> t & 1u)) si[t] = 0.0f;  // hidden, future or past the row: no weight
              sum += si[t];
            }
            l[vi] += sum;
          }
          accumulate_n(g, av, sv, v, D, group_any);
        }
      }
      for (int64_t i = 0; i < n; ++i) {
        float* dst = op + (qoff[it.row] + it.q0 + i / G) * os0 + (it.head * G + i % G) * os1;
        const float inv = l[i] > 0.0f ? 1.0f / l[i] : 0.0f;
        for (int64_t d = 0; d < D; ++d) dst[d] = acc[i * D + d] * inv;
      }
    }
  });
}

TORCH_LIBRARY(multiverse_cpu, m) {
  m.def(
      "masked_attention(Tensor query, Tensor kv_cache, Tensor(a!) output, Tensor q_offsets, Tensor q_lens, "
      "Tensor kv_lens, Tensor block_table, Tensor rect_indptr, Tensor rects, float scale) -> ()");
  m.impl("masked_attention", c10::DispatchKey::CPU, TORCH_FN(masked_attention));
}
