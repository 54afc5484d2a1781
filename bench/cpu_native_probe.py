"""How much faster could native CPU code run the quantized GEMVs, computing the format exactly? A probe, not a route.

    python -m bench.cpu_native_probe [--threads 1] [--reps 30]

The quantized CPU decode runs its matrices on torch's packed ops (``gemma3n_fast.cpu_quant``): ~93 ms of a 139 ms
int4 E2B token on one thread. This compiles a few hand-written AVX-512 GEMVs (C, embedded below, built with the
machine's ``cc -O3 -march=native`` into a temporary folder, called through ctypes on one thread) that read our
stored format directly (``reference.quant``: int8 [N, K] with fp32 row scales; int4 nibbles two per byte along K
with bf16 group scales, G = 64) and keep its arithmetic: every product of a weight and a bf16 activation is exact in
fp32, sums in fp32, the scale applied to the group's (int4) or row's (int8) sum. Against them, at E2B's decode
shapes (batch 1): torch's packed op as ``cpu_quant.project`` calls it, and a plain stream of the int8 weight's bytes
(widen and add, no products): what one core's memory bandwidth allows any int8 GEMV of that weight.

Kernels: ``int8_fma`` (widen 16 weights to fp32, FMA with fp32 x; 4 accumulators), ``int8_fma_prefetch`` (the
same, prefetching the weight 16 KB ahead); ``int4_fma`` (nibbles to fp32,
x split into even / odd columns); ``int4_bf16dot`` (nibbles to bf16 through a 16-entry table, ``vdpbf16ps`` with the
bf16 x: 32 exact products per instruction; needs AVX512_BF16). Each result, rounded to bf16 like torch's op's, is
printed with its relative error against the float64 product of the dequantized weight. Needs a C compiler and an x86 CPU with AVX-512
(F, BW; BF16 for the last kernel): elsewhere it says so and exits. Not in the suite.
"""
from __future__ import annotations

import argparse
import ctypes
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import torch

SHAPES = [("gate|up", 16384, 2048), ("down", 2048, 8192), ("o", 2048, 2048)]  # [N, K], E2B's dense layers

C_SOURCE = r"""
#include <stdint.h>
#include <immintrin.h>

static inline __m512 bf16_splat(uint16_t h) { return _mm512_castsi512_ps(_mm512_set1_epi32((int)h << 16)); }
#define LOAD16(p) _mm_loadu_si128((const __m128i *)(p))

/* the bytes of w widened to fp32 and summed: a stream with no products (bandwidth of one core) */
float stream_int8(const int8_t *w, long n) {
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (long k = 0; k < n; k += 64) {
        a0 = _mm512_add_ps(a0, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(LOAD16(w + k))));
        a1 = _mm512_add_ps(a1, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(LOAD16(w + k + 16))));
        a2 = _mm512_add_ps(a2, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(LOAD16(w + k + 32))));
        a3 = _mm512_add_ps(a3, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(LOAD16(w + k + 48))));
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
}

/* y[n] = scale[n] * sum_k w[n, k] * x[k]; K % 64 == 0 */
void int8_fma(const float *x, int K, const int8_t *w, const float *scales, float *y, int N) {
    for (int n = 0; n < N; n++) {
        const int8_t *r = w + (long)n * K;
        __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        for (int k = 0; k < K; k += 64) {
            a0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(LOAD16(r + k))), _mm512_loadu_ps(x + k), a0);
            a1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(LOAD16(r + k + 16))), _mm512_loadu_ps(x + k + 16), a1);
            a2 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(LOAD16(r + k + 32))), _mm512_loadu_ps(x + k + 32), a2);
            a3 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(LOAD16(r + k + 48))), _mm512_loadu_ps(x + k + 48), a3);
        }
        y[n] = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3))) * scales[n];
    }
}

/* the same with a software prefetch of the weight 16 KB ahead into L2: one core's hardware prefetcher alone does
   not keep the FMA loop fed on weights that stream from memory */
void int8_fma_prefetch(const float *x, int K, const int8_t *w, const float *scales, float *y, int N) {
    for (int n = 0; n < N; n++) {
        const int8_t *r = w + (long)n * K;
        __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        for (int k = 0; k < K; k += 64) {
            _mm_prefetch((const char *)(r + k + 16384), _MM_HINT_T1);
            a0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(LOAD16(r + k))), _mm512_loadu_ps(x + k), a0);
            a1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(LOAD16(r + k + 16))), _mm512_loadu_ps(x + k + 16), a1);
            a2 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(LOAD16(r + k + 32))), _mm512_loadu_ps(x + k + 32), a2);
            a3 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(LOAD16(r + k + 48))), _mm512_loadu_ps(x + k + 48), a3);
        }
        y[n] = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3))) * scales[n];
    }
}

/* int4, G = 64 (32 bytes a group): x as fp32 even (xe) and odd (xo) columns, K2 = K / 2 bytes a row */
void int4_fma(const float *xe, const float *xo, int K2, const uint8_t *w, const uint16_t *scales, float *y, int N) {
    const __m512i low = _mm512_set1_epi32(15), eight = _mm512_set1_epi32(8);
    int groups = K2 / 32;
    for (int n = 0; n < N; n++) {
        const uint8_t *r = w + (long)n * K2;
        const uint16_t *s = scales + (long)n * groups;
        __m512 acc = _mm512_setzero_ps();
        for (int g = 0; g < groups; g++) {
            int j = g * 32;
            __m512i b0 = _mm512_cvtepu8_epi32(LOAD16(r + j)), b1 = _mm512_cvtepu8_epi32(LOAD16(r + j + 16));
            /* low nibble: column 2j, high nibble: column 2j + 1; the stored nibble is the value + 8 */
            __m512 e = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_and_si512(b0, low), eight)), _mm512_loadu_ps(xe + j));
            __m512 o = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_srli_epi32(b0, 4), eight)), _mm512_loadu_ps(xo + j));
            e = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_and_si512(b1, low), eight)), _mm512_loadu_ps(xe + j + 16), e);
            o = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_srli_epi32(b1, 4), eight)), _mm512_loadu_ps(xo + j + 16), o);
            acc = _mm512_fmadd_ps(_mm512_add_ps(e, o), bf16_splat(s[g]), acc);
        }
        y[n] = _mm512_reduce_add_ps(acc);
    }
}

#ifdef __AVX512BF16__
/* int4, G = 64, x in bf16 as stored: nibble n -> bf16(n - 8) by table, 32 exact products per vdpbf16ps */
void int4_bf16dot(const uint16_t *xb, int K2, const uint8_t *w, const uint16_t *scales, float *y, int N) {
    static const uint16_t table[32] = {0xC100, 0xC0E0, 0xC0C0, 0xC0A0, 0xC080, 0xC040, 0xC000, 0xBF80,
                                       0x0000, 0x3F80, 0x4000, 0x4040, 0x4080, 0x40A0, 0x40C0, 0x40E0};
    const __m512i tab = _mm512_loadu_si512(table);
    const __m512i low = _mm512_set1_epi32(0x0F), high = _mm512_set1_epi32(0xF0);
    int groups = K2 / 32;
    for (int n = 0; n < N; n++) {
        const uint8_t *r = w + (long)n * K2;
        const uint16_t *s = scales + (long)n * groups;
        __m512 acc = _mm512_setzero_ps();
        for (int g = 0; g < groups; g++) {
            const uint8_t *p = r + g * 32;
            __m512i b0 = _mm512_cvtepu8_epi32(LOAD16(p)), b1 = _mm512_cvtepu8_epi32(LOAD16(p + 16));
            /* 32-bit lane j: its low word the low nibble (column 2j), its high word the high nibble (2j + 1):
               the weights in x's own column order, so vdpbf16ps pairs each with its activation */
            __m512i i0 = _mm512_or_si512(_mm512_and_si512(b0, low), _mm512_slli_epi32(_mm512_and_si512(b0, high), 12));
            __m512i i1 = _mm512_or_si512(_mm512_and_si512(b1, low), _mm512_slli_epi32(_mm512_and_si512(b1, high), 12));
            __m512 d = _mm512_dpbf16_ps(_mm512_setzero_ps(), (__m512bh)_mm512_permutexvar_epi16(i0, tab),
                                        (__m512bh)_mm512_loadu_si512(xb + g * 64));
            d = _mm512_dpbf16_ps(d, (__m512bh)_mm512_permutexvar_epi16(i1, tab), (__m512bh)_mm512_loadu_si512(xb + g * 64 + 32));
            acc = _mm512_fmadd_ps(d, bf16_splat(s[g]), acc);
        }
        y[n] = _mm512_reduce_add_ps(acc);
    }
}
#endif
"""


def _cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def build(folder: Path) -> tuple[ctypes.CDLL | None, str]:
    """Compile the kernels with ``cc`` for this CPU; (the library, "") or (None, why not)."""
    flags = _cpu_flags()
    if not {"avx512f", "avx512bw"} <= flags:
        return None, "this CPU has no AVX-512 (F, BW): the probe's kernels are written for it"
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return None, "no C compiler (cc) on this machine"
    src, lib = folder / "probe.c", folder / "probe.so"
    src.write_text(C_SOURCE)
    done = subprocess.run([cc, "-O3", "-march=native", "-shared", "-fPIC", str(src), "-o", str(lib)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        return None, f"{cc} failed: {done.stderr.strip()[:300]}"
    return ctypes.CDLL(str(lib)), ""


def _ms(fn, reps: int) -> float:
    fn()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t) / reps * 1e3


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=1, help="torch's threads (the C kernels run on one)")
    p.add_argument("--reps", type=int, default=30)
    args = p.parse_args(argv)
    from gemma3n_fast import cpu_quant
    from gemma3n_fast.reference.quant import quantize

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        lib, why = build(Path(tmp))
        if lib is None:
            print(f"cpu_native_probe: {why}; nothing measured")
            return
        lib.stream_int8.restype = ctypes.c_float
        has_bf16dot = hasattr(lib, "int4_bf16dot")
        ptr = ctypes.c_void_p
        print(f"torch {torch.__version__}, {args.threads} torch thread(s), C kernels on 1; ms per GEMV (batch 1), "
              f"relative error against the float64 product in brackets")
        for name, N, K in SHAPES:
            assert K % 64 == 0, "the probe's kernels take whole 64-column blocks"
            gen = torch.Generator().manual_seed(N + K)
            w = torch.randn(N, K, generator=gen)
            x = torch.randn(1, K, generator=gen).to(torch.bfloat16)
            q8, q4 = quantize(w, "int8"), quantize(w, "int4", 64)
            p8, p4 = cpu_quant.prepack(q8), cpu_quant.prepack(q4)
            xf = x.float().reshape(-1).contiguous()
            xe, xo = xf[0::2].contiguous(), xf[1::2].contiguous()
            y = torch.empty(N)
            K2 = q4.data.shape[1]

            def c_int8():
                lib.int8_fma(ptr(xf.data_ptr()), K, ptr(q8.data.data_ptr()), ptr(q8.scales.data_ptr()),
                             ptr(y.data_ptr()), N)
                return y

            def c_int8_prefetch():
                lib.int8_fma_prefetch(ptr(xf.data_ptr()), K, ptr(q8.data.data_ptr()), ptr(q8.scales.data_ptr()),
                                      ptr(y.data_ptr()), N)
                return y

            def c_int4():
                lib.int4_fma(ptr(xe.data_ptr()), ptr(xo.data_ptr()), K2, ptr(q4.data.data_ptr()),
                             ptr(q4.scales.data_ptr()), ptr(y.data_ptr()), N)
                return y

            def c_int4_dot():
                lib.int4_bf16dot(ptr(x.data_ptr()), K2, ptr(q4.data.data_ptr()), ptr(q4.scales.data_ptr()),
                                 ptr(y.data_ptr()), N)
                return y

            def err(fn, q):
                truth = x.double() @ q.dequantize().double().t()
                got = fn().to(torch.bfloat16).double().reshape(truth.shape)  # every output in bf16, as x
                return ((got - truth).norm() / truth.norm()).item()

            rows = [("int8 stream (no products)", lambda: lib.stream_int8(ptr(q8.data.data_ptr()), N * K), None),
                    ("int8 torch packed op", lambda: cpu_quant.project(x, p8), q8),
                    ("int8 C int8_fma", c_int8, q8),
                    ("int8 C int8_fma_prefetch", c_int8_prefetch, q8),
                    ("int4 torch packed op", lambda: cpu_quant.project(x, p4), q4),
                    ("int4 C int4_fma", c_int4, q4)]
            if has_bf16dot:
                rows.append(("int4 C int4_bf16dot", c_int4_dot, q4))
            print(f"{name} [{N}, {K}]: int8 {q8.nbytes / 1e6:.1f} MB, int4 {q4.nbytes / 1e6:.1f} MB")
            for label, fn, q in rows:
                e = f"  [{err(fn, q):.2e}]" if q is not None else ""
                print(f"  {label:<28} {_ms(fn, args.reps):7.3f} ms{e}", flush=True)
        if not has_bf16dot:
            print("(no AVX512_BF16 on this CPU: int4_bf16dot not built)")


if __name__ == "__main__":
    main()
