#include "score.h"

#include <cstring>
#include <initializer_list>

#include "backend.h"
#include "ggml-alloc.h"
#include "ggml-backend.h"
#include "ggml.h"

namespace tova {

bool scorer::layer_view::operator==(const layer_view & o) const {
    return seen == o.seen && memcmp(ne, o.ne, sizeof(ne)) == 0 && memcmp(nb, o.nb, sizeof(nb)) == 0 && offs == o.offs &&
           scale == o.scale && softcap == o.softcap && sinks == o.sinks;
}

void scorer::free_graph() {
    if (galloc_) ggml_gallocr_free(galloc_);
    if (graph_ctx_) ggml_free(graph_ctx_);
    galloc_ = nullptr;
    graph_ctx_ = nullptr;
    graph_ = nullptr;
    graph_n_kv_ = 0;
}

scorer::~scorer() {
    free_graph();
    if (buf_) ggml_backend_buffer_free(buf_);
    if (buf_ctx_) ggml_free(buf_ctx_);
}

void scorer::begin(int32_t n_layer, const std::vector<int32_t> & rows, ggml_backend_sched * sched) {
    sched_ = sched;
    stream_ = nullptr;
    stream_dev_ = nullptr;
    rows_ = rows;
    span_ = rows.empty() ? 1 : rows.back() - rows.front() + 1;
    if ((int32_t) layers_.size() != n_layer) layers_.assign(n_layer, layer_view());
    for (auto & l : layers_) l.seen = false;
    mask_seen_ = false;
    n_kv_ = 0;
}

// The scheduler's backend on t's device: its stream runs t's node (the scheduler has just waited for it) and, next,
// the nodes that may overwrite t's memory. Null on host buffers or without a scheduler.
ggml_backend * scorer::graph_backend(const ggml_tensor * t) {
    if (!sched_ || !t->buffer || ggml_backend_buffer_is_host(t->buffer)) return nullptr;
    ggml_backend_dev_t dev = ggml_backend_buft_get_device(ggml_backend_buffer_get_type(t->buffer));
    if (dev == stream_dev_) return stream_;
    stream_dev_ = dev;
    stream_ = nullptr;
    for (int i = 0; i < ggml_backend_sched_get_n_backends(sched_); i++) {
        ggml_backend_t b = ggml_backend_sched_get_backend(sched_, i);
        if (ggml_backend_get_device(b) == dev) stream_ = b;
    }
    return stream_;
}

// Copies n bytes from src's data at src_off to dst's data at dst_off: device to device when both live on one
// device (no host round trip), memcpy or one transfer otherwise. Both are byte views of live tensors. With the
// graph's backend known the copy is queued on its stream (ordered before the kernels that reuse src's memory;
// llama_decode's caller synchronizes before the scores are computed); a backend without asynchronous copies
// makes ggml wait and copy.
void scorer::copy_bytes(const ggml_tensor * src, size_t src_off, const ggml_tensor * dst, size_t dst_off, size_t n) {
    ggml_tensor s = *src, d = *dst;
    for (ggml_tensor * t : {&s, &d}) {
        t->type = GGML_TYPE_I8;
        t->ne[0] = (int64_t) n;
        t->ne[1] = t->ne[2] = t->ne[3] = 1;
        t->nb[0] = 1;
        t->nb[1] = t->nb[2] = t->nb[3] = n;
        t->view_src = nullptr;
        t->view_offs = 0;
    }
    s.data = (char *) src->data + src_off;
    d.data = (char *) dst->data + dst_off;
    if (ggml_backend * be = graph_backend(src)) ggml_backend_tensor_copy_async(be, be, &s, &d);
    else ggml_backend_tensor_copy(&s, &d);
}

bool scorer::capture(ggml_tensor * fa, int32_t il, ggml_tensor * cache_k, int32_t n_tokens,
                     const std::vector<int32_t> & rows, int32_t n_cells, backends & devs, std::string & err) {
    if (rows != rows_ || rows.empty() || rows.front() < 0 || rows.back() >= n_tokens) {
        err = "flash-attention capture: the scored rows disagree with begin()";
        return false;
    }
    return capture(fa, il, cache_k, n_tokens, n_cells, devs, err);
}

bool scorer::capture(ggml_tensor * fa, int32_t il, ggml_tensor * cache_k, int32_t n_tokens, int32_t n_cells,
                     backends & devs, std::string & err) {
    // n_tps tokens of each of n_stream streams (unified: one stream); batch row r = token r % n_tps of stream r / n_tps
    ggml_tensor * q = fa->src[0];     // [head_dim, n_tps, n_head, n_stream], a permuted view
    ggml_tensor * k = fa->src[1];     // [head_dim, n_kv, n_head_kv, n_stream], a view of cache_k_l<il>
    ggml_tensor * mask = fa->src[3];  // F16 [n_kv, n_tps, 1, n_stream]
    float params[3];
    memcpy(params, fa->op_params, sizeof(params));  // scale, max_bias, logit_softcap
    if (il < 0 || il >= (int32_t) layers_.size()) return true;
    ggml_tensor * sinks = fa->src[4];  // F32 [n_head]: gpt-oss's learned logit in each head's softmax denominator
    if (sinks && (sinks->type != GGML_TYPE_F32 || sinks->ne[0] != q->ne[2])) {
        err = "unexpected attention sinks in layer " + std::to_string(il) + " (F32, one per query head expected)";
        return false;
    }
    // the sinks are model weights: the scoring graph reads them where they are, which must be the cache's device
    if (sinks && (ggml_backend_buffer_is_host(sinks->buffer) != ggml_backend_buffer_is_host(cache_k->buffer) ||
                  (!ggml_backend_buffer_is_host(sinks->buffer) &&
                   ggml_backend_buft_get_device(ggml_backend_buffer_get_type(sinks->buffer)) !=
                       ggml_backend_buft_get_device(ggml_backend_buffer_get_type(cache_k->buffer))))) {
        err = "attention sinks of layer " + std::to_string(il) + " live on another device than the KV cache";
        return false;
    }
    if (params[1] != 0.0f) {
        err = "ALiBi bias (max_bias != 0) in FLASH_ATTN_EXT: eviction would change what the model computes";
        return false;
    }
    // an F32 cache reaches flash attention through a cast to F16: score on the cache's own rows instead
    if (k->op == GGML_OP_CPY && k->src[0]) k = k->src[0];
    const int64_t n_stream = k->ne[3], n_tps = q->ne[1];
    if (k->view_src != cache_k || q->type != GGML_TYPE_F32 || !mask || mask->type != GGML_TYPE_F16 ||
        q->ne[3] != n_stream || mask->ne[3] != n_stream || q->ne[0] != k->ne[0] || q->nb[0] != sizeof(float) ||
        q->ne[2] % k->ne[2] != 0 || mask->ne[0] != k->ne[1] || n_tps * n_stream != n_tokens ||
        k->ne[1] > cache_k->ne[1] || (n_stream > 1 && (int64_t) rows_.size() != n_stream)) {
        err = "unexpected FLASH_ATTN_EXT operands in layer " + std::to_string(il) +
              " (F32 query, F16 mask, K a view of cache_k_l" + std::to_string(il) +
              ", one scored row per stream expected)";
        return false;
    }
    for (size_t i = 0; n_stream > 1 && i < rows_.size(); i++)
        if (rows_[i] / n_tps != (int64_t) i) {
            err = "flash-attention capture: a scored row per stream expected";
            return false;
        }
    head_dim_ = q->ne[0];
    n_head_ = q->ne[2];
    n_stream_ = n_stream;
    if (n_kv_ != 0 && n_kv_ != k->ne[1]) {
        err = "layers disagree on n_kv";
        return false;
    }
    n_kv_ = k->ne[1];
    const int64_t q_len = head_dim_ * n_head_;
    if (rows_.empty()) rows_.assign(1, n_tokens - 1);  // the single-sequence step scores the newest token
    if (!ensure_buffers(cache_k, (int32_t) layers_.size(), q_len, n_cells, span_, devs, err)) return false;

    // the scored queries: rows t0..t0+span-1 of every head; one block when Q is the usual permuted view of a
    // contiguous [head_dim, n_head, n_tokens] tensor (its streams follow each other)
    const int64_t t0 = rows_.front();
    const size_t dst = (size_t) il * q_->nb[2];
    if (q->nb[2] == (size_t) head_dim_ * sizeof(float) && q->nb[1] == (size_t) q_len * sizeof(float) &&
        (n_stream == 1 || q->nb[3] == n_tps * q->nb[1])) {
        copy_bytes(q, t0 * q->nb[1], q_, dst, span_ * q_len * sizeof(float));
    } else {
        for (int64_t r : rows_)
            for (int64_t h = 0; h < n_head_; h++)
                copy_bytes(q, (r % n_tps) * q->nb[1] + (r / n_tps) * q->nb[3] + h * q->nb[2], q_,
                           dst + (r - t0) * q_->nb[1] + h * head_dim_ * sizeof(float), head_dim_ * sizeof(float));
    }
    if (!mask_seen_) {  // the mask reads metadata only: the same rows for every layer
        if (mask->nb[1] == (size_t) n_kv_ * sizeof(uint16_t) && span_ > 1 &&
            (n_stream == 1 || mask->nb[3] == n_tps * mask->nb[1])) {
            copy_bytes(mask, t0 * mask->nb[1], mask_, 0, span_ * n_kv_ * sizeof(uint16_t));
        } else {
            for (int64_t r : rows_)
                copy_bytes(mask, (r % n_tps) * mask->nb[1] + (r / n_tps) * mask->nb[3], mask_,
                           (r - t0) * n_kv_ * sizeof(uint16_t), n_kv_ * sizeof(uint16_t));
        }
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

bool scorer::ensure_buffers(ggml_tensor * cache_k0, int32_t n_layer, int64_t q_len, int64_t n_kv_max, int64_t span,
                            backends & devs, std::string & err) {
    if (buf_ && q_len_ == q_len && n_kv_max_ == n_kv_max && n_layer_ == n_layer && n_head_alloc_ == n_head_ &&
        span <= span_cap_)
        return true;
    int64_t span_cap = 1;
    while (span_cap < span) span_cap *= 2;
    backend_ = devs.for_tensor(cache_k0, err);
    if (!backend_) return false;
    free_graph();
    if (buf_) ggml_backend_buffer_free(buf_);
    if (buf_ctx_) ggml_free(buf_ctx_);
    buf_ = nullptr;
    ggml_init_params ip = {8 * ggml_tensor_overhead(), nullptr, true};
    buf_ctx_ = ggml_init(ip);
    q_ = ggml_new_tensor_3d(buf_ctx_, GGML_TYPE_F32, q_len, span_cap, n_layer);
    mask_ = ggml_new_tensor_2d(buf_ctx_, GGML_TYPE_F16, n_kv_max, span_cap);
    idx_ = ggml_new_tensor_1d(buf_ctx_, GGML_TYPE_I32, span_cap);
    ones_ = ggml_new_tensor_2d(buf_ctx_, GGML_TYPE_F32, 1, span_cap * n_head_);
    probs_ = ggml_new_tensor_3d(buf_ctx_, GGML_TYPE_F32, n_kv_max, n_head_, n_layer);
    out_ = ggml_new_tensor_1d(buf_ctx_, GGML_TYPE_F32, n_kv_max * n_layer);
    buf_ = ggml_backend_alloc_ctx_tensors_from_buft(buf_ctx_, ggml_backend_buffer_get_type(cache_k0->buffer));
    if (!buf_) {
        err = "cannot allocate the flash-attention scoring buffers on the cache's device";
        return false;
    }
    {
        std::vector<float> ones(span_cap * n_head_, 1.0f);
        ggml_backend_tensor_set(ones_, ones.data(), 0, ones.size() * sizeof(float));
    }
    span_cap_ = span_cap;
    q_len_ = q_len;
    n_kv_max_ = n_kv_max;
    n_layer_ = n_layer;
    n_head_alloc_ = n_head_;
    return true;
}

// The layer's attention rows from its scores kq: the model's scale and softcap, the mask, its sinks (F32 sums).
ggml_tensor * scorer::attention_rows(ggml_context * ctx, ggml_tensor * kq, ggml_tensor * mask, const layer_view & lv) {
    ggml_prec_set_acc(kq, GGML_PREC_F32);
    float sm_scale = lv.scale;
    if (lv.softcap != 0.0f) {
        kq = ggml_tanh(ctx, ggml_scale(ctx, kq, lv.scale / lv.softcap));
        sm_scale = lv.softcap;
    }
    ggml_tensor * p = ggml_soft_max_ext(ctx, kq, mask, sm_scale, 0.0f);
    if (lv.sinks) ggml_soft_max_add_sinks(p, lv.sinks);
    return p;
}

bool scorer::build_graph(const std::vector<ggml_tensor *> & cache_k, std::string & err) {
    free_graph();
    const int32_t n_layer = (int32_t) layers_.size();
    const size_t n_tensors = 24 * (size_t) n_layer + 32;
    graph_ctx_ = graph_context(n_tensors);
    if (!graph_ctx_) {
        err = "ggml_init failed for the scoring graph";
        return false;
    }
    if (n_stream_ > 1) return build_graph_streams(cache_k, err);
    if (rows_.size() > 1) return build_graph_rows(cache_k, err);
    if (const size_t stride = layer_stride(cache_k)) {
        if (build_graph_fused(cache_k, stride, err)) return true;
        // a backend that cannot run the 4-D product: the per-layer graph below
        err.clear();
        graph_ctx_ = graph_context(n_tensors);
        if (!graph_ctx_) {
            err = "ggml_init failed for the scoring graph";
            return false;
        }
    }
    ggml_context * ctx = graph_ctx_;
    ggml_cgraph * gf = ggml_new_graph_custom(ctx, n_tensors, false);
    ggml_tensor * mask = ggml_view_2d(ctx, mask_, n_kv_, 1, n_kv_ * ggml_element_size(mask_), 0);
    const size_t fs = sizeof(float);
    for (int32_t l = 0; l < n_layer; l++) {
        const layer_view & lv = layers_[l];
        if (!lv.seen) continue;
        ggml_tensor * k = ggml_view_3d(ctx, cache_k[l], lv.ne[0], lv.ne[1], lv.ne[2], lv.nb[1], lv.nb[2], lv.offs);
        // the r query heads of one KV head side by side (query head h reads KV head h / r): r columns per product,
        // as in build_graph_streams (one column sends CUDA to its one-block-per-dot vector kernel)
        const int64_t n_head_kv = lv.ne[2], r = n_head_ / n_head_kv;
        ggml_tensor * q =
            ggml_view_3d(ctx, q_, head_dim_, r, n_head_kv, head_dim_ * fs, r * head_dim_ * fs, l * q_->nb[2]);
        ggml_tensor * kq = ggml_mul_mat(ctx, k, q);  // [n_kv, r, n_head_kv]
        ggml_prec_set_acc(kq, GGML_PREC_F32);
        kq = ggml_reshape_3d(ctx, kq, n_kv_, 1, n_head_);  // [n_kv, 1, n_head], head h = g * r + j
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

    return finish_graph(gf, err);
}

// The byte distance between consecutive layers' K caches when one 4-D view can stand for all of them: a float K
// type on a CPU or CUDA backend, every layer captured with the same K view and no sinks, and the caches equally
// spaced in one buffer (llama.cpp allocates each layer's K and V in turn in one buffer per device, so a model
// whose layers share one shape has that). 0 otherwise.
size_t scorer::layer_stride(const std::vector<ggml_tensor *> & cache_k) const {
    const int32_t n_layer = (int32_t) layers_.size();
    if (n_layer < 2 || (int32_t) cache_k.size() != n_layer) return 0;
    const layer_view & lv0 = layers_[0];
    const char * d0 = cache_k[0] ? (const char *) cache_k[0]->data : nullptr;
    const char * d1 = cache_k[1] ? (const char *) cache_k[1]->data : nullptr;
    // quantized K: CUDA's quantized products misread a 4-D view's layer stride (H200: wrong scores from layer 1
    // on with a q8_0 cache), so those caches keep the per-layer graph; so do backends the 4-D product has not
    // been checked on against the oracle (tests/test_reference.py on the CPU, tests/test_gpu.py on CUDA)
    const ggml_type kt = cache_k[0] ? cache_k[0]->type : GGML_TYPE_COUNT;
    if (kt != GGML_TYPE_F16 && kt != GGML_TYPE_BF16 && kt != GGML_TYPE_F32) return 0;
    const char * name = backend_ ? ggml_backend_name(backend_) : "";
    if (strncmp(name, "CPU", 3) != 0 && strncmp(name, "CUDA", 4) != 0) return 0;
    if (!d0 || d1 <= d0) return 0;
    const size_t stride = (size_t) (d1 - d0);
    for (int32_t l = 0; l < n_layer; l++) {
        const layer_view & lv = layers_[l];
        const ggml_tensor * k = cache_k[l];
        if (!lv.seen || lv.sinks || !(lv == lv0) || !k || k->buffer != cache_k[0]->buffer ||
            k->type != cache_k[0]->type || memcmp(k->nb, cache_k[0]->nb, sizeof(k->nb)) != 0 ||
            (const char *) k->data != d0 + (size_t) l * stride)
            return 0;
    }
    return stride;
}

// Every layer in one product: the K caches as one 4-D view [head_dim, n_kv, n_head_kv, n_layer] (layer stride
// from layer_stride), the captured queries as [head_dim, r, n_head_kv, n_layer], then one softmax and one mean
// over heads for all layers: a handful of kernels instead of three per layer (on a GPU the per-layer graph's
// cost was its launches). Same operations per layer as the per-layer graph below. False (err set) when the
// backend cannot run them.
bool scorer::build_graph_fused(const std::vector<ggml_tensor *> & cache_k, size_t stride, std::string & err) {
    const int32_t n_layer = (int32_t) layers_.size();
    const layer_view & lv = layers_[0];
    ggml_context * ctx = graph_ctx_;
    ggml_cgraph * gf = ggml_new_graph_custom(ctx, 64, false);
    // a view of layer 0's cache reaching into the other layers' (same buffer, checked by layer_stride): set up by
    // hand, as ggml_view_4d refuses a view larger than its source
    ggml_tensor * k = ggml_new_tensor_4d(ctx, cache_k[0]->type, lv.ne[0], lv.ne[1], lv.ne[2], n_layer);
    k->nb[1] = lv.nb[1];
    k->nb[2] = lv.nb[2];
    k->nb[3] = stride;
    k->view_src = cache_k[0];
    k->view_offs = lv.offs;
    const size_t fs = sizeof(float);
    const int64_t n_head_kv = lv.ne[2], r = n_head_ / n_head_kv;
    ggml_tensor * q =
        ggml_view_4d(ctx, q_, head_dim_, r, n_head_kv, n_layer, head_dim_ * fs, r * head_dim_ * fs, q_->nb[2], 0);
    ggml_tensor * kq = ggml_mul_mat(ctx, k, q);  // [n_kv, r, n_head_kv, n_layer]
    ggml_prec_set_acc(kq, GGML_PREC_F32);
    kq = ggml_reshape_4d(ctx, kq, n_kv_, 1, n_head_, n_layer);  // head h = g * r + j
    ggml_tensor * mask = ggml_view_2d(ctx, mask_, n_kv_, 1, n_kv_ * ggml_element_size(mask_), 0);
    ggml_tensor * p = attention_rows(ctx, kq, mask, lv);
    ggml_tensor * per_head =
        ggml_cont(ctx, ggml_permute(ctx, ggml_reshape_3d(ctx, p, n_kv_, n_head_, n_layer), 1, 0, 2, 3));
    ggml_tensor * mean = ggml_scale(ctx, ggml_sum_rows(ctx, per_head), 1.0f / (float) n_head_);  // [1, n_kv, n_layer]
    ggml_tensor * out = ggml_view_1d(ctx, out_, n_kv_ * n_layer, 0);
    ggml_build_forward_expand(gf, ggml_cpy(ctx, ggml_reshape_1d(ctx, mean, n_kv_ * n_layer), out));
    return finish_graph(gf, err);
}

// Many sequences: per layer one product of K with every scored row, softmax with each row's own mask row, and
// the sum over rows and heads (out_prod with ones): a row is 0 outside its sequence's cells.
bool scorer::build_graph_rows(const std::vector<ggml_tensor *> & cache_k, std::string & err) {
    const int32_t n_layer = (int32_t) layers_.size();
    const int64_t n_rows = (int64_t) rows_.size(), q_len = head_dim_ * n_head_;
    ggml_context * ctx = graph_ctx_;
    const size_t n_tensors = 24 * (size_t) n_layer + 32;
    ggml_cgraph * gf = ggml_new_graph_custom(ctx, n_tensors, false);
    ggml_tensor * idx = ggml_view_1d(ctx, idx_, n_rows, 0);
    ggml_tensor * mask_block = ggml_view_2d(ctx, mask_, n_kv_, span_, n_kv_ * ggml_element_size(mask_), 0);
    ggml_tensor * mask = ggml_get_rows(ctx, mask_block, idx);  // F32 [n_kv, n_rows]
    ggml_tensor * ones = ggml_view_2d(ctx, ones_, 1, n_rows * n_head_, ones_->nb[1], 0);
    for (int32_t l = 0; l < n_layer; l++) {
        const layer_view & lv = layers_[l];
        if (!lv.seen) continue;
        ggml_tensor * k = ggml_view_3d(ctx, cache_k[l], lv.ne[0], lv.ne[1], lv.ne[2], lv.nb[1], lv.nb[2], lv.offs);
        ggml_tensor * qb = ggml_view_2d(ctx, q_, q_len, span_, q_->nb[1], l * q_->nb[2]);
        ggml_tensor * q = ggml_reshape_3d(ctx, ggml_get_rows(ctx, qb, idx), head_dim_, n_head_, n_rows);
        q = ggml_cont(ctx, ggml_permute(ctx, q, 0, 2, 1, 3));  // [head_dim, n_rows, n_head]
        ggml_tensor * kq = ggml_mul_mat(ctx, k, q);            // [n_kv, n_rows, n_head]
        ggml_tensor * p = attention_rows(ctx, kq, mask, lv);
        ggml_tensor * p2 = ggml_reshape_2d(ctx, p, n_kv_, n_rows * n_head_);
        ggml_tensor * sum = ggml_out_prod(ctx, p2, ones);  // [n_kv, 1]
        if (!ggml_backend_supports_op(backend_, sum))      // a backend without out_prod: transpose, then sum rows
            sum = ggml_sum_rows(ctx, ggml_cont(ctx, ggml_transpose(ctx, p2)));  // [1, n_kv]
        ggml_tensor * mean = ggml_scale(ctx, sum, 1.0f / (float) n_head_);
        ggml_tensor * dst = ggml_view_1d(ctx, out_, n_kv_, (size_t) l * n_kv_ * sizeof(float));
        ggml_build_forward_expand(gf, ggml_cpy(ctx, ggml_reshape_1d(ctx, mean, n_kv_), dst));
    }
    return finish_graph(gf, err);
}

// Per-sequence streams: one scored row per stream (its sequence's newest token). Per layer one batched product of
// each stream's K view with its own row, softmax with the row's own mask, and the mean over heads per stream:
// [n_kv, n_stream] floats, stream i's cells only.
bool scorer::build_graph_streams(const std::vector<ggml_tensor *> & cache_k, std::string & err) {
    const int32_t n_layer = (int32_t) layers_.size();
    const int64_t ns = n_stream_, q_len = head_dim_ * n_head_;
    ggml_context * ctx = graph_ctx_;
    const size_t n_tensors = 24 * (size_t) n_layer + 32;
    ggml_cgraph * gf = ggml_new_graph_custom(ctx, n_tensors, false);
    ggml_tensor * idx = ggml_view_1d(ctx, idx_, ns, 0);
    ggml_tensor * mask_block = ggml_view_2d(ctx, mask_, n_kv_, span_, n_kv_ * ggml_element_size(mask_), 0);
    ggml_tensor * mask = ggml_reshape_4d(ctx, ggml_get_rows(ctx, mask_block, idx), n_kv_, 1, 1, ns);  // F32
    for (int32_t l = 0; l < n_layer; l++) {
        const layer_view & lv = layers_[l];
        if (!lv.seen) continue;
        ggml_tensor * k = ggml_view_4d(ctx, cache_k[l], lv.ne[0], lv.ne[1], lv.ne[2], lv.ne[3], lv.nb[1], lv.nb[2],
                                       lv.nb[3], lv.offs);  // [head_dim, n_kv, n_head_kv, ns]
        ggml_tensor * qb = ggml_view_2d(ctx, q_, q_len, span_, q_->nb[1], l * q_->nb[2]);
        // the r query heads of one KV head side by side (query head h reads KV head h / r): r columns per product.
        // With one column and n_kv <= 512 CUDA takes its vector kernel, one block per head_dim dot product: the
        // likely cause of 87 ms scored steps at 128 streams of 512 cells on an H200 (9.5 ms at 85 of 768).
        const int64_t n_head_kv = lv.ne[2], r = n_head_ / n_head_kv;
        ggml_tensor * q = ggml_reshape_4d(ctx, ggml_get_rows(ctx, qb, idx), head_dim_, r, n_head_kv, ns);
        ggml_tensor * kq = ggml_mul_mat(ctx, k, q);            // [n_kv, r, n_head_kv, ns]
        kq = ggml_reshape_4d(ctx, kq, n_kv_, 1, n_head_, ns);  // [n_kv, 1, n_head, ns], head h = g * r + j
        ggml_tensor * p = attention_rows(ctx, kq, mask, lv);
        // [n_kv, n_head, ns] -> [n_head, n_kv, ns]: sum over heads per cell and stream
        ggml_tensor * per_head =
            ggml_cont(ctx, ggml_permute(ctx, ggml_reshape_3d(ctx, p, n_kv_, n_head_, ns), 1, 0, 2, 3));
        ggml_tensor * mean = ggml_scale(ctx, ggml_sum_rows(ctx, per_head), 1.0f / (float) n_head_);  // [1, n_kv, ns]
        ggml_tensor * dst = ggml_view_1d(ctx, out_, n_kv_ * ns, (size_t) l * n_kv_ * ns * sizeof(float));
        ggml_build_forward_expand(gf, ggml_cpy(ctx, ggml_reshape_1d(ctx, mean, n_kv_ * ns), dst));
    }
    return finish_graph(gf, err);
}

bool scorer::finish_graph(ggml_cgraph * gf, std::string & err) {
    for (int i = 0; i < ggml_graph_n_nodes(gf); i++) {
        ggml_tensor * node = ggml_graph_node(gf, i);
        if (!ggml_backend_supports_op(backend_, node)) {
            err = std::string("the cache's backend (") + ggml_backend_name(backend_) + ") cannot run " +
                  ggml_op_desc(node) + " on " + ggml_type_name(node->src[0]->type) + " for the flash-attention scores";
            free_graph();
            return false;
        }
    }
    galloc_ = ggml_gallocr_new(ggml_backend_get_default_buffer_type(backend_));
    if (!galloc_ || !ggml_gallocr_alloc_graph(galloc_, gf)) {
        err = "cannot allocate the flash-attention scoring graph";
        free_graph();
        return false;
    }
    graph_ = gf;
    graph_layers_ = layers_;
    graph_n_kv_ = n_kv_;
    graph_n_rows_ = (int64_t) rows_.size();
    graph_span_ = span_;
    graph_n_stream_ = n_stream_;
    return true;
}

bool scorer::compute(const std::vector<ggml_tensor *> & cache_k, float * scores, int32_t n_cells, uint8_t * scored,
                     timing & tm, std::string & err) {
    const int32_t n_layer = (int32_t) layers_.size();
    if (n_kv_ == 0 || n_kv_ * n_stream_ > n_cells || !buf_) {
        err = "no FLASH_ATTN_EXT node was captured (or n_kv exceeds the context)";
        return false;
    }
    if (!graph_ || graph_n_kv_ != n_kv_ || !(graph_layers_ == layers_) || graph_n_rows_ != (int64_t) rows_.size() ||
        graph_span_ != span_ || graph_n_stream_ != n_stream_) {
        const double t0 = now_s();
        if (!build_graph(cache_k, err)) return false;
        tm.builds++;
        tm.build_s += now_s() - t0;
    }
    const double t_compute = now_s();
    if (rows_.size() > 1) {
        std::vector<int32_t> rel(rows_.size());
        for (size_t i = 0; i < rows_.size(); i++) rel[i] = rows_[i] - rows_.front();
        ggml_backend_tensor_set(idx_, rel.data(), 0, rel.size() * sizeof(int32_t));
    }
    if (ggml_backend_graph_compute(backend_, graph_) != GGML_STATUS_SUCCESS) {
        err = "the flash-attention scoring graph failed on the cache's backend";
        return false;
    }
    const double t_read = now_s();
    tm.compute_s += t_read - t_compute;
    tm.nodes += ggml_graph_n_nodes(graph_);
    const int64_t per_layer = n_kv_ * n_stream_;
    host_.resize((size_t) per_layer * n_layer);
    ggml_backend_tensor_get(out_, host_.data(), 0, host_.size() * sizeof(float));
    for (int32_t l = 0; l < n_layer; l++) {
        const layer_view & lv = layers_[l];
        if (!lv.seen) continue;
        // the K view starts at the ubatch's first stream; stream s holds the engine's cells [s*kv_size, (s+1)*kv_size)
        const int64_t kv_size = cache_k[l]->ne[1];
        const int64_t s0 = (int64_t) (lv.offs / cache_k[l]->nb[2]);
        if ((s0 + n_stream_) * kv_size > n_cells) {
            err = "the flash-attention K view lies outside the engine's cells";
            return false;
        }
        for (int64_t i = 0; i < n_stream_; i++) {
            float * s = scores + (size_t) l * n_cells + (s0 + i) * kv_size;
            memcpy(s, &host_[(size_t) l * per_layer + i * n_kv_], n_kv_ * sizeof(float));
            memset(s + n_kv_, 0, (kv_size - n_kv_) * sizeof(float));
        }
        scored[l] = 1;
    }
    tm.read_s += now_s() - t_read;
    return true;
}

}  // namespace tova
