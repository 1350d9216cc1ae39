/* Byte plumbing of the safetensors code: the writer's growable header buffer with
 * JSON string output, and whole-range pread/pwrite loops (safetensors_buf.h). */
#include "safetensors_buf.h"

#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

int
sft_buf_reserve(SftBuf *b, size_t extra)
{
    if (b->len + extra <= b->cap) {
        return 0;
    }
    size_t cap = b->cap ? b->cap : 4096;
    while (cap < b->len + extra) {
        cap *= 2;
    }
    char *data = PyMem_Realloc(b->data, cap);
    if (data == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    b->data = data;
    b->cap = cap;
    return 0;
}

int
sft_buf_add(SftBuf *b, const char *s, size_t n)
{
    if (sft_buf_reserve(b, n) < 0) {
        return -1;
    }
    memcpy(b->data + b->len, s, n);
    b->len += n;
    return 0;
}

int
sft_buf_str(SftBuf *b, const char *s)
{
    return sft_buf_add(b, s, strlen(s));
}

int
sft_buf_json_body(SftBuf *b, const char *s, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        char esc[8];
        if (c == '"' || c == '\\') {
            esc[0] = '\\', esc[1] = (char)c;
            if (sft_buf_add(b, esc, 2) < 0) {
                return -1;
            }
        }
        else if (c < 0x20) {
            snprintf(esc, sizeof(esc), "\\u%04x", c);
            if (sft_buf_add(b, esc, 6) < 0) {
                return -1;
            }
        }
        else if (sft_buf_add(b, (const char *)&c, 1) < 0) {
            return -1;
        }
    }
    return 0;
}

int
sft_buf_json_str(SftBuf *b, PyObject *str)
{
    Py_ssize_t n;
    const char *s = PyUnicode_AsUTF8AndSize(str, &n);
    if (s == NULL || sft_buf_add(b, "\"", 1) < 0 || sft_buf_json_body(b, s, (size_t)n) < 0) {
        return -1;
    }
    return sft_buf_add(b, "\"", 1);
}

int
sft_write_all(int fd, const char *p, size_t n, off_t *pos)
{
    while (n > 0) {
        size_t chunk = n > ((size_t)1 << 30) ? ((size_t)1 << 30) : n;
        ssize_t w = pos ? pwrite(fd, p, chunk, *pos) : write(fd, p, chunk);
        if (w < 0) {
            if (errno == EINTR) {
                continue;
            }
            return -1;
        }
        if (w == 0) {
            errno = EIO;
            return -1;
        }
        p += w;
        n -= (size_t)w;
        if (pos) {
            *pos += w;
        }
    }
    return 0;
}

int
sft_read_all(int fd, char *p, size_t n, off_t pos)
{
    while (n > 0) {
        ssize_t r = pread(fd, p, n, pos);
        if (r < 0) {
            if (errno == EINTR) {
                continue;
            }
            return -1;
        }
        if (r == 0) {
            errno = EIO; /* the file shrank under us */
            return -1;
        }
        p += r;
        n -= (size_t)r;
        pos += r;
    }
    return 0;
}
