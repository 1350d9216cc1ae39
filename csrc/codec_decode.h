/* The codec's decoder: msgpack bytes -> a modelopt state (format: codec_wire.h),
 * treating the bytes as hostile. */
#ifndef MODELOPT_C_CODEC_DECODE_H
#define MODELOPT_C_CODEC_DECODE_H

#include "codec_state.h"

/* The value encoded in the `len` bytes at `buf`: one complete encoding and
 * nothing after it.  `tensors` (borrowed sequence, or NULL) resolves tensor
 * references; `source` (borrowed str, or NULL) is named in messages.  A new
 * reference, or NULL with StateDecodeError set (saying what is wrong, at which
 * byte offset and, when nested, at which key path; a torch or UTF-8 error that
 * caused it is its __cause__) or an error from `tensors` or from memory. */
PyObject *codec_decode(CodecState *cs, const void *buf, Py_ssize_t len, PyObject *tensors,
                       PyObject *source);

#endif
