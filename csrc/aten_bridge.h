/* The C face of aten_bridge.cpp, the only code that sees ATen.  Pure C: opaque
 * tensor handles, int status (0 ok, -1 error with a message in AtbError), and no
 * Python.  Ownership is stated on every parameter.
 *
 * No C++ exception ever leaves a bridge function: every body, getters and void
 * functions included, runs inside one catch-all (as PyTorch's AOTI shim does).
 * Functions with an AtbError report failure as -1 + message.  The getters, which
 * have no AtbError, report failure (including a NULL handle) through a sentinel
 * that callers must check:
 *
 *     atb_dtype          ATB_DTYPE_INVALID  (also: a dtype the format lacks)
 *     atb_ndim           -1
 *     atb_size           -1                 (also: dim out of range)
 *     atb_nbytes         -1
 *     atb_is_contiguous  -1
 *     atb_is_cpu         -1
 *     atb_data           NULL  (only meaningful when atb_nbytes > 0: an empty
 *                               tensor may legitimately have no data pointer)
 *     atb_cuda_available 0
 *
 * atb_free, atb_dlpack_free and atb_stager_free swallow anything thrown (there is
 * nobody to tell; the resource is as released as ATen could make it). */
#ifndef MODELOPT_C_ATEN_BRIDGE_H
#define MODELOPT_C_ATEN_BRIDGE_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct AtbTensor AtbTensor; /* an owned at::Tensor */

typedef struct {
    char msg[512];
} AtbError;

/* Element types, by their safetensors names.  ATB_DTYPE_INVALID is never valid. */
typedef enum {
    ATB_DTYPE_INVALID = 0,
    ATB_BOOL, ATB_U8, ATB_I8, ATB_I16, ATB_I32, ATB_I64, ATB_U16, ATB_U32, ATB_U64,
    ATB_F16, ATB_BF16, ATB_F32, ATB_F64, ATB_F8_E4M3, ATB_F8_E5M2,
    ATB_DTYPE_COUNT
} AtbDtype;

/* Wrap a DLPack DLManagedTensor* (steals it: on success the tensor owns it and
 * runs its deleter once, when freed; on failure its deleter has run exactly once,
 * before this returns, even when ATen threw after taking it). */
int atb_from_dlpack(void *dl_managed, AtbTensor **out, AtbError *err);

/* A DLManagedTensor* over the same storage as `t` (new; the caller owns it and
 * must call its deleter, or hand it to a "dltensor" capsule). `t` is borrowed. */
int atb_to_dlpack(const AtbTensor *t, void **dl_managed_out, AtbError *err);

/* A tensor over `data` (borrowed memory, e.g. an mmap) with a C-contiguous layout;
 * `release(ctx)` runs once when ATen drops the last reference. On failure
 * release is NOT called, now or later, whatever ATen threw and when (e.g. a
 * zero-element shape whose strides overflow int64 throws after the storage,
 * holding the callback, exists): the caller still owns ctx. */
int atb_from_blob(void *data, AtbDtype dtype, const int64_t *sizes, int ndim,
                  void (*release)(void *ctx), void *ctx, AtbTensor **out, AtbError *err);

/* dst.copy_(src): same shape required (no broadcasting), dtype/device may differ.
 * Both borrowed. */
int atb_copy_into(AtbTensor *dst, const AtbTensor *src, AtbError *err);

/* Facts about a tensor (borrowed). */
AtbDtype atb_dtype(const AtbTensor *t);
int atb_ndim(const AtbTensor *t);
int64_t atb_size(const AtbTensor *t, int dim);
int64_t atb_nbytes(const AtbTensor *t);
int atb_is_contiguous(const AtbTensor *t);
int atb_is_cpu(const AtbTensor *t);

/* Contiguous host bytes of `t`: *host is `t` itself when it is a contiguous CPU
 * tensor, else a new contiguous CPU copy (a device tensor is copied to the host as
 * it lies, then made contiguous there: no pinned memory, no copy on the device).
 * The caller frees *host with atb_free. `t` borrowed. */
int atb_host_contiguous(const AtbTensor *t, AtbTensor **host, AtbError *err);
const void *atb_data(const AtbTensor *t);

/* A stager moves the bytes of (device) tensors to the host in chunks, through two
 * host buffers of `chunk` bytes (page-locked when `pinned`, which needs an
 * accelerator), so that the copy of the next chunk runs while the caller writes
 * the previous one:
 *
 *     start(slot 0, piece 0); start(slot 1, piece 1); wait(slot 0) -> write;
 *     start(slot 0, piece 2); wait(slot 1) -> write; ...
 *
 * start() queues bytes [off, off + n) of the C-contiguous byte image of `t`
 * (n <= chunk) on the current stream of t's device and returns at once; wait()
 * blocks until that copy has landed and gives the buffer's address, valid until
 * the next start() on the same slot.  For a CPU tensor the copy is synchronous
 * (used by tests to exercise the same pipeline without a GPU).  `t` is borrowed
 * and must outlive the stager's use of it.  A non-contiguous `t` is never made
 * contiguous whole: each start() gathers only the elements its bytes fall in (at
 * most n bytes plus two elements, on t's device), in the C-contiguous byte order. */
typedef struct AtbStager AtbStager;
int atb_stager_new(size_t chunk, int pinned, AtbStager **out, AtbError *err);
int atb_stager_start(AtbStager *s, int slot, const AtbTensor *t, int64_t off, int64_t n, AtbError *err);
int atb_stager_wait(AtbStager *s, int slot, const void **data, AtbError *err);
void atb_stager_free(AtbStager *s);

/* Whether CUDA is usable in this process (0/1). */
int atb_cuda_available(void);

void atb_free(AtbTensor *t);

/* Run the deleter of a DLManagedTensor* (owned; NULL is ignored). For capsule
 * destructors on the C side, which cannot see the DLPack struct. */
void atb_dlpack_free(void *dl_managed);

/* A new contiguous CPU tensor with its own memory, a copy of `t` (borrowed). */
int atb_clone(const AtbTensor *t, AtbTensor **out, AtbError *err);

#ifdef __cplusplus
}
#endif
#endif
