/* The codec as the module sees it: the Python functions encode_state /
 * decode_state (codec_module.c) and the codec's part of the module state
 * (codec_state.h).  The format itself: codec_wire.h. */
#ifndef MODELOPT_C_CODEC_MODULE_H
#define MODELOPT_C_CODEC_MODULE_H

#include "codec_state.h"

extern PyMethodDef codec_methods[];

#endif
