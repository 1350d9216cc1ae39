/* Public face of state_codec.c: the modelopt state <-> msgpack bytes codec.
 * The module only needs the four hooks below; the format itself is documented in
 * the table at the top of state_codec.c. */
#ifndef MODELOPT_C_STATE_CODEC_H
#define MODELOPT_C_STATE_CODEC_H

#include "compat.h"

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

int codec_state_init(PyObject *module, CodecState *cs);
int codec_state_traverse(CodecState *cs, visitproc visit, void *arg);
void codec_state_clear(CodecState *cs);

extern PyMethodDef codec_methods[];

#endif
