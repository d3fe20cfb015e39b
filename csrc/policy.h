// policy: scores + budget -> which cells each layer evicts. Pure: no ggml, no llama.
#pragma once

#include <cstdint>
#include <vector>

namespace tova {

// occupied: cell indices that hold a token; score[c]: head-averaged attention of the newest query to cell c;
// pos[c]: original position held in cell c. Returns the k cells with the lowest score (ties: older first).
std::vector<int32_t> policy_lowest(const std::vector<int32_t> & occupied, const float * score, const int32_t * pos,
                                   int32_t k);

// The one-to-one moves that make `evict` (this layer's choice) equal to `freed` (the cells llama.cpp frees):
// kept content in freed\evict moves into evict\freed. Returns pairs (src, dst).
std::vector<std::pair<int32_t, int32_t>> policy_moves(const std::vector<int32_t> & evict,
                                                      const std::vector<int32_t> & freed);

}  // namespace tova
