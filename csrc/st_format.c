/* Placeholder until the safetensors-compatible format lands. */
#include "st_format.h"

PyMethodDef st_format_methods[] = {{NULL, NULL, 0, NULL}};
