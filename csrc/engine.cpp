// engine: the C API (tova.h) over state, capture, score, policy, mover and backend, and the step it owns:
// pieces -> ubatches -> (arm the callback, llama_decode, place the tokens) -> cut. "Does this decode capture,
// does this piece cut" is decided here and nowhere else.
#include <dlfcn.h>

#include <algorithm>
#include <chrono>
#include <climits>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <new>
#include <string>
#include <vector>

#include "engine_impl.h"
#include "ggml-backend.h"
#include "ggml.h"
#include "llama.h"
#include "policy.h"

#ifndef TOVA_H_SHA256
#define TOVA_H_SHA256 "unknown"
#endif

// Sizes the engine accepts: the state holds n_layer x n_cells entries of 4 + 8 + 4 bytes.
static const int32_t MAX_CELLS = 1 << 24;
static const int64_t MAX_LAYER_CELLS = (int64_t) 1 << 28;

double tova::now_s() {
    return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

tova_engine::~tova_engine() {
    if (batch) {
        llama_batch_free(*batch);
        delete batch;
    }
}

static int32_t fail(tova_engine * e, int32_t code, const std::string & msg) {
    if (e) e->error = msg;
    return code;
}

static void write_err(char * err, size_t len, const std::string & msg) {
    if (err && len) snprintf(err, len, "%s", msg.c_str());
}

// Runs f, turning a C++ exception into an error code: nothing unwinds through the C API.
template <class F>
static int32_t guarded(tova_engine * e, F && f) {
    try {
        return f();
    } catch (const std::bad_alloc &) {
        return fail(e, TOVA_ERR_MEMORY, "out of memory");
    } catch (const std::exception & x) {
        return fail(e, TOVA_ERR_STATE, std::string("internal error: ") + x.what());
    } catch (...) {
        return fail(e, TOVA_ERR_STATE, "internal error");
    }
}

static bool uses_scores(int32_t policy) { return policy == TOVA_POLICY_TOVA || policy == TOVA_POLICY_H2O; }

static const char * size_error(int32_t n_layer, int32_t n_cells) {
    if (n_cells > MAX_CELLS || (int64_t) n_layer * n_cells > MAX_LAYER_CELLS)
        return "too many cells for the engine's bookkeeping (n_layer x n_cells must stay <= 2^28, n_cells <= 2^24)";
    return nullptr;
}

// Allocates every per-cell array for n_cells cells; clears the state.
static void resize_cells(tova_engine * e, int32_t n_cells) {
    e->st.resize(e->n_layer, n_cells, std::max<int32_t>(1, (int32_t) e->seqs.size()), e->n_stream);
    for (auto & q : e->seqs) q.n_past = 0;
    e->scores.assign((size_t) e->n_layer * n_cells, 0.0f);
}

extern "C" const char * tova_abi_hash(void) { return TOVA_H_SHA256; }

extern "C" tova_engine * tova_engine_create(int32_t policy, int32_t n_layer, int32_t budget, int32_t memory,
                                            bool v_trans, char * err, size_t err_len) {
    if (policy < TOVA_POLICY_FULL || policy > TOVA_POLICY_H2O) {
        write_err(err, err_len, "unknown policy " + std::to_string(policy));
        return nullptr;
    }
    if (n_layer < 1 || budget < 1 || memory < budget) {
        write_err(err, err_len,
                  "need n_layer >= 1 and 1 <= budget <= memory (got n_layer=" + std::to_string(n_layer) +
                      ", budget=" + std::to_string(budget) + ", memory=" + std::to_string(memory) + ")");
        return nullptr;
    }
    if (const char * why = size_error(n_layer, memory)) {
        write_err(
            err, err_len,
            std::string(why) + " (got n_layer=" + std::to_string(n_layer) + ", cells=" + std::to_string(memory) + ")");
        return nullptr;
    }
    if (policy == TOVA_POLICY_H2O && !v_trans) {
        // flash attention gives no attention matrix; the FA scoring graph recomputes only the newest row
        write_err(err, err_len, "policy h2o needs flash attention off: it accumulates every query's attention row");
        return nullptr;
    }
    tova_engine * e = nullptr;
    try {
        e = new tova_engine();
        e->policy = policy;
        e->n_layer = n_layer;
        e->budget = budget;
        e->memory = memory;
        e->v_trans = v_trans;
        const char * mv = getenv("TOVA_MOVER");
        e->force_graph = mv && strcmp(mv, "graph") == 0;
        const char * chk = getenv("TOVA_CHECK_CELLS");
        e->verify_cells = chk && strcmp(chk, "0") != 0 && *chk;
        const char * keep_cb = getenv("TOVA_KEEP_CALLBACK");
        e->keep_callback = keep_cb && strcmp(keep_cb, "0") != 0 && *keep_cb;
        e->cache_k.assign(n_layer, nullptr);
        e->cache_v.assign(n_layer, nullptr);
        e->scored.assign(n_layer, 0);
        e->managed.assign(n_layer, 1);
        e->seqs.assign(1, tova_seq());
        e->seqs[0].active = true;
        e->seqs[0].budget = budget;
        e->seqs[0].memory = memory;
        resize_cells(e, memory);
        return e;
    } catch (const std::bad_alloc &) {
        delete e;
        write_err(err, err_len, "out of memory creating the engine");
    } catch (const std::exception & x) {
        delete e;
        write_err(err, err_len, std::string("cannot create the engine: ") + x.what());
    }
    return nullptr;
}

extern "C" void tova_engine_free(tova_engine * e) { delete e; }

extern "C" int32_t tova_engine_set_keep(tova_engine * e, int32_t keep) {
    if (!e) return TOVA_ERR_ARG;
    if (keep < 0 || keep >= e->budget)
        return fail(e, TOVA_ERR_ARG,
                    "keep must be in [0, budget) (got keep=" + std::to_string(keep) +
                        ", budget=" + std::to_string(e->budget) + "): the protected prefix must leave room to evict");
    if (e->st.n_occupied() != 0) return fail(e, TOVA_ERR_STATE, "set keep before the first decode or after reset");
    e->keep = keep;
    if (!e->multi) e->seqs[0].keep = keep;
    return TOVA_OK;
}

extern "C" int32_t tova_engine_set_n_sink(tova_engine * e, int32_t n_sink) {
    if (!e) return TOVA_ERR_ARG;
    if (n_sink < 0 || (e->policy == TOVA_POLICY_SINK && n_sink >= e->budget))
        return fail(e, TOVA_ERR_ARG,
                    "n_sink must be in [0, budget) (got n_sink=" + std::to_string(n_sink) +
                        ", budget=" + std::to_string(e->budget) + ")");
    if (e->st.n_occupied() != 0) return fail(e, TOVA_ERR_STATE, "set n_sink before the first decode or after reset");
    e->n_sink = n_sink;
    return TOVA_OK;
}

extern "C" int32_t tova_engine_set_cells(tova_engine * e, int32_t n_cells) {
    if (!e) return TOVA_ERR_ARG;
    if (n_cells < e->memory)
        return fail(e, TOVA_ERR_ARG,
                    "n_cells (" + std::to_string(n_cells) + ") must be >= memory (" + std::to_string(e->memory) + ")");
    if (const char * why = size_error(e->n_layer, n_cells)) return fail(e, TOVA_ERR_ARG, why);
    if (n_cells % e->n_stream != 0)
        return fail(e, TOVA_ERR_ARG,
                    "n_cells (" + std::to_string(n_cells) + ") must be a multiple of the " +
                        std::to_string(e->n_stream) + " streams");
    return guarded(e, [&] {
        resize_cells(e, n_cells);
        return TOVA_OK;
    });
}

extern "C" int32_t tova_engine_set_evict_interval(tova_engine * e, int32_t m) {
    if (!e) return TOVA_ERR_ARG;
    if (m < 1 || (int64_t) e->budget + m > e->memory)
        return fail(
            e, TOVA_ERR_ARG,
            "evict_interval must be >= 1 and budget + evict_interval <= memory (got " + std::to_string(m) + ")");
    e->evict_interval = m;
    if (!e->multi) e->seqs[0].evict_interval = m;
    return TOVA_OK;
}

extern "C" void tova_engine_set_threads(tova_engine * e, int32_t n_threads) {
    if (e) e->devs.set_threads(n_threads);
}

extern "C" void tova_engine_set_force_graph_mover(tova_engine * e, bool force) {
    if (e) e->force_graph = force;
}

extern "C" int32_t tova_engine_set_layers(tova_engine * e, const uint8_t * managed, int32_t n_layer) {
    if (!e) return TOVA_ERR_ARG;
    if (!managed || n_layer != e->n_layer)
        return fail(e, TOVA_ERR_ARG, "need one flag per layer (n_layer=" + std::to_string(e->n_layer) + ")");
    if (std::none_of(managed, managed + n_layer, [](uint8_t m) { return m != 0; }))
        return fail(e, TOVA_ERR_ARG, "at least one layer must be managed");
    if (e->st.n_occupied() != 0)
        return fail(e, TOVA_ERR_STATE, "set the managed layers before the first decode or after reset");
    for (int32_t l = 0; l < n_layer; l++) e->managed[l] = managed[l] != 0;
    e->layers_checked = false;
    return TOVA_OK;
}

extern "C" bool tova_engine_needs_callback(const tova_engine * e) {
    if (!e) return false;
    const int32_t protect = e->policy == TOVA_POLICY_SINK ? std::max(e->keep, e->n_sink) : e->keep;
    // many sequences: keep is per sequence, added later, so window and sink may move rows
    const bool by_position =
        e->policy == TOVA_POLICY_FULL ||
        (!e->multi && (e->policy == TOVA_POLICY_WINDOW || e->policy == TOVA_POLICY_SINK) && protect == 0);
    return !by_position || e->verify_cells;
}

extern "C" void tova_engine_reset(tova_engine * e) {
    if (!e) return;
    e->st.clear();
    for (auto & q : e->seqs) q.n_past = 0;
    e->armed = tova_armed();
    e->error.clear();
}

// Clears llama.cpp's memory and the engine together: the only consistent state after a failed step.
static void clear_all(tova_engine * e, llama_context * ctx) {
    llama_memory_clear(llama_get_memory(ctx), true);
    e->st.clear();
    e->armed.n_tokens = 0;
}

// -- the step ------------------------------------------------------------------------------------------------

// The one answer to "does a piece that leaves `occupied` cells of sequence s end in a cut" (and so: capture
// its last decode).
static bool cuts_at(const tova_engine * e, int32_t s, int32_t occupied) {
    const tova_seq & q = e->seqs[s];
    return e->policy != TOVA_POLICY_FULL && occupied - q.budget >= q.evict_interval;
}

// llama_context::get_sched() const: exported by libllama (C++ ABI; llama.h has no C entry for it), the scheduler
// that holds the context's eval callback. Resolved once by name in the libllama the engine links; null if absent.
using get_sched_fn = ggml_backend_sched_t (*)(const llama_context *);
static get_sched_fn resolve_get_sched() {
    static const get_sched_fn fn = []() -> get_sched_fn {
        Dl_info info;
        if (!dladdr((void *) &llama_decode, &info) || !info.dli_fname) return nullptr;
        void * h = dlopen(info.dli_fname, RTLD_LAZY | RTLD_NOLOAD);
        if (!h) return nullptr;
        void * sym = dlsym(h, "_ZNK13llama_context9get_schedEv");
        dlclose(h);  // drops RTLD_NOLOAD's reference only: the engine links libllama, which stays loaded
        return (get_sched_fn) sym;
    }();
    return fn;
}

static ggml_backend_sched_t sched_of(llama_context * ctx) {
    const get_sched_fn get_sched = resolve_get_sched();
    return get_sched ? get_sched(ctx) : nullptr;
}

// Switches the eval callback for the next llama_decode (docs/ARCHITECTURE.md section 8, "The callback switched"):
// a decode that needs no node of the graph runs without it, so ggml's scheduler computes each split as one
// graph and does not wait after it, as with llama.cpp alone; one that needs nodes gets it back. llama.cpp itself
// reinstalls the context's callback (this one) whenever it rebuilds a graph: such a decode is merely slower.
static void switch_callback(tova_engine * e, ggml_backend_sched_t sched, bool want) {
    if (!sched || e->keep_callback || !tova_engine_needs_callback(e)) return;
    if (want) ggml_backend_sched_set_eval_callback(sched, tova_eval_callback, e);
    else ggml_backend_sched_set_eval_callback(sched, nullptr, nullptr);
}

// One ubatch as llama_batch rows: token, position, sequence, wants logits; rows scored when capturing.
struct ubatch_rows {
    std::vector<int32_t> tok, pos, seq, rows;
    std::vector<int8_t> logits;
    int32_t size() const { return (int32_t) tok.size(); }
    void add(int32_t t, int32_t p, int32_t s, bool l) {
        tok.push_back(t);
        pos.push_back(p);
        seq.push_back(s);
        logits.push_back(l);
    }
};

static void ensure_batch(tova_engine * e, int32_t n_ub) {
    if (e->batch && e->n_batch_alloc == n_ub) return;
    if (e->batch) {
        llama_batch_free(*e->batch);
        delete e->batch;
        e->batch = nullptr;
    }
    e->batch = new llama_batch(llama_batch_init(n_ub, 0, 1));
    e->n_batch_alloc = n_ub;
}

// One ubatch: arm the callback, llama_decode, place the tokens, score. capture: a cut follows this decode;
// u.rows: the rows whose attention the cut reads (each sequence's newest token in the ubatch).
static int32_t decode_ubatch(tova_engine * e, llama_context * ctx, const ubatch_rows & u, bool capture) {
    llama_batch & b = *e->batch;
    const int32_t n = u.size();
    for (int32_t j = 0; j < n; j++) {
        b.token[j] = u.tok[j];
        b.pos[j] = u.pos[j];
        b.n_seq_id[j] = 1;
        b.seq_id[j][0] = u.seq[j];
        b.logits[j] = u.logits[j];
    }
    b.n_tokens = n;

    tova_armed & a = e->armed;
    // tova needs the row that ends a piece; h2o's accumulator needs every query; window/sink/full need none
    a.scores = (e->policy == TOVA_POLICY_TOVA && capture) || e->policy == TOVA_POLICY_H2O;
    a.rows = u.rows;
    a.stream0 = e->n_stream > 1 ? u.seq[0] : 0;
    const bool predicted = e->st.predict(u.seq.data(), n, e->predicted);
    // the cells: predicted by the slot mirror; read as well where that is free (host, unless the device paths
    // are forced) or asked for
    a.read_cells = !predicted || (e->idxs_host && !e->force_graph) || e->verify_cells;
    a.cells_seen = false;
    a.n_observed = 0;
    a.called = false;
    a.error.clear();
    if (a.scores) std::fill(e->scored.begin(), e->scored.end(), 0);
    ggml_backend_sched_t sched = sched_of(ctx);
    if (a.scores && !e->v_trans) e->fa.begin(e->n_layer, a.rows, sched);
    // the callback is needed to score, to read the cells, and until every layer's cache tensors are known
    const bool want_callback = a.scores || a.read_cells || e->n_cache_found < 2 * e->n_layer;
    switch_callback(e, sched, want_callback);
    a.n_tokens = n;
    const double t_dec = tova::now_s();
    const int32_t rc = llama_decode(ctx, b);
    // a GPU may still run the graph: a batched step or a scored decode waits here (its logits read or cut would)
    // so decode_s holds its cost; a single sequence's unscored decode does not, so the host's next token overlaps
    // the GPU's work as with llama.cpp alone (its decode_s then counts the launch only)
    if (rc == 0 && (e->multi || a.scores)) llama_synchronize(ctx);
    const double dt = tova::now_s() - t_dec;
    e->stats[TOVA_STAT_DECODE_S] += dt;
    if (a.scores) e->stats[TOVA_STAT_SCORED_DECODE_S] += dt;
    e->stats[TOVA_STAT_DECODES] += 1;
    if (!a.called) e->stats[TOVA_STAT_PLAIN_DECODES] += 1;
    a.n_tokens = 0;
    if (rc != 0) return fail(e, TOVA_ERR_BACKEND, "llama_decode failed with code " + std::to_string(rc));
    if (!a.error.empty()) return fail(e, TOVA_ERR_CAPTURE, a.error);
    if (e->n_cache_found < 2 * e->n_layer && tova_engine_needs_callback(e))
        return fail(e, TOVA_ERR_CAPTURE,
                    "the KV cache tensors (cache_k_l<il>, cache_v_l<il>) of every layer were not "
                    "seen during llama_decode");

    const int32_t * cells = e->predicted.data();
    if (a.cells_seen) {
        if (predicted) {
            for (int32_t i = 0; i < n; i++)
                if (a.cells[i] != e->predicted[i])
                    return fail(e, TOVA_ERR_STATE,
                                "llama.cpp placed token " + std::to_string(i) + " in cell " +
                                    std::to_string(a.cells[i]) + ", the engine's slot mirror expected " +
                                    std::to_string(e->predicted[i]));
        } else {
            e->predicted.assign(a.cells.begin(), a.cells.end());
            cells = e->predicted.data();
        }
    } else if (!predicted) {
        return fail(e, TOVA_ERR_CAPTURE, "llama_decode did not write the KV cache (attn_inp_k_idxs not seen)");
    }
    std::string err;
    if (!e->st.place(cells, n, u.pos.data(), u.seq.data(), err)) return fail(e, TOVA_ERR_STATE, err);
    if (!e->layers_checked && e->n_cache_found == 2 * e->n_layer) {
        // llama.cpp's iSWA memory keeps full-attention and sliding-window layers in two caches with separate
        // buffers: a managed layer sharing a buffer with an unmanaged one means a wrong layer pattern
        for (int32_t x = 0; x < e->n_layer; x++)
            for (int32_t y = 0; y < e->n_layer; y++)
                if (e->managed[x] && !e->managed[y] && e->cache_k[x]->buffer == e->cache_k[y]->buffer)
                    return fail(e, TOVA_ERR_STATE,
                                "layers " + std::to_string(x) + " (managed) and " + std::to_string(y) +
                                    " (sliding window) share one KV cache: the sliding-window layer pattern is wrong");
        e->layers_checked = true;
    }

    if (a.scores && !e->v_trans) {
        const double t0 = tova::now_s();
        tova::scorer::timing tm;
        if (!e->fa.compute(e->cache_k, e->scores.data(), e->st.n_cells(), e->scored.data(), tm, err))
            return fail(e, TOVA_ERR_CAPTURE, err);
        e->stats[TOVA_STAT_SCORE_S] += tova::now_s() - t0;
        e->stats[TOVA_STAT_SCORE_BUILDS] += tm.builds;
        e->stats[TOVA_STAT_SCORE_BUILD_S] += tm.build_s;
        e->stats[TOVA_STAT_SCORE_COMPUTE_S] += tm.compute_s;
        e->stats[TOVA_STAT_SCORE_READ_S] += tm.read_s;
        e->stats[TOVA_STAT_SCORE_NODES] += tm.nodes;
    }
    if (a.scores) {
        e->stats[TOVA_STAT_SCORED_DECODES] += 1;
        for (int32_t l = 0; l < e->n_layer; l++)
            if (e->managed[l] && !e->scored[l])
                return fail(e, TOVA_ERR_CAPTURE,
                            std::string(e->v_trans ? "no kq_soft_max-" : "no FLASH_ATTN_EXT node for layer ") +
                                std::to_string(l) + " was seen during llama_decode");
    }
    return TOVA_OK;
}

// Evict each listed sequence down to its `budget` occupied cells (those past budget + evict_interval), each layer
// by its policy, with the cell trick (docs/ARCHITECTURE.md): llama.cpp frees each sequence's k oldest metadata
// positions; each layer first moves the rows it keeps out of them. A sequence's moves stay inside its own cells;
// all sequences' moves go to the mover at once.
static int32_t cut(tova_engine * e, llama_context * ctx, const std::vector<int32_t> & seqs) {
    tova::state & st = e->st;
    const double t0 = tova::now_s();
    std::vector<tova::layer_moves> plan(e->n_layer);
    for (int32_t l = 0; l < e->n_layer; l++) {
        plan[l].k = e->cache_k[l];
        plan[l].v = e->cache_v[l];
    }
    struct freed_range {
        int32_t seq, p_min, p_max;
        std::vector<int32_t> cells;
    };
    std::vector<freed_range> frees;
    std::vector<std::pair<int32_t, int32_t>> first_moves;
    const double t_choose = tova::now_s();
    for (int32_t s : seqs) {
        const tova_seq & q = e->seqs[s];
        const int32_t k = st.n_occupied(s) - q.budget;
        if (!cuts_at(e, s, st.n_occupied(s))) continue;
        if (uses_scores(e->policy))
            for (int32_t l = 0; l < e->n_layer; l++)
                if (e->managed[l] && !e->scored[l])
                    return fail(e, TOVA_ERR_STATE, "cut without scores from the last decode");

        // F: the k cells with the smallest metadata positions; llama.cpp frees exactly these
        freed_range fr = {s, INT32_MAX, -1, st.oldest_cells(k, s)};
        for (int32_t c : fr.cells) {
            fr.p_min = std::min(fr.p_min, st.meta_pos(c));
            fr.p_max = std::max(fr.p_max, st.meta_pos(c));
        }
        if (fr.p_max - fr.p_min + 1 != k)
            return fail(e, TOVA_ERR_STATE, "metadata positions are not a contiguous window");

        const tova::policy_params params = {e->policy, q.keep, e->n_sink};
        // every choice orders its cells by (score,) position, which are distinct: any cell order gives it
        const std::vector<int32_t> & occupied = st.cells_of(s);
        int32_t first = -1;  // the first managed layer
        for (int32_t l = 0; l < e->n_layer; l++) {
            if (!e->managed[l]) continue;  // llama.cpp's window: seq_rm below frees only positions it no longer sees
            if (!uses_scores(e->policy) && first >= 0) {
                // window and sink choose by position alone, and every layer holds the same positions: one choice
                plan[l].moves.insert(plan[l].moves.end(), first_moves.begin(), first_moves.end());
                continue;
            }
            // tova reads the scorer's floats directly (the per-token path: one pass per layer, nothing copied)
            std::vector<int32_t> evict =
                e->policy == TOVA_POLICY_TOVA
                    ? tova::policy_lowest(occupied, &e->scores[(size_t) l * st.n_cells()], st.layer_pos(l), q.keep, k)
                    : tova::policy_choose(params, occupied, st.layer_pos(l),
                                          e->policy == TOVA_POLICY_H2O ? st.acc(l) : nullptr, k);
            if ((int32_t) evict.size() != k)
                return fail(e, TOVA_ERR_ARG,
                            "the protected prefix (keep=" + std::to_string(q.keep) +
                                ", n_sink=" + std::to_string(e->n_sink) + ") leaves fewer than " + std::to_string(k) +
                                " evictable cells in layer " + std::to_string(l));
            const auto moves = tova::policy_moves(evict, fr.cells);
            if (first < 0) {
                first = l;
                first_moves = moves;
            }
            plan[l].moves.insert(plan[l].moves.end(), moves.begin(), moves.end());
        }
        frees.push_back(std::move(fr));
    }
    e->stats[TOVA_STAT_CHOOSE_S] += tova::now_s() - t_choose;
    if (frees.empty()) return TOVA_OK;
    bool any_move = false;
    for (const auto & p : plan) any_move = any_move || !p.moves.empty();
    if (any_move) {
        // llama_decode returns before a GPU finishes the graph (the last layers may still read the cache), and
        // the mover's backend has its own stream: wait
        const double t_move = tova::now_s();
        llama_synchronize(ctx);
        std::string err;
        if (!e->mover.apply(plan, e->v_trans, e->force_graph, e->devs, err)) return fail(e, TOVA_ERR_BACKEND, err);
        e->stats[TOVA_STAT_MOVE_S] += tova::now_s() - t_move;
        e->stats[TOVA_STAT_MOVE_NODES] += e->mover.take_nodes();
        for (int32_t l = 0; l < e->n_layer; l++)
            for (const auto & m : plan[l].moves) st.move(l, m.first, m.second);  // bookkeeping travels with rows
    }
    for (const auto & fr : frees) {
        st.remove(fr.cells);
        if (!llama_memory_seq_rm(llama_get_memory(ctx), fr.seq, fr.p_min, fr.p_max + 1))
            return fail(e, TOVA_ERR_STATE, "llama_memory_seq_rm refused the range");
        e->stats[TOVA_STAT_CUTS] += 1;
    }
    if (e->verify_cells) {
        std::string err;
        if (!st.check(err)) return fail(e, TOVA_ERR_STATE, err);
    }
    e->stats[TOVA_STAT_CUT_S] += tova::now_s() - t0;
    return TOVA_OK;
}

static int32_t check_tokens(tova_engine * e, llama_context * ctx, const int32_t * tokens, int32_t n) {
    const int32_t n_vocab = llama_vocab_n_tokens(llama_model_get_vocab(llama_get_model(ctx)));
    for (int32_t i = 0; i < n; i++)
        if (tokens[i] < 0 || tokens[i] >= n_vocab)
            return fail(e, TOVA_ERR_ARG,
                        "token ids must be in [0, " + std::to_string(n_vocab) + "), got " + std::to_string(tokens[i]));
    return TOVA_OK;
}

static int32_t check_cells(tova_engine * e, llama_context * ctx) {
    if ((int64_t) llama_n_ctx(ctx) != e->st.n_cells())
        return fail(e, TOVA_ERR_ARG,
                    "the engine tracks " + std::to_string(e->st.n_cells()) + " cells but the context has " +
                        std::to_string(llama_n_ctx(ctx)) + ": call tova_engine_set_cells(llama_n_ctx(ctx))");
    // the KV cache's streams: llama.cpp gives each of n_seq_max sequences n_ctx_seq cells unless kv_unified
    const int64_t per = llama_n_ctx_seq(ctx);
    if (e->multi && (per < 1 || llama_n_ctx(ctx) / per != e->n_stream))
        return fail(e, TOVA_ERR_ARG,
                    "the context's KV cache has " + std::to_string(per ? llama_n_ctx(ctx) / per : 0) +
                        " stream(s) but the engine expects " + std::to_string(e->n_stream) +
                        (e->n_stream > 1 ? " (one per sequence: kv_unified = false and n_seq_max = the engine's)"
                                         : " (kv_unified = true)"));
    return TOVA_OK;
}

static int32_t check_decode_args(tova_engine * e, llama_context * ctx, const int32_t * tokens, int32_t n,
                                 int32_t pos0) {
    if (!ctx || !tokens) return fail(e, TOVA_ERR_ARG, "ctx and tokens must not be NULL");
    if (e->multi) return fail(e, TOVA_ERR_ARG, "this engine holds many sequences: use tova_engine_decode_batch");
    if (n < 1) return fail(e, TOVA_ERR_ARG, "eval needs at least one token");
    if (pos0 < 0 || (int64_t) pos0 + n > INT32_MAX) return fail(e, TOVA_ERR_ARG, "positions out of range");
    if (int32_t rc = check_cells(e, ctx)) return rc;
    if (e->policy == TOVA_POLICY_FULL && (int64_t) e->st.n_occupied() + n > e->memory)
        return fail(e, TOVA_ERR_ARG,
                    "policy 'full' holds every token: " + std::to_string(e->st.n_occupied()) + " + " +
                        std::to_string(n) + " exceeds " + std::to_string(e->memory) + " cells");
    return check_tokens(e, ctx, tokens, n);
}

extern "C" int32_t tova_engine_decode(tova_engine * e, llama_context * ctx, const int32_t * tokens, int32_t n,
                                      int32_t pos0, float * logits, tova_progress_fn progress, void * user_data,
                                      int32_t * n_done) {
    if (!e) return TOVA_ERR_ARG;
    if (n_done) *n_done = 0;
    bool started = false;
    // any failure after the first llama_decode leaves llama.cpp and the engine unsure of each other: clear both
    auto failed = [&](int32_t rc) {
        if (started && rc < 0 && rc != TOVA_ERR_ARG) {
            clear_all(e, ctx);
            if (n_done) *n_done = 0;
        }
        return rc;
    };
    const double t_step = tova::now_s();
    int32_t rc = check_decode_args(e, ctx, tokens, n, pos0);
    if (rc != TOVA_OK) return rc;
    rc = guarded(e, [&]() -> int32_t {
        const int32_t n_ub = (int32_t) std::min(llama_n_batch(ctx), llama_n_ubatch(ctx));
        ensure_batch(e, n_ub);
        const int32_t n_vocab = logits ? llama_vocab_n_tokens(llama_model_get_vocab(llama_get_model(ctx))) : 0;
        const std::vector<int32_t> seq0(1, 0);
        int32_t done = 0;
        ubatch_rows u;
        while (done < n) {
            // a piece: as many tokens as memory holds; it gets full causal attention, then one cut
            const int32_t room = e->memory - e->st.n_occupied();
            if (room < 1) return fail(e, TOVA_ERR_STATE, "no room left in memory (a cut was skipped)");
            const int32_t piece = std::min(room, n - done);
            const bool cuts = cuts_at(e, 0, e->st.n_occupied() + piece);
            for (int32_t s = 0; s < piece; s += n_ub) {
                const int32_t m = std::min(n_ub, piece - s);
                const bool last = s + m >= piece;
                started = true;
                u = ubatch_rows();
                for (int32_t j = 0; j < m; j++)
                    u.add(tokens[done + s + j], pos0 + done + s + j, 0, logits != nullptr || j == m - 1);
                u.rows.assign(1, m - 1);
                int32_t r = decode_ubatch(e, ctx, u, last && cuts);
                if (r != TOVA_OK) return r == TOVA_ERR_ARG ? TOVA_ERR_STATE : r;
                if (logits) {
                    const double t_lg = tova::now_s();
                    const float * lg = llama_get_logits(ctx);
                    if (!lg) return fail(e, TOVA_ERR_BACKEND, "llama_get_logits returned NULL");
                    memcpy(logits + (size_t) (done + s) * n_vocab, lg, (size_t) m * n_vocab * sizeof(float));
                    e->stats[TOVA_STAT_LOGITS_S] += tova::now_s() - t_lg;
                }
                if (last && (r = cut(e, ctx, seq0)) != TOVA_OK) return r == TOVA_ERR_ARG ? TOVA_ERR_STATE : r;
                if (n_done) *n_done = done + s + m;
                // a stop after the last ubatch stops nothing: the eval is complete
                if (progress && !progress(done + s + m, n, user_data) && done + s + m < n) return TOVA_CANCELLED;
            }
            done += piece;
        }
        return TOVA_OK;
    });
    e->stats[TOVA_STAT_STEP_S] += tova::now_s() - t_step;
    return failed(rc);
}

// ---- many sequences (docs/ARCHITECTURE.md, section "Many sequences") ----------------------------------------

static int32_t cells_reserved(const tova_engine * e) {
    int64_t r = 0;
    for (const auto & q : e->seqs)
        if (q.active) r += q.memory;
    return (int32_t) r;
}

extern "C" int32_t tova_engine_set_n_seq(tova_engine * e, int32_t n_seq_max) {
    if (!e) return TOVA_ERR_ARG;
    if (n_seq_max < 1 || n_seq_max > TOVA_MAX_SEQ)
        return fail(e, TOVA_ERR_ARG,
                    "n_seq_max must be in [1, " + std::to_string(TOVA_MAX_SEQ) + "], got " + std::to_string(n_seq_max));
    if (e->st.n_occupied() != 0) return fail(e, TOVA_ERR_STATE, "set n_seq before the first decode");
    return guarded(e, [&] {
        e->multi = true;
        e->seqs.assign(n_seq_max, tova_seq());
        e->n_stream = 1;
        e->st.resize(e->n_layer, e->st.n_cells(), n_seq_max);
        return TOVA_OK;
    });
}

extern "C" int32_t tova_engine_set_streams(tova_engine * e, bool per_seq) {
    if (!e) return TOVA_ERR_ARG;
    if (!e->multi) return fail(e, TOVA_ERR_ARG, "call tova_engine_set_n_seq first");
    if (e->st.n_occupied() != 0) return fail(e, TOVA_ERR_STATE, "set the streams before the first decode");
    return guarded(e, [&] {
        e->n_stream = per_seq ? (int32_t) e->seqs.size() : 1;
        resize_cells(e, e->st.n_cells());  // tova_engine_set_cells(llama_n_ctx) follows once the context exists
        return TOVA_OK;
    });
}

static int32_t check_seq(tova_engine * e, int32_t seq, bool want_active) {
    if (!e->multi) return fail(e, TOVA_ERR_ARG, "the engine holds one sequence: call tova_engine_set_n_seq first");
    if (seq < 0 || seq >= (int32_t) e->seqs.size())
        return fail(e, TOVA_ERR_ARG,
                    "sequence id " + std::to_string(seq) + " out of range [0, " + std::to_string(e->seqs.size()) + ")");
    if (e->seqs[seq].active != want_active)
        return fail(e, TOVA_ERR_ARG,
                    "sequence " + std::to_string(seq) + (want_active ? " is not active" : " is already active"));
    return TOVA_OK;
}

extern "C" int32_t tova_engine_seq_add(tova_engine * e, int32_t seq, int32_t budget, int32_t memory, int32_t keep,
                                       int32_t evict_interval) {
    if (!e) return TOVA_ERR_ARG;
    if (int32_t rc = check_seq(e, seq, false)) return rc;
    if (budget < 1 || memory < budget || keep < 0 || keep >= budget || evict_interval < 1 ||
        (int64_t) budget + evict_interval > memory)
        return fail(e, TOVA_ERR_ARG,
                    "need 1 <= budget, 0 <= keep < budget, evict_interval >= 1 and budget + evict_interval <= memory "
                    "(got budget=" +
                        std::to_string(budget) + ", memory=" + std::to_string(memory) +
                        ", keep=" + std::to_string(keep) + ", evict_interval=" + std::to_string(evict_interval) + ")");
    if (e->policy == TOVA_POLICY_SINK && e->n_sink >= budget) return fail(e, TOVA_ERR_ARG, "n_sink must be < budget");
    if (e->n_stream > 1 && memory > e->st.stream_cells())
        return fail(e, TOVA_ERR_CAPACITY,
                    "a sequence of " + std::to_string(memory) + " cells does not fit in its stream of " +
                        std::to_string(e->st.stream_cells()) + " cells (llama_n_ctx / n_seq_max)");
    if (e->n_stream == 1 && (int64_t) cells_reserved(e) + memory > e->st.n_cells())
        return fail(e, TOVA_ERR_CAPACITY,
                    "a sequence of " + std::to_string(memory) +
                        " cells does not fit: " + std::to_string(cells_reserved(e)) + " of the context's " +
                        std::to_string(e->st.n_cells()) + " cells are reserved by other sequences");
    tova_seq & q = e->seqs[seq];
    q = tova_seq();
    q.active = true;
    q.budget = budget;
    q.memory = memory;
    q.keep = keep;
    q.evict_interval = evict_interval;
    return TOVA_OK;
}

extern "C" int32_t tova_engine_cells_free(const tova_engine * e) {
    if (!e || !e->multi) return TOVA_ERR_ARG;
    if (e->n_stream > 1)
        return std::any_of(e->seqs.begin(), e->seqs.end(), [](const tova_seq & q) { return !q.active; })
                   ? e->st.stream_cells()
                   : 0;
    return e->st.n_cells() - cells_reserved(e);
}

// Frees every cell of seq in llama.cpp and the engine.
static int32_t clear_seq(tova_engine * e, llama_context * ctx, int32_t seq) {
    const std::vector<int32_t> cells = e->st.occupied(seq);
    if (!llama_memory_seq_rm(llama_get_memory(ctx), seq, -1, -1))
        return fail(e, TOVA_ERR_STATE, "llama_memory_seq_rm refused to clear the sequence");
    e->st.remove(cells);
    e->seqs[seq].n_past = 0;
    return TOVA_OK;
}

extern "C" int32_t tova_engine_seq_reset(tova_engine * e, llama_context * ctx, int32_t seq) {
    if (!e) return TOVA_ERR_ARG;
    if (!ctx) return fail(e, TOVA_ERR_ARG, "ctx must not be NULL");
    if (int32_t rc = check_seq(e, seq, true)) return rc;
    return guarded(e, [&] { return clear_seq(e, ctx, seq); });
}

extern "C" int32_t tova_engine_seq_remove(tova_engine * e, llama_context * ctx, int32_t seq) {
    if (!e) return TOVA_ERR_ARG;
    if (!ctx) return fail(e, TOVA_ERR_ARG, "ctx must not be NULL");
    if (int32_t rc = check_seq(e, seq, true)) return rc;
    return guarded(e, [&] {
        const int32_t rc = clear_seq(e, ctx, seq);
        e->seqs[seq].active = false;
        return rc;
    });
}

extern "C" int32_t tova_engine_seq_n_occupied(const tova_engine * e, int32_t seq) {
    if (!e || !e->multi || seq < 0 || seq >= (int32_t) e->seqs.size() || !e->seqs[seq].active) return TOVA_ERR_ARG;
    return e->st.n_occupied(seq);
}

extern "C" int32_t tova_engine_seq_n_past(const tova_engine * e, int32_t seq) {
    if (!e || !e->multi || seq < 0 || seq >= (int32_t) e->seqs.size() || !e->seqs[seq].active) return TOVA_ERR_ARG;
    return e->seqs[seq].n_past;
}

extern "C" int32_t tova_engine_cell_seqs(const tova_engine * e, int32_t * out, size_t n) {
    if (!e || !out || n != e->st.all_seq().size()) return TOVA_ERR_ARG;
    memcpy(out, e->st.all_seq().data(), n * sizeof(int32_t));
    return TOVA_OK;
}

// Every active sequence back to empty (after a failure inside a batched step left the cache unsure).
static void clear_all_seqs(tova_engine * e, llama_context * ctx) {
    clear_all(e, ctx);
    for (auto & q : e->seqs) q.n_past = 0;
}

extern "C" int32_t tova_engine_decode_batch(tova_engine * e, struct llama_context * ctx, const int32_t * seq_ids,
                                            const int32_t * n_tokens, int32_t n_seqs, const int32_t * tokens,
                                            float * logits) {
    if (!e) return TOVA_ERR_ARG;
    const double t_step = tova::now_s();
    if (!ctx || !seq_ids || !n_tokens || !tokens) return fail(e, TOVA_ERR_ARG, "ctx and arrays must not be NULL");
    if (!e->multi) return fail(e, TOVA_ERR_ARG, "the engine holds one sequence: use tova_engine_decode");
    if (n_seqs < 1 || n_seqs > (int32_t) e->seqs.size())
        return fail(e, TOVA_ERR_ARG, "a batch holds 1 to n_seq_max sequences, got " + std::to_string(n_seqs));
    if (int32_t rc = check_cells(e, ctx)) return rc;
    // cursors: one per sequence, single tokens (decodes) first so that prompts never delay them
    struct cursor {
        int32_t seq, n, off, pos0, done = 0, piece_left = 0, out = 0;
    };
    std::vector<cursor> cur;
    std::vector<uint8_t> seen(e->seqs.size(), 0);
    int64_t total = 0;
    for (int32_t i = 0; i < n_seqs; i++) {
        const int32_t s = seq_ids[i];
        if (int32_t rc = check_seq(e, s, true)) return rc;
        if (seen[s]) return fail(e, TOVA_ERR_ARG, "sequence " + std::to_string(s) + " appears twice in the batch");
        seen[s] = 1;
        if (n_tokens[i] < 1) return fail(e, TOVA_ERR_ARG, "each sequence needs at least one token");
        const tova_seq & q = e->seqs[s];
        if ((int64_t) q.n_past + n_tokens[i] > INT32_MAX) return fail(e, TOVA_ERR_ARG, "positions out of range");
        if (e->policy == TOVA_POLICY_FULL && (int64_t) e->st.n_occupied(s) + n_tokens[i] > q.memory)
            return fail(e, TOVA_ERR_ARG,
                        "policy 'full' holds every token: sequence " + std::to_string(s) + " holds " +
                            std::to_string(e->st.n_occupied(s)) + " + " + std::to_string(n_tokens[i]) + " exceeds " +
                            std::to_string(q.memory) + " cells");
        cursor c;
        c.seq = s;
        c.n = n_tokens[i];
        c.off = (int32_t) total;
        c.pos0 = q.n_past;
        c.out = i;
        cur.push_back(c);
        total += n_tokens[i];
        if (total > INT32_MAX) return fail(e, TOVA_ERR_ARG, "too many tokens in one batch");
    }
    if (int32_t rc = check_tokens(e, ctx, tokens, (int32_t) total)) return rc;
    if (e->n_stream > 1)  // per-sequence streams: a ubatch is a run of consecutive ids (below)
        std::sort(cur.begin(), cur.end(), [](const cursor & a, const cursor & b) { return a.seq < b.seq; });
    else
        std::stable_sort(cur.begin(), cur.end(),
                         [](const cursor & a, const cursor & b) { return (a.n == 1) > (b.n == 1); });

    bool started = false;
    const int32_t rc = guarded(e, [&]() -> int32_t {
        const int32_t n_ub = (int32_t) std::min(llama_n_batch(ctx), llama_n_ubatch(ctx));
        ensure_batch(e, n_ub);
        const int32_t n_vocab = llama_vocab_n_tokens(llama_model_get_vocab(llama_get_model(ctx)));
        ubatch_rows u;
        std::vector<int32_t> ended, out_of;  // sequences whose piece ends in this ubatch; logits rows
        size_t remaining = cur.size();
        while (remaining > 0) {
            u = ubatch_rows();
            ended.clear();
            out_of.assign(cur.size(), -1);
            bool capture = false;  // a cut follows: score this decode
            // a piece: as many tokens as the sequence's memory holds, then a cut
            auto start_piece = [&](cursor & c) -> bool {
                if (c.piece_left > 0) return true;
                const int32_t room = e->seqs[c.seq].memory - e->st.n_occupied(c.seq);
                if (room < 1) return false;
                c.piece_left = std::min(room, c.n - c.done);
                return true;
            };
            std::vector<std::pair<size_t, int32_t>> takes;  // (cursor, tokens it puts in this ubatch)
            if (e->n_stream == 1) {
                int32_t left = n_ub;
                for (size_t i = 0; i < cur.size() && left > 0; i++) {
                    if (cur[i].done == cur[i].n) continue;
                    if (!start_piece(cur[i]))
                        return fail(e, TOVA_ERR_STATE, "no room left in memory (a cut was skipped)");
                    takes.push_back({i, std::min(cur[i].piece_left, left)});
                    left -= takes.back().second;
                }
            } else {
                // llama.cpp splits a batch over several streams with split_equal(sequential): one ubatch takes a run
                // of consecutive sequence ids, the same number of tokens each. Form exactly that ubatch, so that
                // one llama_decode is one ubatch (cursors are sorted by id).
                size_t i = 0;
                while (cur[i].done == cur[i].n) i++;
                int32_t m = INT32_MAX;
                for (; i < cur.size() && (int32_t) takes.size() < n_ub && cur[i].done < cur[i].n &&
                       (takes.empty() || cur[i].seq == cur[takes.back().first].seq + 1);
                     i++) {
                    if (!start_piece(cur[i]))
                        return fail(e, TOVA_ERR_STATE, "no room left in memory (a cut was skipped)");
                    takes.push_back({i, 0});
                    m = std::min(m, cur[i].piece_left);
                }
                m = std::min(m, n_ub / (int32_t) takes.size());
                for (auto & t : takes) t.second = m;
            }
            for (const auto & t : takes) {
                cursor & c = cur[t.first];
                const int32_t m = t.second;
                for (int32_t j = 0; j < m; j++) {
                    const int32_t tk = c.done + j;
                    u.add(tokens[c.off + tk], c.pos0 + tk, c.seq, tk == c.n - 1);
                }
                u.rows.push_back(u.size() - 1);
                c.done += m;
                c.piece_left -= m;
                if (c.done == c.n) out_of[t.first] = u.size() - 1;
                // a piece that ends here: its sequence holds occupied + m cells after the decode
                if (c.piece_left == 0) {
                    ended.push_back(c.seq);
                    capture = capture || cuts_at(e, c.seq, e->st.n_occupied(c.seq) + m);
                }
            }
            started = true;
            int32_t r = decode_ubatch(e, ctx, u, capture);
            if (r != TOVA_OK) return r == TOVA_ERR_ARG ? TOVA_ERR_STATE : r;
            const double t_lg = tova::now_s();
            for (size_t i = 0; i < cur.size(); i++) {
                if (out_of[i] < 0) continue;
                remaining--;
                if (!logits) continue;  // llama.cpp computed them; nobody reads them
                const float * lg = llama_get_logits_ith(ctx, out_of[i]);
                if (!lg) return fail(e, TOVA_ERR_BACKEND, "llama_get_logits_ith returned NULL");
                memcpy(logits + (size_t) cur[i].out * n_vocab, lg, (size_t) n_vocab * sizeof(float));
            }
            e->stats[TOVA_STAT_LOGITS_S] += tova::now_s() - t_lg;
            for (int32_t j = 0; j < u.size(); j++) e->seqs[u.seq[j]].n_past = u.pos[j] + 1;
            if (!ended.empty() && (r = cut(e, ctx, ended)) != TOVA_OK) return r == TOVA_ERR_ARG ? TOVA_ERR_STATE : r;
        }
        return TOVA_OK;
    });
    if (started && rc < 0 && rc != TOVA_ERR_ARG) clear_all_seqs(e, ctx);
    e->stats[TOVA_STAT_STEP_S] += tova::now_s() - t_step;
    return rc;
}

extern "C" int32_t tova_engine_n_occupied(const tova_engine * e) { return e ? e->st.n_occupied() : TOVA_ERR_ARG; }

extern "C" int32_t tova_engine_cell_positions(const tova_engine * e, int32_t * out, size_t n) {
    if (!e || !out || n != e->st.all_layer_pos().size()) return TOVA_ERR_ARG;
    memcpy(out, e->st.all_layer_pos().data(), n * sizeof(int32_t));
    return TOVA_OK;
}

extern "C" int32_t tova_engine_n_observed(const tova_engine * e) { return e ? e->armed.n_observed : TOVA_ERR_ARG; }

extern "C" int32_t tova_engine_stats(tova_engine * e, double * out, size_t n, bool reset) {
    if (!e || !out || n < 1 || n > TOVA_STAT_COUNT) return TOVA_ERR_ARG;
    memcpy(out, e->stats, n * sizeof(double));
    if (reset) memset(e->stats, 0, sizeof(e->stats));
    return TOVA_OK;
}

extern "C" const char * tova_engine_cache_buffer(const tova_engine * e) {
    if (!e || e->cache_k.empty()) return "";
    for (int32_t l = 0; l < e->n_layer; l++)
        if (e->managed[l])
            return e->cache_k[l] && e->cache_k[l]->buffer ? ggml_backend_buffer_name(e->cache_k[l]->buffer) : "";
    return "";
}

extern "C" const char * tova_engine_last_error(const tova_engine * e) { return e ? e->error.c_str() : "no engine"; }

extern "C" const char * tova_libllama_path(void) {
    Dl_info info;
    if (dladdr((void *) &llama_memory_seq_rm, &info) && info.dli_fname) return info.dli_fname;
    return "";
}

// ---- engine state export / import (save and resume; docs/STATE.md) ------------------------------------------
// Layout, little-endian, all int32 unless noted: magic, version, policy, n_layer, budget, keep, n_sink,
// evict_interval, n_occ; then per occupied cell in ascending cell order: cell index, metadata position; then
// layer_pos [n_layer][n_occ]; then acc (double) [n_layer][n_occ]. Cells keep their indices: the caller restores
// llama.cpp's rows into the same cells, so a resumed run computes over the very same layout.
static const int32_t TOVA_STATE_MAGIC = 0x45564f54;  // "TOVE"
static const int32_t TOVA_STATE_VERSION = 1;
static const int32_t TOVA_STATE_N_HEADER = 9;

static size_t state_bytes(int32_t n_layer, int32_t n_occ) {
    return sizeof(int32_t) * (TOVA_STATE_N_HEADER + 2 * (size_t) n_occ + (size_t) n_layer * n_occ) +
           sizeof(double) * (size_t) n_layer * n_occ;
}

extern "C" int32_t tova_engine_state_size(const tova_engine * e, size_t * out) {
    if (!e || !out) return TOVA_ERR_ARG;
    *out = state_bytes(e->n_layer, e->st.n_occupied());
    return TOVA_OK;
}

// Writes the export of cells `occ` (ascending) under the settings in header[2..8).
static int32_t write_state(tova_engine * e, const std::vector<int32_t> & occ, const int32_t * settings, uint8_t * out,
                           size_t n) {
    tova::state & st = e->st;
    const int32_t n_occ = (int32_t) occ.size();
    if (n != state_bytes(e->n_layer, n_occ)) return fail(e, TOVA_ERR_ARG, "export buffer has the wrong size");
    std::vector<int32_t> ints;
    ints.reserve(TOVA_STATE_N_HEADER + 2 * (size_t) n_occ + (size_t) e->n_layer * n_occ);
    ints.push_back(TOVA_STATE_MAGIC);
    ints.push_back(TOVA_STATE_VERSION);
    ints.insert(ints.end(), settings, settings + 6);
    ints.push_back(n_occ);
    for (int32_t c : occ) {
        ints.push_back(c);
        ints.push_back(st.meta_pos(c));
    }
    for (int32_t l = 0; l < e->n_layer; l++)
        for (int32_t c : occ) ints.push_back(st.layer_pos(l)[c]);
    std::vector<double> acc;
    acc.reserve((size_t) e->n_layer * n_occ);
    for (int32_t l = 0; l < e->n_layer; l++)
        for (int32_t c : occ) acc.push_back(st.acc(l)[c]);
    memcpy(out, ints.data(), ints.size() * sizeof(int32_t));
    memcpy(out + ints.size() * sizeof(int32_t), acc.data(), acc.size() * sizeof(double));
    return TOVA_OK;
}

// An export's cells, read and checked against `settings` (policy, n_layer, budget, keep, n_sink, evict_interval).
struct saved_cells {
    std::vector<int32_t> cells, meta, lpos;
    std::vector<double> acc;
};

static int32_t read_state(tova_engine * e, const uint8_t * data, size_t n, const int32_t * settings,
                          saved_cells & out) {
    if (n < sizeof(int32_t) * TOVA_STATE_N_HEADER) return fail(e, TOVA_ERR_ARG, "engine state is truncated");
    int32_t h[TOVA_STATE_N_HEADER];
    memcpy(h, data, sizeof(h));
    if (h[0] != TOVA_STATE_MAGIC || h[1] != TOVA_STATE_VERSION)
        return fail(e, TOVA_ERR_ARG, "not an engine state of version " + std::to_string(TOVA_STATE_VERSION));
    if (memcmp(&h[2], settings, 6 * sizeof(int32_t)) != 0)
        return fail(
            e, TOVA_ERR_ARG,
            "engine state was saved with other settings (policy, layers, budget, keep, n_sink or evict_interval)");
    const int32_t n_occ = h[8];
    if (n_occ < 0 || n_occ > e->st.n_cells())
        return fail(e, TOVA_ERR_ARG, "engine state holds more cells than the context");
    if (n != state_bytes(e->n_layer, n_occ)) return fail(e, TOVA_ERR_ARG, "engine state has the wrong size");
    out.cells.resize(n_occ);
    out.meta.resize(n_occ);
    out.lpos.resize((size_t) e->n_layer * n_occ);
    out.acc.resize((size_t) e->n_layer * n_occ);
    const uint8_t * r = data + sizeof(int32_t) * TOVA_STATE_N_HEADER;
    for (int32_t i = 0; i < n_occ; i++) {
        memcpy(&out.cells[i], r, sizeof(int32_t));
        memcpy(&out.meta[i], r + sizeof(int32_t), sizeof(int32_t));
        r += 2 * sizeof(int32_t);
    }
    memcpy(out.lpos.data(), r, out.lpos.size() * sizeof(int32_t));
    memcpy(out.acc.data(), r + out.lpos.size() * sizeof(int32_t), out.acc.size() * sizeof(double));
    return TOVA_OK;
}

extern "C" int32_t tova_engine_export_state(tova_engine * e, uint8_t * out, size_t n) {
    if (!e || !out) return TOVA_ERR_ARG;
    if (e->multi) return fail(e, TOVA_ERR_ARG, "not available on an engine of many sequences");
    return guarded(e, [&]() -> int32_t {
        const int32_t settings[] = {e->policy, e->n_layer, e->budget, e->keep, e->n_sink, e->evict_interval};
        return write_state(e, e->st.occupied(), settings, out, n);
    });
}

// Checks everything before changing anything: on error the engine is as it was.
extern "C" int32_t tova_engine_import_state(tova_engine * e, const uint8_t * data, size_t n) {
    if (!e || !data) return TOVA_ERR_ARG;
    if (e->multi) return fail(e, TOVA_ERR_ARG, "not available on an engine of many sequences");
    return guarded(e, [&]() -> int32_t {
        const int32_t settings[] = {e->policy, e->n_layer, e->budget, e->keep, e->n_sink, e->evict_interval};
        saved_cells sc;
        if (int32_t rc = read_state(e, data, n, settings, sc)) return rc;
        std::string err;
        if (!e->st.restore(sc.cells, sc.meta, sc.lpos, sc.acc, err))
            return fail(e, TOVA_ERR_ARG, "engine state: " + err);
        e->armed = tova_armed();
        e->error.clear();
        return TOVA_OK;
    });
}

// Rewind to n_new tokens: positions >= n_new leave every layer and llama.cpp's metadata (seq 0). Metadata drops
// the k = newest_pos + 1 - n_new cells holding those positions; a layer that already evicted r < k of those rows
// drops k - r more rows so that every layer keeps the same count: for h2o and sink their own choice, for the
// others the oldest unprotected rows (no attention row of the new newest token exists).
extern "C" int32_t tova_engine_truncate(tova_engine * e, llama_context * ctx, int32_t n_new) {
    if (!e || !ctx) return TOVA_ERR_ARG;
    if (e->multi) return fail(e, TOVA_ERR_ARG, "not available on an engine of many sequences");
    return guarded(e, [&]() -> int32_t {
        tova::state & st = e->st;
        const std::vector<int32_t> occupied = st.occupied();
        std::vector<int32_t> freed;
        int32_t p_min = INT32_MAX;
        for (int32_t c : occupied) {
            p_min = std::min(p_min, st.meta_pos(c));
            if (st.meta_pos(c) >= n_new) freed.push_back(c);
        }
        const int32_t k = (int32_t) freed.size();
        if (k == 0) return TOVA_OK;
        if (n_new <= p_min)
            return fail(e, TOVA_ERR_ARG,
                        "cannot rewind to " + std::to_string(n_new) + " tokens: the cache's oldest position is " +
                            std::to_string(p_min) + " (everything it holds would go; reset instead)");
        const int32_t extra_policy =
            e->policy == TOVA_POLICY_H2O || e->policy == TOVA_POLICY_SINK ? e->policy : TOVA_POLICY_WINDOW;
        const tova::policy_params params = {extra_policy, e->keep, e->n_sink};
        std::vector<tova::layer_moves> plan(e->n_layer);
        bool any_move = false;
        for (int32_t l = 0; l < e->n_layer; l++) {
            const int32_t * pos = st.layer_pos(l);
            std::vector<int32_t> drop, rest;
            for (int32_t c : occupied) (pos[c] >= n_new ? drop : rest).push_back(c);
            const int32_t extra = k - (int32_t) drop.size();
            if (extra > 0) {
                std::vector<int32_t> more = tova::policy_choose(params, rest, pos, st.acc(l), extra);
                if ((int32_t) more.size() != extra)
                    return fail(e, TOVA_ERR_ARG,
                                "the protected prefix leaves fewer than " + std::to_string(extra) +
                                    " evictable rows in layer " + std::to_string(l));
                drop.insert(drop.end(), more.begin(), more.end());
            }
            plan[l].k = e->cache_k[l];
            plan[l].v = e->cache_v[l];
            plan[l].moves = tova::policy_moves(drop, freed);
            if (!plan[l].moves.empty() && (!e->cache_k[l] || !e->cache_v[l]))
                return fail(e, TOVA_ERR_ARG, "cache tensors not seen yet: decode a token before truncating");
            any_move = any_move || !plan[l].moves.empty();
        }
        if (any_move) {
            llama_synchronize(ctx);
            std::string err;
            if (!e->mover.apply(plan, e->v_trans, e->force_graph, e->devs, err)) return fail(e, TOVA_ERR_BACKEND, err);
            e->stats[TOVA_STAT_MOVE_NODES] += e->mover.take_nodes();
            for (int32_t l = 0; l < e->n_layer; l++)
                for (const auto & m : plan[l].moves) st.move(l, m.first, m.second);
        }
        st.remove(freed);
        if (!llama_memory_seq_rm(llama_get_memory(ctx), 0, n_new, -1))
            return fail(e, TOVA_ERR_STATE, "llama_memory_seq_rm refused the range");
        return TOVA_OK;
    });
}

// ---- one sequence of many: park and resume (docs/STATE.md, section "One sequence of a BatchSession") --------

static void seq_settings(const tova_engine * e, int32_t seq, int32_t * out) {
    const tova_seq & q = e->seqs[seq];
    const int32_t s[] = {e->policy, e->n_layer, q.budget, q.keep, e->n_sink, q.evict_interval};
    memcpy(out, s, sizeof(s));
}

extern "C" int32_t tova_engine_seq_state_size(const tova_engine * e, int32_t seq, size_t * out) {
    if (!e || !out || !e->multi || seq < 0 || seq >= (int32_t) e->seqs.size() || !e->seqs[seq].active)
        return TOVA_ERR_ARG;
    *out = state_bytes(e->n_layer, e->st.n_occupied(seq));
    return TOVA_OK;
}

extern "C" int32_t tova_engine_seq_export_state(tova_engine * e, int32_t seq, uint8_t * out, size_t n) {
    if (!e || !out) return TOVA_ERR_ARG;
    if (int32_t rc = check_seq(e, seq, true)) return rc;
    return guarded(e, [&]() -> int32_t {
        int32_t settings[6];
        seq_settings(e, seq, settings);
        return write_state(e, e->st.occupied(seq), settings, out, n);
    });
}

// Where a load of the saved cells lands (see tova.h): slots in the mirror's search order, from[i] the saved cell
// slot i receives or -1 for a filler. The saved indices when all are free: every free cell up to the highest of
// them is filled (fillers in the gaps), so each saved row returns to its own cell; else the lowest free cells.
// With per-sequence streams a saved index means its offset in the stream: llama.cpp loads a sequence's cells into
// that sequence's own stream, whichever stream they were saved from.
static int32_t plan_import(tova_engine * e, int32_t seq, const saved_cells & sc, std::vector<int32_t> & slots,
                           std::vector<int32_t> & from) {
    const tova::state & st = e->st;
    const int32_t n = (int32_t) sc.cells.size();
    slots.clear();
    from.clear();
    if (n == 0) return TOVA_OK;
    if (n > e->seqs[seq].memory)
        return fail(e, TOVA_ERR_ARG, "the saved sequence holds more cells than the sequence's memory");
    const bool streams = st.n_stream() > 1;
    const int32_t lo = streams ? seq * st.stream_cells() : 0, hi = streams ? lo + st.stream_cells() : st.n_cells();
    auto predict = [&](int32_t k) {
        std::vector<int32_t> ids(k, seq);
        return st.predict(ids.data(), k, slots);
    };
    std::vector<int32_t> target(n);
    bool in_place = true;
    for (int32_t i = 0; i < n; i++) {
        const int32_t c = sc.cells[i];
        target[i] = streams && c >= 0 ? lo + c % st.stream_cells() : c;
        in_place = in_place && c >= 0 && target[i] >= lo && target[i] < hi && st.seq_of(target[i]) < 0;
    }
    if (in_place) {
        std::vector<int32_t> index(st.n_cells(), -1);  // target cell -> the saved cell's index in the export
        int32_t m = 0, top = -1;
        for (int32_t i = 0; i < n; i++) {
            in_place = in_place && index[target[i]] < 0;
            index[target[i]] = i;
            top = std::max(top, target[i]);
        }
        for (int32_t c = lo; in_place && c <= top; c++) m += st.seq_of(c) < 0;
        in_place = in_place && predict(m);
        for (int32_t c : slots) in_place = in_place && c <= top;
        if (in_place)
            for (int32_t c : slots) from.push_back(index[c]);
    }
    if (!in_place) {
        from.clear();
        if (!predict(n))
            return fail(e, TOVA_ERR_CAPACITY, "no " + std::to_string(n) + " free cells for the saved sequence");
        from.resize(n);
        for (int32_t i = 0; i < n; i++) from[i] = i;
    }
    return TOVA_OK;
}

// A saved sequence read against seq's settings and planned into its cells (plan_import).
static int32_t read_and_plan(tova_engine * e, int32_t seq, const uint8_t * data, size_t n, saved_cells & sc,
                             std::vector<int32_t> & slots, std::vector<int32_t> & from) {
    int32_t settings[6];
    seq_settings(e, seq, settings);
    if (int32_t rc = read_state(e, data, n, settings, sc)) return rc;
    return plan_import(e, seq, sc, slots, from);
}

extern "C" int32_t tova_engine_seq_plan_import(tova_engine * e, int32_t seq, const uint8_t * data, size_t n,
                                               int32_t * layout, int32_t n_layout) {
    if (!e || !data || !layout) return TOVA_ERR_ARG;
    if (int32_t rc = check_seq(e, seq, true)) return rc;
    if (e->st.n_occupied(seq) != 0) return fail(e, TOVA_ERR_ARG, "the sequence must be empty (reset it first)");
    return guarded(e, [&]() -> int32_t {
        saved_cells sc;
        std::vector<int32_t> slots, from;
        if (int32_t rc = read_and_plan(e, seq, data, n, sc, slots, from)) return rc;
        if ((int32_t) from.size() > n_layout) return fail(e, TOVA_ERR_ARG, "layout buffer too small");
        std::copy(from.begin(), from.end(), layout);
        return (int32_t) from.size();
    });
}

extern "C" int32_t tova_engine_seq_import_state(tova_engine * e, struct llama_context * ctx, int32_t seq,
                                                const uint8_t * data, size_t n) {
    if (!e || !data) return TOVA_ERR_ARG;
    if (!ctx) return fail(e, TOVA_ERR_ARG, "ctx must not be NULL");
    if (int32_t rc = check_seq(e, seq, true)) return rc;
    if (e->st.n_occupied(seq) != 0) return fail(e, TOVA_ERR_ARG, "the sequence must be empty (reset it first)");
    return guarded(e, [&]() -> int32_t {
        saved_cells sc;
        std::vector<int32_t> slots, from;
        if (int32_t rc = read_and_plan(e, seq, data, n, sc, slots, from)) return rc;
        int32_t p_min = INT32_MAX, p_max = -1, n_fill = 0;
        for (int32_t p : sc.meta) {
            p_min = std::min(p_min, p);
            p_max = std::max(p_max, p);
        }
        for (int32_t j : from) n_fill += j < 0;
        // llama.cpp holds the window and the fillers after it (positions p_max + 1..), nothing else of seq
        llama_memory_t mem = llama_get_memory(ctx);
        const int32_t want_max = sc.meta.empty() ? -1 : p_max + n_fill;
        if (llama_memory_seq_pos_min(mem, seq) != (sc.meta.empty() ? -1 : p_min) ||
            llama_memory_seq_pos_max(mem, seq) != want_max)
            return fail(e, TOVA_ERR_STATE, "llama.cpp's cells of the sequence disagree with the saved state");
        std::string err;
        if (!e->st.restore_seq(seq, slots, from, sc.meta, sc.lpos, sc.acc, err))  // checks first
            return fail(e, TOVA_ERR_ARG, "engine state: " + err);
        if (n_fill > 0 && !llama_memory_seq_rm(mem, seq, p_max + 1, -1)) {
            e->st.remove(e->st.occupied(seq));
            return fail(e, TOVA_ERR_STATE, "llama_memory_seq_rm refused to free the filler cells");
        }
        e->seqs[seq].n_past = sc.meta.empty() ? 0 : p_max + 1;
        if (e->verify_cells && !e->st.check(err)) return fail(e, TOVA_ERR_STATE, err);
        return TOVA_OK;
    });
}
