/* The dtype table of the safetensors format (docs/FORMAT.md, "dtypes"): the only
 * place that knows which names the header may carry. */
#include "safetensors_dtype.h"

#include <string.h>

const SftDtype sft_dtypes[] = {
    {"BOOL", ATB_BOOL, 1}, {"U8", ATB_U8, 1},     {"I8", ATB_I8, 1},
    {"I16", ATB_I16, 2},   {"I32", ATB_I32, 4},   {"I64", ATB_I64, 8},
    {"U16", ATB_U16, 2},   {"U32", ATB_U32, 4},   {"U64", ATB_U64, 8},
    {"F16", ATB_F16, 2},   {"BF16", ATB_BF16, 2}, {"F32", ATB_F32, 4},
    {"F64", ATB_F64, 8},   {"F8_E4M3", ATB_F8_E4M3, 1}, {"F8_E5M2", ATB_F8_E5M2, 1},
};
#define SFT_NDTYPES ((int)(sizeof(sft_dtypes) / sizeof(sft_dtypes[0])))

int
sft_dtype_by_code(AtbDtype code)
{
    for (int i = 0; i < SFT_NDTYPES; i++) {
        if (sft_dtypes[i].code == code) {
            return i;
        }
    }
    return -1;
}

int
sft_dtype_by_name(const char *s, size_t n)
{
    for (int i = 0; i < SFT_NDTYPES; i++) {
        if (strlen(sft_dtypes[i].name) == n && memcmp(sft_dtypes[i].name, s, n) == 0) {
            return i;
        }
    }
    return -1;
}
