// engine: per-context state (cell <-> original position per layer) and the eval-callback capture.
#include <dlfcn.h>

#include <algorithm>
#include <chrono>
#include <climits>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "capture_fa.h"
#include "ggml-backend.h"
#include "ggml.h"
#include "llama.h"
#include "mover.h"
#include "policy.h"
#include "tova.h"

struct tova_engine {
    int32_t policy;
    int32_t n_layer;
    int32_t budget;
    int32_t n_cells;
    bool v_trans;  // also: flash attention off (llama.cpp stores V transposed exactly when FA is off)
    bool force_graph;
    int32_t keep = 0;            // original positions < keep are never evicted
    int32_t n_sink = 4;          // TOVA_POLICY_SINK: original positions < n_sink are never evicted
    int32_t evict_interval = 1;  // cut only once budget + evict_interval cells are occupied

    std::vector<int32_t> meta_pos;   // [n_cells] metadata position llama.cpp holds in the cell, -1 if free
    std::vector<int32_t> layer_pos;  // [n_layer * n_cells] original position each layer holds, -1 if empty
    std::vector<float> scores;       // [n_layer * n_cells] tova: newest query's head-averaged attention
    std::vector<double> acc;         // [n_layer * n_cells] h2o: head-averaged attention summed over every query
                                     // since the token entered; travels with its row, 0 in free cells
    std::vector<uint8_t> scored;     // [n_layer] layer captured in the last scored decode
    // [n_layer] 1: the policy runs on this layer; 0: a sliding-window layer left to llama.cpp (docs/SWA.md)
    std::vector<uint8_t> managed;
    bool layers_checked = false;  // managed and sliding layers seen in separate cache buffers (first decode)
    std::vector<ggml_tensor *> cache_k, cache_v;  // [n_layer], live as long as the context

    // armed by tova_engine_begin for one llama_decode
    int32_t n_tokens = 0;
    int32_t pos0 = 0;
    bool capture_scores = false;
    bool idxs_seen = false;
    int32_t n_observed = 0;          // nodes read in the data phase (each one costs a backend sync)
    std::vector<int64_t> new_cells;  // cells llama.cpp chose for the batch (from attn_inp_k_idxs)
    std::string cb_error;            // first failure inside the callback (it cannot return errors)

    tova::mover mover;
    tova::fa_scorer fa;                  // flash attention on: scores recomputed from the newest query
    double stats[TOVA_STAT_COUNT] = {};  // tova_engine_stats
    std::string error;
};

static double now_s() {
    return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

static int32_t fail(tova_engine * e, int32_t code, const std::string & msg) {
    e->error = msg;
    return code;
}

static void write_err(char * err, size_t len, const std::string & msg) {
    if (err && len) snprintf(err, len, "%s", msg.c_str());
}

extern "C" tova_engine * tova_engine_create(int32_t policy, int32_t n_layer, int32_t budget, int32_t n_cells,
                                            bool v_trans, char * err, size_t err_len) {
    if (policy < TOVA_POLICY_FULL || policy > TOVA_POLICY_H2O) {
        write_err(err, err_len, "unknown policy " + std::to_string(policy));
        return nullptr;
    }
    if (n_layer < 1 || budget < 1 || n_cells < budget) {
        write_err(err, err_len,
                  "need n_layer >= 1 and 1 <= budget <= n_cells (got n_layer=" + std::to_string(n_layer) +
                      ", budget=" + std::to_string(budget) + ", n_cells=" + std::to_string(n_cells) + ")");
        return nullptr;
    }
    if (policy == TOVA_POLICY_H2O && !v_trans) {
        // flash attention gives no attention matrix; the FA scoring graph recomputes only the newest row
        write_err(err, err_len, "policy h2o needs flash attention off: it accumulates every query's attention row");
        return nullptr;
    }
    tova_engine * e = new tova_engine();
    e->policy = policy;
    e->n_layer = n_layer;
    e->budget = budget;
    e->n_cells = n_cells;
    e->v_trans = v_trans;
    const char * mv = getenv("TOVA_MOVER");  // env: TOVA_MOVER=graph forces the ggml-graph mover
    e->force_graph = mv && strcmp(mv, "graph") == 0;
    e->cache_k.assign(n_layer, nullptr);
    e->cache_v.assign(n_layer, nullptr);
    e->scored.assign(n_layer, 0);
    e->managed.assign(n_layer, 1);
    tova_engine_reset(e);
    return e;
}

extern "C" void tova_engine_free(tova_engine * e) { delete e; }

static bool uses_scores(int32_t policy) { return policy == TOVA_POLICY_TOVA || policy == TOVA_POLICY_H2O; }

extern "C" int32_t tova_engine_set_keep(tova_engine * e, int32_t keep) {
    if (!e) return TOVA_ERR_ARG;
    if (keep < 0 || keep >= e->budget)
        return fail(e, TOVA_ERR_ARG,
                    "keep must be in [0, budget) (got keep=" + std::to_string(keep) +
                        ", budget=" + std::to_string(e->budget) + "): the protected prefix must leave room to evict");
    if (tova_engine_n_occupied(e) != 0)
        return fail(e, TOVA_ERR_STATE, "set keep before the first decode or after reset");
    e->keep = keep;
    return TOVA_OK;
}

extern "C" int32_t tova_engine_set_n_sink(tova_engine * e, int32_t n_sink) {
    if (!e) return TOVA_ERR_ARG;
    if (n_sink < 0 || (e->policy == TOVA_POLICY_SINK && n_sink >= e->budget))
        return fail(e, TOVA_ERR_ARG,
                    "n_sink must be in [0, budget) (got n_sink=" + std::to_string(n_sink) +
                        ", budget=" + std::to_string(e->budget) + ")");
    if (tova_engine_n_occupied(e) != 0)
        return fail(e, TOVA_ERR_STATE, "set n_sink before the first decode or after reset");
    e->n_sink = n_sink;
    return TOVA_OK;
}

extern "C" int32_t tova_engine_set_layers(tova_engine * e, const uint8_t * managed, int32_t n_layer) {
    if (!e) return TOVA_ERR_ARG;
    if (!managed || n_layer != e->n_layer)
        return fail(e, TOVA_ERR_ARG, "need one flag per layer (n_layer=" + std::to_string(e->n_layer) + ")");
    if (std::none_of(managed, managed + n_layer, [](uint8_t m) { return m != 0; }))
        return fail(e, TOVA_ERR_ARG, "at least one layer must be managed");
    if (tova_engine_n_occupied(e) != 0)
        return fail(e, TOVA_ERR_STATE, "set the managed layers before the first decode or after reset");
    for (int32_t l = 0; l < n_layer; l++) e->managed[l] = managed[l] != 0;
    e->layers_checked = false;
    return TOVA_OK;
}

static bool is_managed(const tova_engine * e, int il) { return il >= 0 && il < e->n_layer && e->managed[il]; }

extern "C" int32_t tova_engine_set_cells(tova_engine * e, int32_t n_cells) {
    if (n_cells < e->budget) return fail(e, TOVA_ERR_ARG, "n_cells must be >= budget");
    e->n_cells = n_cells;
    tova_engine_reset(e);
    return TOVA_OK;
}

extern "C" void tova_engine_reset(tova_engine * e) {
    e->meta_pos.assign(e->n_cells, -1);
    e->layer_pos.assign((size_t) e->n_layer * e->n_cells, -1);
    e->scores.assign((size_t) e->n_layer * e->n_cells, 0.0f);
    e->acc.assign((size_t) e->n_layer * e->n_cells, 0.0);
    e->n_tokens = 0;
    e->error.clear();
    e->cb_error.clear();
}

// "prefix<il>" -> il, or -1
static int layer_of(const char * name, const char * prefix) {
    const size_t n = strlen(prefix);
    if (strncmp(name, prefix, n) != 0) return -1;
    char * end = nullptr;
    long il = strtol(name + n, &end, 10);
    return (end && *end == '\0') ? (int) il : -1;
}

static ggml_tensor * root_of(ggml_tensor * t) {
    while (t && t->view_src) t = t->view_src;
    return t;
}

static void note_cache_tensor(tova_engine * e, ggml_tensor * t) {
    ggml_tensor * r = root_of(t);
    if (!r) return;
    int il = layer_of(r->name, "cache_k_l");
    if (il >= 0 && il < e->n_layer) e->cache_k[il] = r;
    il = layer_of(r->name, "cache_v_l");
    if (il >= 0 && il < e->n_layer) e->cache_v[il] = r;
}

// h2o: acc[cell] += sum over the batch's queries of their head-averaged attention. The rows of ALL queries of
// the batch count (what H2O does with a prompt), not only the last one; empty and masked cells hold 0.
static void accumulate_scores(tova_engine * e, ggml_tensor * t, int il) {
    const int64_t n_kv = t->ne[0], n_tok = t->ne[1], n_head = t->ne[2];
    const float * p = (const float *) t->data;
    std::vector<float> copy;
    if (!ggml_backend_buffer_is_host(t->buffer)) {
        copy.resize((size_t) n_kv * n_tok * n_head);
        ggml_backend_tensor_get(t, copy.data(), 0, copy.size() * sizeof(float));
        p = copy.data();
    }
    std::vector<double> sum(n_kv, 0.0);
    for (int64_t r = 0; r < n_tok * n_head; r++)
        for (int64_t j = 0; j < n_kv; j++) sum[j] += p[r * n_kv + j];
    double * out = &e->acc[(size_t) il * e->n_cells];
    for (int64_t j = 0; j < n_kv; j++) out[j] += sum[j] / (double) n_head;  // mean over all query heads
    e->scored[il] = 1;
}

// kq_soft_max-<il>: F32 [n_kv, n_tokens, n_head, n_stream]; element (j, t, h) at (h*n_tokens + t)*n_kv + j
static void capture_scores(tova_engine * e, ggml_tensor * t, int il) {
    const int64_t n_kv = t->ne[0], n_tok = t->ne[1], n_head = t->ne[2];
    if (t->type != GGML_TYPE_F32 || !ggml_is_contiguous(t) || n_kv > e->n_cells || n_tok != e->n_tokens) {
        e->cb_error = std::string("unexpected layout of ") + t->name;
        return;
    }
    if (e->policy == TOVA_POLICY_H2O) {
        accumulate_scores(e, t, il);
        return;
    }
    float * out = &e->scores[(size_t) il * e->n_cells];
    std::fill(out, out + e->n_cells, 0.0f);
    std::vector<float> row(n_kv);
    const bool host = ggml_backend_buffer_is_host(t->buffer);
    for (int64_t h = 0; h < n_head; h++) {
        const size_t off = ((size_t) h * n_tok + (n_tok - 1)) * n_kv * sizeof(float);
        const float * src = row.data();
        if (host) src = (const float *) ((const char *) t->data + off);
        else ggml_backend_tensor_get(t, row.data(), off, n_kv * sizeof(float));
        for (int64_t j = 0; j < n_kv; j++) out[j] += src[j];
    }
    for (int64_t j = 0; j < n_kv; j++) out[j] /= (float) n_head;  // mean over all query heads
    e->scored[il] = 1;
}

extern "C" bool tova_eval_callback(ggml_tensor * t, bool ask, void * user_data) {
    tova_engine * e = (tova_engine *) user_data;
    if (!e || e->n_tokens == 0) return ask ? false : true;
    if (!ask) e->n_observed++;
    if (ask && getenv("TOVA_DEBUG")) {  // env: TOVA_DEBUG prints every node the callback is asked about
        fprintf(stderr, "tova: node %s op %s src0 %s src1 %s (%s, root %s)\n", t->name, ggml_op_name(t->op),
                t->src[0] ? t->src[0]->name : "-", t->src[1] ? t->src[1]->name : "-",
                t->src[1] ? ggml_op_name(t->src[1]->op) : "-", t->src[1] ? root_of(t->src[1])->name : "-");
    }
    if (t->op == GGML_OP_SET_ROWS) {
        // cpy_k/cpy_v: the node is a view of cache_{k,v}_l<il>; src[1] holds the destination cells
        note_cache_tensor(e, t);
        // on a GPU the scheduler copies the input and names the copy "CUDA0#attn_inp_k_idxs#0"; an iSWA model's
        // two caches both name theirs attn_inp_k_idxs: take the cells from a managed layer's K write
        const bool k_idxs = t->src[1] && strstr(t->src[1]->name, "attn_inp_k_idxs") != nullptr &&
                            is_managed(e, layer_of(root_of(t)->name, "cache_k_l"));
        // inputs are set before the graph runs: on a host buffer read the cells now and skip a sync
        const bool early = ask && k_idxs && !e->idxs_seen && ggml_backend_buffer_is_host(t->src[1]->buffer);
        if (ask && !early) return k_idxs && !e->idxs_seen;
        if (k_idxs && !e->idxs_seen) {
            ggml_tensor * idx = t->src[1];
            if (idx->type != GGML_TYPE_I64 || ggml_nelements(idx) != e->n_tokens) {
                e->cb_error = "attn_inp_k_idxs does not match the batch";
            } else {
                e->new_cells.resize(e->n_tokens);
                ggml_backend_tensor_get(idx, e->new_cells.data(), 0, e->n_tokens * sizeof(int64_t));
            }
            e->idxs_seen = true;
        }
        return !early;
    }
    if (t->op == GGML_OP_FLASH_ATTN_EXT && e->capture_scores) {
        ggml_tensor * k = t->src[1] && t->src[1]->op == GGML_OP_CPY ? t->src[1]->src[0] : t->src[1];
        const int il = k ? layer_of(root_of(k)->name, "cache_k_l") : -1;
        // a sliding-window layer's node is not read (no sync); an unknown one is, to report it below
        if (ask) return il < 0 || is_managed(e, il);
        if (il < 0 && k && e->cb_error.empty()) {
            // the scheduler handed the node copies of its inputs: it runs on another backend than the cache
            e->cb_error = std::string(
                              "flash attention runs on another backend than the KV cache (its K is the "
                              "copy '") +
                          k->name +
                          "'): the cache's device has no flash-attention kernel "
                          "for this head size or cache type; use flash_attn=False";
        }
        if (is_managed(e, il) && e->cb_error.empty()) {
            const double t0 = now_s();
            std::string err;
            if (!e->fa.capture(t, il, root_of(k), e->n_tokens, err)) e->cb_error = err;
            e->stats[TOVA_STAT_CAPTURE_S] += now_s() - t0;
        }
        return true;
    }
    if (t->op == GGML_OP_SOFT_MAX && e->capture_scores) {
        const int il = layer_of(t->name, "kq_soft_max-");
        if (ask) return is_managed(e, il);
        if (is_managed(e, il)) {
            const double t0 = now_s();
            capture_scores(e, t, il);
            e->stats[TOVA_STAT_CAPTURE_S] += now_s() - t0;
        }
        return true;
    }
    return ask ? false : true;
}

extern "C" int32_t tova_engine_begin(tova_engine * e, int32_t n_tokens, int32_t pos0, bool capture) {
    if (n_tokens < 1) return fail(e, TOVA_ERR_ARG, "n_tokens must be >= 1");
    if (tova_engine_n_occupied(e) + n_tokens > e->n_cells)
        return fail(e, TOVA_ERR_ARG, "batch does not fit in the context's cells");
    e->n_tokens = n_tokens;
    e->pos0 = pos0;
    // tova needs the row that ends a piece; h2o's accumulator needs every query; window/sink/full need none
    e->capture_scores = (e->policy == TOVA_POLICY_TOVA && capture) || e->policy == TOVA_POLICY_H2O;
    e->idxs_seen = false;
    e->n_observed = 0;
    e->new_cells.clear();
    e->cb_error.clear();
    std::fill(e->scored.begin(), e->scored.end(), 0);
    if (e->capture_scores && !e->v_trans) e->fa.begin(e->n_layer);
    return TOVA_OK;
}

extern "C" int32_t tova_engine_end(tova_engine * e) {
    const int32_t n = e->n_tokens;
    e->n_tokens = 0;
    if (!e->cb_error.empty()) return fail(e, TOVA_ERR_CAPTURE, e->cb_error);
    if ((int32_t) e->new_cells.size() != n)
        return fail(e, TOVA_ERR_CAPTURE, "llama_decode did not write the KV cache (attn_inp_k_idxs not seen)");
    for (int32_t i = 0; i < n; i++) {
        const int64_t c = e->new_cells[i];
        if (c < 0 || c >= e->n_cells || e->meta_pos[c] != -1)
            return fail(
                e, TOVA_ERR_STATE,
                "llama.cpp placed a token in cell " + std::to_string(c) + " which the engine holds as occupied");
        e->meta_pos[c] = e->pos0 + i;
        for (int32_t l = 0; l < e->n_layer; l++)
            if (e->managed[l]) e->layer_pos[(size_t) l * e->n_cells + c] = e->pos0 + i;
    }
    if (e->capture_scores && !e->v_trans) {
        std::string err;
        const double t0 = now_s();
        if (!e->fa.compute(e->cache_k, e->scores.data(), e->n_cells, e->scored.data(), err))
            return fail(e, TOVA_ERR_CAPTURE, err);
        e->stats[TOVA_STAT_SCORE_S] += now_s() - t0;
    }
    if (e->capture_scores) e->stats[TOVA_STAT_SCORED_DECODES] += 1;
    if (!e->layers_checked) {
        // llama.cpp's iSWA memory keeps full-attention and sliding-window layers in two caches with separate
        // buffers: a managed layer sharing a buffer with an unmanaged one means a wrong layer pattern
        for (int32_t a = 0; a < e->n_layer; a++)
            for (int32_t b = 0; b < e->n_layer; b++)
                if (e->managed[a] && !e->managed[b] && e->cache_k[a] && e->cache_k[b] &&
                    e->cache_k[a]->buffer == e->cache_k[b]->buffer)
                    return fail(e, TOVA_ERR_STATE,
                                "layers " + std::to_string(a) + " (managed) and " + std::to_string(b) +
                                    " (sliding window) share one KV cache: the sliding-window layer pattern is wrong");
        e->layers_checked = true;
    }
    for (int32_t l = 0; l < e->n_layer; l++) {
        if (!e->managed[l]) continue;
        if (!e->cache_k[l] || !e->cache_v[l])
            return fail(e, TOVA_ERR_CAPTURE, "cache tensors of layer " + std::to_string(l) + " not found");
        if (e->capture_scores && !e->scored[l])
            return fail(e, TOVA_ERR_CAPTURE,
                        std::string(e->v_trans ? "no kq_soft_max-" : "no FLASH_ATTN_EXT node for layer ") +
                            std::to_string(l) + " was seen during llama_decode");
    }
    return TOVA_OK;
}

extern "C" int32_t tova_engine_cut(tova_engine * e, llama_context * ctx) {
    std::vector<int32_t> occupied;
    for (int32_t c = 0; c < e->n_cells; c++)
        if (e->meta_pos[c] >= 0) occupied.push_back(c);
    const int32_t k = (int32_t) occupied.size() - e->budget;
    if (e->policy == TOVA_POLICY_FULL || k <= 0 || k < e->evict_interval) return TOVA_OK;
    if (uses_scores(e->policy))
        for (int32_t l = 0; l < e->n_layer; l++)
            if (e->managed[l] && !e->scored[l])
                return fail(e, TOVA_ERR_STATE, "cut without scores from the last decode");

    // F: the k cells with the smallest metadata positions; llama.cpp frees exactly these
    std::vector<double> meta_as_score(e->meta_pos.begin(), e->meta_pos.end());
    std::vector<int32_t> freed = tova::policy_lowest(occupied, meta_as_score.data(), e->meta_pos.data(), k);
    int32_t p_min = INT32_MAX, p_max = -1;
    for (int32_t c : freed) {
        p_min = std::min(p_min, e->meta_pos[c]);
        p_max = std::max(p_max, e->meta_pos[c]);
    }
    if (p_max - p_min + 1 != k) return fail(e, TOVA_ERR_STATE, "metadata positions are not a contiguous window");

    const tova::policy_params params = {e->policy, e->keep, e->n_sink};
    std::vector<tova::layer_moves> plan(e->n_layer);
    std::vector<double> score(e->n_cells);
    for (int32_t l = 0; l < e->n_layer; l++) {
        if (!e->managed[l]) continue;  // llama.cpp's window: seq_rm below frees only positions it no longer sees
        const size_t off = (size_t) l * e->n_cells;
        const double * s = nullptr;
        if (e->policy == TOVA_POLICY_TOVA) {
            std::copy(e->scores.begin() + off, e->scores.begin() + off + e->n_cells, score.begin());
            s = score.data();
        } else if (e->policy == TOVA_POLICY_H2O) {
            s = &e->acc[off];
        }
        std::vector<int32_t> evict = tova::policy_choose(params, occupied, &e->layer_pos[off], s, k);
        if ((int32_t) evict.size() != k)
            return fail(e, TOVA_ERR_ARG,
                        "the protected prefix (keep=" + std::to_string(e->keep) +
                            ", n_sink=" + std::to_string(e->n_sink) + ") leaves fewer than " + std::to_string(k) +
                            " evictable cells in layer " + std::to_string(l));
        plan[l] = {e->cache_k[l], e->cache_v[l], tova::policy_moves(evict, freed)};
    }
    std::string err;
    const double t0 = now_s();
    // llama_decode returns before a GPU finishes the graph (the last layers may still read the cache): wait
    llama_synchronize(ctx);
    if (!e->mover.apply(plan, e->v_trans, e->force_graph, err)) return fail(e, TOVA_ERR_BACKEND, err);
    for (int32_t l = 0; l < e->n_layer; l++) {
        if (!e->managed[l]) continue;
        const size_t off = (size_t) l * e->n_cells;
        int32_t * pos = &e->layer_pos[off];
        double * acc = &e->acc[off];
        for (const auto & m : plan[l].moves) {  // a row's bookkeeping travels with it
            pos[m.second] = pos[m.first];
            acc[m.second] = acc[m.first];
        }
        for (int32_t c : freed) {
            pos[c] = -1;
            acc[c] = 0.0;
        }
    }
    for (int32_t c : freed) e->meta_pos[c] = -1;
    if (!llama_memory_seq_rm(llama_get_memory(ctx), 0, p_min, p_max + 1))
        return fail(e, TOVA_ERR_STATE, "llama_memory_seq_rm refused the range");
    e->stats[TOVA_STAT_CUT_S] += now_s() - t0;
    e->stats[TOVA_STAT_CUTS] += 1;
    return TOVA_OK;
}

extern "C" int32_t tova_engine_n_occupied(const tova_engine * e) {
    int32_t n = 0;
    for (int32_t p : e->meta_pos) n += p >= 0;
    return n;
}

extern "C" int32_t tova_engine_cell_positions(const tova_engine * e, int32_t * out, size_t n) {
    if (!out || n != e->layer_pos.size()) return TOVA_ERR_ARG;
    memcpy(out, e->layer_pos.data(), n * sizeof(int32_t));
    return TOVA_OK;
}

extern "C" int32_t tova_engine_n_observed(const tova_engine * e) { return e->n_observed; }

extern "C" void tova_engine_set_force_graph_mover(tova_engine * e, bool force) { e->force_graph = force; }

extern "C" int32_t tova_engine_set_evict_interval(tova_engine * e, int32_t m) {
    if (m < 1 || e->budget + m > e->n_cells)
        return fail(
            e, TOVA_ERR_ARG,
            "evict_interval must be >= 1 and budget + evict_interval <= n_cells (got " + std::to_string(m) + ")");
    e->evict_interval = m;
    return TOVA_OK;
}

extern "C" void tova_engine_set_threads(tova_engine * e, int32_t n_threads) {
    e->fa.set_threads(n_threads > 0 ? n_threads : 1);
}

extern "C" int32_t tova_engine_stats(tova_engine * e, double * out, size_t n, bool reset) {
    if (!out || n != TOVA_STAT_COUNT) return TOVA_ERR_ARG;
    memcpy(out, e->stats, sizeof(e->stats));
    if (reset) memset(e->stats, 0, sizeof(e->stats));
    return TOVA_OK;
}

extern "C" const char * tova_engine_cache_buffer(const tova_engine * e) {
    for (int32_t l = 0; l < e->n_layer; l++)
        if (e->managed[l])
            return e->cache_k[l] && e->cache_k[l]->buffer ? ggml_backend_buffer_name(e->cache_k[l]->buffer) : "";
    return "";
}

extern "C" const char * tova_engine_last_error(const tova_engine * e) { return e->error.c_str(); }

extern "C" int32_t tova_policy_evict(const float * score, const int32_t * pos, int32_t n, int32_t k,
                                     int32_t * out_evict) {
    if (!score || !pos || !out_evict || n < 0) return TOVA_ERR_ARG;
    std::vector<int32_t> occupied;
    for (int32_t i = 0; i < n; i++)
        if (pos[i] >= 0) occupied.push_back(i);
    std::vector<double> s(score, score + n);
    std::vector<int32_t> evict = tova::policy_lowest(occupied, s.data(), pos, k);
    std::copy(evict.begin(), evict.end(), out_evict);
    return (int32_t) evict.size();
}

extern "C" int32_t tova_policy_choose(int32_t policy, const double * score, const int32_t * pos, int32_t n, int32_t k,
                                      int32_t keep, int32_t n_sink, int32_t * out_evict) {
    if (policy < TOVA_POLICY_FULL || policy > TOVA_POLICY_H2O || !pos || n < 0 || k < 0 || keep < 0 || n_sink < 0 ||
        (k > 0 && !out_evict))
        return TOVA_ERR_ARG;
    if (uses_scores(policy) && !score) return TOVA_ERR_ARG;
    std::vector<int32_t> occupied;
    for (int32_t i = 0; i < n; i++)
        if (pos[i] >= 0) occupied.push_back(i);
    std::vector<int32_t> evict = tova::policy_choose({policy, keep, n_sink}, occupied, pos, score, k);
    std::copy(evict.begin(), evict.end(), out_evict);
    return (int32_t) evict.size();
}

extern "C" const char * tova_libllama_path(void) {
    Dl_info info;
    if (dladdr((void *) &llama_memory_seq_rm, &info) && info.dli_fname) return info.dli_fname;
    return "";
}
