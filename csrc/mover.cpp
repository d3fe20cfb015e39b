#include "mover.h"

#include <cstring>

#include "ggml-alloc.h"
#include "ggml-backend.h"
#include "ggml.h"

namespace tova {

mover::~mover() {
    if (backend_) ggml_backend_free(backend_);
}

// element (cell c, dim j) of a transposed V cache lies at (j*kv_size + c)*elsize
static void copy_host(ggml_tensor * t, int32_t src, int32_t dst, bool transposed) {
    char * base = (char *) t->data;
    if (!transposed) {
        const size_t row = ggml_row_size(t->type, t->ne[0]);
        memcpy(base + dst * t->nb[1], base + src * t->nb[1], row);
        return;
    }
    const size_t es = ggml_type_size(t->type);
    const int64_t kv_size = t->ne[1];
    for (int64_t j = 0; j < t->ne[0]; j++) {
        memcpy(base + (j * kv_size + dst) * es, base + (j * kv_size + src) * es, es);
    }
}

bool mover::apply(const std::vector<layer_moves> & layers, bool v_trans, bool force_graph, std::string & err) {
    bool any_device = false;
    for (const auto & l : layers) {
        if (l.moves.empty()) continue;
        if (force_graph || !ggml_backend_buffer_is_host(l.k->buffer) || !ggml_backend_buffer_is_host(l.v->buffer)) {
            any_device = true;
            continue;
        }
        for (const auto & m : l.moves) {
            copy_host(l.k, m.first, m.second, false);
            copy_host(l.v, m.first, m.second, v_trans);
        }
    }
    if (!any_device) return true;
    std::vector<layer_moves> device;
    for (const auto & l : layers) {
        if (l.moves.empty()) continue;
        if (force_graph || !ggml_backend_buffer_is_host(l.k->buffer) || !ggml_backend_buffer_is_host(l.v->buffer))
            device.push_back(l);
    }
    return apply_graph(device, v_trans, err);
}

// View of one cell's content, in the cache's own type: a contiguous row, or a strided column when transposed.
static ggml_tensor * cell_view(ggml_context * ctx, ggml_tensor * t, int32_t cell, bool transposed) {
    if (!transposed) return ggml_view_1d(ctx, t, t->ne[0], cell * t->nb[1]);
    const size_t es = ggml_type_size(t->type);
    return ggml_view_2d(ctx, t, 1, t->ne[0], t->ne[1] * es, cell * es);
}

// The device whose backend computes on t's buffer; plain host buffers name no device: the CPU's.
static ggml_backend_dev_t device_of(const ggml_tensor * t) {
    ggml_backend_dev_t dev = ggml_backend_buft_get_device(ggml_backend_buffer_get_type(t->buffer));
    if (!dev && ggml_backend_buffer_is_host(t->buffer)) dev = ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU);
    return dev;
}

bool mover::apply_graph(const std::vector<layer_moves> & layers, bool v_trans, std::string & err) {
    // All cache tensors of one context live on one device in the configurations we accept (layers split
    // across devices get one graph per device).
    size_t n_ops = 0;
    for (const auto & l : layers) n_ops += 2 * l.moves.size();
    std::vector<const layer_moves *> pending;
    for (const auto & l : layers) pending.push_back(&l);
    while (!pending.empty()) {
        ggml_backend_dev_t dev = device_of(pending[0]->k);
        if (!dev) {
            err = "cache buffer has no device";
            return false;
        }
        if (!backend_ || backend_dev_ != (void *) dev) {
            if (backend_) ggml_backend_free(backend_);
            backend_ = ggml_backend_dev_init(dev, nullptr);
            backend_dev_ = (void *) dev;
            if (!backend_) {
                err = std::string("cannot start a backend for device ") + ggml_backend_dev_name(dev);
                return false;
            }
        }
        const size_t n_tensors = 8 * n_ops + 16;
        ggml_init_params ip = {ggml_tensor_overhead() * n_tensors + ggml_graph_overhead_custom(n_tensors, false),
                               nullptr, true};
        ggml_context * ctx = ggml_init(ip);
        if (!ctx) {
            err = "ggml_init failed for the mover graph";
            return false;
        }
        ggml_cgraph * gf = ggml_new_graph_custom(ctx, n_tensors, false);
        std::vector<const layer_moves *> later;
        for (const layer_moves * l : pending) {
            if (device_of(l->k) != dev) {
                later.push_back(l);
                continue;
            }
            // sources are read before any destination is written: src and dst sets are disjoint
            for (const auto & m : l->moves) {
                ggml_build_forward_expand(
                    gf, ggml_cpy(ctx, cell_view(ctx, l->k, m.first, false), cell_view(ctx, l->k, m.second, false)));
                ggml_build_forward_expand(gf, ggml_cpy(ctx, cell_view(ctx, l->v, m.first, v_trans),
                                                       cell_view(ctx, l->v, m.second, v_trans)));
            }
        }
        bool ok = true;
        for (ggml_tensor * t = ggml_get_first_tensor(ctx); t && ok; t = ggml_get_next_tensor(ctx, t)) {
            if (t->buffer == nullptr && t->view_src != nullptr) ok = ggml_backend_view_init(t) == GGML_STATUS_SUCCESS;
        }
        if (ok) ok = ggml_backend_graph_compute(backend_, gf) == GGML_STATUS_SUCCESS;
        ggml_free(ctx);
        if (!ok) {
            err = "the mover graph failed on the cache's backend";
            return false;
        }
        pending = later;
    }
    return true;
}

}  // namespace tova
