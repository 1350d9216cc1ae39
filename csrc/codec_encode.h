/* The codec's encoder: a modelopt state -> msgpack bytes (format: codec_wire.h). */
#ifndef MODELOPT_C_CODEC_ENCODE_H
#define MODELOPT_C_CODEC_ENCODE_H

#include "codec_state.h"

/* `obj` as msgpack bytes (a new bytes object).  Tensors go inline when `tensors`
 * is NULL; otherwise each is appended to that list (borrowed) and only its index
 * is written.  NULL with an exception set: the codec's own TypeError /
 * OverflowError / ValueError names the key path in its message ("... at
 * modelopt_state_dict[0]"); a foreign exception gets it as a note. */
PyObject *codec_encode(CodecState *cs, PyObject *obj, PyObject *tensors);

#endif
