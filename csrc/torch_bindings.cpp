// torch.ops.vllm_multiverse: the CUDA ops of csrc/ for
// vllm_multiverse/kernels (kv_copy.py, packed_mask.py), and the empty
// Python module vllm_multiverse._C whose import registers them.
//
//   copy_kv_slots(Tensor(a!)[] caches, Tensor src, Tensor dst) -> ()
//   pack_masks(Tensor starts, Tensor q_lens, Tensor byte_indptr,
//              Tensor rect_indptr, Tensor rects, int total_bytes) -> Tensor
//
// The only file that sees torch: it checks the tensors, uploads the layer
// pointer table and calls the launchers of ops.h on the current stream.
#include <Python.h>

#include <cstdint>
#include <map>
#include <vector>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "ops.h"

namespace {

bool copyable_element_size(int64_t size) {
  return size == 1 || size == 2 || size == 4 || size == 8;
}

void copy_kv_slots_cuda(const std::vector<at::Tensor>& caches,
                        const at::Tensor& src, const at::Tensor& dst) {
  TORCH_CHECK(src.scalar_type() == at::kLong && dst.scalar_type() == at::kLong,
              "copy_kv_slots: src and dst must be int64, got ",
              src.scalar_type(), " and ", dst.scalar_type());
  TORCH_CHECK(src.dim() == 1 && dst.dim() == 1 && src.numel() == dst.numel(),
              "copy_kv_slots: src and dst must be 1-D of one length, got ",
              src.sizes(), " and ", dst.sizes());
  if (caches.empty() || src.numel() == 0) return;

  const at::Device device = caches[0].device();
  TORCH_CHECK(device.is_cuda(), "copy_kv_slots: caches must be CUDA tensors");
  TORCH_CHECK(src.device() == device && dst.device() == device,
              "copy_kv_slots: src and dst must be on ", device, ", got ",
              src.device(), " and ", dst.device());
  for (const at::Tensor& kv : caches) {
    TORCH_CHECK(kv.device() == device, "copy_kv_slots: caches on ", device,
                " and ", kv.device());
    TORCH_CHECK(kv.layout() == at::kStrided && kv.dim() == 4,
                "copy_kv_slots: each cache must be a strided 4-D "
                "[blocks, kv_heads, block_size, 2 * head_size] view, got ",
                kv.sizes());
    TORCH_CHECK(copyable_element_size(kv.element_size()),
                "copy_kv_slots: element size ", kv.element_size(),
                " (", kv.scalar_type(), ") is not 1, 2, 4 or 8 bytes");
    TORCH_CHECK(kv.size(2) > 0, "copy_kv_slots: block size 0");
  }

  // Layers of one shape, strides and element size share a launch; the
  // pointer table holds each group's layers together.
  std::map<std::vector<int64_t>, std::vector<const at::Tensor*>> groups;
  for (const at::Tensor& kv : caches) {
    if (kv.numel() == 0) continue;
    std::vector<int64_t> key(kv.sizes().begin(), kv.sizes().end());
    key.insert(key.end(), kv.strides().begin(), kv.strides().end());
    key.push_back(kv.element_size());
    groups[key].push_back(&kv);
  }
  int64_t num_layers = 0;
  for (const auto& group : groups) {
    num_layers += static_cast<int64_t>(group.second.size());
  }
  if (num_layers == 0) return;

  const c10::cuda::CUDAGuard guard(device);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();

  // Pinned, then copied on the stream: the caching host allocator keeps the
  // buffer until the copy has run.
  at::Tensor host_table = at::empty(
      {num_layers}, at::TensorOptions().dtype(at::kLong).pinned_memory(true));
  int64_t* host_ptrs = host_table.data_ptr<int64_t>();
  int64_t i = 0;
  for (const auto& group : groups) {
    for (const at::Tensor* kv : group.second) {
      host_ptrs[i++] = reinterpret_cast<int64_t>(kv->data_ptr());
    }
  }
  const at::Tensor table = host_table.to(
      at::TensorOptions().device(device).dtype(at::kLong), /*non_blocking=*/true);
  const int64_t* device_ptrs = table.data_ptr<int64_t>();

  const int64_t* src_ptr = src.data_ptr<int64_t>();
  const int64_t* dst_ptr = dst.data_ptr<int64_t>();
  int64_t offset = 0;
  for (const auto& group : groups) {
    const at::Tensor& kv = *group.second.front();
    const int64_t count = static_cast<int64_t>(group.second.size());
    uint64_t ptr_or = 0;
    for (const at::Tensor* layer : group.second) {
      ptr_or |= reinterpret_cast<uint64_t>(layer->data_ptr());
    }
    C10_CUDA_CHECK(vllm_multiverse::launch_copy_kv_slots(
        device_ptrs + offset, count, ptr_or, src_ptr, src.stride(0), dst_ptr,
        dst.stride(0), src.numel(), kv.size(0), kv.size(1), kv.size(2),
        kv.size(3), kv.element_size(), kv.stride(0), kv.stride(1),
        kv.stride(2), kv.stride(3), stream));
    offset += count;
  }
}

void check_int32(const at::Tensor& t, const char* name, const at::Device& device) {
  TORCH_CHECK(t.scalar_type() == at::kInt, "pack_masks: ", name,
              " must be int32, got ", t.scalar_type());
  TORCH_CHECK(t.device() == device, "pack_masks: ", name, " on ", t.device(),
              ", expected ", device);
}

at::Tensor pack_masks_cuda(const at::Tensor& starts, const at::Tensor& q_lens,
                           const at::Tensor& byte_indptr,
                           const at::Tensor& rect_indptr,
                           const at::Tensor& rects, int64_t total_bytes) {
  const at::Device device = starts.device();
  TORCH_CHECK(device.is_cuda(), "pack_masks: inputs must be CUDA tensors");
  check_int32(starts, "starts", device);
  check_int32(q_lens, "q_lens", device);
  check_int32(byte_indptr, "byte_indptr", device);
  check_int32(rect_indptr, "rect_indptr", device);
  check_int32(rects, "rects", device);
  TORCH_CHECK(starts.dim() == 1, "pack_masks: starts must be 1-D");
  const int64_t num_rows = starts.size(0);
  TORCH_CHECK(q_lens.dim() == 1 && q_lens.size(0) == num_rows,
              "pack_masks: q_lens must be [", num_rows, "], got ", q_lens.sizes());
  TORCH_CHECK(byte_indptr.dim() == 1 && byte_indptr.size(0) == num_rows + 1,
              "pack_masks: byte_indptr must be [", num_rows + 1, "], got ",
              byte_indptr.sizes());
  TORCH_CHECK(rect_indptr.dim() == 1 && rect_indptr.size(0) == num_rows + 1,
              "pack_masks: rect_indptr must be [", num_rows + 1, "], got ",
              rect_indptr.sizes());
  TORCH_CHECK(rects.dim() == 2 && rects.size(1) == 4,
              "pack_masks: rects must be [R, 4], got ", rects.sizes());
  TORCH_CHECK(total_bytes >= 0, "pack_masks: total_bytes ", total_bytes, " < 0");

  const c10::cuda::CUDAGuard guard(device);
  at::Tensor out = at::empty({total_bytes}, starts.options().dtype(at::kByte));
  if (total_bytes == 0) return out;

  const at::Tensor starts_c = starts.contiguous();
  const at::Tensor q_lens_c = q_lens.contiguous();
  const at::Tensor byte_indptr_c = byte_indptr.contiguous();
  const at::Tensor rect_indptr_c = rect_indptr.contiguous();
  const at::Tensor rects_c = rects.contiguous();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();
  C10_CUDA_CHECK(vllm_multiverse::launch_pack_masks(
      starts_c.data_ptr<int32_t>(), q_lens_c.data_ptr<int32_t>(),
      byte_indptr_c.data_ptr<int32_t>(), rect_indptr_c.data_ptr<int32_t>(),
      rects_c.data_ptr<int32_t>(), num_rows, out.data_ptr<uint8_t>(),
      total_bytes, stream));
  return out;
}

// Shapes only, for tracing (torch.compile, fake tensors).
void copy_kv_slots_meta(const std::vector<at::Tensor>&, const at::Tensor&,
                        const at::Tensor&) {}

at::Tensor pack_masks_meta(const at::Tensor& starts, const at::Tensor&,
                           const at::Tensor&, const at::Tensor&,
                           const at::Tensor&, int64_t total_bytes) {
  return at::empty({total_bytes}, starts.options().dtype(at::kByte));
}

}  // namespace

TORCH_LIBRARY(vllm_multiverse, m) {
  m.def("copy_kv_slots(Tensor(a!)[] caches, Tensor src, Tensor dst) -> ()");
  m.def(
      "pack_masks(Tensor starts, Tensor q_lens, Tensor byte_indptr, "
      "Tensor rect_indptr, Tensor rects, int total_bytes) -> Tensor");
}

TORCH_LIBRARY_IMPL(vllm_multiverse, CUDA, m) {
  m.impl("copy_kv_slots", &copy_kv_slots_cuda);
  m.impl("pack_masks", &pack_masks_cuda);
}

TORCH_LIBRARY_IMPL(vllm_multiverse, Meta, m) {
  m.impl("copy_kv_slots", &copy_kv_slots_meta);
  m.impl("pack_masks", &pack_masks_meta);
}

// `import vllm_multiverse._C` loads this library, which runs the
// registrations above; the module itself is empty.
#ifndef TORCH_EXTENSION_NAME
#define TORCH_EXTENSION_NAME _C
#endif
#define MULTIVERSE_CONCAT_(a, b) a##b
#define MULTIVERSE_CONCAT(a, b) MULTIVERSE_CONCAT_(a, b)
#define MULTIVERSE_STR_(x) #x
#define MULTIVERSE_STR(x) MULTIVERSE_STR_(x)

PyMODINIT_FUNC MULTIVERSE_CONCAT(PyInit_, TORCH_EXTENSION_NAME)(void) {
  static PyModuleDef module = {
      PyModuleDef_HEAD_INIT,
      MULTIVERSE_STR(TORCH_EXTENSION_NAME),
      "CUDA ops of vllm_multiverse (torch.ops.vllm_multiverse)",
      0,        // m_size
      nullptr,  // m_methods
      nullptr,  // m_slots
      nullptr,  // m_traverse
      nullptr,  // m_clear
      nullptr,  // m_free
  };
  return PyModule_Create(&module);
}
