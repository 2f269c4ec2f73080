// Evolving attention on a CPU in one pass: an incremental-decoding step, and a whole map.
//
// EvolvingMultiheadAttention._evolve with torch ops runs about ten small ops per layer
// and step (the conv's window zeroed, the previous rows gathered into it in the beam's
// order, the mix, a matmul, the shifted adds, the key mask); inside a decoder step each
// of them meets cold caches. This file does the same for one new query row with one
// pass over each input: per hypothesis, a window of k rows (the k-1 previous rows of M
// and the new one) is built in a small buffer that stays in L1, the conv's output row
// is accumulated from it, and the k-1 rows the next step needs are written out.
//
// ea_map (below) does the same for a whole map in training: the mix, the conv, the lerp
// and the mask of every row in one pass, and, with the taps transposed, the backward's
// input gradient.
//
// Built by ea_fairseq/modules/step_kernel.py with the system's C++ compiler into a plain
// shared library and called through ctypes (no torch headers: it builds in about a
// second and does not depend on torch's C++ ABI). The Python side checks every shape,
// stride and dtype; this side checks the beam's order, the one input it indexes with.
//
// Shapes (H heads, k kernel size, r = k / 2, T keys, B hypotheses, B' of the history):
//   logits, prev   (B, H, T) at the given strides; prev may be null (no mix)
//   keep           (B, T) at the given strides, or null: 0 zeroes a key (M and A)
//   hist           (H, k-1, B', T') at the given strides, T' <= T (later keys are 0),
//                  or null (the first step: zero rows above the first one)
//   order          (B,) indices into B' (the beam's reorders since the last step), or null
//   taps           (k*H, H*k) contiguous: row dx*H + o, column c*k + j (step_taps)
//   bias           (H,) contiguous: alpha * conv bias
//   out            (B, H, T) contiguous: A's new row, keep-masked
//   new_hist       (B, H, k-1, T) contiguous: rows 1..k-1 of the window, for the next step
//                  (read as (H, k-1, B, T) at strides, like hist)
// Returns 0, or 1 + b for the first hypothesis b whose order is out of range.

#include <algorithm>
#include <cstdint>
#include <vector>

namespace {

// The conv's output row for output channels o0..o0+OB-1 of one hypothesis, V keys at a
// time: per block of keys the OB x V sums stay in registers while every (dx, c, j) tap
// adds its window row, read once for all OB channels. rows[c*k + j] is the window row of
// input channel c and row j, key s at column r + s, zero left of the keys and right of
// them up to a whole number of blocks (so that every block reads V valid cells). Output
// channel o's row is out_row + o * out_h; keep_row (key stride q_s) or null masks it.
template <typename T, int OB, int V>
inline void conv_rows(const T* const* rows, int64_t heads, int64_t k, int64_t src_len,
                      const T* taps, const T* bias, const T* keep_row, int64_t q_s, int64_t o0,
                      T* out_row, int64_t out_h) {
    const int64_t taps_cols = heads * k;
    for (int64_t s0 = 0; s0 < src_len; s0 += V) {
        T acc[OB][V];
        for (int oo = 0; oo < OB; ++oo)
            for (int v = 0; v < V; ++v) acc[oo][v] = bias[o0 + oo];
        for (int64_t dx = 0; dx < k; ++dx) {
            for (int64_t c = 0; c < heads; ++c) {
                for (int64_t j = 0; j < k; ++j) {
                    const T* __restrict src = rows[c * k + j] + dx + s0;
                    for (int oo = 0; oo < OB; ++oo) {
                        const T wt = taps[(dx * heads + o0 + oo) * taps_cols + c * k + j];
#pragma omp simd
                        for (int v = 0; v < V; ++v) acc[oo][v] += wt * src[v];
                    }
                }
            }
        }
        const int64_t n = src_len - s0 < V ? src_len - s0 : V;
        for (int oo = 0; oo < OB; ++oo) {
            T* dst = out_row + (o0 + oo) * out_h + s0;
            if (keep_row != nullptr) {
                for (int64_t v = 0; v < n; ++v) dst[v] = acc[oo][v] * keep_row[(s0 + v) * q_s];
            } else {
                for (int64_t v = 0; v < n; ++v) dst[v] = acc[oo][v];
            }
        }
    }
}

// Every output channel of one output row: blocks of 4, then one at a time.
template <typename T, int V>
inline void conv_all(const T* const* rows, int64_t heads, int64_t k, int64_t src_len, const T* taps,
                     const T* bias, const T* keep_row, int64_t q_s, T* out_row, int64_t out_h) {
    int64_t o0 = 0;
    for (; o0 + 4 <= heads; o0 += 4)
        conv_rows<T, 4, V>(rows, heads, k, src_len, taps, bias, keep_row, q_s, o0, out_row, out_h);
    for (; o0 < heads; ++o0)
        conv_rows<T, 1, V>(rows, heads, k, src_len, taps, bias, keep_row, q_s, o0, out_row, out_h);
}

template <typename T>
int64_t ea_step(int64_t bsz, int64_t heads, int64_t src_len, int64_t k,
                const T* logits, int64_t l_b, int64_t l_h, int64_t l_s,
                const T* prev, int64_t p_b, int64_t p_h, int64_t p_s, double beta,
                const T* keep, int64_t q_b, int64_t q_s,
                const T* hist, int64_t hist_bsz, int64_t hist_len,
                int64_t h_c, int64_t h_j, int64_t h_b, int64_t h_s,
                const int64_t* order, const T* taps, const T* bias, T* out, T* new_hist) {
    if (order != nullptr) {
        for (int64_t b = 0; b < bsz; ++b) {
            if (order[b] < 0 || order[b] >= hist_bsz) return 1 + b;
        }
    }
    constexpr int V = 64 / sizeof(T);  // keys per block: one cache line
    const int64_t r = k / 2;
    // window row c*k + j holds key s at column r + s; zero left of it, and right of it up
    // to the last block's reach
    const int64_t width = (src_len + V - 1) / V * V + 2 * r;
    const T tb = static_cast<T>(beta);
    std::vector<T> window(static_cast<size_t>(heads * k * width), T(0));
    std::vector<const T*> rows(static_cast<size_t>(heads * k));
    for (int64_t i = 0; i < heads * k; ++i) rows[i] = window.data() + i * width;
    for (int64_t b = 0; b < bsz; ++b) {
        const int64_t hb = order != nullptr ? order[b] : b;
        const T* keep_b = keep != nullptr ? keep + b * q_b : nullptr;
        for (int64_t c = 0; c < heads; ++c) {
            // rows 0..k-2: the history; the keys it does not have yet (hist_len..src_len-1)
            // are never written, so they keep the window's zeros
            for (int64_t j = 0; hist != nullptr && j + 1 < k; ++j) {
                T* __restrict dst = window.data() + (c * k + j) * width + r;
                const T* src = hist + c * h_c + j * h_j + hb * h_b;
                if (h_s == 1) {
                    std::copy(src, src + hist_len, dst);
                } else {
                    for (int64_t s = 0; s < hist_len; ++s) dst[s] = src[s * h_s];
                }
            }
            // row k-1: M = lerp(S, A_prev, beta), zero at masked keys
            T* __restrict m = window.data() + (c * k + k - 1) * width + r;
            const T* lg = logits + b * l_b + c * l_h;
            if (prev != nullptr && l_s == 1 && p_s == 1) {
                const T* __restrict pv = prev + b * p_b + c * p_h;
                for (int64_t s = 0; s < src_len; ++s) m[s] = lg[s] + tb * (pv[s] - lg[s]);
            } else if (prev != nullptr) {
                const T* pv = prev + b * p_b + c * p_h;
                for (int64_t s = 0; s < src_len; ++s) m[s] = lg[s * l_s] + tb * (pv[s * p_s] - lg[s * l_s]);
            } else {
                for (int64_t s = 0; s < src_len; ++s) m[s] = lg[s * l_s];
            }
            if (keep_b != nullptr) {
                for (int64_t s = 0; s < src_len; ++s) m[s] *= keep_b[s * q_s];
            }
        }
        // A[o, s] = bias[o] + sum over (dx, c, j) of taps[dx*H + o, c*k + j] * window[c, j, s + dx]
        conv_all<T, V>(rows.data(), heads, k, src_len, taps, bias, keep_b, q_s, out + b * heads * src_len, src_len);
        // the rows the next step sees above its own: window rows 1..k-1, one block per
        // hypothesis, which the next step's gather reads in one sweep
        T* hist_b = new_hist + b * heads * (k - 1) * src_len;
        for (int64_t c = 0; c < heads; ++c) {
            for (int64_t j = 0; j + 1 < k; ++j) {
                const T* src = window.data() + (c * k + j + 1) * width + r;
                std::copy(src, src + src_len, hist_b + (c * (k - 1) + j) * src_len);
            }
        }
    }
    return 0;
}

// A whole map (training): per hypothesis b and output row t,
//   out[b, o, t, s] = (bias[o] + sum over (dx, c, j) of taps[dx*H + o, c*k + j] * X[c, t - top + j, s + dx - r])
//                     * keep[b, t, s]
// with X[c, i, s] = (S[b, c, i, s] + beta (P[b, c, i, s] - S[b, c, i, s])) * keep[b, i, s], zero outside
// the map (rows above i = 0 and below i = Tq - 1, keys left of 0 and right of Tk - 1). With
// step_taps-like taps (alpha and the residual folded in) and top = k - 1 (causal) or k / 2,
// that is the forward's A = lerp(M, conv(M), alpha) * keep, M = lerp(S, A_prev, beta) * keep;
// with the taps flipped and transposed, S the gradient, no P and top = k - 1 - top, the
// backward's dL/dM * keep. X's rows go through a ring of k rows per channel in a small
// buffer (each read from S and P once, and written to m_out where given: M, for the
// backward); the conv reads them there. Hypotheses b0..b1-1 (others untouched).
template <typename T>
void ea_map(int64_t b0, int64_t b1, int64_t heads, int64_t tgt_len, int64_t src_len, int64_t k, int64_t top,
            const T* s, int64_t s_b, int64_t s_h, int64_t s_t,
            const T* prev, int64_t p_b, int64_t p_h, int64_t p_t, double beta,
            const T* keep, int64_t q_b, int64_t q_t, int64_t q_s,
            const T* taps, const T* bias,
            T* m_out, int64_t m_b, int64_t m_h, int64_t m_t,
            T* out, int64_t o_b, int64_t o_h, int64_t o_t) {
    constexpr int V = 64 / sizeof(T);
    const int64_t r = k / 2;
    const int64_t width = (src_len + V - 1) / V * V + 2 * r;
    const T tb = static_cast<T>(beta);
    std::vector<T> ring(static_cast<size_t>(heads * k * width + width), T(0));
    const T* zero_row = ring.data() + heads * k * width;
    std::vector<const T*> rows(static_cast<size_t>(heads * k));
    std::vector<T> zero_bias(static_cast<size_t>(heads), T(0));
    const T* bias_v = bias != nullptr ? bias : zero_bias.data();
    for (int64_t b = b0; b < b1; ++b) {
        int64_t loaded = -1;  // the last source row in the ring
        for (int64_t t = 0; t < tgt_len; ++t) {
            const int64_t need = std::min(t - top + k - 1, tgt_len - 1);
            for (int64_t i = loaded + 1; i <= need; ++i) {
                const T* keep_i = keep != nullptr ? keep + b * q_b + i * q_t : nullptr;
                for (int64_t c = 0; c < heads; ++c) {
                    T* __restrict x = ring.data() + (c * k + i % k) * width + r;
                    const T* __restrict sv = s + b * s_b + c * s_h + i * s_t;
                    if (prev != nullptr) {
                        const T* __restrict pv = prev + b * p_b + c * p_h + i * p_t;
#pragma omp simd
                        for (int64_t j = 0; j < src_len; ++j) x[j] = sv[j] + tb * (pv[j] - sv[j]);
                    } else {
                        std::copy(sv, sv + src_len, x);
                    }
                    if (keep_i != nullptr) {
                        if (q_s == 1) {
#pragma omp simd
                            for (int64_t j = 0; j < src_len; ++j) x[j] *= keep_i[j];
                        } else {
                            for (int64_t j = 0; j < src_len; ++j) x[j] *= keep_i[j * q_s];
                        }
                    }
                    if (m_out != nullptr) std::copy(x, x + src_len, m_out + b * m_b + c * m_h + i * m_t);
                }
            }
            loaded = std::max(loaded, need);
            for (int64_t c = 0; c < heads; ++c) {
                for (int64_t j = 0; j < k; ++j) {
                    const int64_t i = t - top + j;
                    rows[c * k + j] = (i < 0 || i >= tgt_len) ? zero_row : ring.data() + (c * k + i % k) * width;
                }
            }
            const T* keep_t = keep != nullptr ? keep + b * q_b + t * q_t : nullptr;
            conv_all<T, V>(rows.data(), heads, k, src_len, taps, bias_v, keep_t, q_s, out + b * o_b + t * o_t, o_h);
        }
    }
}

}  // namespace

#define EA_STEP_ARGS(T)                                                                      \
    int64_t bsz, int64_t heads, int64_t src_len, int64_t k,                                  \
    const T *logits, int64_t l_b, int64_t l_h, int64_t l_s,                                  \
    const T *prev, int64_t p_b, int64_t p_h, int64_t p_s, double beta,                       \
    const T *keep, int64_t q_b, int64_t q_s,                                                 \
    const T *hist, int64_t hist_bsz, int64_t hist_len,                                       \
    int64_t h_c, int64_t h_j, int64_t h_b, int64_t h_s,                                      \
    const int64_t *order, const T *taps, const T *bias, T *out, T *new_hist
#define EA_STEP_CALL                                                                         \
    ea_step(bsz, heads, src_len, k, logits, l_b, l_h, l_s, prev, p_b, p_h, p_s, beta,        \
            keep, q_b, q_s, hist, hist_bsz, hist_len, h_c, h_j, h_b, h_s, order, taps, bias, \
            out, new_hist)

extern "C" {
int64_t ea_step_float(EA_STEP_ARGS(float)) { return EA_STEP_CALL; }
int64_t ea_step_double(EA_STEP_ARGS(double)) { return EA_STEP_CALL; }
#define EA_MAP_ARGS(T)                                                                       \
    int64_t b0, int64_t b1, int64_t heads, int64_t tgt_len, int64_t src_len, int64_t k, int64_t top, \
    const T *s, int64_t s_b, int64_t s_h, int64_t s_t,                                       \
    const T *prev, int64_t p_b, int64_t p_h, int64_t p_t, double beta,                       \
    const T *keep, int64_t q_b, int64_t q_t, int64_t q_s, const T *taps, const T *bias,      \
    T *m_out, int64_t m_b, int64_t m_h, int64_t m_t, T *out, int64_t o_b, int64_t o_h, int64_t o_t
#define EA_MAP_CALL                                                                          \
    ea_map(b0, b1, heads, tgt_len, src_len, k, top, s, s_b, s_h, s_t, prev, p_b, p_h, p_t,   \
           beta, keep, q_b, q_t, q_s, taps, bias, m_out, m_b, m_h, m_t, out, o_b, o_h, o_t)
void ea_map_float(EA_MAP_ARGS(float)) { EA_MAP_CALL; }
void ea_map_double(EA_MAP_ARGS(double)) { EA_MAP_CALL; }
int64_t ea_step_abi_version() { return 2; }
}
