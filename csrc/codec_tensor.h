/* Facts about a torch tensor read through its Python methods, each result checked
 * before C uses it, and the span of its bytes as its storage really holds them.
 * Shared by the encoder (bytes out) and the decoder (bytes into a new tensor). */
#ifndef MODELOPT_C_CODEC_TENSOR_H
#define MODELOPT_C_CODEC_TENSOR_H

#include "codec_state.h"

/* Replace *t by t.<name>() (steals the old value even on failure).  0 or -1. */
int codec_tensor_chain(PyObject **t, PyObject *name);

/* obj.<name> (attribute or, with `call`, method result) as a C truth value:
 * 0/1, or -1 with an exception set (including when torch answers a non-bool). */
int codec_tensor_flag(PyObject *obj, PyObject *name, int call);

/* obj.<name>() as a C integer (checked to be an int).  0 or -1. */
int codec_tensor_int(PyObject *obj, PyObject *name, long long *out);

/* The bytes of a CPU tensor `t` as its storage really holds them: *data is its
 * first element, *avail the bytes of the storage from there to the end.  Every
 * copy in or out of a tensor is sized against *avail, never against
 * numel * itemsize alone (sub-byte dtypes like quint4x2 have storage for fewer
 * bytes than that).  0, or -1 with an exception set (SystemError when the
 * storage's numbers disagree). */
int codec_tensor_span(CodecState *cs, PyObject *t, char **data, size_t *avail);

#endif
