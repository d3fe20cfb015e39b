#include "capture_fa.h"

#include <cstring>

#include "ggml-alloc.h"
#include "ggml-backend.h"
#include "ggml.h"

namespace tova {

fa_scorer::~fa_scorer() {
    if (galloc_) ggml_gallocr_free(galloc_);
    if (buf_) ggml_backend_buffer_free(buf_);
    if (buf_ctx_) ggml_free(buf_ctx_);
    if (backend_) ggml_backend_free(backend_);
}

void fa_scorer::begin(int32_t n_layer) {
    layers_.assign(n_layer, layer_view());
    mask_seen_ = false;
    n_kv_ = 0;
}

// Reads n bytes at `offset` into t's data: memcpy on host buffers, a backend read elsewhere.
static void read_bytes(const ggml_tensor * t, void * dst, size_t offset, size_t n) {
    if (ggml_backend_buffer_is_host(t->buffer)) memcpy(dst, (const char *) t->data + offset, n);
    else ggml_backend_tensor_get(t, dst, offset, n);
}

bool fa_scorer::capture(ggml_tensor * fa, int32_t il, ggml_tensor * cache_k, int32_t n_tokens, std::string & err) {
    ggml_tensor * q = fa->src[0];     // [head_dim, n_tokens, n_head, n_stream], a permuted view
    ggml_tensor * k = fa->src[1];     // [head_dim, n_kv, n_head_kv, n_stream], a view of cache_k_l<il>
    ggml_tensor * mask = fa->src[3];  // F16 [n_kv, n_tokens_pad, 1, n_stream]
    float params[3];
    memcpy(params, fa->op_params, sizeof(params));  // scale, max_bias, logit_softcap
    if (il < 0 || il >= (int32_t) layers_.size()) return true;
    ggml_tensor * sinks = fa->src[4];  // F32 [n_head]: gpt-oss's learned logit in each head's softmax denominator
    if (sinks && (sinks->type != GGML_TYPE_F32 || sinks->ne[0] != q->ne[2])) {
        err = "unexpected attention sinks in layer " + std::to_string(il) + " (F32, one per query head expected)";
        return false;
    }
    if (params[1] != 0.0f) {
        err = "ALiBi bias (max_bias != 0) in FLASH_ATTN_EXT: eviction would change what the model computes";
        return false;
    }
    // an F32 cache reaches flash attention through a cast to F16: score on the cache's own rows instead
    if (k->op == GGML_OP_CPY && k->src[0]) k = k->src[0];
    if (k->view_src != cache_k || q->type != GGML_TYPE_F32 || !mask || mask->type != GGML_TYPE_F16 || q->ne[3] != 1 ||
        k->ne[3] != 1 || q->ne[0] != k->ne[0] || q->nb[0] != sizeof(float) || q->ne[2] % k->ne[2] != 0 ||
        mask->ne[0] != k->ne[1] || q->ne[1] != n_tokens) {
        err = "unexpected FLASH_ATTN_EXT operands in layer " + std::to_string(il) +
              " (one sequence, F32 query, F16 mask, K a view of cache_k_l" + std::to_string(il) + " expected)";
        return false;
    }
    if (head_dim_ != q->ne[0] || n_head_ != q->ne[2]) {
        head_dim_ = q->ne[0];
        n_head_ = q->ne[2];
    }
    const size_t q_len = (size_t) head_dim_ * n_head_;
    if (q_host_.size() != q_len * layers_.size()) q_host_.assign(q_len * layers_.size(), 0.0f);
    if (n_kv_ != 0 && n_kv_ != k->ne[1]) {
        err = "layers disagree on n_kv";
        return false;
    }
    n_kv_ = k->ne[1];

    // the newest query: row t of every head; heads are adjacent rows when Q is the usual permuted view
    const int64_t t = q->ne[1] - 1;
    float * dst = &q_host_[il * q_len];
    if (q->nb[2] == (size_t) head_dim_ * sizeof(float)) {
        read_bytes(q, dst, t * q->nb[1], q_len * sizeof(float));
    } else {
        for (int64_t h = 0; h < n_head_; h++)
            read_bytes(q, dst + h * head_dim_, t * q->nb[1] + h * q->nb[2], head_dim_ * sizeof(float));
    }
    if (!mask_seen_) {  // the mask reads metadata only: the same row for every layer
        mask_host_.resize(n_kv_);
        read_bytes(mask, mask_host_.data(), t * mask->nb[1], n_kv_ * sizeof(uint16_t));
        mask_seen_ = true;
    }
    layer_view & lv = layers_[il];
    for (int i = 0; i < 4; i++) {
        lv.ne[i] = k->ne[i];
        lv.nb[i] = k->nb[i];
    }
    lv.offs = k->view_offs;
    lv.scale = params[0];
    lv.softcap = params[2];
    lv.sinks = sinks;
    lv.seen = true;
    return true;
}

// The device whose backend computes on t's buffer; plain host buffers name no device: the CPU's.
static ggml_backend_dev_t device_of(const ggml_tensor * t) {
    ggml_backend_dev_t dev = ggml_backend_buft_get_device(ggml_backend_buffer_get_type(t->buffer));
    if (!dev && ggml_backend_buffer_is_host(t->buffer)) dev = ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU);
    return dev;
}

bool fa_scorer::ensure_buffers(ggml_tensor * cache_k0, int32_t n_layer, int64_t q_len, int64_t n_kv_max,
                               std::string & err) {
    ggml_backend_dev_t dev = device_of(cache_k0);
    if (!dev) {
        err = "cache buffer has no device";
        return false;
    }
    if (!backend_ || backend_dev_ != (void *) dev) {
        if (galloc_) ggml_gallocr_free(galloc_);
        if (buf_) ggml_backend_buffer_free(buf_);
        if (buf_ctx_) ggml_free(buf_ctx_);
        if (backend_) ggml_backend_free(backend_);
        galloc_ = nullptr;
        buf_ = nullptr;
        buf_ctx_ = nullptr;
        backend_ = ggml_backend_dev_init(dev, nullptr);
        backend_dev_ = (void *) dev;
        if (!backend_) {
            err = std::string("cannot start a backend for device ") + ggml_backend_dev_name(dev);
            return false;
        }
        if (ggml_backend_dev_type(dev) == GGML_BACKEND_DEVICE_TYPE_CPU) {
            ggml_backend_reg_t reg = ggml_backend_dev_backend_reg(dev);
            auto set_threads =
                (ggml_backend_set_n_threads_t) ggml_backend_reg_get_proc_address(reg, "ggml_backend_set_n_threads");
            if (set_threads) set_threads(backend_, n_threads_);
        }
    }
    if (buf_ && q_len_ == q_len && n_kv_max_ == n_kv_max && n_layer_ == n_layer && n_head_alloc_ == n_head_)
        return true;
    if (buf_) ggml_backend_buffer_free(buf_);
    if (buf_ctx_) ggml_free(buf_ctx_);
    buf_ = nullptr;
    ggml_init_params ip = {8 * ggml_tensor_overhead(), nullptr, true};
    buf_ctx_ = ggml_init(ip);
    q_ = ggml_new_tensor_2d(buf_ctx_, GGML_TYPE_F32, q_len, n_layer);
    mask_ = ggml_new_tensor_1d(buf_ctx_, GGML_TYPE_F16, n_kv_max);
    probs_ = ggml_new_tensor_3d(buf_ctx_, GGML_TYPE_F32, n_kv_max, n_head_, n_layer);
    out_ = ggml_new_tensor_1d(buf_ctx_, GGML_TYPE_F32, n_kv_max * n_layer);
    buf_ = ggml_backend_alloc_ctx_tensors_from_buft(buf_ctx_, ggml_backend_buffer_get_type(cache_k0->buffer));
    if (!buf_) {
        err = "cannot allocate the flash-attention scoring buffers on the cache's device";
        return false;
    }
    q_len_ = q_len;
    n_kv_max_ = n_kv_max;
    n_layer_ = n_layer;
    n_head_alloc_ = n_head_;
    return true;
}

bool fa_scorer::compute(const std::vector<ggml_tensor *> & cache_k, float * scores, int32_t n_cells, uint8_t * scored,
                        std::string & err) {
    const int32_t n_layer = (int32_t) layers_.size();
    // the first captured layer's cache names the device (an iSWA model's layer 0 may be a window layer)
    ggml_tensor * cache_k0 = nullptr;
    for (int32_t l = 0; l < n_layer && !cache_k0; l++)
        if (layers_[l].seen) cache_k0 = cache_k[l];
    if (n_kv_ == 0 || n_kv_ > n_cells || !cache_k0) {
        err = "no FLASH_ATTN_EXT node was captured (or n_kv exceeds the context)";
        return false;
    }
    const int64_t q_len = head_dim_ * n_head_;
    if (!ensure_buffers(cache_k0, n_layer, q_len, n_cells, err)) return false;
    for (int32_t l = 0; l < n_layer; l++) {
        // the sinks are model weights: the scoring graph reads them where they are
        const ggml_tensor * sinks = layers_[l].seen ? layers_[l].sinks : nullptr;
        if (sinks && device_of(sinks) != (ggml_backend_dev_t) backend_dev_) {
            err = "attention sinks of layer " + std::to_string(l) + " live on another device than the KV cache";
            return false;
        }
    }
    ggml_backend_tensor_set(q_, q_host_.data(), 0, q_host_.size() * sizeof(float));
    ggml_backend_tensor_set(mask_, mask_host_.data(), 0, n_kv_ * sizeof(uint16_t));

    const size_t n_tensors = 16 * (size_t) n_layer + 32;
    ggml_init_params ip = {ggml_tensor_overhead() * n_tensors + ggml_graph_overhead_custom(n_tensors, false), nullptr,
                           true};
    ggml_context * ctx = ggml_init(ip);
    if (!ctx) {
        err = "ggml_init failed for the scoring graph";
        return false;
    }
    ggml_cgraph * gf = ggml_new_graph_custom(ctx, n_tensors, false);
    ggml_tensor * mask = ggml_view_2d(ctx, mask_, n_kv_, 1, n_kv_ * ggml_element_size(mask_), 0);
    const size_t fs = sizeof(float);
    for (int32_t l = 0; l < n_layer; l++) {
        const layer_view & lv = layers_[l];
        if (!lv.seen) continue;
        ggml_tensor * k = ggml_view_3d(ctx, cache_k[l], lv.ne[0], lv.ne[1], lv.ne[2], lv.nb[1], lv.nb[2], lv.offs);
        ggml_tensor * q = ggml_view_3d(ctx, q_, head_dim_, 1, n_head_, head_dim_ * fs, head_dim_ * fs, l * q_->nb[1]);
        ggml_tensor * kq =
            ggml_mul_mat(ctx, k, q);  // [n_kv, 1, n_head]; query head h reads KV head h / (n_head/n_head_kv)
        ggml_prec_set_acc(kq, GGML_PREC_F32);
        float sm_scale = lv.scale;
        if (lv.softcap != 0.0f) {  // flash attention: softcap * tanh(kq * scale / softcap), then the mask
            kq = ggml_tanh(ctx, ggml_scale(ctx, kq, lv.scale / lv.softcap));
            sm_scale = lv.softcap;
        }
        ggml_tensor * p = ggml_soft_max_ext(ctx, kq, mask, sm_scale, 0.0f);
        if (lv.sinks) ggml_soft_max_add_sinks(p, lv.sinks);  // as llama.cpp's softmax with sinks
        ggml_tensor * dst = ggml_view_2d(ctx, probs_, n_kv_, n_head_, probs_->nb[1], l * probs_->nb[2]);
        ggml_build_forward_expand(gf, ggml_cpy(ctx, ggml_reshape_2d(ctx, p, n_kv_, n_head_), dst));
    }
    // mean over query heads for all layers at once: [n_kv, n_head, n_layer] -> [n_head, n_kv, n_layer] -> rows
    ggml_tensor * all = ggml_view_3d(ctx, probs_, n_kv_, n_head_, n_layer, probs_->nb[1], probs_->nb[2], 0);
    ggml_tensor * per_head = ggml_cont(ctx, ggml_permute(ctx, all, 1, 0, 2, 3));
    ggml_tensor * mean = ggml_scale(ctx, ggml_sum_rows(ctx, per_head), 1.0f / (float) n_head_);  // [1, n_kv, n_layer]
    ggml_tensor * out = ggml_view_1d(ctx, out_, n_kv_ * n_layer, 0);
    ggml_build_forward_expand(gf, ggml_cpy(ctx, ggml_reshape_1d(ctx, mean, n_kv_ * n_layer), out));

    for (int i = 0; i < ggml_graph_n_nodes(gf); i++) {
        ggml_tensor * node = ggml_graph_node(gf, i);
        if (!ggml_backend_supports_op(backend_, node)) {
            err = std::string("the cache's backend (") + ggml_backend_name(backend_) + ") cannot run " +
                  ggml_op_desc(node) + " on " + ggml_type_name(node->src[0]->type) + " for the flash-attention scores";
            ggml_free(ctx);
            return false;
        }
    }
    if (!galloc_) galloc_ = ggml_gallocr_new(ggml_backend_get_default_buffer_type(backend_));
    bool ok = galloc_ && ggml_gallocr_alloc_graph(galloc_, gf);
    if (ok) ok = ggml_backend_graph_compute(backend_, gf) == GGML_STATUS_SUCCESS;
    ggml_free(ctx);
    if (!ok) {
        err = "the flash-attention scoring graph failed on the cache's backend";
        return false;
    }
    std::vector<float> host((size_t) n_kv_ * n_layer);
    ggml_backend_tensor_get(out_, host.data(), 0, host.size() * sizeof(float));
    for (int32_t l = 0; l < n_layer; l++) {
        if (!layers_[l].seen) continue;
        float * s = scores + (size_t) l * n_cells;
        memcpy(s, &host[(size_t) l * n_kv_], n_kv_ * sizeof(float));
        memset(s + n_kv_, 0, (n_cells - n_kv_) * sizeof(float));
        scored[l] = 1;
    }
    return true;
}

}  // namespace tova
