// Winograd F(4x4, 3x3)'s tile transforms as XLA:CPU kernels through the XLA FFI (oasis_jax/winograd_cpu.py builds
// and registers them). Each kernel makes one pass: a 6x6 (or 4x4) tile of every 16-channel block is read once,
// transformed in registers and written once; XLA's fusions of the same transforms re-read the whole input for
// each of the 36 transform points.
//
// Layouts: images [N, H, W, C] (H, W multiples of 4, C a multiple of 16); transform-domain arrays [36, T, C] with
// T = N * H/4 * W/4 tiles in (n, tile row, tile column) order and point (i, j) at 6 i + j. Tile (ti, tj) covers
// rows 4 ti - 1 .. 4 ti + 4 and columns 4 tj - 1 .. 4 tj + 4 of the image (zeros outside: SAME padding).
//   WinogradInput    x  -> B^T d B of every tile           WinogradInputT   its transpose (overlaps summed)
//   WinogradOutput   m  -> A^T m A of every tile            WinogradOutputT  its transpose
// B^T, A^T: Lavin & Gray (2016) with points 0, +-1, +-2, infinity, as WINOGRAD_BT / WINOGRAD_AT in convolution.py.
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kLanes = 16;  // channels per block (one 512-bit vector; the compiler vectorises the loops)
#define LANES for (int64_t k = 0; k < kLanes; ++k)

// Runs fn(0) .. fn(n - 1) on XLA's intra-op threads and the calling thread. The caller takes work too and waits
// only for items already taken, so a task that starts late (or never, while every thread is busy) cannot block it.
template <typename F>
void ParallelFor(ffi::ThreadPool& pool, int64_t n, const F& fn) {
  struct State {
    std::atomic<int64_t> next{0}, done{0};
  };
  auto state = std::make_shared<State>();
  auto run = [state, n, &fn] {
    for (int64_t i; (i = state->next.fetch_add(1)) < n;) {
      fn(i);
      state->done.fetch_add(1, std::memory_order_release);
    }
  };
  int64_t workers = std::min<int64_t>(std::max<int64_t>(pool.num_threads(), 1), n);
  for (int64_t w = 1; w < workers; ++w) pool.Schedule(decltype(run)(run));
  run();
  while (state->done.load(std::memory_order_acquire) < n) std::this_thread::yield();
}

// 1-D transforms of kLanes-float vectors: input vector u at a + u * sa, output i at b + i * sb.
inline void Bt(const float* __restrict a, int64_t sa, float* __restrict b, int64_t sb) {  // B^T d
  LANES {
    float d0 = a[k], d1 = a[sa + k], d2 = a[2 * sa + k], d3 = a[3 * sa + k], d4 = a[4 * sa + k], d5 = a[5 * sa + k];
    b[k] = 4 * d0 - 5 * d2 + d4;
    b[sb + k] = -4 * (d1 + d2) + d3 + d4;
    b[2 * sb + k] = 4 * (d1 - d2) - d3 + d4;
    b[3 * sb + k] = 2 * (d3 - d1) - d2 + d4;
    b[4 * sb + k] = 2 * (d1 - d3) - d2 + d4;
    b[5 * sb + k] = 4 * d1 - 5 * d3 + d5;
  }
}
inline void B(const float* __restrict a, int64_t sa, float* __restrict b, int64_t sb) {  // B v = (B^T)^T v
  LANES {
    float v0 = a[k], v1 = a[sa + k], v2 = a[2 * sa + k], v3 = a[3 * sa + k], v4 = a[4 * sa + k], v5 = a[5 * sa + k];
    b[k] = 4 * v0;
    b[sb + k] = 4 * (v2 - v1 + v5) + 2 * (v4 - v3);
    b[2 * sb + k] = -5 * v0 - 4 * (v1 + v2) - v3 - v4;
    b[3 * sb + k] = v1 - v2 + 2 * (v3 - v4) - 5 * v5;
    b[4 * sb + k] = v0 + v1 + v2 + v3 + v4;
    b[5 * sb + k] = v5;
  }
}
inline void At(const float* __restrict a, int64_t sa, float* __restrict b, int64_t sb) {  // A^T m: 6 -> 4
  LANES {
    float m0 = a[k], m1 = a[sa + k], m2 = a[2 * sa + k], m3 = a[3 * sa + k], m4 = a[4 * sa + k], m5 = a[5 * sa + k];
    float p12 = m1 + m2, d12 = m1 - m2, p34 = m3 + m4, d34 = m3 - m4;
    b[k] = m0 + p12 + p34;
    b[sb + k] = d12 + 2 * d34;
    b[2 * sb + k] = p12 + 4 * p34;
    b[3 * sb + k] = d12 + 8 * d34 + m5;
  }
}
inline void A(const float* __restrict a, int64_t sa, float* __restrict b, int64_t sb) {  // A s: 4 -> 6
  LANES {
    float s0 = a[k], s1 = a[sa + k], s2 = a[2 * sa + k], s3 = a[3 * sa + k];
    b[k] = s0;
    b[sb + k] = s0 + s1 + s2 + s3;
    b[2 * sb + k] = s0 - s1 + s2 - s3;
    b[3 * sb + k] = s0 + 2 * s1 + 4 * s2 + 8 * s3;
    b[4 * sb + k] = s0 - 2 * s1 + 4 * s2 - 8 * s3;
    b[5 * sb + k] = s3;
  }
}
inline void Copy(const float* __restrict a, float* __restrict b) { LANES b[k] = a[k]; }

struct Geometry {  // of the image side [N, H, W, C]
  int64_t n, h, w, c, th, tw, tiles;
};

ffi::Error Check(ffi::Span<const int64_t> image, ffi::Span<const int64_t> points, Geometry* g) {
  if (image.size() != 4 || points.size() != 3)
    return ffi::Error::InvalidArgument("winograd_cpu: expected an image [N, H, W, C] and points [36, T, C]");
  *g = {image[0], image[1], image[2], image[3], image[1] / 4, image[2] / 4, image[0] * (image[1] / 4) * (image[2] / 4)};
  if (g->h % 4 || g->w % 4 || g->c % kLanes || points[0] != 36 || points[1] != g->tiles || points[2] != g->c)
    return ffi::Error::InvalidArgument("winograd_cpu: H, W must be multiples of 4, C of 16, points [36, T, C]");
  return ffi::Error::Success();
}

inline int64_t Point(const Geometry& g, int p, int64_t tile, int64_t c0) { return (p * g.tiles + tile) * g.c + c0; }
inline int64_t Pixel(const Geometry& g, int64_t n, int64_t y, int64_t x, int64_t c0) {
  return ((n * g.h + y) * g.w + x) * g.c + c0;
}

// body(n, ti, tj, tile, c0) for every tile and channel block, rows of tiles in parallel.
template <typename F>
void ForEachTileBlock(ffi::ThreadPool& pool, const Geometry& g, const F& body) {
  ParallelFor(pool, g.n * g.th, [&](int64_t row) {
    for (int64_t tj = 0; tj < g.tw; ++tj)
      for (int64_t c0 = 0; c0 < g.c; c0 += kLanes) body(row / g.th, row % g.th, tj, row * g.tw + tj, c0);
  });
}

ffi::Error Input(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::ResultBuffer<ffi::F32> v) {
  Geometry g;
  if (ffi::Error e = Check(x.dimensions(), v->dimensions(), &g); e.failure()) return e;
  const float* xp = x.typed_data();
  float* vp = v->typed_data();
  ForEachTileBlock(pool, g, [&](int64_t n, int64_t ti, int64_t tj, int64_t tile, int64_t c0) {
    alignas(64) static const float zero[kLanes] = {};
    alignas(64) float d[6][6][kLanes], t[6][6][kLanes], o[6][6][kLanes];
    for (int u = 0; u < 6; ++u) {
      int64_t y = 4 * ti - 1 + u;
      for (int s = 0; s < 6; ++s) {
        int64_t xx = 4 * tj - 1 + s;
        bool inside = y >= 0 && y < g.h && xx >= 0 && xx < g.w;
        Copy(inside ? xp + Pixel(g, n, y, xx, c0) : zero, d[u][s]);
      }
    }
    for (int s = 0; s < 6; ++s) Bt(d[0][s], 6 * kLanes, t[0][s], 6 * kLanes);   // B^T d
    for (int i = 0; i < 6; ++i) Bt(t[i][0], kLanes, o[i][0], kLanes);           // (B^T d) B
    for (int p = 0; p < 36; ++p) Copy(o[p / 6][p % 6], vp + Point(g, p, tile, c0));
  });
  return ffi::Error::Success();
}

ffi::Error InputT(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> dv, ffi::ResultBuffer<ffi::F32> dx) {
  Geometry g;
  if (ffi::Error e = Check(dx->dimensions(), dv.dimensions(), &g); e.failure()) return e;
  const float* vp = dv.typed_data();
  float* xp = dx->typed_data();
  ParallelFor(pool, g.n, [&](int64_t n) {   // one image: its overlapping tiles add into the same pixels
    alignas(64) float in[6][6][kLanes], t[6][6][kLanes], e[6][6][kLanes];
    for (int64_t ti = 0; ti < g.th; ++ti) {
      // Rows 4 ti + 1 .. 4 ti + 4 are first reached by this row of tiles: zero them now, while they fit in cache.
      int64_t first = ti == 0 ? 0 : 4 * ti + 1, last = std::min(4 * ti + 5, g.h);
      std::memset(xp + Pixel(g, n, first, 0, 0), 0, sizeof(float) * (last - first) * g.w * g.c);
      for (int64_t tj = 0; tj < g.tw; ++tj) {
        int64_t tile = (n * g.th + ti) * g.tw + tj;
        for (int64_t c0 = 0; c0 < g.c; c0 += kLanes) {
          for (int p = 0; p < 36; ++p) Copy(vp + Point(g, p, tile, c0), in[p / 6][p % 6]);
          for (int i = 0; i < 6; ++i) B(in[i][0], kLanes, t[i][0], kLanes);           // v B^T
          for (int s = 0; s < 6; ++s) B(t[0][s], 6 * kLanes, e[0][s], 6 * kLanes);   // B (v B^T)
          for (int u = 0; u < 6; ++u) {
            int64_t y = 4 * ti - 1 + u;
            if (y < 0 || y >= g.h) continue;
            for (int s = 0; s < 6; ++s) {
              int64_t xx = 4 * tj - 1 + s;
              if (xx < 0 || xx >= g.w) continue;
              float* out = xp + Pixel(g, n, y, xx, c0);
              LANES out[k] += e[u][s][k];
            }
          }
        }
      }
    }
  });
  return ffi::Error::Success();
}

ffi::Error Output(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> m, ffi::ResultBuffer<ffi::F32> y) {
  Geometry g;
  if (ffi::Error e = Check(y->dimensions(), m.dimensions(), &g); e.failure()) return e;
  const float* mp = m.typed_data();
  float* yp = y->typed_data();
  ForEachTileBlock(pool, g, [&](int64_t n, int64_t ti, int64_t tj, int64_t tile, int64_t c0) {
    alignas(64) float in[6][6][kLanes], t[6][4][kLanes], o[4][4][kLanes];
    for (int p = 0; p < 36; ++p) Copy(mp + Point(g, p, tile, c0), in[p / 6][p % 6]);
    for (int i = 0; i < 6; ++i) At(in[i][0], kLanes, t[i][0], kLanes);           // m A
    for (int s = 0; s < 4; ++s) At(t[0][s], 4 * kLanes, o[0][s], 4 * kLanes);   // A^T (m A)
    for (int r = 0; r < 4; ++r)
      for (int s = 0; s < 4; ++s) Copy(o[r][s], yp + Pixel(g, n, 4 * ti + r, 4 * tj + s, c0));
  });
  return ffi::Error::Success();
}

ffi::Error OutputT(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> dy, ffi::ResultBuffer<ffi::F32> dm) {
  Geometry g;
  if (ffi::Error e = Check(dy.dimensions(), dm->dimensions(), &g); e.failure()) return e;
  const float* yp = dy.typed_data();
  float* mp = dm->typed_data();
  ForEachTileBlock(pool, g, [&](int64_t n, int64_t ti, int64_t tj, int64_t tile, int64_t c0) {
    alignas(64) float in[4][4][kLanes], t[6][4][kLanes], o[6][6][kLanes];
    for (int r = 0; r < 4; ++r)
      for (int s = 0; s < 4; ++s) Copy(yp + Pixel(g, n, 4 * ti + r, 4 * tj + s, c0), in[r][s]);
    for (int s = 0; s < 4; ++s) A(in[0][s], 4 * kLanes, t[0][s], 4 * kLanes);   // A dy
    for (int i = 0; i < 6; ++i) A(t[i][0], kLanes, o[i][0], kLanes);             // (A dy) A^T
    for (int p = 0; p < 36; ++p) Copy(o[p / 6][p % 6], mp + Point(g, p, tile, c0));
  });
  return ffi::Error::Success();
}

}  // namespace

#define OASIS_WINOGRAD_HANDLER(name, impl) \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(           \
      name, impl, ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<ffi::Buffer<ffi::F32>>().Ret<ffi::Buffer<ffi::F32>>());
OASIS_WINOGRAD_HANDLER(WinogradInput, Input)
OASIS_WINOGRAD_HANDLER(WinogradInputT, InputT)
OASIS_WINOGRAD_HANDLER(WinogradOutput, Output)
OASIS_WINOGRAD_HANDLER(WinogradOutputT, OutputT)
