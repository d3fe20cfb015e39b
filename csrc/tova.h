// tova_cpp engine: per-layer bounded KV cache (TOVA, Oren et al. 2024) inside a llama.cpp context.
// C API, extern "C"; every function that can fail returns a negative TOVA_ERR_* code and writes a message
// that tova_engine_last_error() returns. No function aborts on bad input.
#pragma once

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

struct ggml_tensor;
struct llama_context;
typedef struct tova_engine tova_engine;

enum tova_policy {
    TOVA_POLICY_FULL = 0,    // no eviction
    TOVA_POLICY_TOVA = 1,    // keep the `budget` keys with the highest head-averaged attention of the newest query
    TOVA_POLICY_WINDOW = 2,  // keep the most recent `budget` keys
    TOVA_POLICY_SINK = 3,    // keep the first n_sink keys and the most recent ones (StreamingLLM)
    TOVA_POLICY_H2O = 4,     // keep the most recent half and the largest accumulated attention half (H2O)
};

enum tova_status {
    TOVA_OK = 0,
    TOVA_ERR_ARG = -1,      // invalid argument
    TOVA_ERR_CAPTURE = -2,  // the expected graph nodes were not seen during llama_decode
    TOVA_ERR_STATE = -3,    // engine bookkeeping disagrees with llama.cpp (call reset)
    TOVA_ERR_BACKEND = -4,  // a backend operation failed
};

// n_layer: the model's layers; n_cells: the context's KV size (llama_n_ctx); v_trans: V cache stored
// transposed (flash attention off). Returns NULL and fills err on bad arguments.
tova_engine * tova_engine_create(int32_t policy, int32_t n_layer, int32_t budget, int32_t n_cells, bool v_trans,
                                 char * err, size_t err_len);
void tova_engine_free(tova_engine * e);
// Protected prefix (like llama.cpp's --keep): original positions < keep are never evicted by any policy.
// 0 <= keep < budget; default 0. Only while the engine holds no token (after create or reset).
int32_t tova_engine_set_keep(tova_engine * e, int32_t keep);
// TOVA_POLICY_SINK: original positions < n_sink are never evicted. 0 <= n_sink < budget; default 4. Only while
// the engine holds no token. Accepted and unused for the other policies.
int32_t tova_engine_set_n_sink(tova_engine * e, int32_t n_sink);
// Which layers the policy manages: managed[l] != 0 (default: all). A sliding-window model's window layers are
// left to llama.cpp (docs/SWA.md); at least one layer must be managed. Only while the engine holds no token.
int32_t tova_engine_set_layers(tova_engine * e, const uint8_t * managed, int32_t n_layer);
// Resize to the context's real cell count (llama_n_ctx, padded by llama.cpp); clears the state.
int32_t tova_engine_set_cells(tova_engine * e, int32_t n_cells);

// llama_context_params.cb_eval; user_data = the engine. Runs on the llama_decode thread.
bool tova_eval_callback(struct ggml_tensor * t, bool ask, void * user_data);

// Before llama_decode of n_tokens tokens at positions pos0..pos0+n_tokens-1. capture_scores: TOVA records the
// attention row of the batch's last token (needed only for the decode that ends a piece). H2O captures on every
// decode whatever the flag (its accumulator must see every query); window, sink and full never capture.
int32_t tova_engine_begin(tova_engine * e, int32_t n_tokens, int32_t pos0, bool capture_scores);
// After a successful llama_decode: records which cells now hold the new tokens.
int32_t tova_engine_end(tova_engine * e);
// Evict down to `budget` occupied cells, each layer by its policy (tova_policy_choose); removes the evicted
// metadata positions from llama.cpp (seq 0). No-op while occupied < budget + evict_interval or for
// TOVA_POLICY_FULL. With flash attention on (v_trans false) tova's scores come from capture_fa.
int32_t tova_engine_cut(tova_engine * e, struct llama_context * ctx);
// Forget everything (after llama_memory_clear).
void tova_engine_reset(tova_engine * e);

int32_t tova_engine_n_occupied(const tova_engine * e);
// out: [n_layer * n_cells] original position held by each layer's cell, -1 where empty (and in unmanaged layers).
int32_t tova_engine_cell_positions(const tova_engine * e, int32_t * out, size_t n);
// Graph nodes the eval callback read during the last llama_decode; each one costs a backend sync
// (tova and h2o: one per layer; window, sink and full: none on host buffers).
int32_t tova_engine_n_observed(const tova_engine * e);
// Force the ggml-graph mover even for host buffers (tests). env: TOVA_MOVER=graph does the same.
void tova_engine_set_force_graph_mover(tova_engine * e, bool force);
const char * tova_engine_last_error(const tova_engine * e);
// Cut only once budget + m cells are occupied (evicting m or more at once, by the newest query's scores);
// m = 1 is the paper's per-token TOVA. Needs budget + m <= n_cells.
int32_t tova_engine_set_evict_interval(tova_engine * e, int32_t m);
// CPU threads for the flash-attention scoring graph when the cache is in host memory.
void tova_engine_set_threads(tova_engine * e, int32_t n_threads);
// Cumulative costs since creation (or the last reset), for profiling: out[TOVA_STAT_COUNT].
enum tova_stat {
    TOVA_STAT_SCORED_DECODES = 0,  // decodes that captured scores
    TOVA_STAT_CAPTURE_S = 1,       // seconds in the eval callback's data phase (reading scores / the query)
    TOVA_STAT_SCORE_S = 2,         // seconds in the flash-attention scoring graph (upload, compute, read-back)
    TOVA_STAT_CUTS = 3,            // cuts that evicted
    TOVA_STAT_CUT_S = 4,           // seconds moving rows and removing metadata (mover + llama_memory_seq_rm)
    TOVA_STAT_COUNT = 5,
};
int32_t tova_engine_stats(tova_engine * e, double * out, size_t n, bool reset);
// Name of the buffer holding the K cache (e.g. "CPU", "CUDA0"); "" before the first decode.
const char * tova_engine_cache_buffer(const tova_engine * e);

// The policy alone, for tests on synthetic arrays: of the n cells with score[i] and original position pos[i]
// (pos < 0: empty, never chosen), writes to out_evict the k cells to evict, lowest score first (ties: older
// position first). Returns the number written.
int32_t tova_policy_evict(const float * score, const int32_t * pos, int32_t n, int32_t k, int32_t * out_evict);

// Any policy alone, for tests on synthetic arrays: which k of the n cells (original position pos[i], < 0: empty,
// never chosen) one layer evicts under `policy` with protected prefix `keep` and `n_sink`. score: per cell, the
// newest query's head-averaged attention (tova) or the accumulated attention (h2o); may be NULL for the others.
// Writes the cells to out_evict (room for k); returns the number written or TOVA_ERR_ARG.
int32_t tova_policy_choose(int32_t policy, const double * score, const int32_t * pos, int32_t n, int32_t k,
                           int32_t keep, int32_t n_sink, int32_t * out_evict);

// Reads the bool array `key` of the GGUF at `path` (e.g. {arch}.attention.sliding_window_pattern, which
// llama_model_meta_val_str does not return): writes its flags (0/1) to out and returns how many; 0 when the key
// is absent or not a bool array; TOVA_ERR_ARG when the file cannot be read or the array exceeds n_max.
int32_t tova_gguf_bool_array(const char * path, const char * key, uint8_t * out, int32_t n_max);

// The file libllama was loaded from, as seen by this library (to check that one copy is in the process).
const char * tova_libllama_path(void);

#ifdef __cplusplus
}
#endif
