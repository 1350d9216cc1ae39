/* Public face of state_codec.c: the modelopt state <-> msgpack bytes codec.
 * (Filled in by the codec work; the module only needs these four hooks.) */
#ifndef MODELOPT_C_STATE_CODEC_H
#define MODELOPT_C_STATE_CODEC_H

#include "compat.h"

typedef struct {
    PyObject *DecodeError;    /* modelopt_c.StateDecodeError, a ValueError */
} CodecState;

int codec_state_init(PyObject *module, CodecState *cs);
int codec_state_traverse(CodecState *cs, visitproc visit, void *arg);
void codec_state_clear(CodecState *cs);

extern PyMethodDef codec_methods[];

#endif
