/* The codec's wire format: one msgpack object with the extension types below, the
 * limits both directions enforce, and the big-endian loads and stores both need.
 * Shared by codec_encode.c and codec_decode.c; nothing here touches Python.
 *
 * Wire format: one msgpack object (https://github.com/msgpack/msgpack/blob/master/spec.md),
 * nothing after it.  Native msgpack types:
 *
 *   Python value          msgpack
 *   --------------------  ---------------------------------------------------------
 *   None                  nil
 *   bool                  false / true
 *   int                   smallest positive/negative fixint, uint 8-64 or int 8-64;
 *                         range -2**63 .. 2**64-1 (larger: OverflowError)
 *   float                 float 64 (the decoder also reads float 32)
 *   str                   str 8/16/32, strict UTF-8 (decoder: surrogates, overlong
 *                         forms and invalid bytes are errors)
 *   bytes, bytearray      bin 8/16/32 (decoded as bytes)
 *   list                  array
 *   dict                  map, insertion order; keys may be any encodable value
 *                         (the decoder rejects unhashable and duplicate keys)
 *
 * Extension types (msgpack ext; the type byte is the code below).  "ext32" means
 * this encoder always writes the 0xc9 form (4-byte big-endian length) for that
 * code; the decoder accepts any ext form (fixext 1/2/4/8/16, ext 8/16/32) as long
 * as the payload has the stated layout and is consumed exactly.
 *
 *   code  Python value    payload
 *   ----  --------------  ----------------------------------------------------------
 *     1   tuple           ext32; one msgpack array holding the items
 *     2   tensor (ref)    fixext 8; big-endian uint64 index into the `tensors`
 *                         sequence (encode_state(..., tensors=list) appends the tensor)
 *     3   tensor (inline) ext32; one msgpack array of 3:
 *                           [0] str: dtype name without "torch." ("bfloat16", ...)
 *                           [1] array of non-negative ints: the shape (0..64 dims, each
 *                               <= 2**63-1; written as the smallest uint form, read
 *                               from any int form)
 *                           [2] bin: the raw bytes of the contiguous CPU tensor in
 *                               C order, little-endian (the host order; big-endian
 *                               hosts are refused at build time);
 *                               length == prod(shape) * dtype.itemsize
 *                         a bool tensor's bytes must each be 0 or 1; quantized
 *                         dtypes (qint8, quint8, qint32, quint4x2, quint2x4) have
 *                         no inline form (scales are not stored; the x2/x4 ones
 *                         pack elements) and are refused both ways
 *     4   torch.Size      ext32; one msgpack array of ints
 *     5   torch.dtype     ext (fixext/ext8); the raw UTF-8 dtype name without
 *                         "torch." ("float32"), 1..64 bytes, not msgpack-framed
 *     6   torch.device    ext (fixext/ext8); the raw ASCII text of str(device)
 *                         ("cpu", "cuda:0"), 1..64 bytes, not msgpack-framed
 *     7   slice           ext32; one msgpack array of 3: [start, stop, step]
 *                         (each any encodable value, usually nil or int)
 *
 * Tensors, inline or by reference: plain torch.Tensor and nn.Parameter only, strided,
 * not meta, nested or quantized; anything else (DTensor/FSDP2 shards, other
 * subclasses, sparse...) is a TypeError naming the key path.  Lazy conj/neg bits
 * are resolved (by reference: the list gets the resolved tensor).  Every copy in
 * or out of a tensor is sized against its storage's real byte size.
 *
 * Codes 0 and 8..127 are unused; negative codes (msgpack's reserved range, e.g.
 * -1 timestamp) are rejected.  Subclasses of dict, list, tuple, str, int, float
 * and bytes are encoded as their base type (torch.Size is checked before tuple).
 * Nesting is capped at CODEC_MAX_DEPTH (256) levels of containers, counted the same
 * way both ways (a tuple, Size or slice is one level, like a list), so whatever
 * encodes also decodes. */
#ifndef MODELOPT_C_CODEC_WIRE_H
#define MODELOPT_C_CODEC_WIRE_H

#include <stdint.h>

/* Inline tensor bytes are little-endian, the host order of every platform torch ships for. */
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "the codec writes tensor bytes in host order and assumes a little-endian host"
#endif

#define CODEC_MAX_DEPTH 256 /* levels of containers, both ways */
#define CODEC_MAX_NDIM 64   /* dims of an inline tensor */
#define CODEC_MAX_NAME 64   /* bytes of a dtype or device name */

enum {
    EXT_TUPLE = 1,
    EXT_TENSOR_REF = 2,
    EXT_TENSOR = 3,
    EXT_SIZE = 4,
    EXT_DTYPE = 5,
    EXT_DEVICE = 6,
    EXT_SLICE = 7,
};

static inline uint16_t
load_be16(const unsigned char *p)
{
    return (uint16_t)(((uint16_t)p[0] << 8) | p[1]);
}

static inline uint32_t
load_be32(const unsigned char *p)
{
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | p[3];
}

static inline uint64_t
load_be64(const unsigned char *p)
{
    return ((uint64_t)load_be32(p) << 32) | load_be32(p + 4);
}

/* An unsigned big-endian value of n = 1, 2, 4 or 8 bytes. */
static inline uint64_t
load_be(const unsigned char *p, int n)
{
    return n == 1 ? p[0] : n == 2 ? load_be16(p) : n == 4 ? load_be32(p) : load_be64(p);
}

static inline void
store_be32(unsigned char *p, uint32_t v)
{
    p[0] = (unsigned char)(v >> 24);
    p[1] = (unsigned char)(v >> 16);
    p[2] = (unsigned char)(v >> 8);
    p[3] = (unsigned char)v;
}

static inline void
store_be64(unsigned char *p, uint64_t v)
{
    store_be32(p, (uint32_t)(v >> 32));
    store_be32(p + 4, (uint32_t)v);
}

#endif
