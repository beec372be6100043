// Native driver of the emulated kernels, for the sanitizer and mutation tests
// (tests/test_cuda_emu_native.py).  Linked with csrc/cuda/greedy.cu (or a mutated copy) built
// for csrc/emu/cuda_emu.h, optionally with -fsanitize=...: sanitizers cannot be loaded into
// the Python process, so the launch runs here, on arguments that Python prepared with
// cuda_backend.prepare() and wrote to a case directory:
//
//   args.txt    "key value" lines: kind (maxsim|dpp), mode (row|gram), dtype, rows, dim, batch,
//               k_max, lam, smem_state, x_offset (bytes added to the feature address: misaligned rows),
//               optional cluster (MaxSimState::cluster / DppState::cluster: 1 one block per image,
//               n >= 2 a cluster of n)
//   x.bin score.bin starts.bin lengths.bin ks.bin [first.bin] [eligible.bin] [gram.bin inv.bin sqn.bin]
//   optional prepare (a prepare.h ScoreKind code), width, pool_lam, norms (0/1), [weights.bin]: the
//               prepare kernel (launch_prepare) runs first and computes what its kind writes (the
//               score, hybrid's eligible, DivPrune's first score, with norms the Gram mode's inverse
//               norms and DPP's sqn), which the greedy launch then reads instead of those files;
//               topk is the prepare kernel's ranking alone
//
// It runs the launchers of greedy.h as the op does and writes out.bin
// ([batch, k_max] int64) and, for maxsim, rounds.bin ([batch] int64).  Exit status 0 on success, 3 when a launcher reports an error.
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iterator>
#include <map>
#include <string>
#include <vector>

#include "greedy.h"
#include "prepare.h"

namespace {

std::string g_dir;

std::vector<unsigned char> read_file(const std::string& name, bool required = true) {
  std::ifstream f(g_dir + "/" + name, std::ios::binary);
  if (!f) {
    if (required) {
      std::fprintf(stderr, "harness: cannot read %s/%s\n", g_dir.c_str(), name.c_str());
      std::exit(2);
    }
    return {};
  }
  return std::vector<unsigned char>(std::istreambuf_iterator<char>(f), {});
}

// A 16-byte aligned copy (plus `offset` bytes), as a caching allocator would hand out.
struct Buffer {
  std::vector<unsigned char> hold;
  unsigned char* ptr = nullptr;
  Buffer(const std::vector<unsigned char>& data, std::size_t offset = 0) : hold(data.size() + offset + 32, 0) {
    const auto base = reinterpret_cast<std::uintptr_t>(hold.data());
    ptr = reinterpret_cast<unsigned char*>(((base + 15) & ~std::uintptr_t(15)) + offset);
    if (!data.empty()) std::memcpy(ptr, data.data(), data.size());
  }
  explicit Buffer(std::size_t bytes) : Buffer(std::vector<unsigned char>(bytes, 0xab)) {}
  std::uintptr_t addr() const { return reinterpret_cast<std::uintptr_t>(ptr); }
};

std::uintptr_t addr_or_null(const Buffer& b) { return b.hold.size() > 32 ? b.addr() : 0; }

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: harness CASE_DIR\n");
    return 2;
  }
  g_dir = argv[1];
  std::map<std::string, std::string> a;
  {
    std::ifstream f(g_dir + "/args.txt");
    std::string k, v;
    while (f >> k >> v) a[k] = v;
  }
  auto num = [&](const char* k) { return std::strtoll(a.at(k).c_str(), nullptr, 10); };
  const std::string kind = a.at("kind"), mode = a.at("mode");
  const int dtype = static_cast<int>(num("dtype"));
  const std::int64_t rows = num("rows"), dim = num("dim"), batch = num("batch"), k_max = num("k_max");
  const double lam = std::strtod(a.at("lam").c_str(), nullptr);
  const int smem_state = static_cast<int>(num("smem_state"));
  const int cluster = a.count("cluster") ? static_cast<int>(num("cluster")) : 0;

  Buffer x(read_file("x.bin"), static_cast<std::size_t>(num("x_offset")));
  Buffer score(read_file("score.bin", a.count("prepare") == 0)), starts(read_file("starts.bin")),
      lengths(read_file("lengths.bin")),
      ks(read_file("ks.bin"));
  Buffer first(read_file("first.bin", false)), eligible(read_file("eligible.bin", false));
  Buffer state(rows * 4), taken(rows), inv(rows * 4), sqn(rows * 4), chol(rows * k_max * 4 + 4);
  Buffer out(batch * k_max * 8), rounds(batch * 8);
  std::string err;
  namespace mc = mmrprune_cuda;
  mc::Segments seg;
  seg.starts = starts.addr(), seg.lengths = lengths.addr(), seg.ks = ks.addr();
  seg.batch = batch, seg.k_max = k_max, seg.out = out.addr(), seg.stream = 0;
  mc::MaxSimState ms;
  ms.imp = score.addr(), ms.first_score = addr_or_null(first), ms.eligible = addr_or_null(eligible);
  ms.lam = lam, ms.m_scratch = state.addr(), ms.taken_scratch = taken.addr();
  ms.rounds = rounds.addr(), ms.cluster = cluster;
  mc::DppState ds;
  ds.q = score.addr(), ds.d2_scratch = state.addr(), ds.taken_scratch = taken.addr(), ds.c_scratch = chol.addr();
  ds.cluster = cluster;
  const bool gram_mode = mode == "gram";
  Buffer gram(gram_mode ? read_file("gram.bin") : std::vector<unsigned char>());
  Buffer ginv(read_file("inv.bin", false)), gsqn(read_file("sqn.bin", false));
  ms.inv_norm = ds.inv_norm = ginv.addr();
  ds.sqn = gsqn.addr();
  // the prepare kernel first, when the case asks for it: its outputs replace the files' values
  Buffer weights(read_file("weights.bin", false)), p_score(rows * 4), p_inv(rows * 4), p_sqn(rows * 4),
      p_eligible(rows), p_first(rows * 4);
  const int pkind = a.count("prepare") ? static_cast<int>(num("prepare")) : -1;
  if (pkind >= 0) {
    mc::PrepareParams pp;
    pp.starts = starts.addr(), pp.lengths = lengths.addr(), pp.batch = batch;
    const bool norms = num("norms") != 0;
    pp.gram = norms ? gram.addr() : 0, pp.ld = norms ? num("ld") : 0, pp.width = num("width");
    pp.inv_norm = norms ? p_inv.addr() : 0, pp.sqn = norms && kind == "dpp" ? p_sqn.addr() : 0;
    pp.weights = addr_or_null(weights), pp.score_kind = pkind;
    pp.score = pkind != mc::kScoreKeep ? p_score.addr() : 0;
    pp.ks = pkind == mc::kScoreImpPool || pkind == mc::kScoreTopk ? ks.addr() : 0;
    pp.lam = std::strtod(a.at("pool_lam").c_str(), nullptr);
    pp.eligible = pkind == mc::kScoreImpPool ? p_eligible.addr() : 0;
    pp.first_score = pkind == mc::kScoreDivPrune ? p_first.addr() : 0;
    if (pkind == mc::kScoreTopk) pp.out = out.addr(), pp.rounds = rounds.addr(), pp.k_max = k_max;
    err = mc::launch_prepare(pp);
    if (pkind != mc::kScoreKeep) ms.imp = ds.q = p_score.addr();
    if (pkind == mc::kScoreImpPool) ms.eligible = p_eligible.addr();
    if (pkind == mc::kScoreDivPrune) ms.first_score = p_first.addr();
    if (norms) ms.inv_norm = ds.inv_norm = p_inv.addr(), ds.sqn = p_sqn.addr();
  }
  if (!err.empty() || pkind == mc::kScoreTopk) {
    // the launcher's error below, or topk's picks (the prepare kernel's ranking) are written
  } else if (gram_mode) {
    mc::GramRows g;
    g.gram = gram.addr(), g.ld = num("ld");
    err = kind == "dpp" ? mc::launch_greedy_dpp_gram(g, ds, seg) : mc::launch_greedy_maxsim_gram(g, ms, seg, smem_state);
  } else {
    mc::Features f;
    f.x = x.addr(), f.dtype = dtype, f.rows = rows, f.dim = dim;
    ms.inv_norm = ds.inv_norm = inv.addr();
    ds.sqn = sqn.addr();
    err = mc::launch_inv_norms(f, inv.addr(), kind == "dpp" ? sqn.addr() : 0, 0);
    if (err.empty()) err = kind == "dpp" ? mc::launch_greedy_dpp(f, ds, seg) : mc::launch_greedy_maxsim(f, ms, seg);
  }
  if (!err.empty()) {
    std::fprintf(stderr, "harness: launcher error: %s\n", err.c_str());
    return 3;
  }
  std::ofstream f(g_dir + "/out.bin", std::ios::binary);
  f.write(reinterpret_cast<const char*>(out.ptr), batch * k_max * 8);
  if (kind == "maxsim" || pkind == mc::kScoreTopk) {
    std::ofstream fr(g_dir + "/rounds.bin", std::ios::binary);
    fr.write(reinterpret_cast<const char*>(rounds.ptr), batch * 8);
  }
  return 0;
}
