#include "capture.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>

#include "engine_impl.h"
#include "ggml-backend.h"
#include "ggml.h"

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

// cpy_k/cpy_v are SET_ROWS views of cache_{k,v}_l<il>; the tensors live as long as the context
static void note_cache_tensor(tova_engine * e, ggml_tensor * t) {
    ggml_tensor * r = root_of(t);
    if (!r) return;
    int il = layer_of(r->name, "cache_k_l");
    if (il >= 0 && il < e->n_layer && !e->cache_k[il]) {
        e->cache_k[il] = r;
        e->n_cache_found++;
    }
    il = layer_of(r->name, "cache_v_l");
    if (il >= 0 && il < e->n_layer && !e->cache_v[il]) {
        e->cache_v[il] = r;
        e->n_cache_found++;
    }
}

// kq_soft_max-<il>: F32 [n_kv, n_tps, n_head, n_stream]: n_tps tokens of each of the ubatch's streams (per-sequence
// streams: stream0 + i; unified: one stream of all tokens); element (j, t, h, i) at ((i*n_head + h)*n_tps + t)*n_kv +
// j. Cell j of stream i is the engine's cell (stream0 + i) * stream_cells + j.
struct softmax_layout {
    int64_t n_kv, n_tps, n_head, n_stream;
    const float * row(const float * p, int64_t i, int64_t h, int64_t t) const {
        return p + ((i * n_head + h) * n_tps + t) * n_kv;
    }
};

static int64_t cell_base(const tova_engine * e, int64_t i) {
    return (e->n_stream > 1 ? e->armed.stream0 + i : 0) * (int64_t) e->st.stream_cells();
}

// h2o: acc[cell] += sum over the batch's queries of their head-averaged attention. The rows of ALL queries of
// the batch count (what H2O does with a prompt), not only the last one; empty and masked cells hold 0. A device
// (or force_graph) sums on the device and hands back n_kv floats per stream (reduce.h).
static void accumulate_scores(tova_engine * e, ggml_tensor * t, int il, const softmax_layout & L) {
    double * out = e->st.acc(il);
    if (e->force_graph || !ggml_backend_buffer_is_host(t->buffer)) {
        if (!e->sums.column_sums(t, e->devs, e->scratch_f, e->armed.error)) return;
        for (int64_t i = 0; i < L.n_stream; i++) {
            double * o = out + cell_base(e, i);
            const float * c = &e->scratch_f[(size_t) (i * L.n_kv)];
            for (int64_t j = 0; j < L.n_kv; j++) o[j] += (double) c[j] / (double) L.n_head;
        }
        e->scored[il] = 1;
        return;
    }
    const float * p = (const float *) t->data;
    std::vector<double> & sum = e->scratch_d;
    for (int64_t i = 0; i < L.n_stream; i++) {
        sum.assign(L.n_kv, 0.0);
        for (int64_t h = 0; h < L.n_head; h++)
            for (int64_t tk = 0; tk < L.n_tps; tk++) {
                const float * r = L.row(p, i, h, tk);
                for (int64_t j = 0; j < L.n_kv; j++) sum[j] += r[j];
            }
        double * o = out + cell_base(e, i);
        for (int64_t j = 0; j < L.n_kv; j++) o[j] += sum[j] / (double) L.n_head;  // mean over all query heads
    }
    e->scored[il] = 1;
}

static void divide_rows(float * o, const softmax_layout & L) {
    for (int64_t j = 0; j < L.n_kv; j++) o[j] /= (float) L.n_head;  // mean over all query heads
}

static void capture_scores(tova_engine * e, ggml_tensor * t, int il) {
    const softmax_layout L = {t->ne[0], t->ne[1], t->ne[2], t->ne[3]};
    const int32_t n_cells = e->st.n_cells();
    const int64_t span = e->n_stream > 1 ? e->st.stream_cells() : n_cells;  // the cells one stream holds
    if (t->type != GGML_TYPE_F32 || !ggml_is_contiguous(t) || L.n_kv > span ||
        L.n_tps * L.n_stream != e->armed.n_tokens || (e->n_stream == 1 && L.n_stream != 1) ||
        e->armed.stream0 + L.n_stream > e->n_stream) {
        e->armed.error = std::string("unexpected layout of ") + t->name;
        return;
    }
    if (e->policy == TOVA_POLICY_H2O) {
        accumulate_scores(e, t, il, L);
        return;
    }
    float * out = &e->scores[(size_t) il * n_cells];
    std::fill(out, out + n_cells, 0.0f);
    // a device (or force_graph) gathers the captured rows there, sums their heads and reads back n_kv floats per
    // row: r_s rows per stream (streams: one sequence each, at most one row; unified: every row in stream 0),
    // a stream with fewer filled with token 0, whose sums are not read
    const bool device = e->force_graph || !ggml_backend_buffer_is_host(t->buffer);
    std::vector<int64_t> & slot = e->row_slot;  // per captured row: its place in the read-back
    if (device) {
        std::vector<int32_t> & per = e->row_count;
        per.assign((size_t) L.n_stream, 0);
        for (int32_t r : e->armed.rows) per[(size_t) (r / L.n_tps)]++;
        const int64_t r_s = std::max<int64_t>(1, *std::max_element(per.begin(), per.end()));
        std::vector<int32_t> & tk = e->row_tk;
        tk.assign((size_t) (r_s * L.n_stream), 0);
        slot.clear();
        per.assign((size_t) L.n_stream, 0);
        for (int32_t r : e->armed.rows) {
            const int64_t i = r / L.n_tps;
            slot.push_back(i * r_s + per[(size_t) i]);
            tk[(size_t) slot.back()] = (int32_t) (r % L.n_tps);
            per[(size_t) i]++;
        }
        if (!e->sums.head_sums(t, tk, r_s, e->devs, e->scratch_f, e->armed.error)) return;
    }
    // each captured row is one sequence's newest token (batch row r: token r % n_tps of stream r / n_tps). In a
    // unified cache it is 0 on every other sequence's cells (masked), so adding the rows gives each cell the
    // score of its own sequence's row; with per-sequence streams each row covers its own stream only.
    int64_t last = -1;
    for (size_t k = 0; k < e->armed.rows.size(); k++) {  // ascending
        const int32_t r = e->armed.rows[k];
        const int64_t i = r / L.n_tps, tk = r % L.n_tps;
        float * o = out + cell_base(e, i);
        if (last >= 0 && i != last) divide_rows(out + cell_base(e, last), L);
        last = i;
        if (device) {
            const float * src = &e->scratch_f[(size_t) (slot[k] * L.n_kv)];
            for (int64_t j = 0; j < L.n_kv; j++) o[j] += src[j];
            continue;
        }
        for (int64_t h = 0; h < L.n_head; h++) {
            const float * src = (const float *) t->data + ((i * L.n_head + h) * L.n_tps + tk) * L.n_kv;
            for (int64_t j = 0; j < L.n_kv; j++) o[j] += src[j];
        }
    }
    if (last >= 0) divide_rows(out + cell_base(e, last), L);
    e->scored[il] = 1;
}

// attn_inp_k_idxs (I64 [n_tokens]): the cells llama.cpp chose for the batch; the first SET_ROWS reading it.
// On a GPU the scheduler reads a copy named "CUDA0#attn_inp_k_idxs#0".
static bool on_set_rows(tova_engine * e, ggml_tensor * t, bool ask) {
    tova_armed & a = e->armed;
    if (ask && e->n_cache_found < 2 * e->n_layer) note_cache_tensor(e, t);
    if (!a.read_cells || a.cells_seen) return !ask;
    ggml_tensor * idx = t->src[1];
    if (!idx || !strstr(idx->name, "attn_inp_k_idxs")) return !ask;
    // an iSWA model's two caches both name theirs attn_inp_k_idxs: the cells come from a managed layer's K write
    if (!tova_is_managed(e, layer_of(root_of(t)->name, "cache_k_l"))) return !ask;
    const bool host = ggml_backend_buffer_is_host(idx->buffer);
    e->idxs_host = host;
    if (ask && !host) return true;  // inputs are set before the graph runs: on host buffers read them now
    if (!ask) a.n_observed++;
    if (idx->type != GGML_TYPE_I64 || ggml_nelements(idx) != a.n_tokens) {
        a.error = "attn_inp_k_idxs does not match the batch";
    } else {
        a.cells.resize(a.n_tokens);
        ggml_backend_tensor_get(idx, a.cells.data(), 0, a.n_tokens * sizeof(int64_t));
    }
    a.cells_seen = true;
    return !ask;
}

static bool on_flash_attn(tova_engine * e, ggml_tensor * t, bool ask) {
    ggml_tensor * k = t->src[1] && t->src[1]->op == GGML_OP_CPY ? t->src[1]->src[0] : t->src[1];
    const int il = k ? layer_of(root_of(k)->name, "cache_k_l") : -1;
    // a sliding-window layer's node is not read (no sync); an unknown one is, to report it below
    if (ask) return il < 0 || tova_is_managed(e, il);
    tova_armed & a = e->armed;
    a.n_observed++;
    if (il < 0 && k && a.error.empty()) {
        // the scheduler handed the node copies of its inputs: it runs on another backend than the cache
        a.error = std::string("flash attention runs on another backend than the KV cache (its K is the copy '") +
                  k->name +
                  "'): the cache's device has no flash-attention kernel for this head size or cache type; use "
                  "flash_attn=False";
    }
    if (tova_is_managed(e, il) && a.error.empty()) {
        const double t0 = tova::now_s();
        if (!e->fa.capture(t, il, root_of(k), a.n_tokens, a.rows, e->st.n_cells(), e->devs, a.error) && a.error.empty())
            a.error = "flash-attention capture failed";
        e->stats[TOVA_STAT_CAPTURE_S] += tova::now_s() - t0;
    }
    return true;
}

static bool on_soft_max(tova_engine * e, ggml_tensor * t, bool ask) {
    const int il = layer_of(t->name, "kq_soft_max-");
    if (ask) return tova_is_managed(e, il);
    e->armed.n_observed++;
    if (tova_is_managed(e, il)) {
        const double t0 = tova::now_s();
        capture_scores(e, t, il);
        e->stats[TOVA_STAT_CAPTURE_S] += tova::now_s() - t0;
    }
    return true;
}

extern "C" bool tova_eval_callback(ggml_tensor * t, bool ask, void * user_data) {
    tova_engine * e = (tova_engine *) user_data;
    // data phase: always true (false would stop the graph); ask phase: "no" unless armed and needed
    if (!e || e->armed.n_tokens == 0 || !t) return !ask;
    e->armed.called = true;
    try {
        switch (t->op) {
            case GGML_OP_SET_ROWS:
                return on_set_rows(e, t, ask);
            case GGML_OP_FLASH_ATTN_EXT:
                return e->armed.scores ? on_flash_attn(e, t, ask) : !ask;
            case GGML_OP_SOFT_MAX:
                return e->armed.scores ? on_soft_max(e, t, ask) : !ask;
            default:
                return !ask;
        }
    } catch (const std::exception & x) {  // never unwind into llama.cpp
        if (e->armed.error.empty()) e->armed.error = std::string("eval callback: ") + x.what();
        return !ask;
    }
}
