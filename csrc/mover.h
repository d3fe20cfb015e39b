// mover: copies one layer's K/V content from cell to cell, on whatever backend holds the cache.
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

struct ggml_tensor;
struct ggml_backend;

namespace tova {

struct layer_moves {
    ggml_tensor * k;                                 // cache_k_l<il>: [n_embd_k_gqa, kv_size]
    ggml_tensor * v;                                 // cache_v_l<il>: same shape; V transposed in memory when v_trans
    std::vector<std::pair<int32_t, int32_t>> moves;  // (src cell, dst cell)
};

class mover {
public:
    ~mover();
    // Applies every layer's moves; rows are raw bytes (quantized rows are never converted).
    // Host buffers take memcpy unless force_graph; device buffers take one ggml graph of CPY ops.
    bool apply(const std::vector<layer_moves> & layers, bool v_trans, bool force_graph, std::string & err);

private:
    bool apply_graph(const std::vector<layer_moves> & layers, bool v_trans, std::string & err);
    ggml_backend * backend_ = nullptr;
    void * backend_dev_ = nullptr;  // device the backend was made for
};

}  // namespace tova
