// tova_cpp engine: per-layer bounded KV cache (TOVA, Oren et al. 2024) inside a llama.cpp context.
// C API, extern "C". Every function that can fail returns a negative TOVA_ERR_* code and writes a message that
// tova_engine_last_error() returns; every entry point checks its arguments (NULL handles, sizes) and catches
// C++ exceptions (std::bad_alloc included). No function aborts on bad input.
// tova_cpp/_ffi.py builds its cffi declarations from this file (preprocessor lines dropped) and compares
// tova_abi_hash() with the header's own hash: a stale engine fails at import with a clear message.
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
    TOVA_CANCELLED = 1,  // tova_engine_decode: the progress callback asked to stop; the session is consistent
    TOVA_OK = 0,
    TOVA_ERR_ARG = -1,       // invalid argument; nothing was changed
    TOVA_ERR_CAPTURE = -2,   // the expected graph nodes were not seen during llama_decode
    TOVA_ERR_STATE = -3,     // engine bookkeeping disagrees with llama.cpp
    TOVA_ERR_BACKEND = -4,   // llama_decode or a backend operation failed
    TOVA_ERR_MEMORY = -5,    // an allocation failed
    TOVA_ERR_CAPACITY = -6,  // tova_engine_seq_add: the sequence's cells do not fit beside the others; nothing changed
};

enum {
    TOVA_MAX_SEQ = 256,  // llama.cpp's LLAMA_MAX_SEQ: sequence ids of one context
};

// SHA-256 (hex) of the tova.h the engine was built from.
const char * tova_abi_hash(void);

// n_layer: the model's layers; memory: the most cells the engine ever fills (budget + max(chunk,
// evict_interval)), also the engine's first cell count (tova_engine_set_cells gives llama.cpp's real one);
// v_trans: V cache stored transposed (flash attention off). Returns NULL and fills err on bad arguments.
// Environment, read here once: TOVA_MOVER=graph forces the ggml-graph mover; TOVA_CHECK_CELLS=1 reads the
// cells llama.cpp chose on every decode (a sync on a GPU) and checks the engine's invariants after every cut.
tova_engine * tova_engine_create(int32_t policy, int32_t n_layer, int32_t budget, int32_t memory, bool v_trans,
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
// Resize to the context's real cell count (llama_n_ctx, padded by llama.cpp, >= memory); clears the state.
int32_t tova_engine_set_cells(tova_engine * e, int32_t n_cells);
// Cut only once budget + m cells are occupied (evicting m or more at once, by the newest query's scores);
// m = 1 is the paper's per-token TOVA. Needs budget + m <= memory.
int32_t tova_engine_set_evict_interval(tova_engine * e, int32_t m);
// CPU threads for the flash-attention scoring graph when the cache is in host memory; may change between decodes.
void tova_engine_set_threads(tova_engine * e, int32_t n_threads);
// Take the device paths even for host buffers (tests): the ggml-graph mover, and with flash attention off the
// attention sums formed by a ggml graph (reduce.h) instead of reading the softmax rows.
void tova_engine_set_force_graph_mover(tova_engine * e, bool force);

// llama_context_params.cb_eval; user_data = the engine. Runs on the llama_decode thread; wants no node outside
// tova_engine_decode.
bool tova_eval_callback(struct ggml_tensor * t, bool ask, void * user_data);
// Whether the context needs tova_eval_callback (ask after set_keep/set_n_sink, before creating the context):
// false for full, and for window/sink with nothing protected, which never score and never move a row (every
// layer evicts the cells llama.cpp frees), and whose cells the engine predicts. Without a callback llama.cpp
// runs each graph as it would alone: with one, ggml checks every node of every decode (on CUDA: no graph id
// for a callback's graph views, so each node's properties are compared) and syncs after each split.
// True when TOVA_CHECK_CELLS is set.
// When the callback is needed, the engine also switches it per decode on the context's scheduler: a decode that
// needs no node of the graph (tova's unscored decodes on a device, whose cells the engine predicts) runs without
// it, as llama.cpp alone would, and the engine puts tova_eval_callback (user data = the engine) back before the
// next decode that does. A context made for the engine must therefore use exactly that callback. Where the
// scheduler cannot be reached (libllama without llama_context::get_sched) or TOVA_KEEP_CALLBACK=1, it stays on.
bool tova_engine_needs_callback(const tova_engine * e);

// Called after each ubatch: n_done of n_total tokens are in the cache. Return false to stop.
typedef bool (*tova_progress_fn)(int32_t n_done, int32_t n_total, void * user_data);

// One step: evaluates tokens[0..n) of sequence 0 at positions pos0.. into the bounded cache. The engine splits
// them into pieces that fit in `memory` cells and each piece into ubatches of llama_n_ubatch(ctx) tokens
// (begin -> llama_decode -> end), captures scores only on the decodes a cut follows, and after each piece cuts
// every layer to `budget` by its policy (once budget + evict_interval cells are occupied).
// logits: NULL (only each ubatch's last token computes logits; read them with llama_get_logits_ith(ctx, -1)) or
// room for n * n_vocab floats: every token's logits, each from the cache as it was when it was processed.
// progress: NULL or called after each ubatch (and its cut); false after the last ubatch stops nothing.
// Returns TOVA_OK; TOVA_CANCELLED when progress returned false (*n_done tokens stay in the cache, consistent:
// llama.cpp's positions are pos0..pos0+*n_done-1); TOVA_ERR_ARG before any decode, nothing changed; any other
// error clears the whole cache (llama_memory_clear and the engine), *n_done = 0.
// Refused (TOVA_ERR_ARG) on an engine in many-sequence mode (tova_engine_set_n_seq).
int32_t tova_engine_decode(tova_engine * e, struct llama_context * ctx, const int32_t * tokens, int32_t n, int32_t pos0,
                           float * logits, tova_progress_fn progress, void * user_data, int32_t * n_done);
// Forget everything (after llama_memory_clear); sequences stay added, their positions restart at 0.
void tova_engine_reset(tova_engine * e);

// ---- many sequences in one context (docs/ARCHITECTURE.md, section "Many sequences") ----
// The context uses a unified KV cache (llama_context_params.kv_unified = true, n_seq_max = n_seq_max): one
// stream of cells shared by every sequence, each cell owned by one sequence (or per-sequence streams:
// tova_engine_set_streams). Each sequence reserves `memory` cells (its budget + max(chunk, evict_interval)); the
// reservations of the active sequences never exceed the context's cells, so every decode finds its cells. The
// engine's policy and n_sink apply to every sequence; budget, keep and evict_interval are per sequence. Call once,
// before any decode: afterwards tova_engine_decode is refused and sequences are added one by one.
int32_t tova_engine_set_n_seq(tova_engine * e, int32_t n_seq_max);
// Per-sequence streams instead (llama_context_params.kv_unified = false): llama.cpp gives each sequence id its own
// stream of llama_n_ctx_seq(ctx) = llama_n_ctx(ctx) / n_seq_max cells, and attention runs per stream over that
// stream's cells only. The engine numbers cells as attn_inp_k_idxs does (stream s holds cells [s * n_ctx_seq,
// (s + 1) * n_ctx_seq)); a sequence fits when its memory <= n_ctx_seq. Call after tova_engine_set_n_seq, before any
// decode; per_seq = false returns to one unified stream. Each decode checks that the context agrees.
int32_t tova_engine_set_streams(tova_engine * e, bool per_seq);
// Activates sequence `seq` (in [0, n_seq_max), not active) with its settings (1 <= budget, 0 <= keep < budget,
// budget + evict_interval <= memory). TOVA_ERR_CAPACITY when memory exceeds tova_engine_cells_free; any other
// refusal TOVA_ERR_ARG; nothing changed on error.
int32_t tova_engine_seq_add(tova_engine * e, int32_t seq, int32_t budget, int32_t memory, int32_t keep,
                            int32_t evict_interval);
// Cells not reserved by an active sequence; with per-sequence streams the cells of one stream while a sequence id
// is free, else 0.
int32_t tova_engine_cells_free(const tova_engine * e);
// Frees every cell of an active sequence (llama.cpp's and the engine's); it stays active, positions restart at 0.
int32_t tova_engine_seq_reset(tova_engine * e, struct llama_context * ctx, int32_t seq);
// Frees its cells and its reservation; the id can be added again.
int32_t tova_engine_seq_remove(tova_engine * e, struct llama_context * ctx, int32_t seq);
// Cells an active sequence occupies, and its next position (tokens seen); TOVA_ERR_ARG for an inactive id.
int32_t tova_engine_seq_n_occupied(const tova_engine * e, int32_t seq);
int32_t tova_engine_seq_n_past(const tova_engine * e, int32_t seq);
// out: [n_cells] the sequence owning each cell, -1 where free (with tova_engine_cell_positions: a sequence's
// per-layer positions).
int32_t tova_engine_cell_seqs(const tova_engine * e, int32_t * out, size_t n);
// One batched step: sequence seq_ids[i] (active, distinct) evaluates its next n_tokens[i] tokens, taken in order
// from `tokens` (sum of n_tokens), at its own next positions. Every llama_decode carries tokens of several
// sequences (single tokens first, then prompt pieces, up to llama_n_ubatch tokens); each sequence is split into
// pieces that fit its memory and cut to its budget after each piece by its own newest token's attention, over
// its own cells only. logits: NULL or room for n_seqs * n_vocab floats: row i = the logits of sequence
// seq_ids[i]'s last token. TOVA_ERR_ARG before any decode, nothing changed; any other error clears every
// sequence (they stay active, at position 0).
int32_t tova_engine_decode_batch(tova_engine * e, struct llama_context * ctx, const int32_t * seq_ids,
                                 const int32_t * n_tokens, int32_t n_seqs, const int32_t * tokens, float * logits);

int32_t tova_engine_n_occupied(const tova_engine * e);
// out: [n_layer * n_cells] original position held by each layer's cell, -1 where empty.
int32_t tova_engine_cell_positions(const tova_engine * e, int32_t * out, size_t n);
// Graph nodes the eval callback read during the last llama_decode; each one costs a backend sync
// (tova and h2o: one per layer on a scored decode; window, sink and full: none).
int32_t tova_engine_n_observed(const tova_engine * e);
const char * tova_engine_last_error(const tova_engine * e);
// Cumulative costs since creation (or the last reset), for profiling: out[n], the first n <= TOVA_STAT_COUNT
// counters. The finer ones split the coarse ones: decode_s contains capture_s; score_s = score_build_s +
// score_compute_s + score_read_s; cut_s = choose_s + move_s + the metadata removal.
enum tova_stat {
    TOVA_STAT_SCORED_DECODES = 0,    // decodes that captured scores
    TOVA_STAT_CAPTURE_S = 1,         // seconds in the eval callback's data phase (reading scores / the query)
    TOVA_STAT_SCORE_S = 2,           // seconds in the flash-attention scoring graph (compute, read-back)
    TOVA_STAT_CUTS = 3,              // cuts that evicted
    TOVA_STAT_CUT_S = 4,             // seconds choosing, moving rows and removing metadata (mover + seq_rm)
    TOVA_STAT_DECODES = 5,           // llama_decode calls (ubatches)
    TOVA_STAT_DECODE_S = 6,          // seconds in llama_decode and the wait for its graph (includes capture_s;
                                     // a single sequence's unscored decode: the launch, no wait)
    TOVA_STAT_SCORE_BUILDS = 7,      // scoring graphs built (a new one whenever n_kv, the rows or the K views change)
    TOVA_STAT_SCORE_BUILD_S = 8,     // seconds building and allocating scoring graphs
    TOVA_STAT_SCORE_COMPUTE_S = 9,   // seconds computing the scoring graph (on its device, synchronous)
    TOVA_STAT_SCORE_READ_S = 10,     // seconds reading the head means back and spreading them over the cells
    TOVA_STAT_CHOOSE_S = 11,         // seconds choosing the evicted cells and the moves (host, per sequence and layer)
    TOVA_STAT_MOVE_S = 12,           // seconds in the mover (synchronize, then the row copies)
    TOVA_STAT_LOGITS_S = 13,         // seconds reading llama.cpp's logits (and copying them when asked)
    TOVA_STAT_STEP_S = 14,           // seconds inside tova_engine_decode / tova_engine_decode_batch
    TOVA_STAT_SCORED_DECODE_S = 15,  // the part of decode_s spent in scored decodes (their per-layer syncs included)
    TOVA_STAT_MOVE_NODES = 16,       // graph nodes the mover computed on a device (or with force_graph): ~kernels
    TOVA_STAT_PLAIN_DECODES = 17,    // decodes in which the eval callback never ran: switched off for them
                                     // (tova_engine_needs_callback), or a context without one (full, window)
    TOVA_STAT_SCORE_NODES = 18,      // nodes of the flash-attention scoring graphs computed (~kernels on a device)
    TOVA_STAT_COUNT = 19,
};
int32_t tova_engine_stats(tova_engine * e, double * out, size_t n, bool reset);
// Name of the buffer holding the K cache (e.g. "CPU", "CUDA0"); "" before the first decode.
const char * tova_engine_cache_buffer(const tova_engine * e);

// The policy alone, for tests on synthetic arrays: of the n cells with score[i] and original position pos[i]
// (pos < 0: empty, never chosen), writes to out_evict the k cells to evict, lowest score first (ties: older
// position first). Returns the number written or TOVA_ERR_ARG.
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

// ---- save and resume (docs/STATE.md) ----
// Bytes tova_engine_export_state writes for the cells occupied now.
int32_t tova_engine_state_size(const tova_engine * e, size_t * out);
// The engine's bookkeeping of every occupied cell (cell index, metadata position, per-layer original position,
// h2o accumulator) and its settings; n must equal tova_engine_state_size.
int32_t tova_engine_export_state(tova_engine * e, uint8_t * out, size_t n);
// Replaces the bookkeeping with an exported one of the same settings. Call only after llama.cpp's rows were
// restored into the very cells the export names. Checks everything first: on error nothing changed.
int32_t tova_engine_import_state(tova_engine * e, const uint8_t * data, size_t n);
// Forget positions >= n_new in every layer and in llama.cpp's metadata (seq 0), e.g. the tokens of a reply past a
// stop string. Needs n_new > the oldest metadata position. A layer that evicted some of those rows already drops
// as many others (h2o and sink: by their own rule; tova, window, full: the oldest unprotected) so every layer
// keeps the same count. Errors leave everything unchanged except TOVA_ERR_BACKEND.
int32_t tova_engine_truncate(tova_engine * e, struct llama_context * ctx, int32_t n_new);

// ---- one sequence of many: park and resume (BatchSession.save_state / load_state; docs/STATE.md) ----
// tova_engine_export_state's layout for an active sequence of a many-sequence engine (its budget, keep and
// evict_interval in the header): bytes, then the export.
int32_t tova_engine_seq_state_size(const tova_engine * e, int32_t seq, size_t * out);
int32_t tova_engine_seq_export_state(tova_engine * e, int32_t seq, uint8_t * out, size_t n);
// Where llama_state_seq_set_data will put an exported sequence's cells now, for `seq` (active, empty, the same
// settings): its saved cell indices when they are all free (so it computes over the very same layout), else the
// lowest free cells. llama.cpp's slot search fills cells in a fixed order; writes layout[i] for the i-th cell it
// fills: the index (in the export) of the saved cell it must receive, or -1 for a filler (zero rows, positions
// after the window, removed again by tova_engine_seq_import_state). Returns the count (<= n_layout); no other
// sequence's cell is ever a slot. TOVA_ERR_CAPACITY when the free cells cannot hold it; nothing changed.
int32_t tova_engine_seq_plan_import(tova_engine * e, int32_t seq, const uint8_t * data, size_t n, int32_t * layout,
                                    int32_t n_layout);
// Call right after llama_state_seq_set_data(ctx, state rewritten by that layout, seq): checks llama.cpp's
// positions of seq, removes the fillers (seq_rm) and takes over the bookkeeping; the sequence continues at the
// saved position. Checks first: on error the engine's bookkeeping is unchanged (the caller resets the sequence).
int32_t tova_engine_seq_import_state(tova_engine * e, struct llama_context * ctx, int32_t seq, const uint8_t * data,
                                     size_t n);

#ifdef __cplusplus
}
#endif
