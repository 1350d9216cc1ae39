/* XXH64 (seed 0), as specified by github.com/Cyan4973/xxHash doc/xxhash_spec.md:
 * the checksum of every tensor in a safetensors file we write.  Pure C. */
#include "xxh64.h"

#include <string.h>

#define XXH_P1 11400714785074694791ULL
#define XXH_P2 14029467366897019727ULL
#define XXH_P3 1609587929392839161ULL
#define XXH_P4 9650029242287828579ULL
#define XXH_P5 2870177450012600261ULL

static inline uint64_t
xxh_rotl(uint64_t x, int r)
{
    return (x << r) | (x >> (64 - r));
}

static inline uint64_t
xxh_read64(const unsigned char *p)
{
    uint64_t v;
    memcpy(&v, p, 8);
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    v = __builtin_bswap64(v);
#endif
    return v;
}

static inline uint64_t
xxh_read32(const unsigned char *p)
{
    uint32_t v;
    memcpy(&v, p, 4);
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    v = __builtin_bswap32(v);
#endif
    return v;
}

static inline uint64_t
xxh_round(uint64_t acc, uint64_t input)
{
    acc += input * XXH_P2;
    acc = xxh_rotl(acc, 31);
    return acc * XXH_P1;
}

static inline uint64_t
xxh_merge(uint64_t acc, uint64_t val)
{
    acc ^= xxh_round(0, val);
    return acc * XXH_P1 + XXH_P4;
}

void
xxh64_init(Xxh64State *h)
{
    h->v[0] = XXH_P1 + XXH_P2;
    h->v[1] = XXH_P2;
    h->v[2] = 0;
    h->v[3] = (uint64_t)0 - XXH_P1;
    h->total = 0;
    h->buffered = 0;
}

static void
xxh64_stripes(Xxh64State *h, const unsigned char *p, size_t nstripes)
{
    uint64_t v0 = h->v[0], v1 = h->v[1], v2 = h->v[2], v3 = h->v[3];
    for (size_t i = 0; i < nstripes; i++, p += 32) {
        v0 = xxh_round(v0, xxh_read64(p));
        v1 = xxh_round(v1, xxh_read64(p + 8));
        v2 = xxh_round(v2, xxh_read64(p + 16));
        v3 = xxh_round(v3, xxh_read64(p + 24));
    }
    h->v[0] = v0, h->v[1] = v1, h->v[2] = v2, h->v[3] = v3;
}

void
xxh64_update(Xxh64State *h, const void *data, size_t len)
{
    const unsigned char *p = data;
    h->total += len;
    if (h->buffered + len < 32) {
        if (len) {
            memcpy(h->buf + h->buffered, p, len);
        }
        h->buffered += len;
        return;
    }
    if (h->buffered) {
        size_t fill = 32 - h->buffered;
        memcpy(h->buf + h->buffered, p, fill);
        xxh64_stripes(h, h->buf, 1);
        p += fill;
        len -= fill;
        h->buffered = 0;
    }
    xxh64_stripes(h, p, len / 32);
    p += len / 32 * 32;
    len %= 32;
    memcpy(h->buf, p, len);
    h->buffered = len;
}

uint64_t
xxh64_digest(const Xxh64State *h)
{
    uint64_t acc;
    if (h->total >= 32) {
        acc = xxh_rotl(h->v[0], 1) + xxh_rotl(h->v[1], 7) + xxh_rotl(h->v[2], 12) + xxh_rotl(h->v[3], 18);
        for (int i = 0; i < 4; i++) {
            acc = xxh_merge(acc, h->v[i]);
        }
    }
    else {
        acc = XXH_P5;
    }
    acc += h->total;
    const unsigned char *p = h->buf;
    size_t n = h->buffered;
    for (; n >= 8; n -= 8, p += 8) {
        acc ^= xxh_round(0, xxh_read64(p));
        acc = xxh_rotl(acc, 27) * XXH_P1 + XXH_P4;
    }
    if (n >= 4) {
        acc ^= xxh_read32(p) * XXH_P1;
        acc = xxh_rotl(acc, 23) * XXH_P2 + XXH_P3;
        n -= 4, p += 4;
    }
    for (; n > 0; n--, p++) {
        acc ^= (uint64_t)*p * XXH_P5;
        acc = xxh_rotl(acc, 11) * XXH_P1;
    }
    acc ^= acc >> 33;
    acc *= XXH_P2;
    acc ^= acc >> 29;
    acc *= XXH_P3;
    acc ^= acc >> 32;
    return acc;
}

uint64_t
xxh64_buffer(const void *data, size_t len)
{
    Xxh64State h;
    xxh64_init(&h);
    xxh64_update(&h, data, len);
    return xxh64_digest(&h);
}

void
xxh64_to_hex(uint64_t v, char out[16])
{
    static const char digits[] = "0123456789abcdef";
    for (int i = 15; i >= 0; i--, v >>= 4) {
        out[i] = digits[v & 15];
    }
}
