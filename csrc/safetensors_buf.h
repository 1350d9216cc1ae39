/* Byte plumbing of the safetensors code: a growable buffer with JSON string output
 * (the writer builds its header in one) and whole-range file reads and writes that
 * retry short transfers and EINTR. */
#ifndef MODELOPT_C_SAFETENSORS_BUF_H
#define MODELOPT_C_SAFETENSORS_BUF_H

#include "compat.h"

#include <stddef.h>
#include <sys/types.h>

typedef struct {
    char *data; /* PyMem; the owner frees it */
    size_t len, cap;
} SftBuf;

/* Each returns 0, or -1 with MemoryError (or the UTF-8 encoder's error) raised. */
int sft_buf_reserve(SftBuf *b, size_t extra);
int sft_buf_add(SftBuf *b, const char *s, size_t n);
int sft_buf_str(SftBuf *b, const char *s);
/* The body of a JSON string literal for the UTF-8 bytes s[0:n] (no quotes). */
int sft_buf_json_body(SftBuf *b, const char *s, size_t n);
/* A JSON string literal for `str` (quoted). */
int sft_buf_json_str(SftBuf *b, PyObject *str);

/* No Python, no GIL needed: 0, or -1 with errno set.  sft_write_all appends at the
 * file position when `pos` is NULL, else writes at *pos and advances it. */
int sft_write_all(int fd, const char *p, size_t n, off_t *pos);
int sft_read_all(int fd, char *p, size_t n, off_t pos);

#endif
