/* XXH64 (seed 0): the checksum the safetensors writer stores and the reader checks.
 * Pure C, no Python: streaming (init/update/digest) and one-shot, plus the
 * 16-hex-digit text form the header uses. */
#ifndef MODELOPT_C_XXH64_H
#define MODELOPT_C_XXH64_H

#include <stddef.h>
#include <stdint.h>

typedef struct {
    uint64_t v[4];
    uint64_t total;
    unsigned char buf[32];
    size_t buffered;
} Xxh64State;

void xxh64_init(Xxh64State *h);
void xxh64_update(Xxh64State *h, const void *data, size_t len);
uint64_t xxh64_digest(const Xxh64State *h);
/* The digest of data[0:len] in one call. */
uint64_t xxh64_buffer(const void *data, size_t len);
/* v as 16 lowercase hex digits (no NUL). */
void xxh64_to_hex(uint64_t v, char out[16]);

#endif
