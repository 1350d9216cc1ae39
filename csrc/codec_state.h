/* The codec's part of the module state (ModuleState.codec): its exception, the
 * torch objects and dtype tables both directions use, and interned method names.
 * Reached through module_state(module)->codec; set up in codec_state.c. */
#ifndef MODELOPT_C_CODEC_STATE_H
#define MODELOPT_C_CODEC_STATE_H

#include "compat.h"

/* The torch objects below are the codec's own: ModuleState holds none of them
 * (CheckpointState keeps its own torch.Tensor). */
typedef struct {
    PyObject *DecodeError;    /* modelopt_c.StateDecodeError, a ValueError */

    /* torch objects, cached at module exec */
    PyObject *Tensor;         /* torch.Tensor */
    PyObject *Parameter;      /* torch.nn.Parameter (the one subclass encoded as a tensor) */
    PyObject *Size;           /* torch.Size */
    PyObject *dtype_type;     /* torch.dtype */
    PyObject *device_type;    /* torch.device */
    PyObject *strided;        /* torch.strided */
    PyObject *empty;          /* torch.empty */
    PyObject *dtype_by_name;  /* dict: "float32" -> (torch.float32, itemsize, inline_ok);
                               * inline_ok is False for quantized dtypes, whose tensors
                               * have no inline form (their scales are not stored) */
    PyObject *name_by_dtype;  /* dict: torch.float32 -> b"float32" */

    /* interned strings */
    PyObject *s_detach;
    PyObject *s_cpu;
    PyObject *s_contiguous;
    PyObject *s_resolve_conj;
    PyObject *s_resolve_neg;
    PyObject *s_layout;
    PyObject *s_dtype;
    PyObject *s_shape;
    PyObject *s_nbytes;
    PyObject *s_data_ptr;
    PyObject *s_untyped_storage;
    PyObject *s_storage_offset;
    PyObject *s_element_size;
    PyObject *s_is_meta;
    PyObject *s_is_nested;
    PyObject *s_is_quantized;
    PyObject *s_is_conj;
    PyObject *s_is_neg;
    PyObject *kw_dtype;       /* ("dtype",): kwnames for torch.empty(shape, dtype=...) */
} CodecState;

/* Fill `cs` at module exec (imports torch once) and add StateDecodeError to `module`. */
int codec_state_init(PyObject *module, CodecState *cs);
int codec_state_traverse(CodecState *cs, visitproc visit, void *arg);
void codec_state_clear(CodecState *cs);

#endif
