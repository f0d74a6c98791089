// The fused middle of HyperGLU's CPU training path (ops/hyperglu.py), for one chunk of query rows in the lag layout.
//
// The eager steps make about a dozen passes over each (B, H, M, W) map in forward and some forty in backward, each
// reading or writing a whole map from memory. Here the same steps run on blocks of `rows` query rows of one
// (batch, head) at a time, and every map of the block stays in cache: the block's scores q k^T are a small GEMM,
// skewed into lag order in cache; the rank-r products are small BLAS GEMMs; softplus and sigmoid are vectorised
// (ATen's Vectorized); the rest are loops over the block's rows.
//   forward:  q, k -> A2 = op2(act(op1(q k^T in lag order))), and the norm n, inv = 1/max(n, eps) per row
//   backward: q, k, dA2 -> recomputes the block's maps, then A2 (for dV = A^T dy), the controls' gradients, the
//             mixer parameters' gradients per (block, batch, head) summed afterwards, and dZ back in key order
//             down to dq = dS k and dk += dS^T q
// The (batch, head, block of rows) tasks run on torch's intra-op threads, BLAS serial inside each.

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/cpu/vec/functional.h>
#include <algorithm>
#include <map>
#include <string>
#include <vector>

extern "C" {  // Fortran BLAS, as exported by the BLAS that PyTorch's CPU build links (MKL in the official wheels)
void sgemm_(const char*, const char*, const int*, const int*, const int*, const float*, const float*, const int*,
            const float*, const int*, const float*, float*, const int*);
void dgemm_(const char*, const char*, const int*, const int*, const int*, const double*, const double*, const int*,
            const double*, const int*, const double*, double*, const int*);
int MKL_Set_Num_Threads_Local(int) __attribute__((weak));  // MKL only: keep BLAS serial inside our threads
}
static void gemm(char ta, char tb, int m, int n, int k, const float* A, int lda, const float* B, int ldb, float beta,
                 float* C, int ldc) {
  const float one = 1;
  sgemm_(&ta, &tb, &m, &n, &k, &one, A, &lda, B, &ldb, &beta, C, &ldc);
}
static void gemm(char ta, char tb, int m, int n, int k, const double* A, int lda, const double* B, int ldb,
                 double beta, double* C, int ldc) {
  const double one = 1;
  dgemm_(&ta, &tb, &m, &n, &k, &one, A, &lda, B, &ldb, &beta, C, &ldc);
}
// row-major C (m x n, ld ldc) = op(A) (m x k) op(B) (k x n) + beta C, via column-major BLAS: C^T = op(B)^T op(A)^T.
// A is stored m x k (k x m when tA), B k x n (n x k when tB), row-major with leading dims lda, ldb.
template <typename T>
static void mm(bool tA, bool tB, int64_t m, int64_t n, int64_t k, const T* A, int64_t lda, const T* B, int64_t ldb,
               T beta, T* C, int64_t ldc) {
  if (m == 0 || n == 0) return;
  if (k == 0) {
    for (int64_t i = 0; i < m; ++i) for (int64_t j = 0; j < n; ++j) C[i * ldc + j] *= beta;
    return;
  }
  gemm(tB ? 'T' : 'N', tA ? 'T' : 'N', n, m, k, B, ldb, A, lda, beta, C, ldc);
}

template <typename T> using Vec = at::vec::Vectorized<T>;

// softplus(x) = max(x, 0) + log1p(exp(-|x|)) (= logaddexp(x, 0)) into sp; sigmoid(x) = exp(x - softplus(x))
template <typename T>
static void softplus(const T* x, T* sp, int64_t W) {
  int64_t c = 0;
  const Vec<T> zero(T(0));
  for (; c + Vec<T>::size() <= W; c += Vec<T>::size()) {
    Vec<T> v = Vec<T>::loadu(x + c);
    (at::vec::maximum(v, zero) + v.abs().neg().exp().log1p()).store(sp + c);
  }
  for (; c < W; ++c) sp[c] = std::max(x[c], T(0)) + std::log1p(std::exp(-std::abs(x[c])));
}
template <typename T>
static void sigmoid(const T* x, const T* sp, T* out, int64_t W) {
  int64_t c = 0;
  for (; c + Vec<T>::size() <= W; c += Vec<T>::size())
    (Vec<T>::loadu(x + c) - Vec<T>::loadu(sp + c)).exp().store(out + c);
  for (; c < W; ++c) out[c] = std::exp(x[c] - sp[c]);
}

// A 2-D strided view: element (i, j) at p[i * rs + j * cs].
template <typename T> struct View { T* p; int64_t rs; };

struct Args {  // everything but the tensors, from Python
  bool glu, use_norm, op1, op2, mask1, mask2;
  double eps;
  int64_t base;  // row m may use lag columns >= base - m (keys >= 0); the ones left of it are invalid
  int64_t rows;  // query rows per block
  bool backward;
};

// The tensors by name (ops/hyperglu_cpu.py passes a dict); a name that is absent is an undefined tensor.
// In: q (B x H1 x M x dk), k (B x H1 x W x dk), c1, c2, U1 (H1 x W x r1), Vt1 (H1 x r1 x *), s1 (H1 x W), U2, Vt2,
// s2; out: A2, nrm, inv (B x h x M). Backward also takes gA2 (B x h x M x W) and writes gq, gc1, gc2 and, summed
// per (block of rows, batch, head), gVt1, gU1T, gd1, gVt2, gU2T, gd2, gk.
struct Tensors {
  at::Tensor q, k, c1, c2, U1, Vt1, s1, U2, Vt2, s2, A2, nrm, inv;
  at::Tensor gA2, gq, gc1, gc2, gVt1, gU1T, gd1, gVt2, gU2T, gd2, gk;
  explicit Tensors(const std::map<std::string, at::Tensor>& m) {
    auto get = [&](const char* name) { auto it = m.find(name); return it == m.end() ? at::Tensor() : it->second; };
    q = get("q"); k = get("k"); c1 = get("c1"); c2 = get("c2"); U1 = get("U1"); Vt1 = get("Vt1"); s1 = get("s1");
    U2 = get("U2"); Vt2 = get("Vt2"); s2 = get("s2"); A2 = get("A2"); nrm = get("n"); inv = get("inv");
    gA2 = get("gA2"); gq = get("gq"); gc1 = get("gc1"); gc2 = get("gc2"); gVt1 = get("gVt1"); gU1T = get("gU1T");
    gd1 = get("gd1"); gVt2 = get("gVt2"); gU2T = get("gU2T"); gd2 = get("gd2"); gk = get("gk");
  }
};

// One mixer on a block of R rows: y = x * s + (x U * ctrl) Vt, masked. U: W x r (ld r), Vt: r x W (ld vl).
template <typename T>
static void mix_forward(int64_t R, int64_t W, int64_t r, const T* x, int64_t xl, const T* U, const T* Vt,
                        int64_t vl, const T* s, const T* ctrl, int64_t cl, T* P, T* Pc, T* y, int64_t yl,
                        bool mask, int64_t base, int64_t m0) {
  mm<T>(false, false, R, r, W, x, xl, U, r, T(0), P, r);  // P = x U
  for (int64_t i = 0; i < R; ++i)
    for (int64_t k = 0; k < r; ++k) Pc[i * r + k] = P[i * r + k] * ctrl[i * cl + k];
  for (int64_t i = 0; i < R; ++i) {
    const T* xi = x + i * xl; T* yi = y + i * yl;
    #pragma omp simd
    for (int64_t c = 0; c < W; ++c) yi[c] = xi[c] * s[c];
  }
  mm<T>(false, false, R, W, r, Pc, r, Vt, vl, T(1), y, yl);  // y += Pc Vt
  if (mask)
    for (int64_t i = 0; i < R; ++i) {
      const int64_t bad = std::min<int64_t>(std::max<int64_t>(base - (m0 + i), 0), W);
      std::fill(y + i * yl, y + i * yl + bad, T(0));
    }
}

// Its backward from gy: gx = gy * s + (gy Vt^T * ctrl) U^T; gctrl = (gy Vt^T) * P; gVt += Pc^T gy;
// gU^T += (gy Vt^T * ctrl)^T x; gd += colsum(gy * x). gPc, gP: R x r scratch.
template <typename T>
static void mix_backward(int64_t R, int64_t W, int64_t r, const T* gy, int64_t gyl, const T* x, int64_t xl,
                         const T* P, const T* Pc, const T* ctrl, int64_t cl, const T* U, const T* Vt, int64_t vl,
                         const T* s, T* gx, int64_t gxl, T* gctrl, int64_t gcl, T* gVt, T* gUT, T* gd, T* gPc,
                         T* gP) {
  mm<T>(false, true, R, r, W, gy, gyl, Vt, vl, T(0), gPc, r);  // gPc = gy Vt^T
  mm<T>(true, false, r, W, R, Pc, r, gy, gyl, T(1), gVt, W);   // gVt += Pc^T gy
  for (int64_t i = 0; i < R; ++i)
    for (int64_t k = 0; k < r; ++k) {
      gctrl[i * gcl + k] = gPc[i * r + k] * P[i * r + k];
      gP[i * r + k] = gPc[i * r + k] * ctrl[i * cl + k];
    }
  for (int64_t i = 0; i < R; ++i) {
    const T* g = gy + i * gyl; const T* xi = x + i * xl; T* o = gx + i * gxl;
    #pragma omp simd
    for (int64_t c = 0; c < W; ++c) { gd[c] += g[c] * xi[c]; o[c] = g[c] * s[c]; }
  }
  mm<T>(false, true, R, W, r, gP, r, U, r, T(1), gx, gxl);    // gx += gP U^T
  mm<T>(true, false, r, W, R, gP, r, x, xl, T(1), gUT, W);    // gU^T += gP^T x
}

template <typename T>
static inline T* at4(const at::Tensor& t, int64_t b, int64_t h, int64_t m) {
  return t.data_ptr<T>() + b * t.stride(0) + h * t.stride(1) + m * t.stride(2);
}

template <typename T>
static void run(const Tensors& t, const Args& a) {
  const at::Tensor &q = t.q, &K = t.k, &c1 = t.c1, &c2 = t.c2, &U1 = t.U1, &Vt1 = t.Vt1, &s1 = t.s1, &U2 = t.U2;
  const at::Tensor &Vt2 = t.Vt2, &s2 = t.s2, &A2 = t.A2, &nrm = t.nrm, &inv = t.inv;
  int64_t rows = a.rows;
  const int64_t B = A2.size(0), h = A2.size(1), M = A2.size(2), W = A2.size(3);
  const int64_t nh = a.glu ? 2 : 1, H1 = nh * h;
  const int64_t r1 = a.op1 ? U1.size(2) : 0, r2 = a.op2 ? U2.size(2) : 0, rr = std::max<int64_t>({r1, r2, 1});
  rows = std::min(rows, M);  // decoding: one row; scratch sized for the block, not for ROWS
  const int64_t nb = (M + rows - 1) / rows;  // tasks: (batch, v-head, block of rows), for as many cores as there are
  at::parallel_for(0, B * h * nb, 1, [&](int64_t t0, int64_t t1) {
    const int blas_threads = MKL_Set_Num_Threads_Local ? MKL_Set_Num_Threads_Local(1) : 0;
    std::vector<T> zb(nh * rows * W), S(rows * W), z1(nh * rows * W), sp(rows * W), ga(rows * W), gz(rows * W);
    std::vector<T> sig(rows * W), P1(nh * rows * rr), Pc1(nh * rows * rr), Q(rows * rr), Qc(rows * rr);
    std::vector<T> gPc(rows * rr), gP(rows * rr);
    std::vector<T> coef(rows);
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t b = task / (h * nb), j = task / nb % h, blk = task % nb;
      {
        const int64_t m0 = blk * rows;
        const int64_t R = std::min(rows, M - m0);
        // z = q k^T in lag order, then op1, on each qk-head of this v-head (GLU: gate head j, scale head h + j).
        // Row m (query r = W-1-base+m) holds key r-l at column W-1-l: its keys 0..r start at column base - m.
        for (int64_t e = 0; e < nh; ++e) {
          const int64_t hh = j + e * h;
          T* Zb = zb.data() + e * rows * W;
          mm<T>(false, true, R, W, q.size(3), at4<T>(q, b, hh, m0), q.stride(2), at4<T>(K, b, hh, 0), K.stride(2),
                T(0), S.data(), W);
          for (int64_t i = 0; i < R; ++i) {
            const int64_t sh = std::max<int64_t>(0, std::min<int64_t>(a.base - (m0 + i), W));
            std::fill(Zb + i * W, Zb + i * W + sh, T(0));
            std::copy_n(S.data() + i * W, W - sh, Zb + i * W + sh);
          }
          T* y = z1.data() + e * rows * W;
          if (a.op1)
            mix_forward<T>(R, W, r1, Zb, W, U1.data_ptr<T>() + hh * U1.stride(0),
                           Vt1.data_ptr<T>() + hh * Vt1.stride(0), Vt1.stride(1), s1.data_ptr<T>() + hh * W,
                           at4<T>(c1, b, hh, m0), c1.stride(2), P1.data() + e * rows * rr, Pc1.data() + e * rows * rr,
                           y, W, a.mask1, a.base, m0);
          else
            std::copy_n(Zb, R * W, y);
        }
        // the activation: a = softplus(Sc) relu(G) (GLU) or relu(G), and the norm of G per row
        T* G = z1.data();
        T* act = ga.data();  // forward: a; backward reuses the buffer for da after op2's backward
        for (int64_t i = 0; i < R; ++i) {
          const T* g = G + i * W; T* ai = act + i * W;
          if (a.glu) {
            softplus<T>(z1.data() + (rows + i) * W, sp.data() + i * W, W);
            const T* s = sp.data() + i * W;
            #pragma omp simd
            for (int64_t c = 0; c < W; ++c) ai[c] = s[c] * std::max(g[c], T(0));
          } else {
            #pragma omp simd
            for (int64_t c = 0; c < W; ++c) ai[c] = std::max(g[c], T(0));
          }
          if (a.use_norm) {
            double s = 0;
            #pragma omp simd reduction(+:s)
            for (int64_t c = 0; c < W; ++c) s += double(g[c]) * double(g[c]);
            const T nn = T(std::sqrt(s));
            at4<T>(nrm, b, j, m0)[i] = nn;
            at4<T>(inv, b, j, m0)[i] = T(1) / std::max(nn, T(a.eps));
          }
        }
        // op2 into A2 (its buffer, lag order)
        T* A = at4<T>(A2, b, j, m0); const int64_t Al = A2.stride(2);
        if (a.op2)
          mix_forward<T>(R, W, r2, act, W, U2.data_ptr<T>() + j * U2.stride(0), Vt2.data_ptr<T>() + j * Vt2.stride(0),
                         Vt2.stride(1), s2.data_ptr<T>() + j * W, at4<T>(c2, b, j, m0), c2.stride(2), Q.data(),
                         Qc.data(), A, Al, a.mask2, a.base, m0);
        else
          for (int64_t i = 0; i < R; ++i) std::copy_n(act + i * W, W, A + i * Al);
        if (!a.backward) continue;

        const at::Tensor &gA2 = t.gA2, &gc1 = t.gc1, &gc2 = t.gc2, &gVt1 = t.gVt1, &gU1T = t.gU1T, &gd1 = t.gd1;
        const at::Tensor &gVt2 = t.gVt2, &gU2T = t.gU2T, &gd2 = t.gd2;
        T* g = at4<T>(gA2, b, j, m0); const int64_t gl = gA2.stride(2);
        // gA2 arrives as dout v^T; dA2 = (dout inv) v^T scales each row by its inv, known only now
        if (a.use_norm)
          for (int64_t i = 0; i < R; ++i) {
            const T iv = at4<T>(inv, b, j, m0)[i]; T* gi = g + i * gl;
            #pragma omp simd
            for (int64_t c = 0; c < W; ++c) gi[c] *= iv;
          }
        // the norm: out = (A v) inv, inv = 1/max(n, eps): dG gets coef G with coef = -rowdot(A2, dA2) inv^2
        for (int64_t i = 0; i < R; ++i) {
          coef[i] = 0;
          if (a.use_norm && at4<T>(nrm, b, j, m0)[i] > T(a.eps)) {
            const T* Ai = A + i * Al; const T* gi = g + i * gl;
            T s = 0;
            #pragma omp simd reduction(+:s)
            for (int64_t c = 0; c < W; ++c) s += Ai[c] * gi[c];
            const T iv = at4<T>(inv, b, j, m0)[i];
            coef[i] = -s * iv * iv;
          }
        }
        // op2: da = dA2 s2 + ..., into gz (the activation values in `act` are still needed as op2's input)
        T* da = gz.data();
        if (a.op2)
          mix_backward<T>(R, W, r2, g, gl, act, W, Q.data(), Qc.data(), at4<T>(c2, b, j, m0), c2.stride(2),
                          U2.data_ptr<T>() + j * U2.stride(0), Vt2.data_ptr<T>() + j * Vt2.stride(0), Vt2.stride(1),
                          s2.data_ptr<T>() + j * W, da, W, at4<T>(gc2, b, j, m0), gc2.stride(2),
                          gVt2.data_ptr<T>() + ((blk * B + b) * h + j) * r2 * W,
                          gU2T.data_ptr<T>() + ((blk * B + b) * h + j) * r2 * W,
                          gd2.data_ptr<T>() + ((blk * B + b) * h + j) * W, gPc.data(), gP.data());
        else
          for (int64_t i = 0; i < R; ++i) std::copy_n(g + i * gl, W, da + i * W);
        // the activation's backward, in place over op1's outputs: dG = da [G > 0] sp + coef G,
        // dSc = da relu(G) sigmoid(Sc)
        for (int64_t i = 0; i < R; ++i) {
          T* gi = G + i * W; const T* d = da + i * W; const T cf = coef[i];
          if (a.glu) {
            T* Sc = z1.data() + (rows + i) * W; const T* s = sp.data() + i * W; T* sg = sig.data() + i * W;
            sigmoid<T>(Sc, s, sg, W);
            #pragma omp simd
            for (int64_t c = 0; c < W; ++c) {
              const T gv = gi[c];
              Sc[c] = d[c] * std::max(gv, T(0)) * sg[c];
              gi[c] = (gv > T(0) ? d[c] * s[c] : T(0)) + cf * gv;
            }
          } else {
            #pragma omp simd
            for (int64_t c = 0; c < W; ++c) { const T gv = gi[c]; gi[c] = (gv > T(0) ? d[c] : T(0)) + cf * gv; }
          }
        }
        // op1's backward per qk-head into dZ (op1's mask needs no step: where it zeroed Z1, G = 0 zeroes dZ1),
        // then dZ back to key order (future keys get 0) and z = q k^T's backward: dq = dS k, dk += dS^T q
        const at::Tensor &gq = t.gq, &gk = t.gk;
        const int64_t dk = q.size(3);
        for (int64_t e = 0; e < nh; ++e) {
          const int64_t hh = j + e * h;
          const T* gy = z1.data() + e * rows * W;
          T* out = ga.data(); const int64_t ol = W;  // dZ of this head, lag order (a is no longer needed)
          if (a.op1)
            mix_backward<T>(R, W, r1, gy, W, zb.data() + e * rows * W, W, P1.data() + e * rows * rr,
                            Pc1.data() + e * rows * rr, at4<T>(c1, b, hh, m0), c1.stride(2),
                            U1.data_ptr<T>() + hh * U1.stride(0), Vt1.data_ptr<T>() + hh * Vt1.stride(0),
                            Vt1.stride(1), s1.data_ptr<T>() + hh * W, out, ol, at4<T>(gc1, b, hh, m0), gc1.stride(2),
                            gVt1.data_ptr<T>() + ((blk * B + b) * H1 + hh) * r1 * W,
                            gU1T.data_ptr<T>() + ((blk * B + b) * H1 + hh) * r1 * W,
                            gd1.data_ptr<T>() + ((blk * B + b) * H1 + hh) * W, gPc.data(), gP.data());
          else
            std::copy_n(gy, R * W, out);
          for (int64_t i = 0; i < R; ++i) {
            const int64_t sh = std::max<int64_t>(0, std::min<int64_t>(a.base - (m0 + i), W));
            std::copy_n(out + i * W + sh, W - sh, S.data() + i * W);
            std::fill(S.data() + i * W + W - sh, S.data() + (i + 1) * W, T(0));
          }
          mm<T>(false, false, R, dk, W, S.data(), W, at4<T>(K, b, hh, 0), K.stride(2), T(0), at4<T>(gq, b, hh, m0),
                gq.stride(2));
          mm<T>(true, false, W, dk, R, S.data(), W, at4<T>(q, b, hh, m0), q.stride(2), T(1),
                gk.data_ptr<T>() + ((blk * B + b) * H1 + hh) * W * dk, dk);
        }
      }
    }
    if (MKL_Set_Num_Threads_Local) MKL_Set_Num_Threads_Local(blas_threads);
  });
}

// One chunk's fused middle, forward (backward=false) or forward and backward; see ops/hyperglu_cpu.py.
void middle(const std::map<std::string, at::Tensor>& tensors, bool glu, bool use_norm, bool op1, bool op2, bool mask1,
            bool mask2, double eps, int64_t base, int64_t rows, bool backward) {
  const Tensors t(tensors);
  const Args a{glu, use_norm, op1, op2, mask1, mask2, eps, base, rows, backward};
  if (t.q.scalar_type() == at::kDouble) run<double>(t, a);
  else run<float>(t, a);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("middle", &middle, py::arg("tensors"), py::kw_only(), py::arg("glu"), py::arg("use_norm"), py::arg("op1"),
        py::arg("op2"), py::arg("mask1"), py::arg("mask2"), py::arg("eps"), py::arg("base"), py::arg("rows"),
        py::arg("backward"));
}
