// reduce: sums of one layer's attention probabilities (kq_soft_max-<il>, F32 [n_kv, n_tps, n_head, n_stream])
// formed on the device that holds them, so that a GPU hands back n_kv floats per row or per stream instead of
// the whole tensor (the host path read every head of every row: for h2o, every query row of a prompt piece).
// h2o's column sums copy p once (permuted) on its device; TOVA's head sums gather only the scored rows.
// Called from the eval callback's data phase: the scheduler has synchronized the node's backend, and the graph
// here runs on the same device's backend (shared with the mover and the scorer) and is synchronous.
// Sums are F32 on the device (the host path adds F32 rows in F64): an h2o or TOVA near-tie may resolve the
// other way than on a host cache (docs/ARCHITECTURE.md, "h2o on a GPU").
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "backend.h"

struct ggml_tensor;
struct ggml_backend;

namespace tova {

class reducer {
public:
    reducer() = default;
    reducer(const reducer &) = delete;
    reducer & operator=(const reducer &) = delete;
    // The head sums of chosen rows, r_s of them in each stream: tk[i * r_s + r] is the r-th row (token index) of
    // stream i (any row < n_tps fills a stream that has fewer). out[(i * r_s + r) * n_kv + j] = sum over heads h
    // of p[j, tk[i * r_s + r], h, i]. Only those rows are gathered (GET_ROWS), so the device's extra memory is
    // r_s x n_kv x n_head x n_stream floats, not p's size.
    bool head_sums(ggml_tensor * p, const std::vector<int32_t> & tk, int64_t r_s, backends & devs,
                   std::vector<float> & out, std::string & err);
    // out[i * n_kv + j] = sum over rows t and heads h of p[j, t, h, i]: each stream's column sums (h2o).
    bool column_sums(ggml_tensor * p, backends & devs, std::vector<float> & out, std::string & err);

private:
    bool run(ggml_tensor * p, const std::vector<int32_t> * tk, int64_t r_s, backends & devs, std::vector<float> & out,
             std::string & err);
    graph_allocator alloc_;      // grows to the largest reduction seen and is reused
    std::vector<int32_t> rows_;  // head_sums' row indices as uploaded (one list per head and stream)
};

}  // namespace tova
