// The CPU implementation of the op `mmrprune::cpu_select` (schema and fake: mmrprune/ops.py).
//
// Tensors in, checked here once (device, dtype, rank, length, contiguity: TORCH_CHECK naming the
// argument), one SelectArgs filled, select_batch run.  select_batch's own checks (segment values)
// raise std::invalid_argument; they are rethrown as ValueError, the type Python callers expect.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>

#include "op.h"
#include "select.h"

namespace mmrprune {
namespace {

DType dtype_of(const at::Tensor& rows) {
  switch (rows.scalar_type()) {
    case at::kFloat: return DType::F32;
    case at::kDouble: return DType::F64;
    case at::kHalf: return DType::F16;
    case at::kBFloat16: return DType::BF16;
    default:
      TORCH_CHECK_TYPE(false, "mmrprune::cpu_select: rows must be float32, float64, float16 or bfloat16, got ",
                       rows.scalar_type());
  }
}

Method method_of(std::string_view name) {
  for (const auto& [n, m] : kMethodNames)
    if (n == name) return m;
  TORCH_CHECK_VALUE(false, "mmrprune::cpu_select: unknown method '", name, "'");
}

// A 1-D contiguous CPU tensor of `dtype` with `length` entries.
void check_vector(const at::Tensor& t, const char* name, at::ScalarType dtype, int64_t length, const char* of) {
  TORCH_CHECK_VALUE(t.device().is_cpu(), "mmrprune::cpu_select: ", name, " must be a CPU tensor, got device ",
                    t.device());
  TORCH_CHECK_TYPE(t.scalar_type() == dtype, "mmrprune::cpu_select: ", name, " must have dtype ", dtype,
                   " (", of, "), got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == length, "mmrprune::cpu_select: ", name, " must have shape [",
                    length, "] (", of, "), got ", t.sizes());
  TORCH_CHECK_VALUE(t.is_contiguous(), "mmrprune::cpu_select: ", name, " must be contiguous (call .contiguous())");
}

at::Tensor cpu_select(const at::Tensor& rows, const at::Tensor& importance, const std::optional<at::Tensor>& quality,
                      const at::Tensor& starts, const at::Tensor& lengths, const at::Tensor& ks, int64_t k_max,
                      std::string_view method, double lam, double pivot_ratio, double alpha, double tau,
                      int64_t radius, int64_t grid_w, std::string_view isa) {
  TORCH_CHECK_VALUE(rows.device().is_cpu(), "mmrprune::cpu_select: rows must be a CPU tensor, got device ",
                    rows.device());
  const DType dtype = dtype_of(rows);
  TORCH_CHECK_VALUE(rows.dim() == 2, "mmrprune::cpu_select: rows must be 2-D [rows, dim], got shape ",
                    rows.sizes());
  TORCH_CHECK_VALUE(rows.is_contiguous(), "mmrprune::cpu_select: rows must be contiguous (call .contiguous())");
  const Method m = method_of(method);
  const int64_t n_rows = rows.size(0), bsz = starts.numel();
  // scores in the compute type: float64 for float64 rows, float32 otherwise
  const auto compute = dtype == DType::F64 ? at::kDouble : at::kFloat;
  const char* per_row = "one per row of rows, in the compute dtype";
  check_vector(importance, "importance", compute, n_rows, per_row);
  if (quality) check_vector(*quality, "quality", compute, n_rows, per_row);
  TORCH_CHECK_VALUE(quality || m != Method::DPP, "mmrprune::cpu_select: method 'dpp' needs quality");
  check_vector(starts, "starts", at::kLong, bsz, "one per image");
  check_vector(lengths, "lengths", at::kLong, bsz, "one per image, as starts");
  check_vector(ks, "ks", at::kLong, bsz, "one per image, as starts");
  TORCH_CHECK_VALUE(k_max >= 0, "mmrprune::cpu_select: k_max must be >= 0, got ", k_max);

  at::Tensor out = at::empty({bsz, k_max}, rows.options().dtype(at::kLong));
  const std::string isa_name(isa);
  SelectArgs a{};
  a.rows = rows.data_ptr();
  a.dtype = dtype;
  a.total_rows = n_rows;
  a.dim = rows.size(1);
  a.starts = starts.data_ptr<int64_t>();
  a.lengths = lengths.data_ptr<int64_t>();
  a.ks = ks.data_ptr<int64_t>();
  a.batch = bsz;
  a.k_max = k_max;
  a.importance = importance.data_ptr();
  a.quality = quality ? quality->data_ptr() : nullptr;
  a.method = m;
  a.lam = lam;
  a.pivot_ratio = pivot_ratio;
  a.alpha = alpha;
  a.tau = tau;
  a.radius = radius;
  a.grid_w = grid_w;
  a.num_threads = at::get_num_threads();  // torch's intra-op threads (torch.set_num_threads)
  a.isa = isa_name.empty() ? nullptr : isa_name.c_str();
  a.out = out.data_ptr<int64_t>();
  try {
    select_batch(a);
  } catch (const std::invalid_argument& e) {
    TORCH_CHECK_VALUE(false, e.what());
  }
  return out;
}

}  // namespace

// Called by the module's init (module.cpp), not run as a static initializer: a signature that does
// not match the schema in mmrprune/ops.py (a stale build) fails the import with the dispatcher's
// message instead of aborting the process.
void register_cpu_select() {
  static std::unique_ptr<torch::Library> lib;
  if (lib) return;
  auto l = std::make_unique<torch::Library>(torch::Library::IMPL, "mmrprune", std::make_optional(c10::DispatchKey::CPU),
                                            __FILE__, __LINE__);
  l->impl("cpu_select", &cpu_select);
  lib = std::move(l);  // kept for the process's lifetime: dropping it would unregister the kernel
}

}  // namespace mmrprune
