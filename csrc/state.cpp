#include "state.h"

#include <algorithm>
#include <climits>
#include <string>

namespace tova {

void state::resize(int32_t n_layer, int32_t n_cells, int32_t n_seq, int32_t n_stream) {
    n_layer_ = n_layer;
    n_cells_ = n_cells;
    n_stream_ = n_stream < 1 ? 1 : n_stream;
    stream_cells_ = n_cells / n_stream_;
    heads_.assign(n_stream_, 0);
    meta_pos_.assign(n_cells, -1);
    seq_.assign(n_cells, -1);
    cells_.assign(n_seq, {});
    layer_pos_.assign((size_t) n_layer * n_cells, -1);
    acc_.assign((size_t) n_layer * n_cells, 0.0);
    n_occupied_ = 0;
    head_known_ = true;
}

void state::clear() {
    std::fill(meta_pos_.begin(), meta_pos_.end(), -1);
    std::fill(seq_.begin(), seq_.end(), -1);
    for (auto & c : cells_) c.clear();
    std::fill(layer_pos_.begin(), layer_pos_.end(), -1);
    std::fill(acc_.begin(), acc_.end(), 0.0);
    n_occupied_ = 0;
    std::fill(heads_.begin(), heads_.end(), 0);  // llama_kv_cache::clear
    head_known_ = true;
}

// llama_kv_cache::find_slot with cont = false, no SWA, in one stream (cells [base, base + size), `used` of them
// occupied): from the stream's head (or 0 when enough cells are free before it), take empty cells in index
// order, wrapping around once.
static bool find_slot(const std::vector<int32_t> & meta_pos, uint32_t base, uint32_t size, uint32_t head, uint32_t used,
                      int32_t n, std::vector<int32_t> & cells) {
    if (n < 1 || (uint32_t) n > size) return false;
    if (head > used + 2 * (uint32_t) n) head = 0;
    uint32_t n_tested = 0;
    int32_t found = 0;
    while (true) {
        if (head + 1 > size) {
            n_tested += size - head;
            head = 0;
            continue;
        }
        const uint32_t idx = head++;
        n_tested++;
        if (meta_pos[base + idx] < 0) {
            cells.push_back((int32_t) (base + idx));
            found++;
        }
        if (found == n) return true;
        if (n_tested >= size) return false;
    }
}

bool state::predict(int32_t n, std::vector<int32_t> & cells) const {
    cells.clear();
    if (!head_known_ || n < 1 || n > n_cells_ || n_stream_ != 1) return false;
    return find_slot(meta_pos_, 0, (uint32_t) n_cells_, heads_[0], (uint32_t) n_occupied_, n, cells);
}

bool state::predict(const int32_t * seq, int32_t n, std::vector<int32_t> & cells) const {
    if (n_stream_ == 1) return predict(n, cells);
    cells.clear();
    if (!head_known_ || n < 1) return false;
    for (int32_t i = 0; i < n;) {  // one run of a sequence's tokens per stream (the ubatch is sequence-major)
        const int32_t s = seq[i];
        int32_t j = i;
        while (j < n && seq[j] == s) j++;
        if (s < 0 || s >= n_stream_) return false;
        if (!find_slot(meta_pos_, (uint32_t) s * stream_cells_, (uint32_t) stream_cells_, heads_[s],
                       (uint32_t) cells_[s].size(), j - i, cells))
            return false;
        i = j;
    }
    return true;
}

bool state::place(const int32_t * cells, int32_t n, int32_t pos0, std::string & err) {
    std::vector<int32_t> pos(n), seq(n, 0);
    for (int32_t i = 0; i < n; i++) pos[i] = pos0 + i;
    return place(cells, n, pos.data(), seq.data(), err);
}

bool state::place(const int32_t * cells, int32_t n, const int32_t * pos, const int32_t * seq, std::string & err) {
    for (int32_t i = 0; i < n; i++) {
        const int32_t c = cells[i];
        if (c < 0 || c >= n_cells_ || meta_pos_[c] != -1) {
            err = "llama.cpp placed a token in cell " + std::to_string(c) + " which the engine holds as occupied";
            return false;
        }
        if (seq[i] < 0 || seq[i] >= (int32_t) cells_.size()) {
            err = "sequence id " + std::to_string(seq[i]) + " out of range";
            return false;
        }
        if (n_stream_ > 1 && c / stream_cells_ != seq[i]) {
            err = "llama.cpp placed a token of sequence " + std::to_string(seq[i]) + " in cell " + std::to_string(c) +
                  " of stream " + std::to_string(c / stream_cells_);
            return false;
        }
    }
    for (int32_t i = 0; i < n; i++) {
        const int32_t c = cells[i];
        meta_pos_[c] = pos[i];
        seq_[c] = seq[i];
        cells_[seq[i]].push_back(c);
        for (int32_t l = 0; l < n_layer_; l++) layer_pos_[(size_t) l * n_cells_ + c] = pos[i];
        heads_[c / stream_cells_] = (uint32_t) (c % stream_cells_) + 1;  // llama_kv_cache::apply_ubatch
    }
    n_occupied_ += n;
    head_known_ = true;
    return true;
}

std::vector<int32_t> state::occupied(int32_t seq) const {
    std::vector<int32_t> out = cells_[seq];
    std::sort(out.begin(), out.end());
    return out;
}

std::vector<int32_t> state::oldest_cells(int32_t k, int32_t seq) const {
    std::vector<int32_t> occ = cells_[seq];  // any order: metadata positions are distinct
    if (k > (int32_t) occ.size()) k = (int32_t) occ.size();
    if (k <= 0) return {};
    if (k == 1) {  // the per-token decode: one linear pass
        auto it =
            std::min_element(occ.begin(), occ.end(), [&](int32_t a, int32_t b) { return meta_pos_[a] < meta_pos_[b]; });
        return {*it};
    }
    std::partial_sort(occ.begin(), occ.begin() + k, occ.end(),
                      [&](int32_t a, int32_t b) { return meta_pos_[a] < meta_pos_[b]; });
    occ.resize(k);
    return occ;
}

void state::move(int32_t il, int32_t src, int32_t dst) {
    int32_t * pos = layer_pos(il);
    double * a = acc(il);
    pos[dst] = pos[src];
    a[dst] = a[src];
}

void state::remove(const std::vector<int32_t> & freed) {
    for (int32_t c : freed) {
        if (meta_pos_[c] < 0) continue;
        meta_pos_[c] = -1;
        std::vector<int32_t> & owned = cells_[seq_[c]];
        owned.erase(std::find(owned.begin(), owned.end(), c));
        seq_[c] = -1;
        for (int32_t l = 0; l < n_layer_; l++) {
            layer_pos_[(size_t) l * n_cells_ + c] = -1;
            acc_[(size_t) l * n_cells_ + c] = 0.0;
        }
        n_occupied_--;
        uint32_t & head = heads_[c / stream_cells_];
        head = std::min(head, (uint32_t) (c % stream_cells_));  // llama_kv_cache::seq_rm: the lowest freed cell
    }
}

// A saved layout of n cells: metadata a contiguous window, each layer's positions unique and not newer than the
// window's end (docs/ARCHITECTURE.md, the cell trick).
static bool check_saved(int32_t n_layer, const std::vector<int32_t> & meta, const std::vector<int32_t> & lpos,
                        std::string & err) {
    const int32_t n = (int32_t) meta.size();
    int32_t p_min = INT32_MAX, p_max = -1;
    for (int32_t i = 0; i < n; i++) {
        if (meta[i] < 0) {
            err = "invalid cells";
            return false;
        }
        p_min = std::min(p_min, meta[i]);
        p_max = std::max(p_max, meta[i]);
    }
    std::vector<int32_t> sorted(meta);
    std::sort(sorted.begin(), sorted.end());
    for (int32_t i = 0; i < n; i++)
        if (sorted[i] != p_min + i) {
            err = "the metadata positions are not a contiguous window";
            return false;
        }
    for (int32_t l = 0; l < n_layer; l++) {
        sorted.assign(lpos.begin() + (size_t) l * n, lpos.begin() + (size_t) (l + 1) * n);
        std::sort(sorted.begin(), sorted.end());
        for (int32_t i = 0; i < n; i++)
            if (sorted[i] < 0 || sorted[i] > p_max || (i > 0 && sorted[i] == sorted[i - 1])) {
                err = "layer " + std::to_string(l) + " positions are invalid";
                return false;
            }
    }
    return true;
}

bool state::restore(const std::vector<int32_t> & cells, const std::vector<int32_t> & meta,
                    const std::vector<int32_t> & lpos, const std::vector<double> & acc, std::string & err) {
    const int32_t n = (int32_t) cells.size();
    if ((int32_t) meta.size() != n || lpos.size() != (size_t) n_layer_ * n || acc.size() != lpos.size()) {
        err = "array sizes disagree";
        return false;
    }
    // cells ascending and in range
    for (int32_t i = 0; i < n; i++)
        if (cells[i] < 0 || cells[i] >= n_cells_ || (i > 0 && cells[i] <= cells[i - 1])) {
            err = "invalid cells";
            return false;
        }
    if (!check_saved(n_layer_, meta, lpos, err)) return false;
    clear();
    for (int32_t i = 0; i < n; i++) {
        const int32_t c = cells[i];
        meta_pos_[c] = meta[i];
        seq_[c] = 0;
        cells_[0].push_back(c);
        for (int32_t l = 0; l < n_layer_; l++) {
            layer_pos_[(size_t) l * n_cells_ + c] = lpos[(size_t) l * n + i];
            acc_[(size_t) l * n_cells_ + c] = acc[(size_t) l * n + i];
        }
    }
    n_occupied_ = n;
    uint32_t & head = heads_[0];
    head = 0;
    while (head < (uint32_t) n_cells_ && meta_pos_[head] >= 0) head++;
    if (head == (uint32_t) n_cells_) head = 0;
    head_known_ = true;
    return true;
}

bool state::restore_seq(int32_t seq, const std::vector<int32_t> & slots, const std::vector<int32_t> & from,
                        const std::vector<int32_t> & meta, const std::vector<int32_t> & lpos,
                        const std::vector<double> & acc, std::string & err) {
    const int32_t n = (int32_t) meta.size(), m = (int32_t) slots.size();
    if (seq < 0 || seq >= (int32_t) cells_.size() || !cells_[seq].empty()) {
        err = "the sequence must exist and be empty";
        return false;
    }
    if ((int32_t) from.size() != m || lpos.size() != (size_t) n_layer_ * n || acc.size() != lpos.size()) {
        err = "array sizes disagree";
        return false;
    }
    if (!check_saved(n_layer_, meta, lpos, err)) return false;
    // every saved cell exactly once, every slot free and distinct
    std::vector<uint8_t> seen(n, 0), used(n_cells_, 0);
    int32_t n_seen = 0;
    for (int32_t i = 0; i < m; i++) {
        const int32_t c = slots[i], j = from[i];
        if (c < 0 || c >= n_cells_ || meta_pos_[c] != -1 || used[c] || j >= n || (j >= 0 && seen[j]) ||
            (n_stream_ > 1 && c / stream_cells_ != seq)) {
            err = "invalid slots";
            return false;
        }
        used[c] = 1;
        if (j >= 0) {
            seen[j] = 1;
            n_seen++;
        }
    }
    if (n_seen != n) {
        err = "the slots do not hold every saved cell";
        return false;
    }
    uint32_t lowest_filler = (uint32_t) n_cells_;
    for (int32_t i = 0; i < m; i++) {
        const int32_t c = slots[i], j = from[i];
        if (j < 0) {
            lowest_filler = std::min(lowest_filler, (uint32_t) c);
            continue;
        }
        meta_pos_[c] = meta[j];
        seq_[c] = seq;
        cells_[seq].push_back(c);
        for (int32_t l = 0; l < n_layer_; l++) {
            layer_pos_[(size_t) l * n_cells_ + c] = lpos[(size_t) l * n + j];
            acc_[(size_t) l * n_cells_ + c] = acc[(size_t) l * n + j];
        }
    }
    n_occupied_ += n;
    if (m > 0) {
        const int32_t s = slots[0] / stream_cells_, base = s * stream_cells_;
        uint32_t & head = heads_[s];
        head = (uint32_t) (slots[m - 1] - base) + 1;  // llama_kv_cache::apply_ubatch
        if (lowest_filler < (uint32_t) n_cells_)      // llama_kv_cache::seq_rm of the fillers
            head = std::min(head, lowest_filler - (uint32_t) base);
    }
    return true;
}

bool state::check(std::string & err) const {
    int32_t n = 0;
    std::vector<int32_t> lo(cells_.size(), INT32_MAX), hi(cells_.size(), -1), count(cells_.size(), 0);
    for (int32_t c = 0; c < n_cells_; c++) {
        const int32_t p = meta_pos_[c];
        if ((p < 0) != (seq_[c] < 0)) {
            err = "cell " + std::to_string(c) + " has a position without a sequence or the reverse";
            return false;
        }
        if (p < 0) {
            for (int32_t l = 0; l < n_layer_; l++)
                if (layer_pos_[(size_t) l * n_cells_ + c] != -1) {
                    err = "layer " + std::to_string(l) + " holds a position in free cell " + std::to_string(c);
                    return false;
                }
            continue;
        }
        n++;
        const int32_t s = seq_[c];
        lo[s] = std::min(lo[s], p);
        hi[s] = std::max(hi[s], p);
        count[s]++;
    }
    if (n != n_occupied_) {
        err = "occupied count " + std::to_string(n_occupied_) + " disagrees with the cells (" + std::to_string(n) + ")";
        return false;
    }
    for (size_t s = 0; s < cells_.size(); s++) {
        if (count[s] != (int32_t) cells_[s].size()) {
            err = "sequence " + std::to_string(s) + " cell list disagrees with the cells";
            return false;
        }
        if (count[s] > 0 && hi[s] - lo[s] + 1 != count[s]) {
            err = "metadata positions of sequence " + std::to_string(s) + " are not a contiguous window";
            return false;
        }
    }
    for (int32_t c = 0; c < n_cells_; c++) {
        if (meta_pos_[c] < 0) continue;
        const int32_t p_max = hi[seq_[c]];
        for (int32_t l = 0; l < n_layer_; l++) {
            const int32_t p = layer_pos_[(size_t) l * n_cells_ + c];
            if (p < 0 || p > p_max) {
                err = "layer " + std::to_string(l) + " holds position " + std::to_string(p) + " in cell " +
                      std::to_string(c) + " (newest " + std::to_string(p_max) + ")";
                return false;
            }
        }
    }
    return true;
}

}  // namespace tova
