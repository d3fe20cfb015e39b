#include "policy.h"

#include <algorithm>
#include <climits>

#include "tova.h"

namespace tova {

// The k lowest (score, position) among the occupied cells whose position is >= protect_below, in that order.
template <class S>
static std::vector<int32_t> lowest(const std::vector<int32_t> & occupied, const S * score, const int32_t * pos,
                                   int32_t protect_below, int32_t k) {
    if (k <= 0) return {};
    auto lower = [&](int32_t a, int32_t b) {
        if (score[a] != score[b]) return score[a] < score[b];
        return pos[a] < pos[b];
    };
    if (k > 32) {
        std::vector<int32_t> cells;
        cells.reserve(occupied.size());
        for (int32_t c : occupied)
            if (pos[c] >= protect_below) cells.push_back(c);
        if (k > (int32_t) cells.size()) k = (int32_t) cells.size();
        std::partial_sort(cells.begin(), cells.begin() + k, cells.end(), lower);
        cells.resize(k);
        return cells;
    }
    // a decode's cut evicts a few of many cells (sequences x layers of them per step): one pass keeping the k
    // lowest in order, most cells rejected by one comparison with the k-th
    std::vector<int32_t> low;
    low.reserve(k + 1);
    for (int32_t c : occupied) {
        if (pos[c] < protect_below || ((int32_t) low.size() == k && !lower(c, low.back()))) continue;
        low.insert(std::upper_bound(low.begin(), low.end(), c, lower), c);
        if ((int32_t) low.size() > k) low.pop_back();
    }
    return low;
}

std::vector<int32_t> policy_lowest(const std::vector<int32_t> & occupied, const double * score, const int32_t * pos,
                                   int32_t k) {
    return lowest(occupied, score, pos, INT32_MIN, k);
}

std::vector<int32_t> policy_lowest(const std::vector<int32_t> & occupied, const float * score, const int32_t * pos,
                                   int32_t protect_below, int32_t k) {
    return lowest(occupied, score, pos, protect_below, k);
}

// the k candidates with the smallest original position
static std::vector<int32_t> oldest(std::vector<int32_t> cells, const int32_t * pos, int32_t k) {
    if (k > (int32_t) cells.size()) k = (int32_t) cells.size();
    std::partial_sort(cells.begin(), cells.begin() + k, cells.end(),
                      [&](int32_t a, int32_t b) { return pos[a] < pos[b]; });
    cells.resize(k);
    return cells;
}

// H2O (Zhang et al. 2023): half of the unprotected budget for the most recent tokens (the larger half when odd),
// the other half for the heavy hitters, i.e. evict the lowest accumulated attention among the older tokens
static std::vector<int32_t> h2o(std::vector<int32_t> cand, int32_t n_protected, int32_t n_occupied, const int32_t * pos,
                                const double * acc, int32_t k) {
    const int32_t unprotected_kept = n_occupied - k - n_protected;
    const int32_t n_recent = std::max(0, unprotected_kept - unprotected_kept / 2);
    if (n_recent >= (int32_t) cand.size()) return {};
    std::sort(cand.begin(), cand.end(), [&](int32_t a, int32_t b) { return pos[a] > pos[b]; });  // newest first
    std::vector<int32_t> older(cand.begin() + n_recent, cand.end());
    return policy_lowest(older, acc, pos, k);
}

std::vector<int32_t> policy_choose(const policy_params & p, const std::vector<int32_t> & occupied, const int32_t * pos,
                                   const double * score, int32_t k) {
    if (k <= 0 || p.policy == TOVA_POLICY_FULL) return {};
    const int32_t protect_below = p.policy == TOVA_POLICY_SINK ? std::max(p.keep, p.n_sink) : p.keep;
    if (p.policy == TOVA_POLICY_TOVA) return lowest(occupied, score, pos, protect_below, k);
    std::vector<int32_t> cand;
    cand.reserve(occupied.size());
    for (int32_t c : occupied)
        if (pos[c] >= protect_below) cand.push_back(c);
    const int32_t n_protected = (int32_t) (occupied.size() - cand.size());
    switch (p.policy) {
        case TOVA_POLICY_WINDOW:
        case TOVA_POLICY_SINK:
            return oldest(cand, pos, k);
        case TOVA_POLICY_H2O:
            return h2o(cand, n_protected, (int32_t) occupied.size(), pos, score, k);
        default:
            return {};
    }
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

// -- C API: the policy alone, on synthetic arrays (tests) -------------------------------------------------

static std::vector<int32_t> occupied_of(const int32_t * pos, int32_t n) {
    std::vector<int32_t> occupied;
    for (int32_t i = 0; i < n; i++)
        if (pos[i] >= 0) occupied.push_back(i);
    return occupied;
}

extern "C" int32_t tova_policy_evict(const float * score, const int32_t * pos, int32_t n, int32_t k,
                                     int32_t * out_evict) {
    if (!score || !pos || n < 0 || k < 0 || (k > 0 && !out_evict)) return TOVA_ERR_ARG;
    try {
        std::vector<double> s(score, score + n);
        std::vector<int32_t> evict = tova::policy_lowest(occupied_of(pos, n), s.data(), pos, k);
        std::copy(evict.begin(), evict.end(), out_evict);
        return (int32_t) evict.size();
    } catch (...) {
        return TOVA_ERR_MEMORY;
    }
}

extern "C" int32_t tova_policy_choose(int32_t policy, const double * score, const int32_t * pos, int32_t n, int32_t k,
                                      int32_t keep, int32_t n_sink, int32_t * out_evict) {
    if (policy < TOVA_POLICY_FULL || policy > TOVA_POLICY_H2O || !pos || n < 0 || k < 0 || keep < 0 || n_sink < 0 ||
        (k > 0 && !out_evict))
        return TOVA_ERR_ARG;
    if ((policy == TOVA_POLICY_TOVA || policy == TOVA_POLICY_H2O) && !score) return TOVA_ERR_ARG;
    try {
        std::vector<int32_t> evict = tova::policy_choose({policy, keep, n_sink}, occupied_of(pos, n), pos, score, k);
        std::copy(evict.begin(), evict.end(), out_evict);
        return (int32_t) evict.size();
    } catch (...) {
        return TOVA_ERR_MEMORY;
    }
}
