"""NumPy oracle: the llama forward pass (RMSNorm, RoPE, GQA attention, SwiGLU) in float64 with a per-layer
KV cache cut by each policy exactly as docs/ARCHITECTURE.md section 1 and tova_cpp.session's docstring say, processing
the same pieces as the engine. Written from the definitions (which positions a layer KEEPS), not from the
C++ code."""

from __future__ import annotations

import numpy as np
from tiny_gguf import TinyGemma, TinyGptOss, TinyIswa, TinyLlama


def rms_norm(x, w, eps):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def rope(x, pos, base):
    """llama.cpp's NORM rope (LLM_ARCH_LLAMA): rotates adjacent pairs. x: [T, heads, hd]."""
    hd = x.shape[-1]
    theta = pos[:, None] * base ** (-np.arange(0, hd, 2) / hd)  # [T, hd/2]
    cos, sin = np.cos(theta)[:, None, :], np.sin(theta)[:, None, :]
    x0, x1 = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2] = x0 * cos - x1 * sin
    out[..., 1::2] = x0 * sin + x1 * cos
    return out


def rope_neox(x, pos, base):
    """llama.cpp's NEOX rope (Gemma): rotates dimension i with i + hd/2. x: [T, heads, hd]."""
    hd = x.shape[-1]
    theta = pos[:, None] * base ** (-np.arange(0, hd, 2) / hd)  # [T, hd/2]
    cos, sin = np.cos(theta)[:, None, :], np.sin(theta)[:, None, :]
    x0, x1 = x[..., : hd // 2], x[..., hd // 2 :]
    return np.concatenate([x0 * cos - x1 * sin, x0 * sin + x1 * cos], axis=-1)


def gelu(x):
    """ggml's CPU GELU (tanh approximation) as Gemma's feed-forward runs it: a table over f16 inputs holding
    f16 outputs for -10 < x < 10 (GGML_GELU_FP16), exact beyond."""
    x16 = x.astype(np.float16).astype(np.float64)
    table = 0.5 * x16 * (1 + np.tanh(np.sqrt(2 / np.pi) * x16 * (1 + 0.044715 * x16 * x16)))
    table = table.astype(np.float32).astype(np.float16).astype(np.float64)
    return np.where(x <= -10, 0.0, np.where(x >= 10, x, table))


def moe(h, w, p, n_used, alpha=1.702, limit=7.0):
    """gpt-oss's experts: the n_used largest router logits (biased) per token, weights softmax over those,
    each expert a SwiGLU with gpt-oss's clamps (ggml_swiglu_oai) and biases."""
    logits = h @ w[p + "ffn_gate_inp.weight"].T + w[p + "ffn_gate_inp.bias"]
    out = np.zeros_like(h)
    for t in range(len(h)):
        top = np.argsort(-logits[t])[:n_used]
        gate = np.exp(logits[t, top] - logits[t, top].max())
        gate /= gate.sum()
        for e, g_e in zip(top, gate, strict=True):
            g = w[p + "ffn_gate_exps.weight"][e] @ h[t] + w[p + "ffn_gate_exps.bias"][e]
            u = w[p + "ffn_up_exps.weight"][e] @ h[t] + w[p + "ffn_up_exps.bias"][e]
            g = np.minimum(g, limit)
            u = np.clip(u, -limit, limit)
            a = g / (1 + np.exp(-alpha * g)) * (u + 1)
            out[t] += g_e * (w[p + "ffn_down_exps.weight"][e] @ a + w[p + "ffn_down_exps.bias"][e])
    return out


def _blocks(x):
    return x.reshape(*x.shape[:-1], x.shape[-1] // 32, 32)


def quantize_roundtrip(x, type_name: str):
    """What a llama.cpp cache of this type gives back: ggml's reference quantizers, blocks of 32 along the
    last axis, scales stored as f16."""
    if type_name == "f32":
        return x
    if type_name == "f16":
        return x.astype(np.float16).astype(np.float64)
    b = _blocks(x.astype(np.float32))
    if type_name == "q8_0":
        d = np.abs(b).max(-1, keepdims=True) / 127
        q = np.round(b * np.where(d > 0, 1 / np.where(d > 0, d, 1), 0))
        out = q * d.astype(np.float16).astype(np.float32)
    elif type_name == "q4_0":
        idx = np.abs(b).argmax(-1)[..., None]
        d = np.take_along_axis(b, idx, -1) / -8
        q = np.minimum(15, np.trunc(b * np.where(d != 0, 1 / np.where(d != 0, d, 1), 0) + 8.5))
        out = (q - 8) * d.astype(np.float16).astype(np.float32)
    else:
        raise ValueError(type_name)
    return out.reshape(x.shape).astype(np.float64)


def head_probs(q, K, mask, softcap: float, sink):
    """One query head's softmax rows over K (q [T, hd], K [n, hd]): scale 1/sqrt(hd), then the softcap, the
    mask, and gpt-oss's sink logit in the denominator (and the max) when given. Returns (probs, raw logits)."""
    s = raw = q @ K.T / np.sqrt(q.shape[-1])
    if softcap:
        s = softcap * np.tanh(s / softcap)
    s = s + mask
    top = s.max(-1, keepdims=True)
    if sink is not None:
        top = np.maximum(top, sink)
    s = np.exp(s - top)
    denom = s.sum(-1, keepdims=True)
    if sink is not None:
        denom = denom + np.exp(sink - top)
    return s / denom, raw


POLICIES = ("tova", "window", "sink", "h2o")
# wrong policies the comparison must reject: one eviction set for all layers (the cheaper policy, not TOVA);
# the newest token never evicted; h2o accumulating only the last query row of a prompt piece; tova scores of a
# model with attention sinks computed without the sink in the denominator
WRONG_VARIANTS = ("shared", "protect_newest", "h2o_last_row", "no_sink_scores", "no_softcap_scores")


class Reference:
    """policy: one of POLICIES or WRONG_VARIANTS; keep: positions < keep are never evicted; n_sink: sink's
    protected first positions. evict_interval m: hold up to budget + m keys and cut back to budget only once
    that full (m = 1: the paper)."""

    def __init__(
        self,
        m: TinyLlama,
        budget: int,
        chunk: int,
        policy: str = "tova",
        *,
        keep: int = 0,
        n_sink: int = 4,
        evict_interval: int = 1,
        type_k: str = "f32",
        type_v: str = "f32",
        flash_attn: bool = False,
    ):
        """type_k/type_v: emulate a cache of that type (keys/values rounded as llama.cpp stores them; the
        query rounded to what K . q runs on in ggml's CPU kernels: q8_0 for quantized K, f16 for f16 K).
        flash_attn: the attention output as llama.cpp's flash attention computes it from an F32 cache: it casts
        K and V to F16 before ggml_flash_attn_ext (llama-graph.cpp, build_attn_mha) and the CPU kernel rounds
        the query to F16 for K . q; the policy's scores still come from the cache's own rows and the F32 query
        (the engine scores those, docs/ARCHITECTURE.md). F32 arithmetic elsewhere: float64 here."""
        assert policy in POLICIES + WRONG_VARIANTS
        self.m, self.budget, self.policy = m, budget, policy
        self.keep, self.n_sink = keep, n_sink
        self.type_k, self.type_v = type_k, type_v
        self.flash_attn = flash_attn
        self.evict_interval = evict_interval
        self.memory = budget + max(chunk, evict_interval)
        self.before_cut = None
        # h2o: attention accumulated since each key entered, aligned with self.pos
        self.acc = [np.zeros(0) for _ in range(m.n_layer)]
        w = {k: v.astype(np.float64) for k, v in m.weights.items()}
        self.w = w
        self.k = [np.zeros((0, m.n_head_kv, m.head_dim)) for _ in range(m.n_layer)]
        self.v = [np.zeros((0, m.n_head_kv, m.head_dim)) for _ in range(m.n_layer)]
        self.pos = [np.zeros(0, dtype=np.int64) for _ in range(m.n_layer)]
        self.n_past = 0
        self.last_logits = None
        # the layers the policy manages: all of a llama, the full-attention layers of an iSWA model (its
        # sliding-window layers keep llama.cpp's window)
        self.managed = m.full_layers if isinstance(m, TinyIswa) else list(range(m.n_layer))

    def _piece(self, tokens):
        m, w = self.m, self.w
        T = len(tokens)
        pos = np.arange(self.n_past, self.n_past + T)
        gemma = isinstance(m, TinyGemma)
        oss = isinstance(m, TinyGptOss)
        x = w["token_embd.weight"][tokens]
        if gemma:
            x = x * np.sqrt(m.n_embd)
        rows = []  # per layer: the last token's attention over the layer's keys, head-averaged
        sums = []  # per layer: the column sums of all T query rows, head-averaged (h2o)
        r = m.n_head // m.n_head_kv
        for il in range(m.n_layer):
            p = f"blk.{il}."
            swa = (gemma or oss) and m.is_swa(il)
            h = rms_norm(x, w[p + "attn_norm.weight"], m.eps)
            q, k, v = (h @ w[p + f"attn_{n}.weight"].T for n in "qkv")
            if oss:
                q, k, v = (t + w[p + f"attn_{n}.bias"] for t, n in zip((q, k, v), "qkv", strict=True))
            q = q.reshape(T, m.n_head, m.head_dim)
            k = k.reshape(T, m.n_head_kv, m.head_dim)
            v = v.reshape(T, m.n_head_kv, m.head_dim)
            if oss:
                q, k = rope_neox(q, pos, m.rope_base), rope_neox(k, pos, m.rope_base)
            elif gemma:
                if m.arch == "gemma3":
                    q = rms_norm(q, w[p + "attn_q_norm.weight"], m.eps)
                    k = rms_norm(k, w[p + "attn_k_norm.weight"], m.eps)
                base = m.rope_base_swa if swa else m.rope_base
                q, k = rope_neox(q, pos, base), rope_neox(k, pos, base)
            else:
                q, k = rope(q, pos, m.rope_base), rope(k, pos, m.rope_base)
            k, v = quantize_roundtrip(k, self.type_k), quantize_roundtrip(v, self.type_v)
            if self.type_k != "f32":
                q = quantize_roundtrip(q, "q8_0" if self.type_k.startswith("q") else "f16")
            K = np.concatenate([self.k[il], k])
            V = np.concatenate([self.v[il], v])
            # what flash attention multiplies (an F32 cache cast to F16, the query rounded to match); the
            # scores below use K and q as they are
            qa, Ka, Va = q, K, V
            if self.flash_attn and self.type_k == "f32":
                qa, Ka = quantize_roundtrip(q, "f16"), quantize_roundtrip(K, "f16")
            if self.flash_attn and self.type_v == "f32":
                Va = quantize_roundtrip(V, "f16")
            key_pos = np.concatenate([self.pos[il], pos])
            # causal; a sliding-window layer also hides keys n_swa or more positions back (llama.cpp's
            # LLAMA_SWA_TYPE_STANDARD: query i sees key j iff i - j < n_swa)
            mask = np.where(key_pos[None, :] > pos[:, None], -np.inf, 0.0)
            if swa:
                mask[pos[:, None] - key_pos[None, :] >= m.n_swa] = -np.inf
            softcap = getattr(m, "attn_softcap", 0.0)
            out = np.empty((T, m.n_head, m.head_dim))
            probs_last = np.zeros(len(K))
            probs_all = np.zeros(len(K))
            for hq in range(m.n_head):
                sink = w[p + "attn_sinks.weight"][hq] if oss else None
                s, raw = head_probs(q[:, hq], K[:, hq // r], mask, softcap, sink)
                if qa is not q or Ka is not K:
                    out[:, hq] = (
                        head_probs(qa[:, hq], Ka[:, hq // r], mask, softcap, sink)[0] @ Va[:, hq // r]
                    )
                else:
                    out[:, hq] = s @ Va[:, hq // r]
                # the wrong variant scores as if the sink were not in the denominator
                probs_last += s[-1] / s[-1].sum() if self.policy == "no_sink_scores" else s[-1]
                if self.policy == "no_softcap_scores":  # the wrong variant scores the logits before the cap
                    z = np.exp(raw[-1] + mask[-1] - (raw[-1] + mask[-1]).max())
                    probs_last += z / z.sum() - s[-1]
                probs_all += s.sum(0)
            rows.append(probs_last / m.n_head)
            sums.append(probs_all / m.n_head)
            attn = out.reshape(T, -1) @ w[p + "attn_output.weight"].T
            if oss:
                x = x + attn + w[p + "attn_output.bias"]
                x = x + moe(rms_norm(x, w[p + "post_attention_norm.weight"], m.eps), w, p, m.n_expert_used)
            elif gemma:
                x = x + rms_norm(attn, w[p + "post_attention_norm.weight"], m.eps)
                h = rms_norm(x, w[p + "ffn_norm.weight"], m.eps)
                ffn = (gelu(h @ w[p + "ffn_gate.weight"].T) * (h @ w[p + "ffn_up.weight"].T)) @ w[
                    p + "ffn_down.weight"
                ].T
                x = x + rms_norm(ffn, w[p + "post_ffw_norm.weight"], m.eps)
            else:
                x = x + attn
                h = rms_norm(x, w[p + "ffn_norm.weight"], m.eps)
                g = h @ w[p + "ffn_gate.weight"].T
                x = x + ((g / (1 + np.exp(-g))) * (h @ w[p + "ffn_up.weight"].T)) @ w[p + "ffn_down.weight"].T
            added = sums[il] if self.policy != "h2o_last_row" else rows[il]
            acc = np.concatenate([self.acc[il], np.zeros(T)]) + added
            if swa:
                # llama.cpp's window, not the policy: keys no later query can see are dropped here
                visible = key_pos > self.n_past + T - m.n_swa
                K, V, key_pos, acc = K[visible], V[visible], key_pos[visible], acc[visible]
            self.k[il], self.v[il], self.pos[il], self.acc[il] = K, V, key_pos, acc
        self.n_past += T
        h = rms_norm(x[-1], w["output_norm.weight"], m.eps)
        if gemma:
            self.last_logits = h @ w["token_embd.weight"].T  # tied output matrix
            if m.final_softcap:
                self.last_logits = m.final_softcap * np.tanh(self.last_logits / m.final_softcap)
        else:
            self.last_logits = h @ w["output.weight"].T
        return rows

    def _protect_below(self) -> int:
        """Positions below this are never evicted (keep; sink's first n_sink)."""
        return max(self.keep, self.n_sink) if self.policy == "sink" else self.keep

    def _kept(self, il, row):
        """Indices (into this layer's keys) of the `budget` keys the layer keeps."""
        pos, budget = self.pos[il], self.budget
        protect_below = self._protect_below()
        protected = [i for i in range(len(pos)) if pos[i] < protect_below]
        rest = [i for i in range(len(pos)) if pos[i] >= protect_below]
        room = budget - len(protected)  # cells left for the unprotected keys
        newest_first = sorted(rest, key=lambda i: -pos[i])
        if self.policy in ("window", "sink"):
            return protected + newest_first[:room]
        if self.policy in ("h2o", "h2o_last_row"):
            n_recent = room - room // 2  # the recent half takes the extra cell when odd
            recent, older = newest_first[:n_recent], newest_first[n_recent:]
            # largest accumulated attention first; ties: the newer key stays
            heavy = sorted(older, key=lambda i: (-self.acc[il][i], -pos[i]))[: room - n_recent]
            return protected + recent + heavy
        score = row.copy()
        if self.policy == "protect_newest":
            score[np.argmax(pos)] = np.inf
        # highest score first; ties: the newer key stays
        return protected + sorted(rest, key=lambda i: (-score[i], -pos[i]))[:room]

    def _cut(self, rows):
        n = len(self.pos[self.managed[0]])
        k = n - self.budget
        self.before_cut = None
        if k <= 0 or k < self.evict_interval:
            return
        self.before_cut = (
            [a.copy() for a in self.k],
            [a.copy() for a in self.v],
            [p.copy() for p in self.pos],
            [a.copy() for a in self.acc],
            rows,
        )
        if self.policy == "shared":
            mean = np.mean([rows[il] for il in self.managed], axis=0)
            rows = [mean] * len(rows)
        for il in self.managed:
            keep = np.sort(np.array(self._kept(il, rows[il])))
            assert len(keep) == self.budget
            self.k[il], self.v[il] = self.k[il][keep], self.v[il][keep]
            self.pos[il], self.acc[il] = self.pos[il][keep], self.acc[il][keep]

    def eval(self, tokens):
        tokens = list(tokens)
        i = 0
        while i < len(tokens):
            room = self.memory - len(self.pos[self.managed[0]])
            piece = tokens[i : i + room]
            self._cut(self._piece(piece))
            i += len(piece)

    def follow(self, kept, rtol: float) -> int:
        """Redo the last cut with another engine's per-layer kept positions (`kept`: [managed layers, width],
        -1 padded) when that choice is the policy's up to a near tie: every protected key is kept, and every kept
        unprotected key scores at least every evicted key / (1+rtol) by this reference's scores (h2o: the
        accumulated attention of the keys outside its recent half). Protected keys are left out of the
        comparison (they are kept whatever they score). window and sink choose by position: a difference there is
        never a tie. Returns the number of layers whose set changed; raises AssertionError when the other choice
        is not a near tie (a real disagreement) or there was no cut."""
        assert self.before_cut is not None, "no cut in the last step to follow"
        assert self.policy not in ("window", "sink"), f"{self.policy} chooses by position: it has no near tie"
        ks, vs, ps, accs, rows = self.before_cut
        protect_below = self._protect_below()
        changed = 0
        for il, row in zip(self.managed, kept, strict=True):
            want = np.sort(row[row >= 0])
            if np.array_equal(want, np.sort(self.pos[il])):
                continue
            held = list(ps[il])
            assert set(want) <= set(held) and len(want) == len(self.pos[il]), f"layer {il}: not a subset"
            keep = np.array([held.index(p) for p in want])
            drop = np.setdiff1d(np.arange(len(held)), keep)
            assert (ps[il][drop] >= protect_below).all(), f"layer {il}: a protected position was evicted"
            score, judged = rows[il], keep[ps[il][keep] >= protect_below]  # the kept keys that won by score
            if self.policy == "h2o":  # the recent half is kept by position, the rest by accumulated attention
                unprotected = [i for i in np.argsort(-ps[il]) if ps[il][i] >= protect_below]
                room = self.budget - (len(held) - len(unprotected))
                recent = unprotected[: room - room // 2]
                assert np.isin(recent, keep).all(), f"layer {il}: a recent key was evicted"
                score, judged = accs[il], np.setdiff1d(judged, recent)
            lo, hi = score[judged].min(), score[drop].max()
            assert hi <= lo * (1 + rtol), (
                f"layer {il}: evicted score {hi:.6g} > kept {lo:.6g} beyond a near tie"
            )
            self.k[il], self.v[il], self.pos[il] = ks[il][keep], vs[il][keep], ps[il][keep]
            self.acc[il] = accs[il][keep]
            changed += 1
        return changed

    def kept_positions(self):
        """[managed layers, max(budget, held)] ascending, -1 padded: the engine's kept_positions() layout."""
        width = max(self.budget, len(self.pos[self.managed[0]]))
        out = np.full((len(self.managed), width), -1, dtype=np.int64)
        for row, il in enumerate(self.managed):
            out[row, : len(self.pos[il])] = np.sort(self.pos[il])
        return out
