// Causal attention for XLA:CPU as two XLA FFI custom calls (forward, backward), float32.
//
// Why: XLA:CPU runs attention's many small batched matmuls (one per batch row and head) one after another,
// each too small to spread over the cores, at about a third of its large-matmul speed. Here each
// (batch row, K/V head) is one work item on XLA's intra-op thread pool, and the item does its matmuls,
// mask and softmax in cache, FlashAttention style: the forward keeps only the output and each row's
// log-sum-exp; the backward recomputes the probabilities from them.
//
// Layouts (those of model/attention.py before any transpose): q, out, dout, dq [B, T, N, H];
// k, v, dk, dv [B, T, K, H]; lse [B, N, T]; slopes [N]. Query head n reads K/V head n / (N / K).
// logit(i, j) = scale * q_i . k_j - slope_n * (i - j) for keys j <= i (ALiBi when slopes are nonzero).
//
// Built by model/kernels/cpu_attention.py with -march=native; the vector width follows the machine.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "cpu_vector.h"

#ifndef CPU_ATTENTION_NO_FFI
#include "xla/ffi/api/ffi.h"
namespace ffi = xla::ffi;
#endif

namespace {

using namespace jaxlm_simd;

// exp(x) for x <= 0 (Cephes' expf: 2^n * p(r), |r| <= ln2/2); exact 0 below -87.
inline vf vexp(vf x) {
  const vf lo = splat(-87.0f);
  vf xc = x < lo ? lo : x;
  vf n = __builtin_convertvector(__builtin_convertvector(xc * 1.44269504088896341f - 0.5f, vi), vf);
  vf r = xc - n * 0.693359375f + n * 2.12194440e-4f;
  vf p = splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  vi bits = (__builtin_convertvector(n, vi) + 127) << 23;
  vf scale;
  std::memcpy(&scale, &bits, sizeof scale);
  vf y = p * scale;
  return x < lo ? vf{} : y;
}

// Rows of a register tile with NV vectors per row: as many as the registers hold (accumulators + B + A).
constexpr int rows_for(int nv) { return std::min(8, (kRegs - nv - 1) / nv); }

// C[r, 0:NV*W] (= or +=) sum_c A[r*ars + c*acs] * B[c*ldb + 0:NV*W] for r < MR, c < kc.
template <int MR, int NV>
inline void tile(int kc, const float* A, int64_t ars, int64_t acs, const float* B, int64_t ldb, float* C,
                 int64_t ldc, bool accumulate) {
  vf s[MR][NV];
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) s[r][v] = accumulate ? load(C + r * ldc + v * W) : vf{};
  for (int c = 0; c < kc; ++c) {
    vf b[NV];
    for (int v = 0; v < NV; ++v) b[v] = load(B + c * ldb + v * W);
    for (int r = 0; r < MR; ++r) {
      vf a = splat(A[r * ars + c * acs]);
      for (int v = 0; v < NV; ++v) s[r][v] += a * b[v];
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) store(C + r * ldc + v * W, s[r][v]);
}

template <int NV, int MR = rows_for(NV)>
inline void tile_rows(int rows, int kc, const float* A, int64_t ars, int64_t acs, const float* B, int64_t ldb,
                      float* C, int64_t ldc, bool accumulate) {
  if constexpr (MR > 1) {
    if (rows < MR) return tile_rows<NV, MR - 1>(rows, kc, A, ars, acs, B, ldb, C, ldc, accumulate);
  }
  tile<MR, NV>(kc, A, ars, acs, B, ldb, C, ldc, accumulate);
}

// One register tile of `rows` (<= rows_for(nv)) rows and nv (1..4) vectors of columns.
inline void mm(int nv, int rows, int kc, const float* A, int64_t ars, int64_t acs, const float* B, int64_t ldb,
               float* C, int64_t ldc, bool accumulate) {
  switch (nv) {
    case 1: return tile_rows<1>(rows, kc, A, ars, acs, B, ldb, C, ldc, accumulate);
    case 2: return tile_rows<2>(rows, kc, A, ars, acs, B, ldb, C, ldc, accumulate);
    case 3: return tile_rows<3>(rows, kc, A, ars, acs, B, ldb, C, ldc, accumulate);
    default: return tile_rows<4>(rows, kc, A, ars, acs, B, ldb, C, ldc, accumulate);
  }
}

// C[M, N] (= or +=) A[M, kc] B[kc, N], N a multiple of W, where row i only needs the contraction range
// [first(i0, rows), last(i0, rows)) of its row tile (causal skipping; entries outside are zero in A).
template <class Range>
void gemm(int M, int N, const float* A, int64_t ars, int64_t acs, const float* B, int64_t ldb, float* C, int64_t ldc,
          bool accumulate, Range range) {
  for (int j0 = 0; j0 < N; j0 += 4 * W) {
    const int nv = std::min(4, (N - j0) / W), mr = rows_for(nv);
    for (int i0 = 0; i0 < M; i0 += mr) {
      const int rows = std::min(mr, M - i0);
      auto [c0, c1] = range(i0, rows);
      if (c1 <= c0) {
        if (!accumulate)
          for (int r = 0; r < rows; ++r) std::fill(C + (i0 + r) * ldc + j0, C + (i0 + r) * ldc + j0 + nv * W, 0.0f);
        continue;
      }
      mm(nv, rows, c1 - c0, A + i0 * ars + c0 * acs, ars, acs, B + c0 * ldb + j0, ldb, C + i0 * ldc + j0, ldc,
         accumulate);
    }
  }
}

// S[r, j] = q_(i0+r) . k_j for the keys j <= i0 + r that a causal row needs, in tiles of 2W keys;
// returns the number of key columns of the chunk that may be nonzero (a multiple of 2W).
int scores(int rows, int i0, int Tp, int H, const float* q, int64_t ldq, const float* kt, float* S) {
  constexpr int mr = rows_for(2);
  const int ncols = std::min(Tp, (i0 + rows + 2 * W - 1) / (2 * W) * (2 * W));
  for (int r0 = 0; r0 < rows; r0 += mr) {
    const int nr = std::min(mr, rows - r0);
    const int need = std::min(Tp, (i0 + r0 + nr + 2 * W - 1) / (2 * W) * (2 * W));
    for (int j0 = 0; j0 < need; j0 += 2 * W) mm(2, nr, H, q + r0 * ldq, ldq, 1, kt + j0, Tp, S + r0 * Tp + j0, Tp, false);
  }
  return ncols;
}

#if VEC_WIDTH == 16
#define ZIP_LO 0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23
#define ZIP_HI 8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31
#elif VEC_WIDTH == 8
#define ZIP_LO 0, 8, 1, 9, 2, 10, 3, 11
#define ZIP_HI 4, 12, 5, 13, 6, 14, 7, 15
#else
#define ZIP_LO 0, 4, 1, 5
#define ZIP_HI 2, 6, 3, 7
#endif

// Transposes a W x W block in registers: log2(W) perfect shuffles of the rows (row 2i, 2i+1 <- the
// interleaved first and second halves of rows i and i + W/2) turn rows into columns.
inline void transpose_block(vf (&rows)[W]) {
  for (int stage = 1; stage < W; stage *= 2) {
    vf next[W];
    for (int i = 0; i < W / 2; ++i) {
      next[2 * i] = __builtin_shufflevector(rows[i], rows[i + W / 2], ZIP_LO);
      next[2 * i + 1] = __builtin_shufflevector(rows[i], rows[i + W / 2], ZIP_HI);
    }
    for (int i = 0; i < W; ++i) rows[i] = next[i];
  }
}

// Packs x[t, 0:H] (row stride ld) transposed into xt[h, t] (row stride Tp), zero for T <= t < Tp; H % W == 0.
void pack_transposed(const float* x, int64_t ld, int T, int Tp, int H, float* xt) {
  int t0 = 0;
  for (; t0 + W <= T; t0 += W)
    for (int h0 = 0; h0 < H; h0 += W) {
      vf block[W];
      for (int r = 0; r < W; ++r) block[r] = load(x + (t0 + r) * ld + h0);
      transpose_block(block);
      for (int r = 0; r < W; ++r) store(xt + int64_t(h0 + r) * Tp + t0, block[r]);
    }
  for (int h = 0; h < H; ++h) {
    for (int t = t0; t < T; ++t) xt[int64_t(h) * Tp + t] = x[t * ld + h];
    std::fill(xt + int64_t(h) * Tp + T, xt + int64_t(h + 1) * Tp, 0.0f);
  }
}

inline float hmax(vf v) {
  float m = v[0];
  for (int l = 1; l < W; ++l) m = std::max(m, v[l]);
  return m;
}
inline float hsum(vf v) {
  float s = 0.0f;
  for (int l = 0; l < W; ++l) s += v[l];
  return s;
}

// Turns a row of scores q_i . k_j into probabilities in place: exp(scale * s + bias - lse) for keys j <= i,
// 0 after, up to ncols. With lse == nullptr it computes the row's softmax and writes its log-sum-exp to *lse_out.
void probabilities(float* row, int i, int ncols, float scale, float slope, const float* lse, float* lse_out) {
  const int nv = (i + 1 + W - 1) / W * W;  // whole vectors covering keys 0..i
  vf ramp;
  for (int l = 0; l < W; ++l) ramp[l] = float(l);
  const vf vi_ = splat(float(i)), neg_inf = splat(-INFINITY);
  vf vmax = neg_inf;
  for (int j = 0; j < nv; j += W) {  // logits x_j = scale * s_j - slope * (i - j) (ALiBi), -inf after key i
    const vf vj = splat(float(j)) + ramp;
    vf x = load(row + j) * scale + (vj - vi_) * slope;
    x = vj <= vi_ ? x : neg_inf;
    store(row + j, x);
    vmax = x > vmax ? x : vmax;
  }
  const float m = lse != nullptr ? *lse : hmax(vmax);
  vf vsum = vf{};
  for (int j = 0; j < nv; j += W) {
    const vf e = vexp(load(row + j) - m);
    store(row + j, e);
    vsum += e;
  }
  std::fill(row + nv, row + ncols, 0.0f);
  if (lse == nullptr) {
    const float sum = hsum(vsum);
    const vf inv = splat(1.0f / sum);
    for (int j = 0; j < nv; j += W) store(row + j, load(row + j) * inv);
    *lse_out = m + std::log(sum);
  }
}

// Backward of one query row i: p <- probabilities (from lse), ds <- scale * P * (dP - rowsum(P * dP)), the
// gradient of the scaled logits q . k (ds holds dP = dout . v on entry); both zero after key i.
void logit_grads(float* p, float* ds, int i, int ncols, float scale, float slope, float lse) {
  probabilities(p, i, ncols, scale, slope, &lse, nullptr);
  const int n = i + 1;
  const int nv = (n + W - 1) / W * W;  // p is 0 after key i, so whole vectors give the same sums
  vf vdelta = vf{};
  for (int j = 0; j < nv; j += W) vdelta += load(p + j) * load(ds + j);
  const float delta = hsum(vdelta);
  for (int j = 0; j < nv; j += W) store(ds + j, load(p + j) * (load(ds + j) - delta) * scale);
  std::fill(ds + nv, ds + ncols, 0.0f);
}

constexpr int kChunk = 32;  // query rows per step of an item

// One attention problem; pointers into the layouts described at the top. Items are (batch row, K/V head).
struct Problem {
  int B, T, N, K, H;
  float scale;
  const float *q, *k, *v, *slopes, *dout;  // dout: backward only
  float *out, *lse;                        // the forward's outputs; lse is the backward's input
  float *dq, *dk, *dv;                     // the backward's outputs
  // Row stride of the per-item key-major buffers: T rounded up to whole 2W-key tiles, plus W floats so
  // that successive rows do not alias in 4 KiB (which stalls loads behind unrelated stores).
  int Tp() const { return (T + 2 * W - 1) / (2 * W) * (2 * W) + W; }
  int64_t ldq() const { return int64_t(N) * H; }
  int64_t ldk() const { return int64_t(K) * H; }
};

void forward_item(const Problem& p, int item) {
  const int b = item / p.K, kh = item % p.K, G = p.N / p.K, Tp = p.Tp();
  const int64_t ldq = p.ldq(), ldk = p.ldk();
  thread_local std::vector<float> kt, S;
  kt.resize(size_t(p.H) * Tp);
  S.resize(size_t(kChunk) * Tp);
  const float* kb = p.k + int64_t(b) * p.T * ldk + kh * p.H;
  const float* vb = p.v + int64_t(b) * p.T * ldk + kh * p.H;
  pack_transposed(kb, ldk, p.T, Tp, p.H, kt.data());
  for (int g = 0; g < G; ++g) {
    const int n = kh * G + g;
    const int64_t qoff = int64_t(b) * p.T * ldq + n * p.H;
    const float* qn = p.q + qoff;
    float* on = p.out + qoff;
    float* lsen = p.lse + (int64_t(b) * p.N + n) * p.T;
    for (int i0 = 0; i0 < p.T; i0 += kChunk) {
      const int rows = std::min(kChunk, p.T - i0);
      const int ncols = scores(rows, i0, Tp, p.H, qn + i0 * ldq, ldq, kt.data(), S.data());
      for (int r = 0; r < rows; ++r)
        probabilities(S.data() + r * Tp, i0 + r, ncols, p.scale, p.slopes[n], nullptr, lsen + i0 + r);
      // out rows = P V, each row tile reading the keys up to its last row.
      gemm(rows, p.H, S.data(), Tp, 1, vb, ldk, on + i0 * ldq, ldq, false,
           [&](int r0, int nr) { return std::pair{0, std::min(p.T, i0 + r0 + nr)}; });
    }
  }
}

void backward_item(const Problem& p, int item) {
  const int b = item / p.K, kh = item % p.K, G = p.N / p.K, Tp = p.Tp();
  const int64_t ldq = p.ldq(), ldk = p.ldk();
  thread_local std::vector<float> kt, vt, P, dS, dK, dV;
  kt.resize(size_t(p.H) * Tp);
  vt.resize(size_t(p.H) * Tp);
  P.resize(size_t(kChunk) * Tp);
  dS.resize(size_t(kChunk) * Tp);
  dK.assign(size_t(p.T) * p.H, 0.0f);
  dV.assign(size_t(p.T) * p.H, 0.0f);
  const int64_t kvoff = int64_t(b) * p.T * ldk + kh * p.H;
  const float *kb = p.k + kvoff, *vb = p.v + kvoff;
  pack_transposed(kb, ldk, p.T, Tp, p.H, kt.data());
  pack_transposed(vb, ldk, p.T, Tp, p.H, vt.data());
  for (int g = 0; g < G; ++g) {
    const int n = kh * G + g;
    const int64_t qoff = int64_t(b) * p.T * ldq + n * p.H;
    const float *qn = p.q + qoff, *don = p.dout + qoff;
    const float* lsen = p.lse + (int64_t(b) * p.N + n) * p.T;
    for (int i0 = 0; i0 < p.T; i0 += kChunk) {
      const int rows = std::min(kChunk, p.T - i0);
      const int ncols = scores(rows, i0, Tp, p.H, qn + i0 * ldq, ldq, kt.data(), P.data());
      scores(rows, i0, Tp, p.H, don + i0 * ldq, ldq, vt.data(), dS.data());  // dP = dout V^T
      for (int r = 0; r < rows; ++r)
        logit_grads(P.data() + r * Tp, dS.data() + r * Tp, i0 + r, ncols, p.scale, p.slopes[n], lsen[i0 + r]);
      auto keys_of_rows = [&](int r0, int nr) { return std::pair{0, std::min(p.T, i0 + r0 + nr)}; };
      gemm(rows, p.H, dS.data(), Tp, 1, kb, ldk, p.dq + qoff + i0 * ldq, ldq, false, keys_of_rows);  // dq = dS K
      // dK[j] += sum_i dS[i, j] q_i and dV[j] += sum_i P[i, j] dout_i over the chunk's rows i >= j.
      auto rows_of_keys = [&](int j0, int) { return std::pair{std::max(0, j0 - i0), rows}; };
      const int nkeys = std::min(p.T, i0 + rows);
      gemm(nkeys, p.H, dS.data(), 1, Tp, qn + i0 * ldq, ldq, dK.data(), p.H, true, rows_of_keys);
      gemm(nkeys, p.H, P.data(), 1, Tp, don + i0 * ldq, ldq, dV.data(), p.H, true, rows_of_keys);
    }
  }
  for (int t = 0; t < p.T; ++t) {
    std::memcpy(p.dk + kvoff + t * ldk, dK.data() + int64_t(t) * p.H, p.H * sizeof(float));
    std::memcpy(p.dv + kvoff + t * ldk, dV.data() + int64_t(t) * p.H, p.H * sizeof(float));
  }
}

// Decoding attention over a paged cache (model/cache.py's `Paged`), one (batch row, K/V head) per item: the
// row's T queries and the G = N / K query heads of the K/V head read its pages through the page table, one page
// at a time with an online softmax (flash-decoding), so no dense copy of the row's keys and values is made.
// Layouts: q, out [B, T, N, H] / [B, T, N, Hv]; pools k [P, K, ps, H], v [P, K, ps, Hv]; table [B, M];
// qpos [B, T]; kpos [B, M * ps] (a slot's position, -1: invisible); slopes [N] (ALiBi; zeros: none).
// Query (t, n) reads slot s where 0 <= kpos[s] <= qpos[t] (and qpos[t] - kpos[s] < window when window > 0):
// model.mask.visible's rule. A slot it may not read is never loaded, a page none of the item's queries may read
// is skipped; a query that reads nothing (padding) gets zeros.
struct PagedProblem {
  int B, T, N, K, H, Hv, P, M, ps, window;
  float scale, softcap;
  const float *q, *k, *v, *slopes;
  const int32_t *table, *qpos, *kpos;
  float* out;
};

inline float dot(const float* a, const float* b, int n) {
  vf acc = vf{};
  int i = 0;
  for (; i + W <= n; i += W) acc += load(a + i) * load(b + i);
  float s = hsum(acc);
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

inline void axpy(float a, const float* x, float* y, int n) {  // y += a x
  const vf va = splat(a);
  int i = 0;
  for (; i + W <= n; i += W) store(y + i, load(y + i) + va * load(x + i));
  for (; i < n; ++i) y[i] += a * x[i];
}

void paged_item(const PagedProblem& p, int item) {
  const int b = item / p.K, kh = item % p.K, G = p.N / p.K, R = p.T * G;
  const int32_t* qpos = p.qpos + int64_t(b) * p.T;
  const int32_t* kpos = p.kpos + int64_t(b) * p.M * p.ps;
  int qmax = -1;
  for (int t = 0; t < p.T; ++t) qmax = std::max(qmax, qpos[t]);
  std::vector<float> m(R, -INFINITY), l(R, 0.0f), acc(int64_t(R) * p.Hv, 0.0f), s(p.ps);
  for (int j = 0; j < p.M; ++j) {
    const int32_t page = p.table[int64_t(b) * p.M + j];
    const int32_t* kp = kpos + int64_t(j) * p.ps;
    int lo = INT32_MAX;
    for (int o = 0; o < p.ps; ++o)
      if (kp[o] >= 0) lo = std::min(lo, kp[o]);
    if (lo > qmax || page < 0 || page >= p.P) continue;  // nothing on this page is visible to any query
    const float* kpage = p.k + (int64_t(page) * p.K + kh) * p.ps * p.H;
    const float* vpage = p.v + (int64_t(page) * p.K + kh) * p.ps * p.Hv;
    for (int r = 0; r < R; ++r) {
      const int t = r / G, n = kh * G + r % G, qp = qpos[t];
      const float* qrow = p.q + ((int64_t(b) * p.T + t) * p.N + n) * p.H;
      float mx = -INFINITY;
      for (int o = 0; o < p.ps; ++o) {
        const int kpo = kp[o];
        if (kpo < 0 || kpo > qp || (p.window > 0 && qp - kpo >= p.window)) {
          s[o] = -INFINITY;
          continue;
        }
        float x = p.scale * dot(qrow, kpage + int64_t(o) * p.H, p.H);
        if (p.softcap > 0.0f) x = p.softcap * std::tanh(x / p.softcap);
        x -= p.slopes[n] * float(qp - kpo);
        s[o] = x;
        mx = std::max(mx, x);
      }
      if (mx == -INFINITY) continue;  // no slot of this page for this query
      float* a = acc.data() + int64_t(r) * p.Hv;
      if (mx > m[r]) {
        const float c = std::exp(m[r] - mx);  // 0 on the first visible page
        l[r] *= c;
        for (int h = 0; h < p.Hv; ++h) a[h] *= c;
        m[r] = mx;
      }
      for (int o = 0; o < p.ps; ++o) {
        if (s[o] == -INFINITY) continue;
        const float e = std::exp(s[o] - m[r]);
        l[r] += e;
        axpy(e, vpage + int64_t(o) * p.Hv, a, p.Hv);
      }
    }
  }
  for (int r = 0; r < R; ++r) {
    const int t = r / G, n = kh * G + r % G;
    float* o = p.out + ((int64_t(b) * p.T + t) * p.N + n) * p.Hv;
    const float inv = l[r] > 0.0f ? 1.0f / l[r] : 0.0f;
    for (int h = 0; h < p.Hv; ++h) o[h] = acc[int64_t(r) * p.Hv + h] * inv;
  }
}

#ifndef CPU_ATTENTION_NO_FFI
// Runs f(item) for item < n on XLA's intra-op pool and the calling thread; returns when all are done.
// Items are claimed from a shared counter, so a task that starts late finds nothing left and returns.
template <class F>
void parallel_for(ffi::ThreadPool& pool, int n, const F& f) {
  struct State {
    std::atomic<int> next{0}, done{0};
  };
  auto state = std::make_shared<State>();
  auto work = [state, n, &f] {
    for (int i; (i = state->next.fetch_add(1)) < n;) {
      f(i);
      state->done.fetch_add(1, std::memory_order_release);
    }
  };
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), n) - 1;
  for (int64_t t = 0; t < helpers; ++t) {
    auto task = work;
    pool.Schedule(std::move(task));
  }
  work();
  while (state->done.load(std::memory_order_acquire) < n) std::this_thread::yield();
}

ffi::Error problem_of(ffi::Buffer<ffi::F32>& q, ffi::Buffer<ffi::F32>& k, ffi::Buffer<ffi::F32>& v,
                      ffi::Buffer<ffi::F32>& slopes, float scale, Problem* p) {
  auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions();
  if (qd.size() != 4 || kd.size() != 4 || vd.size() != 4 || kd[0] != qd[0] || kd[1] != qd[1] || kd[3] != qd[3] ||
      qd[2] % kd[2] != 0 || qd[3] % W != 0 || vd[0] != kd[0] || vd[1] != kd[1] || vd[2] != kd[2] ||
      vd[3] != kd[3] || slopes.element_count() != size_t(qd[2]))
    return ffi::Error::InvalidArgument("cpu attention: q [B,T,N,H], k/v [B,T,K,H], slopes [N] with N % K == 0 and H % " +
                                       std::to_string(W) + " == 0");
  *p = Problem{int(qd[0]), int(qd[1]), int(qd[2]), int(kd[2]), int(qd[3]), scale, q.typed_data(), k.typed_data(),
               v.typed_data(), slopes.typed_data()};
  return ffi::Error::Success();
}

ffi::Error forward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                   ffi::Buffer<ffi::F32> slopes, ffi::ResultBuffer<ffi::F32> out, ffi::ResultBuffer<ffi::F32> lse,
                   float scale) {
  Problem p;
  if (auto e = problem_of(q, k, v, slopes, scale, &p); e.failure()) return e;
  p.out = out->typed_data();
  p.lse = lse->typed_data();
  parallel_for(pool, p.B * p.K, [&](int item) { forward_item(p, item); });
  return ffi::Error::Success();
}

ffi::Error backward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                    ffi::Buffer<ffi::F32> slopes, ffi::Buffer<ffi::F32> lse, ffi::Buffer<ffi::F32> dout,
                    ffi::ResultBuffer<ffi::F32> dq, ffi::ResultBuffer<ffi::F32> dk, ffi::ResultBuffer<ffi::F32> dv,
                    float scale) {
  Problem p;
  if (auto e = problem_of(q, k, v, slopes, scale, &p); e.failure()) return e;
  p.lse = const_cast<float*>(lse.typed_data());
  p.dout = dout.typed_data();
  p.dq = dq->typed_data();
  p.dk = dk->typed_data();
  p.dv = dv->typed_data();
  parallel_for(pool, p.B * p.K, [&](int item) { backward_item(p, item); });
  return ffi::Error::Success();
}

ffi::Error paged_decode(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                        ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::S32> table, ffi::Buffer<ffi::S32> qpos,
                        ffi::Buffer<ffi::S32> kpos, ffi::Buffer<ffi::F32> slopes, ffi::ResultBuffer<ffi::F32> out,
                        float scale, float softcap, int32_t window) {
  auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions(), td = table.dimensions();
  if (qd.size() != 4 || kd.size() != 4 || vd.size() != 4 || td.size() != 2 || td[0] != qd[0] || kd[3] != qd[3] ||
      qd[2] % kd[1] != 0 || vd[0] != kd[0] || vd[1] != kd[1] || vd[2] != kd[2] ||
      qpos.element_count() != size_t(qd[0] * qd[1]) || kpos.element_count() != size_t(td[0] * td[1] * kd[2]) ||
      slopes.element_count() != size_t(qd[2]))
    return ffi::Error::InvalidArgument(
        "cpu paged decode: q [B,T,N,H], k [P,K,ps,H], v [P,K,ps,Hv], table [B,M], qpos [B,T], kpos [B,M*ps], "
        "slopes [N] with N % K == 0");
  PagedProblem p{int(qd[0]),  int(qd[1]), int(qd[2]), int(kd[1]), int(qd[3]),        int(vd[3]),
                 int(kd[0]),  int(td[1]), int(kd[2]), window,     scale,             softcap,
                 q.typed_data(), k.typed_data(), v.typed_data(), slopes.typed_data(), table.typed_data(),
                 qpos.typed_data(), kpos.typed_data(), out->typed_data()};
  parallel_for(pool, p.B * p.K, [&](int item) { paged_item(p, item); });
  return ffi::Error::Success();
}
#endif

}  // namespace

#ifndef CPU_ATTENTION_NO_FFI
XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxLmCpuAttentionForward, forward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("scale"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxLmCpuAttentionBackward, backward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("scale"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxLmCpuPagedDecode, paged_decode,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("scale")
                                  .Attr<float>("softcap")
                                  .Attr<int32_t>("window"));
#endif

extern "C" int JaxLmCpuAttentionVectorWidth() { return W; }
