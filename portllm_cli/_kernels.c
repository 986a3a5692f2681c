/* portllm_cli._kernels: the last step of a bf16 merge in one pass over memory (optional).
 *
 * out[i] = bf16(float(w[i]) + d[i] * s)
 *
 * w: the stored bfloat16 rows, d: the float32 delta B @ A for those rows (computed by torch's
 * matmul, so its bits are PEFT's), s: the scale. The product and the sum are float32 operations,
 * each rounded (no fused multiply-add: this file is compiled with -ffp-contract=off and uses none),
 * and the result is rounded to bfloat16 to nearest, ties to even: the same bits as torch's
 * `block = w.float(); d.mul_(s); block.add_(d); block.to(torch.bfloat16)`, which
 * portllm_cli.core.merge uses where this module is not built (tests/test_kernels.py compares the
 * two on every kind of float32 bit pattern). A NaN becomes the quiet NaN 0x7FC0 (torch's
 * vectorized conversion writes 0xFFFF; both are NaN).
 *
 * Built by setuptools as an optional extension: where no C compiler is found the install goes on
 * and portllm uses the torch operations (four passes over memory instead of one).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

/* One loop, compiled for several instruction sets where the compiler and C library can pick
 * one at load time (GCC/Clang on x86-64 with glibc: ifunc); elsewhere the baseline. */
#if defined(__x86_64__) && defined(__GNUC__) && defined(__GLIBC__) && !defined(__clang__)
#define PORTLLM_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define PORTLLM_CLONES
#endif

PORTLLM_CLONES
static void add_scaled_bf16(const uint16_t *restrict w, const float *restrict d, uint16_t *restrict out,
                            Py_ssize_t n, float s)
{
    for (Py_ssize_t i = 0; i < n; i++) {
        uint32_t wu = (uint32_t)w[i] << 16;
        float wf;
        memcpy(&wf, &wu, 4);
        float t = d[i] * s;
        float r = wf + t;
        uint32_t u;
        memcpy(&u, &r, 4);
        uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
        out[i] = (uint16_t)(((u & 0x7FFFFFFFu) > 0x7F800000u) ? 0x7FC0u : rounded);
    }
}

/* ---- The whole LoRA merge of a bf16 block in one pass: the rank-r product too ----------------
 *
 * out[i, j] = bf16(float(w[i, j]) + delta[i, j] * s),  delta[i, j] = fma chain over k = 0..r-1:
 *     acc = 0; acc = fmaf(B[i, k], A[k, j], acc) for k in order
 *
 * That chain is how torch's float32 matmul (MKL's sgemm kernels) sums a rank-r product on the
 * machines measured, so delta has torch's bits there, and so PEFT's. That is not a promise of
 * torch's, so portllm_cli.core.merge uses this only after lora_delta_f32 (the same accumulation,
 * storing delta instead of merging it) has given torch.matmul's bits exactly for the rank and
 * row length at hand, on probe factors chosen to expose any other order (tests/test_kernels.py).
 *
 * A is also passed packed, tile after tile of 16 columns (Ap[t, k, l] = A[k, 16 t + l]), so a
 * tile's r rows are one contiguous run; columns past the last whole tile are read from A itself.
 * Compiled only for x86-64 with GCC or Clang, for AVX-512F and for AVX2 with FMA, chosen at run
 * time; elsewhere (and on CPUs with neither) lora_fused() is False and portllm keeps torch's
 * matmul followed by add_scaled_bf16.
 */
#if (defined(__x86_64__) || defined(_M_X64)) && defined(__GNUC__)
#define PORTLLM_FUSED 1
#include <immintrin.h>
#include <math.h>
#include <stddef.h>

typedef struct {
    const uint16_t *w; /* rows x n, bf16 (unused for the delta) */
    const float *B;    /* rows x r */
    const float *A;    /* r x n */
    const float *Ap;   /* packed A: (n / 16) x r x 16 */
    void *dst;         /* rows x n: bf16 (merge) or float32 (delta) */
    Py_ssize_t rows, r, n;
    float s;
    int delta;         /* 1: store the float32 delta, 0: merge into bf16 */
} lora_job;

static inline uint16_t round_bf16(float x)
{
    uint32_t u;
    memcpy(&u, &x, 4);
    if ((u & 0x7FFFFFFFu) > 0x7F800000u)
        return 0x7FC0u;
    return (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

/* The columns past the last whole tile, one element at a time (the same chain, scalar). */
__attribute__((target("fma")))
static void lora_tail(const lora_job *jb, Py_ssize_t i0, Py_ssize_t i1, Py_ssize_t j0)
{
    for (Py_ssize_t i = i0; i < i1; i++)
        for (Py_ssize_t j = j0; j < jb->n; j++) {
            float acc = 0.0f;
            for (Py_ssize_t k = 0; k < jb->r; k++)
                acc = fmaf(jb->B[i * jb->r + k], jb->A[k * jb->n + j], acc);
            if (jb->delta) {
                ((float *)jb->dst)[i * jb->n + j] = acc;
            } else {
                uint32_t wu = (uint32_t)jb->w[i * jb->n + j] << 16;
                float wf;
                memcpy(&wf, &wu, 4);
                float t = acc * jb->s;
                ((uint16_t *)jb->dst)[i * jb->n + j] = round_bf16(wf + t);
            }
        }
}

#define RB512 8
__attribute__((target("avx512f,fma")))
static inline void out512(const lora_job *jb, __m512 acc, Py_ssize_t i, Py_ssize_t j)
{
    if (jb->delta) {
        _mm512_storeu_ps((float *)jb->dst + i * jb->n + j, acc);
        return;
    }
    __m256i wv = _mm256_loadu_si256((const __m256i *)(jb->w + i * jb->n + j));
    __m512 wf = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(wv), 16));
    __m512i u = _mm512_castps_si512(_mm512_add_ps(wf, _mm512_mul_ps(acc, _mm512_set1_ps(jb->s))));
    __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7FFF)), lsb), 16);
    __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(u, _mm512_set1_epi32(0x7FFFFFFF)),
                                            _mm512_set1_epi32(0x7F800000));
    rounded = _mm512_mask_mov_epi32(rounded, nan, _mm512_set1_epi32(0x7FC0));
    _mm512_mask_cvtepi32_storeu_epi16((uint16_t *)jb->dst + i * jb->n + j, (__mmask16)0xFFFF, rounded);
}

__attribute__((target("avx512f,fma")))
static void lora_avx512(const lora_job *jb)
{
    const Py_ssize_t r = jb->r, n = jb->n, nv = n - n % 16;
    const float *B = jb->B;
    Py_ssize_t i = 0;
    for (; i + RB512 <= jb->rows; i += RB512)
        for (Py_ssize_t j = 0; j < nv; j += 16) {
            const float *ap = jb->Ap + j * r, *b = B + i * r;
            __m512 c0 = _mm512_setzero_ps(), c1 = c0, c2 = c0, c3 = c0, c4 = c0, c5 = c0, c6 = c0, c7 = c0;
            for (Py_ssize_t k = 0; k < r; k++) {
                __m512 a = _mm512_loadu_ps(ap + k * 16);
                c0 = _mm512_fmadd_ps(_mm512_set1_ps(b[k]), a, c0);
                c1 = _mm512_fmadd_ps(_mm512_set1_ps(b[r + k]), a, c1);
                c2 = _mm512_fmadd_ps(_mm512_set1_ps(b[2 * r + k]), a, c2);
                c3 = _mm512_fmadd_ps(_mm512_set1_ps(b[3 * r + k]), a, c3);
                c4 = _mm512_fmadd_ps(_mm512_set1_ps(b[4 * r + k]), a, c4);
                c5 = _mm512_fmadd_ps(_mm512_set1_ps(b[5 * r + k]), a, c5);
                c6 = _mm512_fmadd_ps(_mm512_set1_ps(b[6 * r + k]), a, c6);
                c7 = _mm512_fmadd_ps(_mm512_set1_ps(b[7 * r + k]), a, c7);
            }
            out512(jb, c0, i, j); out512(jb, c1, i + 1, j); out512(jb, c2, i + 2, j); out512(jb, c3, i + 3, j);
            out512(jb, c4, i + 4, j); out512(jb, c5, i + 5, j); out512(jb, c6, i + 6, j); out512(jb, c7, i + 7, j);
        }
    for (; i < jb->rows; i++) { /* the last rows one at a time, four tiles side by side */
        const float *b = B + i * r;
        Py_ssize_t j = 0;
        for (; j + 64 <= nv; j += 64) {
            const float *ap = jb->Ap + j * r;
            __m512 c0 = _mm512_setzero_ps(), c1 = c0, c2 = c0, c3 = c0;
            for (Py_ssize_t k = 0; k < r; k++) {
                __m512 bk = _mm512_set1_ps(b[k]);
                c0 = _mm512_fmadd_ps(bk, _mm512_loadu_ps(ap + k * 16), c0);
                c1 = _mm512_fmadd_ps(bk, _mm512_loadu_ps(ap + 16 * r + k * 16), c1);
                c2 = _mm512_fmadd_ps(bk, _mm512_loadu_ps(ap + 32 * r + k * 16), c2);
                c3 = _mm512_fmadd_ps(bk, _mm512_loadu_ps(ap + 48 * r + k * 16), c3);
            }
            out512(jb, c0, i, j); out512(jb, c1, i, j + 16); out512(jb, c2, i, j + 32); out512(jb, c3, i, j + 48);
        }
        for (; j < nv; j += 16) {
            const float *ap = jb->Ap + j * r;
            __m512 c0 = _mm512_setzero_ps();
            for (Py_ssize_t k = 0; k < r; k++)
                c0 = _mm512_fmadd_ps(_mm512_set1_ps(b[k]), _mm512_loadu_ps(ap + k * 16), c0);
            out512(jb, c0, i, j);
        }
    }
    lora_tail(jb, 0, jb->rows, nv);
}

#define RB256 4
__attribute__((target("avx2,fma")))
static inline void out256(const lora_job *jb, __m256 acc, Py_ssize_t i, Py_ssize_t j)
{
    if (jb->delta) {
        _mm256_storeu_ps((float *)jb->dst + i * jb->n + j, acc);
        return;
    }
    __m128i wv = _mm_loadu_si128((const __m128i *)(jb->w + i * jb->n + j));
    __m256 wf = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(wv), 16));
    __m256i u = _mm256_castps_si256(_mm256_add_ps(wf, _mm256_mul_ps(acc, _mm256_set1_ps(jb->s))));
    __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7FFF)), lsb), 16);
    /* (u & 0x7FFFFFFF) and 0x7F800000 are both non-negative as int32: a signed compare is exact */
    __m256i nan = _mm256_cmpgt_epi32(_mm256_and_si256(u, _mm256_set1_epi32(0x7FFFFFFF)), _mm256_set1_epi32(0x7F800000));
    rounded = _mm256_blendv_epi8(rounded, _mm256_set1_epi32(0x7FC0), nan);
    __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(rounded, rounded), 0x08);
    _mm_storeu_si128((__m128i *)((uint16_t *)jb->dst + i * jb->n + j), _mm256_castsi256_si128(packed));
}

__attribute__((target("avx2,fma")))
static void lora_avx2(const lora_job *jb)
{
    const Py_ssize_t r = jb->r, n = jb->n, nv = n - n % 16;
    const float *B = jb->B;
    Py_ssize_t i = 0;
    for (; i + RB256 <= jb->rows; i += RB256)
        for (Py_ssize_t j = 0; j < nv; j += 16) {
            const float *ap = jb->Ap + j * r, *b = B + i * r;
            __m256 c0 = _mm256_setzero_ps(), c1 = c0, c2 = c0, c3 = c0, c4 = c0, c5 = c0, c6 = c0, c7 = c0;
            for (Py_ssize_t k = 0; k < r; k++) {
                __m256 a0 = _mm256_loadu_ps(ap + k * 16), a1 = _mm256_loadu_ps(ap + k * 16 + 8);
                __m256 b0 = _mm256_set1_ps(b[k]), b1 = _mm256_set1_ps(b[r + k]);
                __m256 b2 = _mm256_set1_ps(b[2 * r + k]), b3 = _mm256_set1_ps(b[3 * r + k]);
                c0 = _mm256_fmadd_ps(b0, a0, c0); c1 = _mm256_fmadd_ps(b0, a1, c1);
                c2 = _mm256_fmadd_ps(b1, a0, c2); c3 = _mm256_fmadd_ps(b1, a1, c3);
                c4 = _mm256_fmadd_ps(b2, a0, c4); c5 = _mm256_fmadd_ps(b2, a1, c5);
                c6 = _mm256_fmadd_ps(b3, a0, c6); c7 = _mm256_fmadd_ps(b3, a1, c7);
            }
            out256(jb, c0, i, j); out256(jb, c1, i, j + 8); out256(jb, c2, i + 1, j); out256(jb, c3, i + 1, j + 8);
            out256(jb, c4, i + 2, j); out256(jb, c5, i + 2, j + 8); out256(jb, c6, i + 3, j); out256(jb, c7, i + 3, j + 8);
        }
    for (; i < jb->rows; i++) { /* the last rows one at a time, two tiles side by side */
        const float *b = B + i * r;
        Py_ssize_t j = 0;
        for (; j + 32 <= nv; j += 32) {
            const float *ap = jb->Ap + j * r;
            __m256 c0 = _mm256_setzero_ps(), c1 = c0, c2 = c0, c3 = c0;
            for (Py_ssize_t k = 0; k < r; k++) {
                __m256 bk = _mm256_set1_ps(b[k]);
                c0 = _mm256_fmadd_ps(bk, _mm256_loadu_ps(ap + k * 16), c0);
                c1 = _mm256_fmadd_ps(bk, _mm256_loadu_ps(ap + k * 16 + 8), c1);
                c2 = _mm256_fmadd_ps(bk, _mm256_loadu_ps(ap + 16 * r + k * 16), c2);
                c3 = _mm256_fmadd_ps(bk, _mm256_loadu_ps(ap + 16 * r + k * 16 + 8), c3);
            }
            out256(jb, c0, i, j); out256(jb, c1, i, j + 8); out256(jb, c2, i, j + 16); out256(jb, c3, i, j + 24);
        }
        for (; j < nv; j += 16) {
            const float *ap = jb->Ap + j * r;
            __m256 c0 = _mm256_setzero_ps(), c1 = c0;
            for (Py_ssize_t k = 0; k < r; k++) {
                __m256 bk = _mm256_set1_ps(b[k]);
                c0 = _mm256_fmadd_ps(bk, _mm256_loadu_ps(ap + k * 16), c0);
                c1 = _mm256_fmadd_ps(bk, _mm256_loadu_ps(ap + k * 16 + 8), c1);
            }
            out256(jb, c0, i, j);
            out256(jb, c1, i, j + 8);
        }
    }
    lora_tail(jb, 0, jb->rows, nv);
}

/* 2: AVX-512F, 1: AVX2 with FMA, 0: neither (the compiler's CPU check includes the OS's support
 * for the vector registers). _fused_isa(level) lowers it, for tests of the AVX2 code on a machine
 * with AVX-512. */
static int detected = -1, level = -1;
static int fused_level(void)
{
    if (detected < 0) {
        __builtin_cpu_init();
        if (__builtin_cpu_supports("avx512f"))
            detected = 2;
        else if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
            detected = 1;
        else
            detected = 0;
        level = detected;
    }
    return level;
}

static void lora_run(const lora_job *jb)
{
    if (fused_level() == 2)
        lora_avx512(jb);
    else
        lora_avx2(jb);
}
#endif /* PORTLLM_FUSED */

/* add_scaled_bf16(w_ptr, d_ptr, out_ptr, n, s): addresses of contiguous buffers of n elements
 * (torch's data_ptr()), none overlapping another. The GIL is released while the loop runs. */
static PyObject *py_add_scaled_bf16(PyObject *self, PyObject *args)
{
    unsigned long long w, d, out;
    Py_ssize_t n;
    float s;
    (void)self;
    if (!PyArg_ParseTuple(args, "KKKnf", &w, &d, &out, &n, &s))
        return NULL;
    if (n < 0) {
        PyErr_SetString(PyExc_ValueError, "n must be >= 0");
        return NULL;
    }
    if (n > 0 && (!w || !d || !out)) {
        PyErr_SetString(PyExc_ValueError, "null buffer");
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    add_scaled_bf16((const uint16_t *)(uintptr_t)w, (const float *)(uintptr_t)d, (uint16_t *)(uintptr_t)out, n, s);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *py_lora_fused(PyObject *self, PyObject *args)
{
    (void)self;
    (void)args;
#ifdef PORTLLM_FUSED
    return PyBool_FromLong(fused_level() > 0);
#else
    Py_RETURN_FALSE;
#endif
}

static PyObject *py_fused_isa(PyObject *self, PyObject *args)
{
    int want = -1;
    (void)self;
    if (!PyArg_ParseTuple(args, "|i", &want))
        return NULL;
#ifdef PORTLLM_FUSED
    fused_level();
    if (want >= 0) {
        if (want > detected) {
            PyErr_SetString(PyExc_ValueError, "this CPU does not have that instruction set");
            return NULL;
        }
        level = want;
    }
    return PyLong_FromLong(level);
#else
    return PyLong_FromLong(0);
#endif
}

/* lora_merge_bf16(w, w_offset, B, A, Ap, out, rows, r, n, s) and lora_delta_f32(B, A, Ap, d, rows, r, n).
 * B, A, Ap, out, d: addresses of contiguous buffers (torch's data_ptr()). w: the stored rows, an
 * address or any object with the buffer protocol (a read-only mmap of the source shard: the rows
 * are read in place, no copy), w_offset bytes in; a buffer is held only during the call, and the
 * rows must lie inside it. No output may overlap an input. */
static PyObject *lora_call(PyObject *args, int delta)
{
#ifdef PORTLLM_FUSED
    unsigned long long B, A, Ap, dst;
    PyObject *wobj = NULL;
    Py_ssize_t w_offset = 0, rows, r, n;
    float s = 1.0f;
    int ok = delta ? PyArg_ParseTuple(args, "KKKKnnn", &B, &A, &Ap, &dst, &rows, &r, &n)
                   : PyArg_ParseTuple(args, "OnKKKKnnnf", &wobj, &w_offset, &B, &A, &Ap, &dst, &rows, &r, &n, &s);
    if (!ok)
        return NULL;
    if (fused_level() == 0) {
        PyErr_SetString(PyExc_RuntimeError, "this CPU has neither AVX-512F nor AVX2 with FMA");
        return NULL;
    }
    if (rows < 0 || r < 1 || n < 0 || w_offset < 0) {
        PyErr_SetString(PyExc_ValueError, "need rows >= 0, r >= 1, n >= 0, w_offset >= 0");
        return NULL;
    }
    Py_buffer view;
    int have_view = 0;
    const char *w = NULL;
    if (!delta) {
        if (PyLong_Check(wobj)) {
            unsigned long long addr = PyLong_AsUnsignedLongLong(wobj);
            if (PyErr_Occurred())
                return NULL;
            w = addr ? (const char *)(uintptr_t)addr + w_offset : NULL;
        } else {
            if (PyObject_GetBuffer(wobj, &view, PyBUF_SIMPLE) < 0)
                return NULL;
            have_view = 1;
            if (rows > 0 && n > PY_SSIZE_T_MAX / 2 / rows) {
                PyBuffer_Release(&view);
                PyErr_SetString(PyExc_ValueError, "rows * n too large");
                return NULL;
            }
            if (w_offset > view.len || rows * n * 2 > view.len - w_offset) {
                PyBuffer_Release(&view);
                PyErr_SetString(PyExc_ValueError, "the rows do not lie inside the buffer");
                return NULL;
            }
            w = (const char *)view.buf + w_offset;
        }
    }
    if (rows > 0 && n > 0 && (!B || !A || !dst || (!Ap && n >= 16) || (!delta && !w))) {
        if (have_view)
            PyBuffer_Release(&view);
        PyErr_SetString(PyExc_ValueError, "null buffer");
        return NULL;
    }
    lora_job jb = {(const uint16_t *)w, (const float *)(uintptr_t)B, (const float *)(uintptr_t)A,
                   (const float *)(uintptr_t)Ap, (void *)(uintptr_t)dst, rows, r, n, s, delta};
    if (rows > 0 && n > 0) {
        Py_BEGIN_ALLOW_THREADS
        lora_run(&jb);
        Py_END_ALLOW_THREADS
    }
    if (have_view)
        PyBuffer_Release(&view);
    Py_RETURN_NONE;
#else
    (void)args;
    (void)delta;
    PyErr_SetString(PyExc_RuntimeError, "built without the fused LoRA kernel (x86-64 with GCC or Clang only)");
    return NULL;
#endif
}

static PyObject *py_lora_merge_bf16(PyObject *self, PyObject *args)
{
    (void)self;
    return lora_call(args, 0);
}

static PyObject *py_lora_delta_f32(PyObject *self, PyObject *args)
{
    (void)self;
    return lora_call(args, 1);
}

static PyMethodDef methods[] = {
    {"add_scaled_bf16", py_add_scaled_bf16, METH_VARARGS,
     "add_scaled_bf16(w_ptr, d_ptr, out_ptr, n, s): out = bf16(float(w) + d * s), element by element."},
    {"lora_fused", py_lora_fused, METH_NOARGS, "lora_fused(): whether lora_merge_bf16 and lora_delta_f32 run here."},
    {"_fused_isa", py_fused_isa, METH_VARARGS,
     "_fused_isa([level]): the instruction set the fused kernel uses (2 AVX-512F, 1 AVX2+FMA, 0 none); tests lower it."},
    {"lora_merge_bf16", py_lora_merge_bf16, METH_VARARGS,
     "lora_merge_bf16(w, w_offset, B, A, Ap, out, rows, r, n, s): out = bf16(float(w) + (B @ A) * s), B @ A an fma chain."},
    {"lora_delta_f32", py_lora_delta_f32, METH_VARARGS,
     "lora_delta_f32(B, A, Ap, d, rows, r, n): d = B @ A in float32, the same fma chain as lora_merge_bf16."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_kernels", NULL, -1, methods};

PyMODINIT_FUNC PyInit__kernels(void) { return PyModule_Create(&module); }
