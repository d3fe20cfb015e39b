// engine_impl: the engine struct behind the opaque tova_engine handle, shared by engine.cpp (the C API and the
// step) and capture.cpp (the eval callback). Not part of the C API.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "backend.h"
#include "mover.h"
#include "reduce.h"
#include "score.h"
#include "state.h"
#include "tova.h"

struct ggml_tensor;
struct llama_batch;

// One sequence's settings and progress (tova_engine_seq_add); the single-sequence API keeps seqs[0] equal to the
// engine's own fields.
struct tova_seq {
    bool active = false;
    int32_t budget = 0;
    int32_t memory = 0;  // cells reserved: budget + max(chunk, evict_interval)
    int32_t keep = 0;
    int32_t evict_interval = 1;
    int32_t n_past = 0;  // many-sequence mode: the next token's position
};

// What the eval callback must do during one llama_decode; set by the step before the decode.
struct tova_armed {
    int32_t n_tokens = 0;        // 0: not inside a decode the engine drives; the callback wants nothing
    std::vector<int32_t> rows;   // batch rows whose attention is captured (tova: each sequence's newest token)
    int32_t stream0 = 0;         // per-sequence streams: the ubatch's first stream (its lowest sequence id)
    bool scores = false;         // capture this decode's attention (tova: the newest row; h2o: every row)
    bool read_cells = false;     // read attn_inp_k_idxs (host buffers: free, in the ask phase; a device: a sync)
    std::vector<int64_t> cells;  // what attn_inp_k_idxs held, when read
    bool cells_seen = false;
    int32_t n_observed = 0;  // nodes read in the data phase (each one costs a backend sync)
    bool called = false;     // the callback ran during this decode (it may be switched off: engine.cpp)
    std::string error;       // first failure inside the callback (it cannot return errors)
};

struct tova_engine {
    int32_t policy;
    int32_t n_layer;
    int32_t budget;
    int32_t memory;              // most cells ever occupied: budget + max(chunk, evict_interval)
    bool v_trans;                // also: flash attention off (llama.cpp stores V transposed exactly when FA is off)
    bool force_graph = false;    // env: TOVA_MOVER=graph forces the device paths (graph mover, attention sums)
    bool verify_cells = false;   // env: TOVA_CHECK_CELLS=1 reads attn_inp_k_idxs on every decode, even on a device
    bool keep_callback = false;  // env: TOVA_KEEP_CALLBACK=1 leaves the eval callback on for decodes needing no node
    int32_t keep = 0;            // original positions < keep are never evicted
    int32_t n_sink = 4;          // TOVA_POLICY_SINK: original positions < n_sink are never evicted
    int32_t evict_interval = 1;  // cut only once budget + evict_interval cells are occupied
    bool multi = false;          // tova_engine_set_n_seq: sequences are added one by one, seqs[s] holds settings
    std::vector<tova_seq> seqs;  // [n_seq_max]
    int32_t n_stream = 1;        // tova_engine_set_streams: 1 (unified KV cache) or n_seq_max (one per sequence)

    tova::state st;
    std::vector<float> scores;    // [n_layer * n_cells] tova: newest query's head-averaged attention
    std::vector<uint8_t> scored;  // [n_layer] layer captured in the last scored decode
    // [n_layer] 1: the policy runs on this layer; 0: a sliding-window layer left to llama.cpp (docs/SWA.md)
    std::vector<uint8_t> managed;
    bool layers_checked = false;  // managed and sliding layers seen in separate cache buffers (first decode)
    std::vector<ggml_tensor *> cache_k, cache_v;  // [n_layer], live as long as the context
    int32_t n_cache_found = 0;                    // layers whose K and V tensors are both known

    tova_armed armed;
    std::vector<int32_t> predicted;  // cells the slot mirror expects for the ubatch in flight
    llama_batch * batch = nullptr;   // owned; sized n_batch_alloc
    int32_t n_batch_alloc = 0;
    std::vector<float> scratch_f;            // attention sums read back from a device (reduce.h)
    std::vector<double> scratch_d;           // [n_kv] h2o column sums
    std::vector<int32_t> row_count, row_tk;  // device head sums: rows per stream, each stream's token indices
    std::vector<int64_t> row_slot;           // device head sums: each captured row's place in the read-back
    bool idxs_host = true;                   // attn_inp_k_idxs was last seen in host memory (reading it is free)

    tova::backends devs;
    tova::mover mover;
    tova::scorer fa;                     // flash attention on: scores recomputed from the newest query
    tova::reducer sums;                  // flash attention off, cache on a device: attention sums made there
    double stats[TOVA_STAT_COUNT] = {};  // tova_engine_stats
    std::string error;

    ~tova_engine();
};

namespace tova {
double now_s();
}

inline bool tova_is_managed(const tova_engine * e, int il) { return il >= 0 && il < e->n_layer && e->managed[il]; }
