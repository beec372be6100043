// The fused greedy family as torch ops: mmrprune::fused_greedy (prepare kernel, then the Gram- or
// row-mode greedy kernel; score_kind 'topk': the prepare kernel alone writes the picks) and
// mmrprune::_fused_prepare (the prepare kernel alone, for tests and the emulator harness).
// Schemas and fakes: mmrprune/ops.py.
//
// Tensors in, checked here once with TORCH_CHECK naming the argument; outputs and scratch from
// at::empty on the input's device; the parameter structs of greedy.h / prepare.h filled once;
// every kernel enqueued on torch's current stream, nothing synchronised.  The kernels themselves
// (greedy.cu, prepare.cu) include no torch header, so CI compiles them without torch's CUDA build.
//
// One source, two builds (setup.py): mmrprune._cuda registers these ops for CUDA tensors;
// mmrprune._cuda_emu (the emulator build, MMRPRUNE_CUDA_MODULE defined) registers them for CPU
// tensors, the same host code driving the emulated kernels (csrc/emu).  Registered when the module
// is imported (mmrprune_register_fused_ops).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <torch/library.h>

#include <climits>
#include <cmath>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <tuple>

#include "greedy.h"
#include "prepare.h"

namespace mc = mmrprune_cuda;
using at::Tensor;
using OptTensor = std::optional<Tensor>;

namespace {

#ifdef MMRPRUNE_CUDA_MODULE  // only the emulator build names the module (build_flags.EMU_MODULE_DEFINE)
constexpr bool kEmulator = true;
#define MMRPRUNE_DISPATCH_KEY CPU
#else
constexpr bool kEmulator = false;
#define MMRPRUNE_DISPATCH_KEY CUDA
#endif
constexpr c10::DeviceType kDevice = kEmulator ? c10::DeviceType::CPU : c10::DeviceType::CUDA;

std::uintptr_t addr(const Tensor& t) { return reinterpret_cast<std::uintptr_t>(t.data_ptr()); }
std::uintptr_t addr(const OptTensor& t) { return t ? addr(*t) : 0; }

// torch's current stream of the input's device, without libc10_cuda (the CPU torch wheel has no
// such library, and the module must link against it): the CUDA guard implementation that
// libc10_cuda registers in libc10 at run time hands out the cudaStream_t.
std::uintptr_t current_stream(const c10::Device& device) {
  if constexpr (kEmulator) return 0;
  const auto* impl = c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA);
  return reinterpret_cast<std::uintptr_t>(impl->getStreamNativeHandle(impl->getStream(device)));
}

void launched(const std::string& err) { TORCH_CHECK(err.empty(), "mmrprune::fused_greedy: ", err); }

// A contiguous tensor of `dtype` on the rows' device, 1-D of `length` entries (length < 0: any shape).
void check_tensor(const Tensor& t, const char* name, at::ScalarType dtype, int64_t length, const Tensor& rows) {
  TORCH_CHECK_VALUE(t.device() == rows.device(), "mmrprune::fused_greedy: ", name, " must be on ", rows.device(),
                    " as rows, got ", t.device());
  TORCH_CHECK_TYPE(t.scalar_type() == dtype, "mmrprune::fused_greedy: ", name, " must be ", dtype, ", got ",
                   t.scalar_type());
  TORCH_CHECK_VALUE(length < 0 || (t.dim() == 1 && t.size(0) == length), "mmrprune::fused_greedy: ", name,
                    " must have shape [", length, "], got ", t.sizes());
  TORCH_CHECK_VALUE(t.is_contiguous(), "mmrprune::fused_greedy: ", name, " must be contiguous (call .contiguous())");
}

void check_optional(const OptTensor& t, const char* name, at::ScalarType dtype, int64_t length, const Tensor& rows) {
  if (t) check_tensor(*t, name, dtype, length, rows);
}

mc::ScoreKind score_kind_of(std::string_view kind) {
  std::string names;
  for (const auto& k : mc::kScoreKindNames) {
    if (kind == k.name) return k.kind;
    names += (names.empty() ? "'" : ", '") + std::string(k.name) + "'";
  }
  TORCH_CHECK_VALUE(false, "mmrprune::fused_greedy: score_kind must be one of ", names, ", got '", kind, "'");
}

int dtype_code(const Tensor& rows) {
  switch (rows.scalar_type()) {
    case at::kFloat: return mc::kFloat32;
    case at::kHalf: return mc::kFloat16;
    case at::kBFloat16: return mc::kBFloat16;
    default:
      TORCH_CHECK_TYPE(false, "mmrprune::fused_greedy: rows must be float16, bfloat16 or float32 (float64 runs on "
                       "the torch backend), got ", rows.scalar_type());
  }
}

// The arguments every op of the family shares: rows [R, D] and the segments [B], checked.
struct Batch {
  int64_t n_rows, dim, bsz;
};

Batch check_batch(const Tensor& rows, const Tensor& starts, const Tensor& lengths, int64_t width) {
  TORCH_CHECK_VALUE(rows.device().type() == kDevice, "mmrprune::fused_greedy: rows must be a ",
                    c10::DeviceTypeName(kDevice, true), " tensor in module mmrprune.",
                    kEmulator ? "_cuda_emu" : "_cuda", ", got device ", rows.device());
  dtype_code(rows);
  TORCH_CHECK_VALUE(rows.dim() == 2 && rows.size(1) >= 1, "mmrprune::fused_greedy: rows must be 2-D [rows, dim] "
                    "with dim >= 1, got shape ", rows.sizes());
  TORCH_CHECK_VALUE(rows.is_contiguous(), "mmrprune::fused_greedy: rows must be contiguous (call .contiguous())");
  const Batch b{rows.size(0), rows.size(1), starts.numel()};
  TORCH_CHECK_VALUE(b.n_rows <= INT_MAX, "mmrprune::fused_greedy: rows must fit in int32 (local token indices are "
                    "int32), got ", b.n_rows);
  TORCH_CHECK_VALUE(b.bsz <= INT_MAX, "mmrprune::fused_greedy: batch must fit in one grid dimension (<= 2^31 - 1), "
                    "got ", b.bsz);
  check_tensor(starts, "starts", at::kLong, b.bsz, rows);
  check_tensor(lengths, "lengths", at::kLong, b.bsz, rows);
  TORCH_CHECK_VALUE(width >= 0, "mmrprune::fused_greedy: width must be >= 0, got ", width);
  TORCH_CHECK_VALUE(width == 0 || width * b.bsz == b.n_rows, "mmrprune::fused_greedy: padded rows must be [B * width = ",
                    width * b.bsz, "], got ", b.n_rows);
  return b;
}

// gram [B, ld, ld] fp32 (Gram mode), as wide as padded rows.
int64_t check_gram(const OptTensor& gram, const Batch& b, int64_t width, const Tensor& rows) {
  if (!gram) return 0;
  check_tensor(*gram, "gram", at::kFloat, -1, rows);
  const int64_t ld = gram->dim() == 3 ? gram->size(1) : 0;
  TORCH_CHECK_VALUE(gram->dim() == 3 && gram->size(0) == b.bsz && gram->size(2) == ld && ld >= 1,
                    "mmrprune::fused_greedy: gram must be [B=", b.bsz, ", n_max, n_max] with n_max >= 1, got ",
                    gram->sizes());
  TORCH_CHECK_VALUE(ld <= INT_MAX, "mmrprune::fused_greedy: the Gram's width must fit in int32, got ", ld);
  TORCH_CHECK_VALUE(width == 0 || width == ld, "mmrprune::fused_greedy: padded rows of width ", width,
                    " need a Gram of that width, got ", gram->sizes());
  return ld;
}

struct Prepared {
  Tensor score, inv_norm, sqn, eligible, first_score;  // undefined where the prepare kernel wrote nothing
};

// kScoreTopk's outputs, the op's own (the other kinds leave them to the greedy kernel).
struct TopkOut {
  std::uintptr_t out = 0, rounds = 0;
  int64_t k_max = 0;
};

// What the two score kinds that read more than the weights need: the hybrid pool's budgets and
// lam; DivPrune's first score reads the Gram and the norms the kernel takes from its diagonal.
void check_score_kind(mc::ScoreKind kind, const OptTensor& ks, double pool_lam, const OptTensor& gram,
                      const OptTensor& inv_norm) {
  TORCH_CHECK_VALUE(kind != mc::kScoreImpPool || (ks && std::isfinite(pool_lam) && pool_lam >= 0.0 && pool_lam <= 1.0),
                    "mmrprune::fused_greedy: score_kind 'pool' sizes the hybrid pool from ks and pool_lam in [0, 1], "
                    "got pool_lam ", pool_lam, ks ? "" : " and no ks");
  TORCH_CHECK_VALUE(kind != mc::kScoreDivPrune || (gram && !inv_norm), "mmrprune::fused_greedy: score_kind "
                    "'divprune' reads the Gram and the norms of its diagonal: pass gram and no inv_norm");
}

// Top-k is the importance ranking alone: the prepare kernel writes the picks, so no similarity
// source (Gram, norms) and no greedy option applies.
void check_topk(const OptTensor& gram, const OptTensor& inv_norm, const OptTensor& sqn, bool dpp) {
  TORCH_CHECK_VALUE(!gram && !inv_norm && !sqn && !dpp, "mmrprune::fused_greedy: score_kind 'topk' ranks the "
                    "importance only: pass no gram, inv_norm or sqn, and dpp=False");
}

// The prepare kernel: the per-row score (score_kind != keep) and, in Gram mode without the
// caller's inv_norm, the inverse norms (and DPP's sqn) from the Gram's diagonal.  No launch when
// there is nothing to compute.  Arguments checked by the caller.
Prepared run_prepare(const Tensor& rows, const Tensor& starts, const Tensor& lengths, const OptTensor& gram,
                     int64_t ld, const OptTensor& weights, mc::ScoreKind kind, int64_t width, bool norms, bool dpp,
                     const OptTensor& ks, double pool_lam, std::uintptr_t stream, const TopkOut& topk = {}) {
  Prepared p;
  if (!norms && kind == mc::kScoreKeep) return p;
  const int64_t n_rows = rows.size(0);
  const auto f32 = rows.options().dtype(at::kFloat);
  if (kind != mc::kScoreKeep) p.score = at::empty({n_rows}, f32);
  if (kind == mc::kScoreImpPool) p.eligible = at::empty({n_rows}, rows.options().dtype(at::kByte));
  if (kind == mc::kScoreDivPrune) p.first_score = at::empty({n_rows}, f32);
  if (norms) {
    p.inv_norm = at::empty({n_rows}, f32);
    if (dpp) p.sqn = at::empty({n_rows}, f32);
  }
  mc::PrepareParams pp;
  pp.starts = addr(starts);
  pp.lengths = addr(lengths);
  pp.batch = starts.numel();
  pp.gram = norms ? addr(gram) : 0;
  pp.ld = norms ? ld : 0;
  pp.width = width;
  pp.inv_norm = norms ? addr(p.inv_norm) : 0;
  pp.sqn = p.sqn.defined() ? addr(p.sqn) : 0;
  pp.weights = addr(weights);
  pp.score = p.score.defined() ? addr(p.score) : 0;
  pp.score_kind = kind;
  pp.ks = kind == mc::kScoreImpPool || kind == mc::kScoreTopk ? addr(ks) : 0;
  pp.lam = pool_lam;
  pp.eligible = p.eligible.defined() ? addr(p.eligible) : 0;
  pp.first_score = p.first_score.defined() ? addr(p.first_score) : 0;
  pp.out = topk.out;
  pp.rounds = topk.rounds;
  pp.k_max = topk.k_max;
  pp.stream = stream;
  launched(mc::launch_prepare(pp));
  return p;
}

std::tuple<Tensor, Tensor> fused_greedy(const Tensor& rows, const OptTensor& score, const OptTensor& first_score,
                                        const OptTensor& eligible, const Tensor& starts, const Tensor& lengths,
                                        const Tensor& ks, int64_t k_max, double lam, bool dpp, const OptTensor& gram,
                                        const OptTensor& inv_norm, const OptTensor& sqn, const OptTensor& weights,
                                        std::string_view score_kind, int64_t width, int64_t max_round,
                                        double pool_lam, int64_t smem_state, bool dpp_rounds, int64_t cluster) {
  const Batch b = check_batch(rows, starts, lengths, width);
  check_tensor(ks, "ks", at::kLong, b.bsz, rows);
  TORCH_CHECK_VALUE(k_max >= 0, "mmrprune::fused_greedy: k_max must be >= 0, got ", k_max);
  TORCH_CHECK_VALUE(std::isfinite(lam) && lam >= 0.0 && lam <= 1.0, "mmrprune::fused_greedy: lam must be in [0, 1], "
                    "got ", lam);
  const mc::ScoreKind kind = score_kind_of(score_kind);
  TORCH_CHECK_VALUE(kind != mc::kScoreKeep || score, "mmrprune::fused_greedy: score_kind 'keep' needs a score");
  check_score_kind(kind, ks, pool_lam, gram, inv_norm);
  if (kind == mc::kScoreTopk) check_topk(gram, inv_norm, sqn, dpp);
  check_optional(score, "score", at::kFloat, b.n_rows, rows);
  check_optional(weights, "weights", at::kFloat, b.n_rows, rows);
  check_optional(first_score, "first_score", at::kFloat, b.n_rows, rows);
  check_optional(eligible, "eligible", at::kByte, b.n_rows, rows);
  const int64_t ld = check_gram(gram, b, width, rows);
  TORCH_CHECK_VALUE(gram || !inv_norm, "mmrprune::fused_greedy: inv_norm is read in Gram mode only (row mode "
                    "computes the norms from the rows): pass gram, or no inv_norm");
  check_optional(inv_norm, "inv_norm", at::kFloat, b.n_rows, rows);
  TORCH_CHECK_VALUE(!(gram && inv_norm && dpp) || sqn, "mmrprune::fused_greedy: Gram-mode dpp with its own inv_norm "
                    "needs sqn");
  check_optional(sqn, "sqn", at::kFloat, b.n_rows, rows);
  TORCH_CHECK_VALUE(max_round == 0 || (max_round >= 1 && max_round <= mc::kMaxRound), "mmrprune::fused_greedy: "
                    "max_round must be 0 (the kernels' own, ", mc::kMaxRound, ") or in [1, ", mc::kMaxRound, "], got ",
                    max_round);
  TORCH_CHECK_VALUE(smem_state >= -1 && smem_state <= 1, "mmrprune::fused_greedy: smem_state must be -1 (auto), "
                    "0 (global scratch) or 1 (shared when it fits), got ", smem_state);
  TORCH_CHECK_VALUE(cluster >= 0 && cluster <= mc::kMaxClusterCtas, "mmrprune::fused_greedy: cluster must be 0 (the "
                    "launcher's choice), 1 (one block per image) or the CTAs per image, at most ", mc::kMaxClusterCtas,
                    ", got ", cluster);

  const auto i64 = rows.options().dtype(at::kLong);
  Tensor out = at::empty({b.bsz, k_max}, i64);
  Tensor rounds = at::empty({b.bsz}, i64);  // written by the maxsim kernels; DPP: counted below
  if (b.bsz == 0 || k_max == 0 || b.n_rows == 0) return {out.fill_(-1), rounds.zero_()};

  const c10::OptionalDeviceGuard guard(kEmulator ? std::nullopt : std::make_optional(rows.device()));
  const std::uintptr_t stream = current_stream(rows.device());
  if (kind == mc::kScoreTopk) {   // the selection is the prepare kernel's ranking: one launch
    run_prepare(rows, starts, lengths, gram, ld, weights, kind, width, false, false, ks, pool_lam, stream,
                TopkOut{addr(out), addr(rounds), k_max});
    return {out, rounds};
  }
  const Prepared p = run_prepare(rows, starts, lengths, gram, ld, weights, kind, width, gram && !inv_norm, dpp, ks,
                                 pool_lam, stream);
  const Tensor& row_score = p.score.defined() ? p.score : *score;

  const auto f32 = rows.options().dtype(at::kFloat);
  const Tensor state = at::empty({b.n_rows}, f32);                         // maxsim m / dpp d^2
  const Tensor taken = at::empty({b.n_rows}, rows.options().dtype(at::kByte));
  mc::Segments seg;
  seg.starts = addr(starts);
  seg.lengths = addr(lengths);
  seg.ks = addr(ks);
  seg.batch = b.bsz;
  seg.k_max = k_max;
  seg.out = addr(out);
  seg.stream = stream;

  // norms: Gram mode's from the prepare kernel or the caller; row mode's from the rows (one launch)
  Tensor inv, sq;
  mc::Features f;
  if (gram) {
    inv = p.inv_norm.defined() ? p.inv_norm : *inv_norm;
    if (dpp) sq = p.sqn.defined() ? p.sqn : *sqn;
  } else {
    f.x = addr(rows);
    f.dtype = dtype_code(rows);
    f.rows = b.n_rows;
    f.dim = b.dim;
    inv = at::empty({b.n_rows}, f32);
    if (dpp) sq = at::empty({b.n_rows}, f32);
    launched(mc::launch_inv_norms(f, addr(inv), dpp ? addr(sq) : 0, stream));
  }
  mc::GramRows g;
  g.gram = addr(gram);
  g.ld = ld;

  if (dpp) {
    const Tensor chol = at::empty({b.n_rows, k_max}, f32);  // Cholesky rows, token-major
    mc::DppState st;
    st.inv_norm = addr(inv);
    st.sqn = addr(sq);
    st.q = addr(row_score);
    st.d2_scratch = addr(state);
    st.taken_scratch = addr(taken);
    st.c_scratch = addr(chol);
    st.cluster = static_cast<int>(cluster);
    launched(gram ? mc::launch_greedy_dpp_gram(g, st, seg) : mc::launch_greedy_dpp(f, st, seg));
    // one pick per round; a caller that counts them itself passes dpp_rounds=False (two launches saved)
    if (dpp_rounds) rounds = out.ge(0).sum(1);
  } else {
    mc::MaxSimState st;
    st.inv_norm = addr(inv);
    st.imp = addr(row_score);
    st.first_score = p.first_score.defined() ? addr(p.first_score) : addr(first_score);
    st.eligible = p.eligible.defined() ? addr(p.eligible) : addr(eligible);
    st.lam = lam;
    st.m_scratch = addr(state);
    st.taken_scratch = addr(taken);
    st.rounds = addr(rounds);
    st.max_round = max_round ? static_cast<int>(max_round) : mc::kMaxRound;
    st.cluster = static_cast<int>(cluster);
    launched(gram ? mc::launch_greedy_maxsim_gram(g, st, seg, static_cast<int>(smem_state))
                  : mc::launch_greedy_maxsim(f, st, seg));
  }
  return {out, rounds};
}

// The prepare kernel alone: (score, inv_norm, sqn, eligible, first_score), each None where it
// computes nothing.
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> fused_prepare(const Tensor& rows, const Tensor& starts,
                                                                 const Tensor& lengths, const OptTensor& gram,
                                                                 const OptTensor& weights, std::string_view score_kind,
                                                                 int64_t width, bool dpp, const OptTensor& ks,
                                                                 double pool_lam) {
  const Batch b = check_batch(rows, starts, lengths, width);
  const int64_t ld = check_gram(gram, b, width, rows);
  check_optional(weights, "weights", at::kFloat, b.n_rows, rows);
  const mc::ScoreKind kind = score_kind_of(score_kind);
  check_optional(ks, "ks", at::kLong, b.bsz, rows);
  check_score_kind(kind, ks, pool_lam, gram, std::nullopt);
  TORCH_CHECK_VALUE(kind != mc::kScoreTopk, "mmrprune::_fused_prepare: score_kind 'topk' writes the picks, not "
                    "per-row values: call mmrprune::fused_greedy");
  if (b.bsz == 0 || b.n_rows == 0) return {};
  const c10::OptionalDeviceGuard guard(kEmulator ? std::nullopt : std::make_optional(rows.device()));
  Prepared p = run_prepare(rows, starts, lengths, gram, ld, weights, kind, width, gram.has_value(), dpp, ks, pool_lam,
                           current_stream(rows.device()));
  return {p.score, p.inv_norm, p.sqn, p.eligible, p.first_score};
}

}  // namespace

// Called by the module's init (module.cpp) rather than run as a static initializer
// (TORCH_LIBRARY_IMPL): a C++ signature that does not match the schema in mmrprune/ops.py, e.g. a
// stale build, then fails the import with the dispatcher's message instead of aborting the process.
void mmrprune_register_fused_ops() {
  static std::unique_ptr<torch::Library> lib;
  if (lib) return;
  auto l = std::make_unique<torch::Library>(torch::Library::IMPL, "mmrprune",
                                            std::make_optional(c10::DispatchKey::MMRPRUNE_DISPATCH_KEY), __FILE__,
                                            __LINE__);
  l->impl("fused_greedy", &fused_greedy);
  l->impl("_fused_prepare", &fused_prepare);
  lib = std::move(l);  // kept for the process's lifetime: dropping it would unregister the kernels
}
