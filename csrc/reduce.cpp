#include "reduce.h"

#include "backend.h"
#include "ggml-backend.h"
#include "ggml.h"

namespace tova {

// idx[r, h, i] = tk[i * r_s + r] for every head h (GET_ROWS takes one row list per (head, stream) slice)
static void upload_rows(ggml_tensor * idx, const std::vector<int32_t> * tk, int64_t r_s, int64_t n_head,
                        int64_t n_stream, std::vector<int32_t> & v) {
    if (!idx) return;
    v.resize((size_t) (r_s * n_head * n_stream));
    for (int64_t i = 0; i < n_stream; i++)
        for (int64_t h = 0; h < n_head; h++)
            for (int64_t r = 0; r < r_s; r++) v[(size_t) ((i * n_head + h) * r_s + r)] = (*tk)[(size_t) (i * r_s + r)];
    ggml_backend_tensor_set(idx, v.data(), 0, v.size() * sizeof(int32_t));
}

bool reducer::head_sums(ggml_tensor * p, const std::vector<int32_t> & tk, int64_t r_s, backends & devs,
                        std::vector<float> & out, std::string & err) {
    return run(p, &tk, r_s, devs, out, err);
}

bool reducer::column_sums(ggml_tensor * p, backends & devs, std::vector<float> & out, std::string & err) {
    return run(p, nullptr, 0, devs, out, err);
}

// SUM_ROWS adds along dim 0, so the summed axes go first. Column sums (tk null): a permuted copy of p, [n_kv,
// n_tps * n_head, n_stream] -> [n_tps * n_head, n_kv, n_stream], then SUM_ROWS. Head sums: GET_ROWS takes rows
// tk of every (head, stream) slice, [n_kv, r_s, n_head, n_stream], permuted to [n_head, n_kv, r_s, n_stream],
// then SUM_ROWS.
bool reducer::run(ggml_tensor * p, const std::vector<int32_t> * tk, int64_t r_s, backends & devs,
                  std::vector<float> & out, std::string & err) {
    if (p->type != GGML_TYPE_F32 || !ggml_is_contiguous(p)) {
        err = std::string("cannot reduce ") + p->name + ": not a contiguous F32 tensor";
        return false;
    }
    ggml_backend * b = devs.for_tensor(p, err);
    if (!b) return false;
    const int64_t n_kv = p->ne[0], n_tps = p->ne[1], n_head = p->ne[2], n_stream = p->ne[3];
    const size_t n_nodes = 8;
    ggml_context * ctx = graph_context(n_nodes);
    if (!ctx) {
        err = "ggml_init failed for the attention sums";
        return false;
    }
    // p as a leaf of this graph (p itself would pull in the whole model graph behind it)
    ggml_tensor * in = ggml_new_tensor(ctx, GGML_TYPE_F32, GGML_MAX_DIMS, p->ne);
    in->buffer = p->buffer;
    in->data = p->data;
    bool rows_ok = !tk || (r_s >= 1 && (int64_t) tk->size() == r_s * n_stream);
    if (tk && rows_ok)
        for (int32_t t : *tk) rows_ok = rows_ok && t >= 0 && t < n_tps;
    if (!rows_ok) {
        err = "attention sums: the scored rows do not match the softmax's tokens and streams";
        ggml_free(ctx);
        return false;
    }
    ggml_tensor * idx = nullptr;
    ggml_tensor * x = nullptr;
    if (tk) {
        idx = ggml_new_tensor_3d(ctx, GGML_TYPE_I32, r_s, n_head, n_stream);
        ggml_set_input(idx);
        x = ggml_permute(ctx, ggml_get_rows(ctx, in, idx), 1, 2, 0, 3);
    } else {
        x = ggml_permute(ctx, ggml_reshape_3d(ctx, in, n_kv, n_tps * n_head, n_stream), 1, 0, 2, 3);
    }
    ggml_tensor * s = ggml_sum_rows(ctx, ggml_cont(ctx, x));
    ggml_cgraph * gf = ggml_new_graph_custom(ctx, n_nodes, false);
    ggml_build_forward_expand(gf, s);
    bool ok = false;
    for (int i = 0; i < ggml_graph_n_nodes(gf); i++) {
        ggml_tensor * node = ggml_graph_node(gf, i);
        if (!ggml_backend_supports_op(b, node)) {
            err = std::string("the cache's backend (") + ggml_backend_name(b) + ") cannot run " + ggml_op_desc(node) +
                  " for the attention sums";
            ggml_free(ctx);
            return false;
        }
    }
    if (!alloc_.alloc(b, gf)) {
        err = "cannot allocate the attention sums on the cache's device";
    } else {
        upload_rows(idx, tk, r_s, n_head, n_stream, rows_);  // after the allocation, which places idx
        if (ggml_backend_graph_compute(b, gf) != GGML_STATUS_SUCCESS) {
            err = "the attention-sum graph failed on the cache's backend";
        } else {
            out.resize((size_t) ggml_nelements(s));
            ggml_backend_tensor_get(s, out.data(), 0, out.size() * sizeof(float));
            ok = true;
        }
    }
    ggml_free(ctx);
    return ok;
}

}  // namespace tova
