// score: TOVA scores with flash attention on. FLASH_ATTN_EXT never materialises the attention probabilities, so
// the eval callback hands each layer's node to capture(), which keeps what the recompute needs (the newest
// query, copied device-to-device into a persistent buffer; the K view's shape; scale/softcap; the newest
// token's mask row). After llama_decode, compute() runs one ggml graph on the cache's own device that
// recomputes softmax(K q * scale + mask) per query head and its mean over heads, for every layer. The graph is
// built once per n_kv and reused; only n_layer x n_kv floats come back to the host.
// Many sequences: one row per sequence (its newest token in the ubatch). The graph gathers those query rows and
// mask rows, computes softmax(K Q * scale + mask) for all of them in one matrix product per layer, and sums each
// cell over rows and heads: a row is 0 on the cells of every other sequence (masked), so each cell gets its own
// sequence's head mean. Still n_layer x n_kv floats come back, whatever the number of sequences.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

struct ggml_tensor;
struct ggml_backend;
struct ggml_backend_buffer;
struct ggml_backend_device;
struct ggml_backend_sched;
struct ggml_context;
struct ggml_cgraph;
struct ggml_gallocr;

namespace tova {

class backends;
double now_s();  // steady clock, seconds (engine.cpp)

class scorer {
public:
    ~scorer();
    // Before each scored llama_decode. rows: the batch rows to score (one per sequence), ascending. sched: the
    // context's scheduler when the engine can reach it (null otherwise): on a device the query and mask copies
    // are then queued on the stream of the backend running the graph, behind the node and ahead of the kernels
    // that reuse its memory, instead of a copy waited for per layer.
    void begin(int32_t n_layer, const std::vector<int32_t> & rows, ggml_backend_sched * sched = nullptr);
    // Callback, data phase of a FLASH_ATTN_EXT node of layer il (scores the rows given to begin).
    // n_cells: the context's cells (the most n_kv can be). Returns false and fills err when the node is not one
    // the scorer understands.
    bool capture(ggml_tensor * fa, int32_t il, ggml_tensor * cache_k, int32_t n_tokens, int32_t n_cells,
                 backends & devs, std::string & err);
    bool capture(ggml_tensor * fa, int32_t il, ggml_tensor * cache_k, int32_t n_tokens,
                 const std::vector<int32_t> & rows, int32_t n_cells, backends & devs, std::string & err);
    // Where compute() spent its time (tova_engine_stats' score_* counters).
    struct timing {
        int32_t builds = 0, nodes = 0;
        double build_s = 0, compute_s = 0, read_s = 0;
    };
    // After llama_decode: scores[l * n_cells + c] for every captured layer (cells >= n_kv get 0), scored[l] set.
    // cache_k: [n_layer] cache tensors. Adds its costs to tm.
    bool compute(const std::vector<ggml_tensor *> & cache_k, float * scores, int32_t n_cells, uint8_t * scored,
                 timing & tm, std::string & err);

private:
    struct layer_view {
        bool seen = false;
        int64_t ne[4] = {};  // K view as FLASH_ATTN_EXT reads it: [head_dim, n_kv, n_head_kv, n_stream]
                             // (offs: the first stream's offset)
        size_t nb[4] = {};
        size_t offs = 0;  // byte offset into cache_k_l<il>
        float scale = 0.0f, softcap = 0.0f;
        ggml_tensor * sinks = nullptr;  // F32 [n_head] model weight, or null
        bool operator==(const layer_view & o) const;
    };
    // the layer's attention rows from its scores kq: scale and softcap, the mask, its sinks (F32 sums)
    static ggml_tensor * attention_rows(ggml_context * ctx, ggml_tensor * kq, ggml_tensor * mask,
                                        const layer_view & lv);
    bool ensure_buffers(ggml_tensor * cache_k0, int32_t n_layer, int64_t q_len, int64_t n_kv_max, int64_t span,
                        backends & devs, std::string & err);
    bool build_graph(const std::vector<ggml_tensor *> & cache_k, std::string & err);
    size_t layer_stride(const std::vector<ggml_tensor *> & cache_k) const;
    bool build_graph_fused(const std::vector<ggml_tensor *> & cache_k, size_t stride, std::string & err);
    bool build_graph_rows(const std::vector<ggml_tensor *> & cache_k, std::string & err);
    bool build_graph_streams(const std::vector<ggml_tensor *> & cache_k, std::string & err);
    bool finish_graph(ggml_cgraph * gf, std::string & err);
    void free_graph();

    // the backend whose stream runs the captured nodes (from begin's scheduler; null: copies wait for themselves)
    ggml_backend * graph_backend(const ggml_tensor * t);
    void copy_bytes(const ggml_tensor * src, size_t src_off, const ggml_tensor * dst, size_t dst_off, size_t n);

    ggml_backend_sched * sched_ = nullptr;
    ggml_backend * stream_ = nullptr;  // graph_backend's answer for stream_dev_ in this decode
    ggml_backend_device * stream_dev_ = nullptr;
    std::vector<layer_view> layers_;
    int64_t head_dim_ = 0, n_head_ = 0, n_kv_ = 0;
    int64_t n_stream_ = 1;  // streams in the ubatch (per-sequence streams: one scored row each)
    bool mask_seen_ = false;
    std::vector<int32_t> rows_;  // batch rows scored in this decode
    int64_t span_ = 1;           // rows_.back() - rows_.front() + 1: the block of rows copied per layer

    // persistent device state (on the cache's buffer type)
    ggml_backend * backend_ = nullptr;  // owned by `backends`
    ggml_context * buf_ctx_ = nullptr;
    ggml_backend_buffer * buf_ = nullptr;
    ggml_tensor * q_ = nullptr;      // F32 [head_dim * n_head, span_cap, n_layer] the scored queries of every layer
    ggml_tensor * mask_ = nullptr;   // F16 [n_kv_max, span_cap] their mask rows
    ggml_tensor * idx_ = nullptr;    // I32 [span_cap] rows_ relative to rows_.front()
    ggml_tensor * ones_ = nullptr;   // F32 [1, span_cap * n_head] for the sum over rows and heads
    ggml_tensor * probs_ = nullptr;  // F32 [n_kv_max, n_head, n_layer] each head's softmax row
    ggml_tensor * out_ = nullptr;    // F32 [n_kv * n_layer] head means, packed
    int64_t q_len_ = 0, n_kv_max_ = 0, n_head_alloc_ = 0, span_cap_ = 0;
    int32_t n_layer_ = 0;

    // the scoring graph, kept while n_kv and the layers' K views stay the same
    ggml_context * graph_ctx_ = nullptr;
    ggml_cgraph * graph_ = nullptr;
    ggml_gallocr * galloc_ = nullptr;
    std::vector<layer_view> graph_layers_;
    int64_t graph_n_kv_ = 0;
    int64_t graph_n_rows_ = 0, graph_span_ = 0, graph_n_stream_ = 0;
    std::vector<float> host_;  // [n_kv * n_layer] read-back
};

}  // namespace tova
