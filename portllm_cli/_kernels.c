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

static PyMethodDef methods[] = {
    {"add_scaled_bf16", py_add_scaled_bf16, METH_VARARGS,
     "add_scaled_bf16(w_ptr, d_ptr, out_ptr, n, s): out = bf16(float(w) + d * s), element by element."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_kernels", NULL, -1, methods};

PyMODINIT_FUNC PyInit__kernels(void) { return PyModule_Create(&module); }
