// pybind11 module mmrprune._cpu: the C++ CPU backend's library and its helpers.
//
// Importing it registers the CPU implementation of the op mmrprune::cpu_select (op.cpp; the
// schema and fake are in mmrprune/ops.py).  What is here is not on the selection path: the
// SIMD kernel set, the scratch cache, the method names, a test hook.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "dots.h"
#include "op.h"
#include "select.h"

namespace py = pybind11;
using namespace mmrprune;

namespace {

template <class T>
int64_t first_step(py::array_t<T, py::array::c_style> xn, py::array_t<T, py::array::c_style> best, int threads,
                   const std::string& isa) {
  if (xn.ndim() != 2 || best.ndim() != 1 || best.shape(0) != xn.shape(0))
    throw std::invalid_argument("divprune_first_step: xn must be [n, dim] and best [n], of one dtype");
  const int64_t n = xn.shape(0), dim = xn.shape(1);
  const T* x = xn.data();
  T* out = best.mutable_data();
  py::gil_scoped_release no_gil;
  return divprune_first_step(x, sizeof(T) == 8, n, dim, threads, isa.empty() ? nullptr : isa.c_str(), out);
}

}  // namespace

PYBIND11_MODULE(_cpu, m) {
  register_cpu_select();  // a failure is the import's error (ImportError)
  m.doc() = "mmrprune C++ CPU backend (greedy token selection over a segment-form batch)";
  // float64 first, so that a float64 array is not converted to float32
  m.def("divprune_first_step", &first_step<double>, py::arg("xn").noconvert(), py::arg("best").noconvert(),
        py::arg("num_threads"), py::arg("isa") = "");
  m.def("divprune_first_step", &first_step<float>, py::arg("xn").noconvert(), py::arg("best").noconvert(),
        py::arg("num_threads"), py::arg("isa") = "",
        "Test hook: DivPrune step 1 on normalised rows xn [n, dim] (float32 or float64, C order); fills "
        "best[i] = max_{j != i} sim(i, j) (full tiled pass) and returns the pruned search's first pick.");
  m.def("scratch_bytes", &scratch_bytes, "Bytes of row scratch kept between calls (at most SCRATCH_CACHE_LIMIT)");
  m.def("release_scratch", &release_scratch, "Free the row scratch kept between calls; returns the bytes freed");
  m.attr("SCRATCH_CACHE_LIMIT") = SCRATCH_CACHE_LIMIT;
  m.attr("SCRATCH_ALIGN") = SCRATCH_ALIGN;
  m.def("isa", [] { return std::string(dot_kernels().isa); }, "SIMD kernels chosen for this CPU at load time");
  m.def("isa_supported", [](const std::string& isa) {
    try {
      dot_kernels_for(isa.c_str());
      return true;
    } catch (const std::invalid_argument&) {
      return false;
    }
  });
  // The method names mmrprune::cpu_select takes (mmrprune/ops.py compares them with the package's).
  py::dict methods;
  for (const auto& [name, code] : kMethodNames) methods[py::str(std::string(name))] = static_cast<int>(code);
  m.attr("METHOD_CODES") = methods;
  py::dict dtypes;
  dtypes["float32"] = static_cast<int>(DType::F32);
  dtypes["float64"] = static_cast<int>(DType::F64);
  dtypes["float16"] = static_cast<int>(DType::F16);
  dtypes["bfloat16"] = static_cast<int>(DType::BF16);
  m.attr("DTYPE_CODES") = dtypes;
}
