// state: what the engine knows about one llama.cpp KV stream, without asking llama.cpp. Cell metadata
// (cell -> position llama.cpp holds), each layer's original position per cell (the cell trick moves rows, so
// layers differ), h2o's accumulators, an occupied count, and a mirror of llama.cpp's slot search
// (llama_kv_cache::find_slot, one stream, no SWA) that predicts which cells the next ubatch lands in, so a
// decode needs no read of attn_inp_k_idxs (on a GPU that read is a graph split and a sync).
// Invariants (check()): occupied cells hold unique metadata positions forming one contiguous window; each
// layer holds a position exactly in the occupied cells; n_occupied counts them.
// Many sequences (docs/ARCHITECTURE.md, section "Many sequences"): one unified stream, each cell owned by at most
// one sequence; the invariants hold per sequence (its own contiguous window), the slot mirror is the stream's.
// Per-sequence streams (kv_unified = false): sequence s lives in stream s, cells [s * stream_cells, (s + 1) *
// stream_cells) in llama.cpp's own global numbering (attn_inp_k_idxs); one slot-search head per stream.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace tova {

class state {
public:
    // n_cells: llama_n_ctx (all streams' cells); n_seq: sequence ids [0, n_seq); n_stream: 1 (unified) or n_seq
    // (one stream per sequence; n_cells must be a multiple of n_stream). Clears everything.
    void resize(int32_t n_layer, int32_t n_cells, int32_t n_seq = 1, int32_t n_stream = 1);
    // after llama_memory_clear
    void clear();

    int32_t n_layer() const { return n_layer_; }
    int32_t n_cells() const { return n_cells_; }
    int32_t n_seq() const { return (int32_t) cells_.size(); }
    int32_t n_stream() const { return n_stream_; }
    int32_t stream_cells() const { return stream_cells_; }  // cells of one stream
    int32_t n_occupied() const { return n_occupied_; }
    int32_t n_occupied(int32_t seq) const { return (int32_t) cells_[seq].size(); }
    int32_t meta_pos(int32_t cell) const { return meta_pos_[cell]; }
    int32_t seq_of(int32_t cell) const { return seq_[cell]; }  // -1: free
    const std::vector<int32_t> & all_seq() const { return seq_; }
    int32_t * layer_pos(int32_t il) { return &layer_pos_[(size_t) il * n_cells_]; }
    const std::vector<int32_t> & all_layer_pos() const { return layer_pos_; }
    double * acc(int32_t il) { return &acc_[(size_t) il * n_cells_]; }

    // The cells llama.cpp's next llama_decode of n tokens (one ubatch) will use, in batch order; false when
    // the mirror is unknown (after a state load) or no slot exists. Costs what llama.cpp's own search costs.
    bool predict(int32_t n, std::vector<int32_t> & cells) const;
    // The same for a ubatch whose token i belongs to sequence seq[i]: with per-sequence streams each run of one
    // sequence's tokens is searched in its own stream (llama.cpp's find_slot per stream of the ubatch).
    bool predict(const int32_t * seq, int32_t n, std::vector<int32_t> & cells) const;
    // After a successful decode: n tokens at positions pos0.. now sit in cells[0..n), every layer alike.
    // Returns false (and fills err) when a cell is out of range or already occupied.
    bool place(const int32_t * cells, int32_t n, int32_t pos0, std::string & err);
    // The same for a ubatch of several sequences: token i at position pos[i] of sequence seq[i].
    bool place(const int32_t * cells, int32_t n, const int32_t * pos, const int32_t * seq, std::string & err);
    // The k cells of `seq` with the smallest metadata positions (llama.cpp frees exactly these on seq_rm of
    // that position range). O(cells of seq).
    std::vector<int32_t> oldest_cells(int32_t k, int32_t seq = 0) const;
    // Occupied cells of `seq` in index order. O(cells of seq log).
    std::vector<int32_t> occupied(int32_t seq = 0) const;
    // The same cells in no particular order, without a copy (what the per-token cut iterates).
    const std::vector<int32_t> & cells_of(int32_t seq = 0) const { return cells_[seq]; }
    // Layer il's content moves from cell src to cell dst (the mover copied its K/V rows).
    void move(int32_t il, int32_t src, int32_t dst);
    // llama_memory_seq_rm of the freed cells' positions: frees them in every layer and updates the slot
    // mirror as llama.cpp does (its search restarts at the lowest freed cell when that is below it).
    void remove(const std::vector<int32_t> & freed);
    // The slot mirror cannot be trusted: the next decode reads the cells (needs the eval callback).
    void forget_head() { head_known_ = false; }
    // Replaces everything with a saved layout of sequence 0 (Session.load_state): n = cells.size() occupied cells,
    // ascending, with metadata positions meta[i] and per-layer positions lpos[l * n + i], accumulators acc[l * n + i].
    // Checks the invariants first (on error nothing changed). Call only after llama.cpp's rows were restored into
    // exactly these cells by llama_state_seq_set_data into an empty cache and its filler cells were removed: its
    // search head then sits at the lowest free cell (apply_ubatch leaves it after the last cell, seq_rm of the
    // fillers moves it down to the lowest of them), and so does the mirror's.
    bool restore(const std::vector<int32_t> & cells, const std::vector<int32_t> & meta,
                 const std::vector<int32_t> & lpos, const std::vector<double> & acc, std::string & err);
    bool head_known() const { return head_known_; }
    // Many sequences (BatchSession.load_state): llama.cpp's llama_state_seq_set_data of `seq` (empty) filled
    // slots[i] (its slot search order, the mirror's predict) with saved cell from[i] (meta[from[i]], per-layer
    // lpos/acc[l * n + from[i]]) or with a filler (from[i] < 0) that seq_rm removed again. Mirrors apply_ubatch
    // (head after the last slot) and seq_rm (head down to the lowest filler). Checks first; on error nothing changed.
    bool restore_seq(int32_t seq, const std::vector<int32_t> & slots, const std::vector<int32_t> & from,
                     const std::vector<int32_t> & meta, const std::vector<int32_t> & lpos,
                     const std::vector<double> & acc, std::string & err);

    bool check(std::string & err) const;

private:
    int32_t n_layer_ = 0, n_cells_ = 0;
    int32_t n_occupied_ = 0;
    std::vector<int32_t> meta_pos_;            // [n_cells] metadata position llama.cpp holds in the cell, -1 if free
    std::vector<int32_t> seq_;                 // [n_cells] the sequence owning the cell, -1 if free
    std::vector<std::vector<int32_t>> cells_;  // [n_seq] cells each sequence occupies (unordered)
    std::vector<int32_t> layer_pos_;           // [n_layer * n_cells] original position each layer holds, -1 if empty
    std::vector<double> acc_;                  // [n_layer * n_cells] h2o: accumulated attention; travels with its row
    int32_t n_stream_ = 1, stream_cells_ = 0;
    std::vector<uint32_t> heads_;  // [n_stream] llama.cpp's v_heads: where each stream's search starts
    bool head_known_ = true;
};

}  // namespace tova
