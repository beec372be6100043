// pybind11 module mmrprune._cpu: the C++ CPU backend.
//
// No torch headers: Python passes data pointers (tensor.data_ptr()), shapes and
// a dtype code, and owns every buffer (mmrprune/ops.py checks dtypes, devices
// and contiguity before calling in).
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

#include "dots.h"
#include "select.h"

namespace py = pybind11;
using namespace mmrprune;

static void select_py(uintptr_t rows, int dtype, int64_t total_rows, int64_t dim, uintptr_t starts,
                      uintptr_t lengths, uintptr_t ks, int64_t batch, int64_t k_max, uintptr_t importance,
                      uintptr_t quality, int method, double lam, double pivot_ratio, double alpha, double tau,
                      int64_t radius, int64_t grid_w, int num_threads, uintptr_t out, const std::string& isa) {
  SelectArgs a{};
  a.rows = reinterpret_cast<const void*>(rows);
  a.dtype = static_cast<DType>(dtype);
  a.total_rows = total_rows;
  a.dim = dim;
  a.starts = reinterpret_cast<const int64_t*>(starts);
  a.lengths = reinterpret_cast<const int64_t*>(lengths);
  a.ks = reinterpret_cast<const int64_t*>(ks);
  a.batch = batch;
  a.k_max = k_max;
  a.importance = reinterpret_cast<const void*>(importance);
  a.quality = reinterpret_cast<const void*>(quality);
  a.method = static_cast<Method>(method);
  a.lam = lam;
  a.pivot_ratio = pivot_ratio;
  a.alpha = alpha;
  a.tau = tau;
  a.radius = radius;
  a.grid_w = grid_w;
  a.num_threads = num_threads;
  a.isa = isa.empty() ? nullptr : isa.c_str();
  a.out = reinterpret_cast<int64_t*>(out);
  py::gil_scoped_release no_gil;  // pure C++ from here on; lets other Python threads run
  select_batch(a);
}

PYBIND11_MODULE(_cpu, m) {
  m.doc() = "mmrprune C++ CPU backend (greedy token selection over a segment-form batch)";
  m.def("select", &select_py, py::arg("rows"), py::arg("dtype"), py::arg("total_rows"), py::arg("dim"),
        py::arg("starts"), py::arg("lengths"), py::arg("ks"), py::arg("batch"), py::arg("k_max"),
        py::arg("importance"), py::arg("quality"), py::arg("method"), py::arg("lam"), py::arg("pivot_ratio"),
        py::arg("alpha"), py::arg("tau"), py::arg("radius"), py::arg("grid_w"), py::arg("num_threads"),
        py::arg("out"), py::arg("isa") = "",
        "Run the selection; every pointer is a raw address owned by the caller.  Writes out [batch, k_max].");
  m.def(
      "divprune_first_step",
      [](uintptr_t xn, bool f64, int64_t n, int64_t dim, int num_threads, uintptr_t best, const std::string& isa) {
        py::gil_scoped_release no_gil;
        return divprune_first_step(reinterpret_cast<const void*>(xn), f64, n, dim, num_threads,
                                   isa.empty() ? nullptr : isa.c_str(), reinterpret_cast<void*>(best));
      },
      py::arg("xn"), py::arg("f64"), py::arg("n"), py::arg("dim"), py::arg("num_threads"), py::arg("best"),
      py::arg("isa") = "",
      "Test hook: DivPrune step 1 on normalised rows [n, dim]; fills best[i] = max_{j != i} sim(i, j) (full "
      "tiled pass) and returns the pruned search's first pick.");
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
  // The codes Python passes for `method` and `dtype`, read from the enums themselves so that
  // mmrprune/ops.py never keeps its own copy of the numbering.
  py::dict methods;
  methods["mmr"] = static_cast<int>(Method::MMR);
  methods["divprune"] = static_cast<int>(Method::DIVPRUNE);
  methods["topk"] = static_cast<int>(Method::TOPK);
  methods["fps"] = static_cast<int>(Method::FPS);
  methods["hybrid"] = static_cast<int>(Method::HYBRID);
  methods["dpp"] = static_cast<int>(Method::DPP);
  methods["d2pruner"] = static_cast<int>(Method::D2PRUNER);
  m.attr("METHOD_CODES") = methods;
  py::dict dtypes;
  dtypes["float32"] = static_cast<int>(DType::F32);
  dtypes["float64"] = static_cast<int>(DType::F64);
  dtypes["float16"] = static_cast<int>(DType::F16);
  dtypes["bfloat16"] = static_cast<int>(DType::BF16);
  m.attr("DTYPE_CODES") = dtypes;
}
