/* The safetensors header parser: a strict, bounds-checked JSON reader for exactly
 * the header schema, producing the tensor table (SftHeader) and the metadata dict.
 * Every defect is a CheckpointError "<path>: <what>". */
#ifndef MODELOPT_C_SAFETENSORS_JSON_H
#define MODELOPT_C_SAFETENSORS_JSON_H

#include "module_state.h"

#include <stdint.h>

typedef struct {
    PyObject *name;  /* strong */
    int dtype;       /* index into sft_dtypes */
    int ndim;
    size_t shape_at; /* index into SftHeader.shapes */
    uint64_t begin, end;
} SftEntry;

typedef struct {
    ModuleState *st;    /* for the error type */
    PyObject *display;  /* borrowed: the path, for messages */
    const unsigned char *start, *p, *end;
    SftEntry *entries;  /* header order */
    size_t nentries, cap_entries;
    int64_t *shapes;    /* every entry's dimensions, one pool */
    size_t nshapes, cap_shapes;
} SftHeader;

/* Parse and validate the header bytes json[0:n] of a file whose data section is
 * `data_len` bytes: fills h->entries and `metadata` (str -> str).  h->st and
 * h->display are set by the caller; sft_header_clear frees what it filled. */
int sft_parse_header(SftHeader *h, const unsigned char *json, size_t n, uint64_t data_len, PyObject *metadata);
void sft_header_clear(SftHeader *h);

/* Entry e's e->ndim dimensions.  Never computed from a null pool: a header whose
 * tensors are all scalars has no pool at all, and NULL + 0 is undefined. */
static inline const int64_t *
sft_entry_dims(const SftHeader *h, const SftEntry *e)
{
    static const int64_t no_dims[1] = {0};
    return e->ndim == 0 ? no_dims : h->shapes + e->shape_at;
}

/* For the checksums map (a JSON object inside a metadata string): h->p over '{'
 * "k": "v", ... '}' into `dict`, duplicate keys rejected; then the whitespace. */
int sft_json_str_map(SftHeader *h, PyObject *dict, const char *what);
void sft_json_ws(SftHeader *h);
/* The value of hex digit c, or -1. */
int sft_hexval(unsigned char c);

#endif
