// capture: the eval callback (llama_context_params.cb_eval, user_data = the engine). llama.cpp asks it about
// every graph node of every decode; it answers "no" at once unless the step armed it (engine_impl.h,
// tova_armed): then it notes the cache tensors (until all are known), reads the new tokens' cells from
// attn_inp_k_idxs (free on host buffers, in the ask phase), and on scored decodes reads kq_soft_max-<il>
// (flash attention off: the newest row, or every row for h2o) or hands FLASH_ATTN_EXT to the scorer. Each node
// it wants costs llama.cpp a graph split and a backend sync. Runs on the llama_decode thread, without the GIL.
#pragma once

#include "tova.h"  // tova_eval_callback
