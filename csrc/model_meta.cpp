// model_meta: GGUF metadata that llama.cpp's C API does not return (llama_model_meta_val_str skips arrays).
#include <cstdio>
#include <cstring>

#include "gguf.h"
#include "tova.h"

extern "C" int32_t tova_gguf_bool_array(const char * path, const char * key, uint8_t * out, int32_t n_max) {
    if (!path || !key || (n_max > 0 && !out) || n_max < 0) return TOVA_ERR_ARG;
    gguf_init_params params = {true, nullptr};  // metadata only, no tensor data
    gguf_context * ctx = gguf_init_from_file(path, params);
    if (!ctx) return TOVA_ERR_ARG;
    int32_t rc = 0;
    const int64_t id = gguf_find_key(ctx, key);
    if (id >= 0 && gguf_get_kv_type(ctx, id) == GGUF_TYPE_ARRAY && gguf_get_arr_type(ctx, id) == GGUF_TYPE_BOOL) {
        const size_t n = gguf_get_arr_n(ctx, id);
        if (n > (size_t) n_max) {
            rc = TOVA_ERR_ARG;
        } else {
            const int8_t * data = (const int8_t *) gguf_get_arr_data(ctx, id);  // GGUF bools are one byte each
            for (size_t i = 0; i < n; i++) out[i] = data[i] != 0;
            rc = (int32_t) n;
        }
    }
    gguf_free(ctx);
    return rc;
}
