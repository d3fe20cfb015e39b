// capture_fa: TOVA scores with flash attention on. FLASH_ATTN_EXT never materialises the attention
// probabilities, so the eval callback keeps what it needs from each layer's node (the newest query, the K view's
// shape, scale/softcap, the newest token's mask row) and, after llama_decode, one small ggml graph on the cache's
// own device recomputes softmax(K q * scale + mask) per query head and its mean over heads, for every layer.
// Only n_layer x n_kv floats come back to the host.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

struct ggml_tensor;
struct ggml_backend;
struct ggml_backend_buffer;
struct ggml_context;
struct ggml_gallocr;

namespace tova {

class fa_scorer {
public:
    ~fa_scorer();
    void set_threads(int32_t n) { n_threads_ = n; }
    // Before each scored llama_decode.
    void begin(int32_t n_layer);
    // Callback, data phase of a FLASH_ATTN_EXT node of layer il (the newest token is row n_tokens-1).
    // Returns false and fills err when the node is not one the scorer understands.
    bool capture(ggml_tensor * fa, int32_t il, ggml_tensor * cache_k, int32_t n_tokens, std::string & err);
    // After llama_decode: computes scores[l * n_cells + c] for every captured layer (cells >= n_kv get 0) and
    // sets scored[l]. cache_k: [n_layer] cache tensors.
    bool compute(const std::vector<ggml_tensor *> & cache_k, float * scores, int32_t n_cells, uint8_t * scored,
                 std::string & err);

private:
    struct layer_view {
        bool seen = false;
        int64_t ne[4];  // K view as FLASH_ATTN_EXT reads it: [head_dim, n_kv, n_head_kv, n_stream]
        size_t nb[4];
        size_t offs;  // byte offset into cache_k_l<il>
        float scale, softcap;
        ggml_tensor * sinks = nullptr;  // F32 [n_head] model weight, or null
    };
    bool ensure_buffers(ggml_tensor * cache_k0, int32_t n_layer, int64_t q_len, int64_t n_kv_max, std::string & err);

    std::vector<layer_view> layers_;
    std::vector<float> q_host_;        // [n_layer][head_dim * n_head] newest query, F32
    std::vector<uint16_t> mask_host_;  // [n_kv] newest token's mask row, F16 bits
    int64_t head_dim_ = 0, n_head_ = 0, n_kv_ = 0;
    bool mask_seen_ = false;
    int32_t n_threads_ = 1;

    // persistent device state (on the cache's buffer type)
    ggml_backend * backend_ = nullptr;
    void * backend_dev_ = nullptr;
    ggml_context * buf_ctx_ = nullptr;
    ggml_backend_buffer * buf_ = nullptr;
    ggml_tensor * q_ = nullptr;      // F32 [head_dim, n_head, n_layer]
    ggml_tensor * mask_ = nullptr;   // F16 [n_kv_max]
    ggml_tensor * probs_ = nullptr;  // F32 [n_kv_max, n_head, n_layer] each head's softmax row
    ggml_tensor * out_ = nullptr;    // F32 [n_kv * n_layer] head means, packed
    int64_t q_len_ = 0, n_kv_max_ = 0, n_head_alloc_ = 0;
    int32_t n_layer_ = 0;
    ggml_gallocr * galloc_ = nullptr;
};

}  // namespace tova
