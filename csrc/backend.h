// backend: the device that holds a tensor, and one ggml backend per device, started on first use and kept for
// the engine's life. The mover and the scorer share it (a second backend per device would hold a second CUDA
// stream and its buffers).
#pragma once

#include <string>
#include <utility>
#include <vector>

struct ggml_tensor;
struct ggml_backend;
struct ggml_backend_device;
struct ggml_context;
struct ggml_cgraph;
struct ggml_gallocr;

namespace tova {

// The device whose backend computes on t's buffer; plain host buffers name no device: the CPU's. NULL if none.
ggml_backend_device * device_of(const ggml_tensor * t);

class backends {
public:
    ~backends();
    backends() = default;
    backends(const backends &) = delete;
    backends & operator=(const backends &) = delete;
    // CPU threads of the CPU backend (the flash-attention scores on a host cache), started or not: the session
    // may change it between decodes (tova_cpp/threads.py follows the cores other processes leave free).
    void set_threads(int n);
    // The backend for t's device; NULL and err filled when there is none.
    ggml_backend * for_tensor(const ggml_tensor * t, std::string & err);

private:
    std::vector<std::pair<ggml_backend_device *, ggml_backend *>> started_;
    int n_threads_ = 1;
};

// A no_alloc ggml context with room for n_tensors tensors and a graph of as many nodes (the engine's own graphs:
// mover, scorer, attention sums). NULL when ggml_init fails.
ggml_context * graph_context(size_t n_tensors);

// A ggml_gallocr for graphs computed on one backend, kept across calls (its buffer grows to the largest graph
// seen and is reused); made anew when the backend changes.
class graph_allocator {
public:
    graph_allocator() = default;
    graph_allocator(const graph_allocator &) = delete;
    graph_allocator & operator=(const graph_allocator &) = delete;
    ~graph_allocator();
    // Places gf's unallocated tensors in b's default buffer type; false when there is no room.
    bool alloc(ggml_backend * b, ggml_cgraph * gf);

private:
    ggml_backend * backend_ = nullptr;  // owned by `backends`
    ggml_gallocr * galloc_ = nullptr;
};

}  // namespace tova
