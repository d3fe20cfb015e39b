#include "mover.h"

#include <algorithm>
#include <cstring>
#include <initializer_list>

#include "backend.h"
#include "ggml-backend.h"
#include "ggml.h"

namespace tova {

mover::~mover() {
    if (scratch_) ggml_backend_buffer_free(scratch_);
}

// Cells are numbered across streams as llama.cpp's attn_inp_k_idxs does: cell g is cell g % kv_size of stream
// g / kv_size (the tensors are [n_embd, kv_size, n_stream], contiguous, so a row's offset is g * nb[1]). Element
// (cell c, dim j) of stream s of a transposed V cache lies at s*nb[2] + (j*kv_size + c)*elsize.
static size_t transposed_offset(const ggml_tensor * t, int32_t g) {
    const int64_t kv_size = t->ne[1];
    return (g / kv_size) * t->nb[2] + (g % kv_size) * ggml_type_size(t->type);
}

static void copy_host(ggml_tensor * t, int32_t src, int32_t dst, bool transposed) {
    char * base = (char *) t->data;
    if (!transposed) {
        const size_t row = ggml_row_size(t->type, t->ne[0]);
        memcpy(base + dst * t->nb[1], base + src * t->nb[1], row);
        return;
    }
    const size_t es = ggml_type_size(t->type);
    const size_t col = t->ne[1] * es;  // one dim of one stream: kv_size elements
    const size_t s_off = transposed_offset(t, src), d_off = transposed_offset(t, dst);
    for (int64_t j = 0; j < t->ne[0]; j++) memcpy(base + d_off + j * col, base + s_off + j * col, es);
}

bool mover::apply(const std::vector<layer_moves> & layers, bool v_trans, bool force_graph, backends & devs,
                  std::string & err) {
    std::vector<const layer_moves *> device;
    for (const auto & l : layers) {
        if (l.moves.empty()) continue;
        if (force_graph || !ggml_backend_buffer_is_host(l.k->buffer) || !ggml_backend_buffer_is_host(l.v->buffer)) {
            device.push_back(&l);
            continue;
        }
        for (const auto & m : l.moves) {
            copy_host(l.k, m.first, m.second, false);
            copy_host(l.v, m.first, m.second, v_trans);
        }
    }
    return device.empty() || apply_graph(device, v_trans, devs, err);
}

// View of one cell's content, in the cache's own type: a contiguous row, or a strided column when transposed.
static ggml_tensor * cell_view(ggml_context * ctx, ggml_tensor * t, int32_t cell, bool transposed) {
    if (!transposed) return ggml_view_1d(ctx, t, t->ne[0], cell * t->nb[1]);
    const size_t es = ggml_type_size(t->type);
    return ggml_view_2d(ctx, t, 1, t->ne[0], t->ne[1] * es, transposed_offset(t, cell));
}

// Byte-exact I32 alias of t (rows of nb[1] bytes), placed on t's own memory. Rows are then copied as I32 -> I32,
// a plain copy on every backend: ggml's Metal backend copies quantized types only to F32/F16, never Q8_0 -> Q8_0
// (ggml-metal-device.m, ggml_metal_device_supports_op, case GGML_OP_CPY). Null when a row is not whole words.
static ggml_tensor * i32_alias(ggml_context * ctx, ggml_tensor * t) {
    if (t->nb[1] % 4 != 0 || t->nb[1] != ggml_row_size(t->type, t->ne[0]) || !ggml_is_contiguous(t)) return nullptr;
    ggml_tensor * a = ggml_new_tensor_2d(ctx, GGML_TYPE_I32, t->nb[1] / 4, ggml_nrows(t));
    if (ggml_backend_tensor_alloc(t->buffer, a, t->data) != GGML_STATUS_SUCCESS) return nullptr;
    return a;
}

// Same as i32_alias, typed F32: ggml_set_rows writes F32 rows, which on every backend is a plain copy of the words.
static ggml_tensor * f32_alias(ggml_context * ctx, ggml_tensor * t) {
    if (t->nb[1] % 4 != 0 || t->nb[1] != ggml_row_size(t->type, t->ne[0]) || !ggml_is_contiguous(t)) return nullptr;
    ggml_tensor * a = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, t->nb[1] / 4, ggml_nrows(t));
    if (ggml_backend_tensor_alloc(t->buffer, a, t->data) != GGML_STATUS_SUCCESS) return nullptr;
    return a;
}

// Copies cell src to cell dst of t: whole rows through the I32 alias when there is one, else in t's own type
// (a transposed V column: F16/F32/BF16, which every backend copies).
static ggml_tensor * copy_cell(ggml_context * ctx, ggml_tensor * t, ggml_tensor * alias, int32_t src, int32_t dst,
                               bool transposed) {
    if (!transposed && alias) {
        return ggml_cpy(ctx, ggml_view_1d(ctx, alias, alias->ne[0], src * alias->nb[1]),
                        ggml_view_1d(ctx, alias, alias->ne[0], dst * alias->nb[1]));
    }
    return ggml_cpy(ctx, cell_view(ctx, t, src, transposed), cell_view(ctx, t, dst, transposed));
}

// Rows to move inside one tensor (or one span of several, see fused_job): its I32 and F32 aliases and the rows.
struct rows_job {
    ggml_tensor * i32 = nullptr;
    ggml_tensor * f32 = nullptr;
    std::vector<int32_t> src, dst;
};

// Per job, rows gathered (get_rows on the I32 alias) into a scratch buffer, then scattered (set_rows of the same
// words read as F32) into their destinations: two kernels per job whatever the count. The indices of all jobs
// travel in one upload. Sources and destinations are disjoint; the scatter runs after the gather (graph order,
// one stream).
bool mover::add_batched(ggml_context * ctx, ggml_cgraph * gf, ggml_backend * backend,
                        const std::vector<rows_job> & jobs, std::string & err) {
    size_t n_idx = 0, tmp_bytes = 0;
    const size_t align = 256;
    for (const rows_job & j : jobs) {
        if (!j.i32 || !j.f32) {
            err = "mover: rows that are not whole 32-bit words cannot be gathered";
            return false;
        }
        n_idx += 2 * j.src.size();
        tmp_bytes += GGML_PAD(j.i32->nb[1] * j.src.size(), align);
    }
    const size_t need = GGML_PAD(n_idx * sizeof(int32_t), align) + tmp_bytes + align;
    if (!scratch_ || scratch_backend_ != backend || ggml_backend_buffer_get_size(scratch_) < need) {
        if (scratch_) ggml_backend_buffer_free(scratch_);
        scratch_ = ggml_backend_alloc_buffer(backend, need * 2);
        scratch_backend_ = backend;
        if (!scratch_) {
            err = "cannot allocate the mover's scratch buffer on the cache's device";
            return false;
        }
    }
    char * base = (char *) ggml_backend_buffer_get_base(scratch_);
    base = (char *) GGML_PAD((uintptr_t) base, align);
    ggml_tensor * idx = ggml_new_tensor_1d(ctx, GGML_TYPE_I32, (int64_t) n_idx);
    if (ggml_backend_tensor_alloc(scratch_, idx, base) != GGML_STATUS_SUCCESS) {
        err = "mover: index tensor";
        return false;
    }
    char * tmp = base + GGML_PAD(n_idx * sizeof(int32_t), align);
    idx_host_.clear();
    for (const rows_job & j : jobs) {
        const size_t n = j.src.size();
        const size_t off = idx_host_.size() * sizeof(int32_t);
        idx_host_.insert(idx_host_.end(), j.src.begin(), j.src.end());
        idx_host_.insert(idx_host_.end(), j.dst.begin(), j.dst.end());
        ggml_tensor * src = ggml_view_1d(ctx, idx, (int64_t) n, off);
        ggml_tensor * dst = ggml_view_1d(ctx, idx, (int64_t) n, off + n * sizeof(int32_t));
        ggml_tensor * rows = ggml_get_rows(ctx, j.i32, src);  // I32 [words, n]
        ggml_tensor * as_f32 = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, rows->ne[0], rows->ne[1]);
        if (ggml_backend_tensor_alloc(scratch_, rows, tmp) != GGML_STATUS_SUCCESS ||
            ggml_backend_tensor_alloc(scratch_, as_f32, tmp) != GGML_STATUS_SUCCESS) {
            err = "mover: scratch rows";
            return false;
        }
        tmp += GGML_PAD(j.i32->nb[1] * n, align);
        ggml_build_forward_expand(gf, rows);
        ggml_build_forward_expand(gf, ggml_set_rows(ctx, j.f32, as_f32, dst));
    }
    pending_idx_ = idx;
    return true;
}

// A layer's moves in one tensor, given that tensor's I32 and F32 aliases, as a job.
static rows_job layer_job(ggml_tensor * i32, ggml_tensor * f32, const layer_moves * l) {
    rows_job j;
    j.i32 = i32;
    j.f32 = f32;
    for (const auto & m : l->moves) {
        j.src.push_back(m.first);
        j.dst.push_back(m.second);
    }
    return j;
}

// Every layer's K and V moves as one job when their tensors tile one span of one buffer in rows of one size: the
// span's aliases number the rows of all of them (a tensor's cell c is row (data - base) / row + c), so one gather
// and one scatter move a whole cut, whatever the layers (llama.cpp allocates each layer's K and V in turn in one
// buffer per device; with K and V rows of one size and type-aligned offsets they tile it). False otherwise.
static bool fused_job(ggml_context * ctx, const std::vector<const layer_moves *> & layers, rows_job & j) {
    std::vector<ggml_tensor *> ts;
    for (const layer_moves * l : layers) {
        ts.push_back(l->k);
        ts.push_back(l->v);
    }
    if (ts.empty()) return false;
    const size_t row = ts[0]->nb[1];
    const char * lo = (const char *) ts[0]->data;
    const char * hi = lo;
    for (const ggml_tensor * t : ts) {
        if (t->buffer != ts[0]->buffer || t->nb[1] != row || row % 4 != 0 || row != ggml_row_size(t->type, t->ne[0]) ||
            !ggml_is_contiguous(t))
            return false;
        lo = std::min(lo, (const char *) t->data);
        hi = std::max(hi, (const char *) t->data + ggml_nbytes(t));
    }
    const size_t n_rows = (size_t) (hi - lo) / row;
    if ((size_t) (hi - lo) % row != 0 || n_rows > (size_t) INT32_MAX) return false;
    for (const ggml_tensor * t : ts)
        if ((size_t) ((const char *) t->data - lo) % row != 0) return false;
    j.i32 = ggml_new_tensor_2d(ctx, GGML_TYPE_I32, (int64_t) (row / 4), (int64_t) n_rows);
    j.f32 = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, (int64_t) (row / 4), (int64_t) n_rows);
    if (ggml_backend_tensor_alloc(ts[0]->buffer, j.i32, (void *) lo) != GGML_STATUS_SUCCESS ||
        ggml_backend_tensor_alloc(ts[0]->buffer, j.f32, (void *) lo) != GGML_STATUS_SUCCESS)
        return false;
    for (const layer_moves * l : layers)
        for (const ggml_tensor * t : {l->k, l->v}) {
            const int32_t first = (int32_t) (((const char *) t->data - lo) / row);
            for (const auto & m : l->moves) {
                j.src.push_back(first + m.first);
                j.dst.push_back(first + m.second);
            }
        }
    return true;
}

// A transposed V cache whose columns add_columns can move: a float type (a transposed V is never quantized
// in llama.cpp), [n_embd, kv_size, n_stream] with each stream's n_embd x kv_size elements contiguous.
static bool transposable(const ggml_tensor * t) {
    const bool flt = t->type == GGML_TYPE_F16 || t->type == GGML_TYPE_F32 || t->type == GGML_TYPE_BF16;
    return flt && ggml_is_contiguous(t) && t->ne[3] == 1;
}

using upload_list = std::vector<std::pair<ggml_tensor *, std::vector<int32_t>>>;

// The streams [lo, hi] that l's moves touch (a cell g lies in stream g / kv_size).
static std::pair<int64_t, int64_t> stream_range(const layer_moves * l) {
    const int64_t kv = l->v->ne[1];
    int64_t lo = l->v->ne[2], hi = -1;
    for (const auto & m : l->moves)
        for (int32_t g : {m.first, m.second}) {
            lo = std::min<int64_t>(lo, g / kv);
            hi = std::max<int64_t>(hi, g / kv);
        }
    return {lo, hi};
}

// Whether add_columns beats a copy per cell for l: its two passes over the touched streams' V against two kernel
// launches per move. A launch (~3-5 us on a GPU) is worth about 4 MiB of copying at a GPU's bandwidth; a large V
// with few moves (one sequence, a wide cache, m of a few) keeps the per-cell copies.
static bool columns_pay(const layer_moves * l) {
    const auto [lo, hi] = stream_range(l);
    return (double) l->moves.size() * (4 << 20) >= (double) (hi - lo + 1) * (double) l->v->nb[2];
}

// Transposed V (flash attention off): a cell is a column, one strided element per dim, so a copy per cell is one
// kernel per move, which on a GPU made a cut of hundreds of moves per layer (a prompt piece, a sequence's first
// cut) cost one launch per row and layer. Per layer instead: the streams the moves touch are copied to a scratch
// tensor with a row per cell (transposed copy), the rows gathered and scattered there (GET_ROWS gives F32,
// SET_ROWS writes the cache's type back: F16/BF16 -> F32 -> F16/BF16 is exact), and the scratch copied back
// transposed: a handful of nodes per layer, whatever the count, at two passes over those streams' V. Appends one
// layer to gf; its indices go to `uploads`, to be set once the graph is allocated.
static void add_columns(ggml_context * ctx, ggml_cgraph * gf, const layer_moves * l, upload_list & uploads) {
    ggml_tensor * t = l->v;
    const int64_t kv = t->ne[1], n_embd = t->ne[0];
    const auto [s_lo, s_hi] = stream_range(l);
    const int64_t ns = s_hi - s_lo + 1;
    // streams s_lo..s_hi as stored, [kv, n_embd, ns], and as a row per cell, [n_embd, kv, ns] (a view)
    ggml_tensor * stored =
        ggml_view_3d(ctx, t, kv, n_embd, ns, kv * ggml_type_size(t->type), t->nb[2], s_lo * t->nb[2]);
    ggml_tensor * by_cell = ggml_permute(ctx, stored, 1, 0, 2, 3);
    ggml_tensor * rows = ggml_reshape_2d(ctx, ggml_cont(ctx, by_cell), n_embd, kv * ns);
    const int64_t n = (int64_t) l->moves.size();
    ggml_tensor * idx = ggml_new_tensor_1d(ctx, GGML_TYPE_I32, 2 * n);
    ggml_set_input(idx);
    std::vector<int32_t> v;
    v.reserve((size_t) (2 * n));
    for (const auto & m : l->moves) v.push_back((int32_t) (m.first - s_lo * kv));
    for (const auto & m : l->moves) v.push_back((int32_t) (m.second - s_lo * kv));
    uploads.emplace_back(idx, std::move(v));
    ggml_tensor * src = ggml_view_1d(ctx, idx, n, 0);
    ggml_tensor * dst = ggml_view_1d(ctx, idx, n, n * sizeof(int32_t));
    ggml_tensor * put = ggml_set_rows(ctx, rows, ggml_get_rows(ctx, rows, src), dst);
    ggml_build_forward_expand(gf, ggml_cpy(ctx, ggml_reshape_3d(ctx, put, n_embd, kv, ns), by_cell));
}

// Whether `backend` runs add_columns' ops on l's V (checked once per backend and V type).
bool mover::columns_supported(ggml_backend * backend, const layer_moves * l) {
    const auto key = std::make_pair(backend, (int) l->v->type);
    for (const auto & c : columns_ok_)
        if (c.first == key) return c.second;
    ggml_context * ctx = graph_context(32);
    if (!ctx) return false;
    ggml_cgraph * gf = ggml_new_graph_custom(ctx, 32, false);
    upload_list unused;
    add_columns(ctx, gf, l, unused);
    bool ok = true;
    for (int i = 0; ok && i < ggml_graph_n_nodes(gf); i++)
        ok = ggml_backend_supports_op(backend, ggml_graph_node(gf, i));
    ggml_free(ctx);
    columns_ok_.emplace_back(key, ok);
    return ok;
}

// add_columns for every layer, one graph; its scratch tensors placed by columns_alloc_ (reused across layers and
// calls). no_room: the scratch did not fit on the device (nothing was moved).
bool mover::move_columns(ggml_backend * backend, const std::vector<const layer_moves *> & layers, bool & no_room,
                         std::string & err) {
    const size_t n_tensors = 16 * layers.size() + 16;
    ggml_context * ctx = graph_context(n_tensors);
    if (!ctx) {
        err = "ggml_init failed for the mover graph";
        return false;
    }
    ggml_cgraph * gf = ggml_new_graph_custom(ctx, n_tensors, false);
    upload_list uploads;
    for (const layer_moves * l : layers) add_columns(ctx, gf, l, uploads);
    no_room = !columns_alloc_.alloc(backend, gf);
    bool ok = !no_room;
    if (no_room) err = "cannot allocate the mover's scratch for V's columns on the cache's device";
    for (size_t i = 0; ok && i < uploads.size(); i++)
        ggml_backend_tensor_set(uploads[i].first, uploads[i].second.data(), 0,
                                uploads[i].second.size() * sizeof(int32_t));
    if (ok && ggml_backend_graph_compute(backend, gf) != GGML_STATUS_SUCCESS) {
        err = "the mover graph failed on the cache's backend";
        ok = false;
    }
    if (ok) nodes_ += ggml_graph_n_nodes(gf);
    ggml_free(ctx);
    return ok;
}

bool mover::apply_graph(const std::vector<const layer_moves *> & layers, bool v_trans, backends & devs,
                        std::string & err) {
    // All cache tensors of one context live on one device in the configurations we accept (layers split
    // across devices get one graph per device).
    size_t n_ops = 0;
    for (const layer_moves * l : layers) n_ops += 2 * l->moves.size() + 8;
    std::vector<const layer_moves *> pending = layers;
    while (!pending.empty()) {
        ggml_backend_dev_t dev = device_of(pending[0]->k);
        ggml_backend_t backend = devs.for_tensor(pending[0]->k, err);
        if (!backend) return false;
        const size_t n_tensors = 8 * n_ops + 16;
        ggml_context * ctx = graph_context(n_tensors);
        if (!ctx) {
            err = "ggml_init failed for the mover graph";
            return false;
        }
        ggml_cgraph * gf = ggml_new_graph_custom(ctx, n_tensors, false);
        std::vector<const layer_moves *> later, per_layer, columns;
        for (const layer_moves * l : pending) (device_of(l->k) == dev ? per_layer : later).push_back(l);
        std::vector<rows_job> jobs(1);
        if (!v_trans && fused_job(ctx, per_layer, jobs[0]))
            per_layer.clear();  // the whole cut in one gather and one scatter
        else jobs.clear();
        for (const layer_moves * l : per_layer) {
            ggml_tensor * ak = i32_alias(ctx, l->k);
            ggml_tensor * av = v_trans ? nullptr : i32_alias(ctx, l->v);
            ggml_tensor * fk = ak && l->moves.size() >= 2 ? f32_alias(ctx, l->k) : nullptr;
            const bool many = fk != nullptr;
            if (many && v_trans && transposable(l->v) && columns_pay(l) && columns_supported(backend, l)) {
                jobs.push_back(layer_job(ak, fk, l));  // K below; V's columns in a graph of their own (move_columns)
                columns.push_back(l);
                continue;
            }
            ggml_tensor * fv = many && av ? f32_alias(ctx, l->v) : nullptr;
            if (fv) {  // many rows: one gather and one scatter per tensor (below)
                jobs.push_back(layer_job(ak, fk, l));
                jobs.push_back(layer_job(av, fv, l));
                continue;
            }
            // sources are read before any destination is written: src and dst sets are disjoint
            for (const auto & m : l->moves) {
                ggml_build_forward_expand(gf, copy_cell(ctx, l->k, ak, m.first, m.second, false));
                ggml_build_forward_expand(gf, copy_cell(ctx, l->v, av, m.first, m.second, v_trans));
            }
        }
        // V's columns first: with no room for their scratch, those layers' V takes the per-cell copies below
        bool no_room = false;
        if (!columns.empty() && !move_columns(backend, columns, no_room, err)) {
            if (!no_room) {
                ggml_free(ctx);
                return false;
            }
            for (const layer_moves * l : columns)
                for (const auto & m : l->moves)
                    ggml_build_forward_expand(gf, copy_cell(ctx, l->v, nullptr, m.first, m.second, true));
        }
        bool ok = jobs.empty() || add_batched(ctx, gf, backend, jobs, err);
        if (!ok) {
            ggml_free(ctx);
            return false;
        }
        for (ggml_tensor * t = ggml_get_first_tensor(ctx); t && ok; t = ggml_get_next_tensor(ctx, t)) {
            if (t->buffer == nullptr && t->view_src != nullptr) ok = ggml_backend_view_init(t) == GGML_STATUS_SUCCESS;
        }
        const char * unsupported = nullptr;
        for (int i = 0; ok && i < ggml_graph_n_nodes(gf); i++) {
            ggml_tensor * node = ggml_graph_node(gf, i);
            if (!ggml_backend_supports_op(backend, node)) {
                unsupported = ggml_type_name(node->src[0]->type);
                ok = false;
            }
        }
        if (ok && pending_idx_)
            ggml_backend_tensor_set(pending_idx_, idx_host_.data(), 0, idx_host_.size() * sizeof(int32_t));
        pending_idx_ = nullptr;
        if (ok) ok = ggml_backend_graph_compute(backend, gf) == GGML_STATUS_SUCCESS;
        if (ok) nodes_ += ggml_graph_n_nodes(gf);
        ggml_free(ctx);
        if (unsupported) {
            err = std::string("the cache's backend (") + ggml_backend_name(backend) + ") cannot copy " + unsupported +
                  " cells (ggml CPY)";
            return false;
        }
        if (!ok) {
            err = "the mover graph failed on the cache's backend";
            return false;
        }
        pending = later;
    }
    return true;
}

}  // namespace tova
