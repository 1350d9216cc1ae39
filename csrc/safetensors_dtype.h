/* The fixed numbers of the safetensors format and the dtypes it can store (header
 * name <-> ATen bridge code and item size).  Pure C. */
#ifndef MODELOPT_C_SAFETENSORS_DTYPE_H
#define MODELOPT_C_SAFETENSORS_DTYPE_H

#include "aten_bridge.h"

#include <stddef.h>

#define SFT_MAX_HEADER 100000000ULL /* the safetensors package's own cap */
#define SFT_ALIGN 64                /* our writer starts the data section on this boundary */
#define SFT_MAX_NDIM 64

typedef struct {
    const char *name; /* as written in the header: "F32", "BF16", ... */
    AtbDtype code;
    int itemsize;
} SftDtype;

extern const SftDtype sft_dtypes[];

/* The index into sft_dtypes of `code`, or -1 when the format cannot store it. */
int sft_dtype_by_code(AtbDtype code);
/* The index into sft_dtypes of the header name s[0:n], or -1. */
int sft_dtype_by_name(const char *s, size_t n);

#endif
