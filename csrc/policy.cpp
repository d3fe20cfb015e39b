#include "policy.h"

#include <algorithm>

namespace tova {

std::vector<int32_t> policy_lowest(const std::vector<int32_t> & occupied, const float * score, const int32_t * pos,
                                   int32_t k) {
    std::vector<int32_t> cells = occupied;
    if (k <= 0) return {};
    if (k > (int32_t) cells.size()) k = (int32_t) cells.size();
    std::partial_sort(cells.begin(), cells.begin() + k, cells.end(), [&](int32_t a, int32_t b) {
        if (score[a] != score[b]) return score[a] < score[b];
        return pos[a] < pos[b];
    });
    cells.resize(k);
    return cells;
}

std::vector<std::pair<int32_t, int32_t>> policy_moves(const std::vector<int32_t> & evict,
                                                      const std::vector<int32_t> & freed) {
    std::vector<int32_t> src, dst;
    for (int32_t f : freed)
        if (std::find(evict.begin(), evict.end(), f) == evict.end()) src.push_back(f);
    for (int32_t e : evict)
        if (std::find(freed.begin(), freed.end(), e) == freed.end()) dst.push_back(e);
    std::vector<std::pair<int32_t, int32_t>> moves;
    for (size_t i = 0; i < src.size() && i < dst.size(); i++) moves.emplace_back(src[i], dst[i]);
    return moves;
}

}  // namespace tova
