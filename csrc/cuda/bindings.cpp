// pybind11 module `mmrprune._cuda`: raw-pointer entry points of the fused greedy kernels.
//
// Python passes device pointers as ints (tensor.data_ptr()), shapes, a dtype code
// (0 float32, 1 float16, 2 bfloat16) and the CUDA stream as an int
// (torch.cuda.current_stream().cuda_stream).  Nothing here synchronises.
// Argument errors raise ValueError (std::invalid_argument), CUDA errors RuntimeError.
// Each entry point checks its arguments while packing them into the parameter structs of
// greedy.h (Features / GramRows, Segments, MaxSimState / DppState) the launchers take.
// No torch headers: mmrprune/backends/cuda_backend.py owns the tensors.

#include <pybind11/pybind11.h>

#include <climits>
#include <cmath>
#include <cstdint>
#include <sstream>
#include <stdexcept>
#include <string>

#include "greedy.h"
#include "prepare.h"

namespace py = pybind11;
using mmrprune_cuda::DType;

#define MMRPRUNE_CHECK(cond, ...)                                                   \
  do {                                                                              \
    if (!(cond)) {                                                                  \
      std::ostringstream mmrprune_msg_;                                             \
      mmrprune_msg_ << "mmrprune._cuda: " << __VA_ARGS__ << " (failed: " #cond ")"; \
      throw std::invalid_argument(mmrprune_msg_.str());                             \
    }                                                                               \
  } while (0)

#define CHECK_PTR(p) MMRPRUNE_CHECK((p) != 0, #p " must be a non-null device pointer")
#define CHECK_ALIGNED(p, bytes) \
  MMRPRUNE_CHECK((p) % (bytes) == 0, #p " must be " << (bytes) << "-byte aligned, got address " << (p))
#define CHECK_NONNEG(v) MMRPRUNE_CHECK((v) >= 0, #v " must be >= 0, got " << (v))
#define CHECK_DTYPE(code)                                                                          \
  MMRPRUNE_CHECK((code) == mmrprune_cuda::kFloat32 || (code) == mmrprune_cuda::kFloat16 ||         \
                     (code) == mmrprune_cuda::kBFloat16,                                          \
                 "dtype code must be 0 (float32), 1 (float16) or 2 (bfloat16), got " << (code))

namespace {

std::int64_t elem_size(int dtype) { return dtype == mmrprune_cuda::kFloat32 ? 4 : 2; }

void raise_if_failed(const std::string& err) {
  if (!err.empty()) throw std::runtime_error("mmrprune._cuda: " + err);
}

using mmrprune_cuda::DppState;
using mmrprune_cuda::Features;
using mmrprune_cuda::GramRows;
using mmrprune_cuda::MaxSimState;
using mmrprune_cuda::Segments;

Features check_features(std::uintptr_t x, int dtype, std::int64_t rows, std::int64_t dim) {
  CHECK_DTYPE(dtype);
  CHECK_PTR(x);
  CHECK_ALIGNED(x, elem_size(dtype));
  CHECK_NONNEG(rows);
  MMRPRUNE_CHECK(rows <= INT_MAX, "rows must fit in int32 (local token indices are int32), got " << rows);
  MMRPRUNE_CHECK(dim >= 1, "dim must be >= 1, got " << dim);
  Features f;
  f.x = x;
  f.dtype = dtype;
  f.rows = rows;
  f.dim = dim;
  return f;
}

Segments check_segments(std::uintptr_t starts, std::uintptr_t lengths, std::uintptr_t ks, std::int64_t batch,
                        std::int64_t k_max, std::uintptr_t taken, std::uintptr_t out, std::uintptr_t stream) {
  CHECK_NONNEG(batch);
  MMRPRUNE_CHECK(batch <= INT_MAX, "batch must fit in one grid dimension (<= 2^31 - 1), got " << batch);
  CHECK_NONNEG(k_max);
  for (std::uintptr_t p : {starts, lengths, ks, out}) {
    MMRPRUNE_CHECK(p != 0, "starts, lengths, ks and out must be non-null device pointers");
    MMRPRUNE_CHECK(p % 8 == 0, "starts, lengths, ks and out are int64 and must be 8-byte aligned");
  }
  CHECK_PTR(taken);
  Segments seg;
  seg.starts = starts;
  seg.lengths = lengths;
  seg.ks = ks;
  seg.batch = batch;
  seg.k_max = k_max;
  seg.out = out;
  seg.stream = stream;
  return seg;
}

// The maxsim kernels' float32 inputs and scratch (row-mode and Gram-mode launches alike).
MaxSimState check_maxsim_state(std::uintptr_t inv_norm, std::uintptr_t imp, std::uintptr_t first_score,
                               std::uintptr_t eligible, double lam, std::uintptr_t m_scratch,
                               std::uintptr_t taken_scratch, std::uintptr_t rounds, int max_round) {
  MMRPRUNE_CHECK(std::isfinite(lam) && lam >= 0.0 && lam <= 1.0, "lam must be in [0, 1], got " << lam);
  CHECK_PTR(inv_norm);
  CHECK_PTR(imp);
  CHECK_PTR(m_scratch);
  for (std::uintptr_t p : {inv_norm, imp, first_score, m_scratch})
    MMRPRUNE_CHECK(p % 4 == 0, "inv_norm, imp, first_score and m_scratch are float32 and must be 4-byte aligned");
  MaxSimState st;
  st.inv_norm = inv_norm;
  st.imp = imp;
  st.first_score = first_score;
  st.eligible = eligible;
  st.lam = lam;
  st.m_scratch = m_scratch;
  st.taken_scratch = taken_scratch;
  MMRPRUNE_CHECK(max_round >= 1 && max_round <= mmrprune_cuda::kMaxRound,
                 "max_round must be in [1, " << mmrprune_cuda::kMaxRound << "], got " << max_round);
  CHECK_ALIGNED(rounds, 8);  // 0 (no output) passes
  st.rounds = rounds;
  st.max_round = max_round;
  return st;
}

// The DPP kernels' float32 inputs and scratch (row-mode and Gram-mode launches alike).
DppState check_dpp_state(std::uintptr_t inv_norm, std::uintptr_t sqn, std::uintptr_t q, std::uintptr_t d2_scratch,
                         std::uintptr_t taken_scratch, std::uintptr_t c_scratch) {
  CHECK_PTR(inv_norm);
  CHECK_PTR(sqn);
  CHECK_PTR(q);
  CHECK_PTR(d2_scratch);
  CHECK_PTR(c_scratch);
  for (std::uintptr_t p : {inv_norm, sqn, q, d2_scratch, c_scratch})
    MMRPRUNE_CHECK(p % 4 == 0, "inv_norm, sqn, q, d2_scratch and c_scratch are float32 and must be 4-byte aligned");
  DppState st;
  st.inv_norm = inv_norm;
  st.sqn = sqn;
  st.q = q;
  st.d2_scratch = d2_scratch;
  st.taken_scratch = taken_scratch;
  st.c_scratch = c_scratch;
  return st;
}

GramRows check_gram(std::uintptr_t gram, std::int64_t ld, std::int64_t batch) {
  CHECK_PTR(gram);
  CHECK_ALIGNED(gram, 4);
  MMRPRUNE_CHECK(ld >= 1, "ld (the Gram's padded image length) must be >= 1, got " << ld);
  MMRPRUNE_CHECK(ld <= INT_MAX, "ld must fit in int32 (local token indices are int32), got " << ld);
  MMRPRUNE_CHECK(batch <= 0 || ld <= INT64_MAX / ld / batch, "batch * ld * ld overflows int64");
  GramRows g;
  g.gram = gram;
  g.ld = ld;
  return g;
}

// Python entry points: keyword arguments in, checked parameter structs to the launchers.
// The checks run in the same order as the launch's arguments are listed.

void inv_norms(std::uintptr_t x, int dtype, std::int64_t rows, std::int64_t dim, std::uintptr_t inv_norm,
               std::uintptr_t sqn, std::uintptr_t stream) {
  const Features f = check_features(x, dtype, rows, dim);
  CHECK_PTR(inv_norm);
  CHECK_ALIGNED(inv_norm, 4);
  CHECK_ALIGNED(sqn, 4);  // 0 (no output) passes
  raise_if_failed(mmrprune_cuda::launch_inv_norms(f, inv_norm, sqn, stream));
}

void greedy_maxsim(std::uintptr_t x, int dtype, std::int64_t rows, std::int64_t dim, std::uintptr_t inv_norm,
                   std::uintptr_t imp, std::uintptr_t first_score, std::uintptr_t eligible, std::uintptr_t starts,
                   std::uintptr_t lengths, std::uintptr_t ks, std::int64_t batch, std::int64_t k_max, double lam,
                   std::uintptr_t m_scratch, std::uintptr_t taken_scratch, std::uintptr_t out,
                   std::uintptr_t rounds, int max_round, std::uintptr_t stream) {
  const Features f = check_features(x, dtype, rows, dim);
  const Segments seg = check_segments(starts, lengths, ks, batch, k_max, taken_scratch, out, stream);
  const MaxSimState st = check_maxsim_state(inv_norm, imp, first_score, eligible, lam, m_scratch, taken_scratch,
                                            rounds, max_round);
  raise_if_failed(mmrprune_cuda::launch_greedy_maxsim(f, st, seg));
}

void greedy_dpp(std::uintptr_t x, int dtype, std::int64_t rows, std::int64_t dim, std::uintptr_t inv_norm,
                std::uintptr_t sqn, std::uintptr_t q, std::uintptr_t starts, std::uintptr_t lengths,
                std::uintptr_t ks, std::int64_t batch, std::int64_t k_max, std::uintptr_t d2_scratch,
                std::uintptr_t taken_scratch, std::uintptr_t c_scratch, std::uintptr_t out, std::uintptr_t stream) {
  const Features f = check_features(x, dtype, rows, dim);
  const Segments seg = check_segments(starts, lengths, ks, batch, k_max, taken_scratch, out, stream);
  const DppState st = check_dpp_state(inv_norm, sqn, q, d2_scratch, taken_scratch, c_scratch);
  raise_if_failed(mmrprune_cuda::launch_greedy_dpp(f, st, seg));
}

void greedy_maxsim_gram(std::uintptr_t gram, std::int64_t ld, std::uintptr_t inv_norm, std::uintptr_t imp,
                        std::uintptr_t first_score, std::uintptr_t eligible, std::uintptr_t starts,
                        std::uintptr_t lengths, std::uintptr_t ks, std::int64_t batch, std::int64_t k_max,
                        double lam, std::uintptr_t m_scratch, std::uintptr_t taken_scratch, std::uintptr_t out,
                        std::uintptr_t rounds, int max_round, int smem_state, std::uintptr_t stream) {
  const Segments seg = check_segments(starts, lengths, ks, batch, k_max, taken_scratch, out, stream);
  const GramRows g = check_gram(gram, ld, batch);
  const MaxSimState st = check_maxsim_state(inv_norm, imp, first_score, eligible, lam, m_scratch, taken_scratch,
                                            rounds, max_round);
  MMRPRUNE_CHECK(smem_state >= -1 && smem_state <= 1, "smem_state must be -1, 0 or 1, got " << smem_state);
  raise_if_failed(mmrprune_cuda::launch_greedy_maxsim_gram(g, st, seg, smem_state));
}

void greedy_dpp_gram(std::uintptr_t gram, std::int64_t ld, std::uintptr_t inv_norm, std::uintptr_t sqn,
                     std::uintptr_t q, std::uintptr_t starts, std::uintptr_t lengths, std::uintptr_t ks,
                     std::int64_t batch, std::int64_t k_max, std::uintptr_t d2_scratch,
                     std::uintptr_t taken_scratch, std::uintptr_t c_scratch, std::uintptr_t out,
                     std::uintptr_t stream) {
  const Segments seg = check_segments(starts, lengths, ks, batch, k_max, taken_scratch, out, stream);
  const GramRows g = check_gram(gram, ld, batch);
  const DppState st = check_dpp_state(inv_norm, sqn, q, d2_scratch, taken_scratch, c_scratch);
  raise_if_failed(mmrprune_cuda::launch_greedy_dpp_gram(g, st, seg));
}

void prepare(std::uintptr_t starts, std::uintptr_t lengths, std::int64_t batch, std::uintptr_t gram,
             std::int64_t ld, std::int64_t width, std::uintptr_t inv_norm, std::uintptr_t sqn, std::uintptr_t weights,
             std::uintptr_t score, int score_kind, std::uintptr_t stream, std::uintptr_t ks, double lam,
             std::uintptr_t eligible, std::uintptr_t first_score) {
  CHECK_NONNEG(batch);
  MMRPRUNE_CHECK(batch <= INT_MAX, "batch must fit in one grid dimension (<= 2^31 - 1), got " << batch);
  for (std::uintptr_t p : {starts, lengths}) {
    MMRPRUNE_CHECK(p != 0, "starts and lengths must be non-null device pointers");
    MMRPRUNE_CHECK(p % 8 == 0, "starts and lengths are int64 and must be 8-byte aligned");
  }
  MMRPRUNE_CHECK(score_kind >= mmrprune_cuda::kScoreKeep && score_kind <= mmrprune_cuda::kScoreDivPrune,
                 "score_kind must be in [0, 5], got " << score_kind);
  if (score_kind == mmrprune_cuda::kScoreImpPool) {
    MMRPRUNE_CHECK(ks != 0 && ks % 8 == 0, "the hybrid pool needs ks, a non-null 8-byte aligned int64 pointer");
    CHECK_PTR(eligible);
    MMRPRUNE_CHECK(lam >= 0.0 && lam <= 1.0, "lam must be in [0, 1], got " << lam);
  }
  if (score_kind == mmrprune_cuda::kScoreDivPrune) {
    MMRPRUNE_CHECK(gram != 0, "DivPrune's first score from the Gram needs the Gram");
    CHECK_PTR(first_score);
    MMRPRUNE_CHECK(first_score % 4 == 0, "first_score is float32 and must be 4-byte aligned");
  }
  mmrprune_cuda::PrepareParams p;
  CHECK_NONNEG(width);
  if (gram != 0) {
    p.ld = check_gram(gram, ld, batch).ld;
    CHECK_PTR(inv_norm);
    MMRPRUNE_CHECK(width == 0 || width == ld, "padded rows are as wide as the Gram: width " << width << ", ld " << ld);
  }
  if (score_kind != mmrprune_cuda::kScoreKeep) CHECK_PTR(score);
  for (std::uintptr_t q : {gram, inv_norm, sqn, weights, score})
    MMRPRUNE_CHECK(q % 4 == 0, "gram, inv_norm, sqn, weights and score are float32 and must be 4-byte aligned");
  p.starts = starts;
  p.lengths = lengths;
  p.batch = batch;
  p.gram = gram;
  p.width = width;
  p.inv_norm = inv_norm;
  p.sqn = sqn;
  p.weights = weights;
  p.score = score;
  p.score_kind = score_kind;
  p.ks = ks;
  p.lam = lam;
  p.eligible = eligible;
  p.first_score = first_score;
  p.stream = stream;
  raise_if_failed(mmrprune_cuda::launch_prepare(p));
}

}  // namespace

// The same source is also built as mmrprune._cuda_emu (kernels on the CPU emulator, csrc/emu/).
#ifndef MMRPRUNE_CUDA_MODULE
#define MMRPRUNE_CUDA_MODULE _cuda
#endif

PYBIND11_MODULE(MMRPRUNE_CUDA_MODULE, m) {
  m.doc() = "mmrprune fused CUDA greedy selection (raw device pointers; see csrc/cuda/NOTES.md)";
  m.attr("DTYPE_FLOAT32") = static_cast<int>(mmrprune_cuda::kFloat32);
  m.attr("DTYPE_FLOAT16") = static_cast<int>(mmrprune_cuda::kFloat16);
  m.attr("DTYPE_BFLOAT16") = static_cast<int>(mmrprune_cuda::kBFloat16);
  m.attr("GREEDY_THREADS") = mmrprune_cuda::kGreedyThreads;
  m.attr("MAX_ROUND") = mmrprune_cuda::kMaxRound;

  m.attr("SCORE_KEEP") = static_cast<int>(mmrprune_cuda::kScoreKeep);
  m.attr("SCORE_IMP") = static_cast<int>(mmrprune_cuda::kScoreImp);
  m.attr("SCORE_QUALITY") = static_cast<int>(mmrprune_cuda::kScoreQuality);
  m.attr("SCORE_ZERO") = static_cast<int>(mmrprune_cuda::kScoreZero);
  m.def("prepare", &prepare, py::arg("starts"), py::arg("lengths"), py::arg("batch"), py::arg("gram"),
        py::arg("ld"), py::arg("width"), py::arg("inv_norm"), py::arg("sqn"), py::arg("weights"),
        py::arg("score"), py::arg("score_kind"), py::arg("stream"), py::arg("ks") = 0, py::arg("lam") = 0.0,
        py::arg("eligible") = 0, py::arg("first_score") = 0,
        "one launch: inverse norms from the Gram diagonal, the per-row scores from raw importance, "
        "the hybrid pool or DivPrune's first score");
  m.def("smem_bytes", &mmrprune_cuda::greedy_smem_bytes, py::arg("dim"),
        "dynamic shared memory (bytes) of the greedy kernels for feature dim `dim`");
  m.def("inv_norms", &inv_norms, py::arg("x"), py::arg("dtype"), py::arg("rows"), py::arg("dim"),
        py::arg("inv_norm"), py::arg("sqn"), py::arg("stream"),
        "inv_norm[r] = 1/max(||x_r||, 1e-12) (fp32); sqn[r] = ||x̂_r||^2 when sqn != 0");
  m.def("greedy_maxsim", &greedy_maxsim, py::arg("x"), py::arg("dtype"), py::arg("rows"), py::arg("dim"),
        py::arg("inv_norm"), py::arg("imp"), py::arg("first_score"), py::arg("eligible"), py::arg("starts"),
        py::arg("lengths"), py::arg("ks"), py::arg("batch"), py::arg("k_max"), py::arg("lam"),
        py::arg("m_scratch"), py::arg("taken_scratch"), py::arg("out"), py::arg("rounds"), py::arg("max_round"),
        py::arg("stream"), "MMR / FPS / hybrid / DivPrune greedy in exact rounds, one block per image, one launch");
  m.def("gram_state_smem_bytes", &mmrprune_cuda::gram_state_smem_bytes, py::arg("ld"),
        "dynamic shared memory (bytes) of the Gram-mode maxsim kernel's token state for padded length `ld`");
  m.def("greedy_maxsim_gram", &greedy_maxsim_gram, py::arg("gram"), py::arg("ld"), py::arg("inv_norm"),
        py::arg("imp"), py::arg("first_score"), py::arg("eligible"), py::arg("starts"), py::arg("lengths"),
        py::arg("ks"), py::arg("batch"), py::arg("k_max"), py::arg("lam"), py::arg("m_scratch"),
        py::arg("taken_scratch"), py::arg("out"), py::arg("rounds"), py::arg("max_round"), py::arg("smem_state"),
        py::arg("stream"),
        "MMR / FPS / hybrid / DivPrune greedy, similarity rows read from a precomputed fp32 Gram [B, ld, ld]");
  m.def("greedy_dpp_gram", &greedy_dpp_gram, py::arg("gram"), py::arg("ld"), py::arg("inv_norm"), py::arg("sqn"),
        py::arg("q"), py::arg("starts"), py::arg("lengths"), py::arg("ks"), py::arg("batch"), py::arg("k_max"),
        py::arg("d2_scratch"), py::arg("taken_scratch"), py::arg("c_scratch"), py::arg("out"), py::arg("stream"),
        "conditional-DPP greedy MAP, similarity rows read from a precomputed fp32 Gram [B, ld, ld]");
  m.def("greedy_dpp", &greedy_dpp, py::arg("x"), py::arg("dtype"), py::arg("rows"), py::arg("dim"),
        py::arg("inv_norm"), py::arg("sqn"), py::arg("q"), py::arg("starts"), py::arg("lengths"), py::arg("ks"),
        py::arg("batch"), py::arg("k_max"), py::arg("d2_scratch"), py::arg("taken_scratch"), py::arg("c_scratch"),
        py::arg("out"), py::arg("stream"), "conditional-DPP greedy MAP, one block per image, one launch");
}
