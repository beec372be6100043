// The names the op `mmrprune::cpu_select` takes for its `method` argument (csrc/cpu/op.cpp),
// exported by the module as METHOD_CODES so that mmrprune/ops.py can compare them with the
// package's methods.
#pragma once
#include <string_view>
#include <utility>

#include "select.h"

namespace mmrprune {

inline constexpr std::pair<std::string_view, Method> kMethodNames[] = {
    {"mmr", Method::MMR},   {"divprune", Method::DIVPRUNE}, {"topk", Method::TOPK},         {"fps", Method::FPS},
    {"hybrid", Method::HYBRID}, {"dpp", Method::DPP},       {"d2pruner", Method::D2PRUNER},
};

// Registers cpu_select's CPU implementation (op.cpp); the module calls it when imported.
void register_cpu_select();

}  // namespace mmrprune
