// policy: per-layer scores + budget (+ protected prefix) -> which cells each layer evicts. Pure: no ggml, no llama.
// Its C API (tova_policy_evict, tova_policy_choose in tova.h) is defined in policy.cpp.
#pragma once

#include <cstdint>
#include <utility>
#include <vector>

namespace tova {

// occupied: cell indices that hold a token; score[c]: the policy's score of cell c (higher = keep);
// pos[c]: original position held in cell c. Returns the k cells with the lowest score (ties: older first).
std::vector<int32_t> policy_lowest(const std::vector<int32_t> & occupied, const double * score, const int32_t * pos,
                                   int32_t k);
// The same over the cells whose position is >= protect_below, reading float scores (tova's, as the scorer gives
// them; a float compares as its double does): policy_choose's tova choice without copying anything per layer.
std::vector<int32_t> policy_lowest(const std::vector<int32_t> & occupied, const float * score, const int32_t * pos,
                                   int32_t protect_below, int32_t k);

// Which k of one layer's occupied cells to evict. Every evicting policy keeps the protected prefix (original
// positions < keep; for sink also < n_sink) and chooses among the other cells:
//   tova:   the k lowest score (newest query's head-averaged attention), ties: older first
//   window: the k oldest
//   sink:   the k oldest (the first n_sink positions are protected: StreamingLLM)
//   h2o:    of the n_keep = n - k cells kept, u = n_keep - protected are unprotected; the ceil(u/2) most recent
//           unprotected cells are kept, the k lowest score (attention accumulated since the token entered)
//           among the older ones are evicted, ties: older first
//   full:   nothing
// score: [cells] for tova and h2o, unused (may be null) for the others. Returns fewer than k only when fewer
// than k cells can be evicted (the caller treats that as an error).
struct policy_params {
    int32_t policy;  // enum tova_policy
    int32_t keep;    // original positions < keep are never evicted
    int32_t n_sink;  // sink: original positions < n_sink are never evicted
};
std::vector<int32_t> policy_choose(const policy_params & p, const std::vector<int32_t> & occupied, const int32_t * pos,
                                   const double * score, int32_t k);

// The one-to-one moves that make `evict` (this layer's choice) equal to `freed` (the cells llama.cpp frees):
// kept content in freed\evict moves into evict\freed. Returns pairs (src, dst).
std::vector<std::pair<int32_t, int32_t>> policy_moves(const std::vector<int32_t> & evict,
                                                      const std::vector<int32_t> & freed);

}  // namespace tova
