// mover: copies each layer's K/V content from cell to cell, on whatever backend holds the cache (memcpy on host
// buffers, one ggml graph of byte-exact copies on a device). Call only after llama_synchronize: the mover's
// backend has its own stream.
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "backend.h"

struct ggml_tensor;
struct ggml_backend;
struct ggml_backend_buffer;
struct ggml_context;
struct ggml_cgraph;

namespace tova {

struct rows_job;  // mover.cpp

struct layer_moves {
    ggml_tensor * k;                                 // cache_k_l<il>: [n_embd_k_gqa, kv_size, n_stream]
    ggml_tensor * v;                                 // cache_v_l<il>: same shape; V transposed in memory when v_trans
    std::vector<std::pair<int32_t, int32_t>> moves;  // (src cell, dst cell)
};

class mover {
public:
    mover() = default;
    mover(const mover &) = delete;
    mover & operator=(const mover &) = delete;
    ~mover();
    // Applies every layer's moves; rows are raw bytes (quantized rows are never converted; a transposed V's float
    // elements pass through F32 on a device, which gives back the same bits).
    // Host buffers take memcpy unless force_graph; device buffers take ggml graphs: when every layer's K and V rows
    // tile one span of one buffer (flash attention on), one gather and one scatter for the whole cut; otherwise
    // a layer with several moves a gather and a scatter per tensor (a transposed V: move_columns), a single move
    // a CPY per tensor.
    bool apply(const std::vector<layer_moves> & layers, bool v_trans, bool force_graph, backends & devs,
               std::string & err);
    // Graph nodes computed since the last call (each is about one kernel on a GPU): the launches a cut cost.
    double take_nodes() {
        const double n = nodes_;
        nodes_ = 0;
        return n;
    }

private:
    bool apply_graph(const std::vector<const layer_moves *> & layers, bool v_trans, backends & devs, std::string & err);
    bool add_batched(ggml_context * ctx, ggml_cgraph * gf, ggml_backend * backend, const std::vector<rows_job> & jobs,
                     std::string & err);
    bool columns_supported(ggml_backend * backend, const layer_moves * l);
    bool move_columns(ggml_backend * backend, const std::vector<const layer_moves *> & layers, bool & no_room,
                      std::string & err);

    ggml_backend_buffer * scratch_ = nullptr;  // gathered rows and indices, on the cache's device
    ggml_backend * scratch_backend_ = nullptr;
    std::vector<int32_t> idx_host_;
    ggml_tensor * pending_idx_ = nullptr;  // uploaded once the graph's views are set up
    graph_allocator columns_alloc_;        // move_columns' scratch
    std::vector<std::pair<std::pair<ggml_backend *, int>, bool>> columns_ok_;  // (backend, V type) -> supported
    double nodes_ = 0;  // graph nodes computed (kernels, roughly), for tova_engine_stats
};

}  // namespace tova
