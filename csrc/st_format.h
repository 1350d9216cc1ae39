/* Public face of st_format.c: the safetensors-compatible checkpoint format. */
#ifndef MODELOPT_C_ST_FORMAT_H
#define MODELOPT_C_ST_FORMAT_H

#include "compat.h"

extern PyMethodDef st_format_methods[];

#endif
