/* The safetensors header parser (safetensors_json.h).  Every read checks p < end;
 * nothing is allocated beyond what the (capped) header bytes can hold; there is no
 * recursion.  Layout checks (sizes, overlaps, gaps) run once the whole header is read. */
#include "safetensors_json.h"
#include "safetensors_dtype.h"
#include "safetensors_error.h"

#include <string.h>

/* ------------------------------------------------------------------ lexing */

static int
sft_json_fail(SftHeader *h, const char *what)
{
    return sft_fail(h->st, h->display, "invalid header JSON at byte %zd: %s", (Py_ssize_t)(h->p - h->start), what);
}

void
sft_json_ws(SftHeader *h)
{
    while (h->p < h->end && (*h->p == ' ' || *h->p == '\t' || *h->p == '\n' || *h->p == '\r')) {
        h->p++;
    }
}

/* Skip whitespace, then: whether the next byte is `c` (consumed when it is). */
static int
sft_json_take(SftHeader *h, char c)
{
    sft_json_ws(h);
    if (h->p < h->end && *h->p == (unsigned char)c) {
        h->p++;
        return 1;
    }
    return 0;
}

static int
sft_json_expect(SftHeader *h, char c, const char *what)
{
    if (sft_json_take(h, c)) {
        return 0;
    }
    return sft_json_fail(h, h->p >= h->end ? "unexpected end of the header" : what);
}

/* After an item of a list or object: 1 on ',' (another item follows), 0 on
 * `close`, -1 (raised) on anything else. */
static int
sft_json_next(SftHeader *h, char close, const char *what)
{
    if (sft_json_take(h, ',')) {
        return 1;
    }
    return sft_json_expect(h, close, what) < 0 ? -1 : 0;
}

int
sft_hexval(unsigned char c)
{
    if (c >= '0' && c <= '9') {
        return c - '0';
    }
    if (c >= 'a' && c <= 'f') {
        return c - 'a' + 10;
    }
    if (c >= 'A' && c <= 'F') {
        return c - 'A' + 10;
    }
    return -1;
}

static int
sft_read_u4(SftHeader *h, unsigned *out)
{
    if (h->end - h->p < 4) {
        return sft_json_fail(h, "truncated \\u escape");
    }
    unsigned v = 0;
    for (int i = 0; i < 4; i++) {
        int d = sft_hexval(h->p[i]);
        if (d < 0) {
            return sft_json_fail(h, "bad \\u escape");
        }
        v = v * 16 + (unsigned)d;
    }
    h->p += 4;
    *out = v;
    return 0;
}

/* Code point cp as UTF-8 at buf + *n. */
static void
sft_utf8_put(char *buf, size_t *n, unsigned cp)
{
    if (cp < 0x80) {
        buf[(*n)++] = (char)cp;
    }
    else if (cp < 0x800) {
        buf[(*n)++] = (char)(0xC0 | (cp >> 6));
        buf[(*n)++] = (char)(0x80 | (cp & 0x3F));
    }
    else if (cp < 0x10000) {
        buf[(*n)++] = (char)(0xE0 | (cp >> 12));
        buf[(*n)++] = (char)(0x80 | ((cp >> 6) & 0x3F));
        buf[(*n)++] = (char)(0x80 | (cp & 0x3F));
    }
    else {
        buf[(*n)++] = (char)(0xF0 | (cp >> 18));
        buf[(*n)++] = (char)(0x80 | ((cp >> 12) & 0x3F));
        buf[(*n)++] = (char)(0x80 | ((cp >> 6) & 0x3F));
        buf[(*n)++] = (char)(0x80 | (cp & 0x3F));
    }
}

/* The code point of a \u escape (h->p just past the 'u'), a surrogate pair read
 * whole. */
static int
sft_json_u_escape(SftHeader *h, unsigned *out)
{
    unsigned cp = 0, lo = 0;
    if (sft_read_u4(h, &cp) < 0) {
        return -1;
    }
    if (cp >= 0xDC00 && cp <= 0xDFFF) {
        return sft_json_fail(h, "lone low surrogate in a \\u escape");
    }
    if (cp >= 0xD800 && cp <= 0xDBFF) {
        if (h->end - h->p < 2 || h->p[0] != '\\' || h->p[1] != 'u') {
            return sft_json_fail(h, "lone high surrogate in a \\u escape");
        }
        h->p += 2;
        if (sft_read_u4(h, &lo) < 0) {
            return -1;
        }
        if (lo < 0xDC00 || lo > 0xDFFF) {
            return sft_json_fail(h, "bad surrogate pair in a \\u escape");
        }
        cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
    }
    *out = cp;
    return 0;
}

/* One escape (h->p on the backslash) decoded into buf + *n. */
static int
sft_json_escape(SftHeader *h, char *buf, size_t *n)
{
    static const char plain[] = "\"\\/bfnrt", decoded[] = "\"\\/\b\f\n\r\t";
    h->p++;
    unsigned char c = *h->p++;
    const char *hit = c ? strchr(plain, c) : NULL;
    if (hit != NULL) {
        buf[(*n)++] = decoded[hit - plain];
        return 0;
    }
    if (c == 'u') {
        unsigned cp = 0;
        if (sft_json_u_escape(h, &cp) < 0) {
            return -1;
        }
        sft_utf8_put(buf, n, cp);
        return 0;
    }
    h->p--;
    return sft_json_fail(h, "bad escape in a string");
}

/* The raw text of a string, h->p just past its opening quote and q on its closing
 * one, decoded into buf (never longer than the raw text); *n its length. */
static int
sft_json_unescape(SftHeader *h, const unsigned char *q, char *buf, size_t *n)
{
    while (h->p < q) {
        unsigned char c = *h->p;
        if (c < 0x20) {
            return sft_json_fail(h, "control character in a string");
        }
        if (c != '\\') {
            buf[(*n)++] = (char)c;
            h->p++;
            continue;
        }
        if (sft_json_escape(h, buf, n) < 0) {
            return -1;
        }
        if (h->p > q) { /* an escape ran into the closing quote */
            return sft_json_fail(h, "unterminated string");
        }
    }
    return 0;
}

/* A JSON string -> new str. Escapes decoded, raw bytes strict UTF-8. */
static PyObject *
sft_json_string(SftHeader *h)
{
    char *buf = NULL;
    size_t n = 0;
    PyObject *result = NULL;
    sft_json_ws(h);
    if (h->p >= h->end || *h->p != '"') {
        sft_json_fail(h, h->p >= h->end ? "unexpected end of the header" : "expected a string");
        goto done;
    }
    h->p++;
    const unsigned char *q = h->p;
    while (q < h->end && *q != '"') {
        q += (*q == '\\' && q + 1 < h->end) ? 2 : 1;
    }
    if (q >= h->end) {
        sft_json_fail(h, "unterminated string");
        goto done;
    }
    if ((buf = PyMem_Malloc((size_t)(q - h->p) + 1)) == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    if (sft_json_unescape(h, q, buf, &n) < 0) {
        goto done;
    }
    h->p = q + 1;
    result = PyUnicode_DecodeUTF8(buf, (Py_ssize_t)n, "strict");
    if (result == NULL && PyErr_ExceptionMatches(PyExc_UnicodeDecodeError)) {
        PyErr_Clear(); /* the file's fault: said in the format's own words */
        sft_json_fail(h, "a string is not valid UTF-8");
    }
done:
    PyMem_Free(buf);
    return result;
}

/* A string that is only compared, never kept (field names, dtypes): plain
 * printable ASCII without escapes is matched in place, with no allocation;
 * anything else goes through sft_json_string (*owned holds that str). */
static int
sft_json_word(SftHeader *h, const char **s, Py_ssize_t *n, PyObject **owned)
{
    *owned = NULL;
    sft_json_ws(h);
    if (h->p < h->end && *h->p == '"') {
        const unsigned char *q = h->p + 1;
        while (q < h->end && *q != '"' && *q != '\\' && *q >= 0x20 && *q < 0x7f) {
            q++;
        }
        if (q < h->end && *q == '"') {
            *s = (const char *)h->p + 1;
            *n = (Py_ssize_t)(q - h->p - 1);
            h->p = q + 1;
            return 0;
        }
    }
    *owned = sft_json_string(h);
    if (*owned == NULL) {
        return -1;
    }
    *s = PyUnicode_AsUTF8AndSize(*owned, n);
    if (*s == NULL) {
        Py_CLEAR(*owned);
        return -1;
    }
    return 0;
}

/* The word s[0:n] as a str: `owned` when sft_json_word made one (a new reference). */
static PyObject *
sft_word_str(const char *s, Py_ssize_t n, PyObject *owned)
{
    return owned != NULL ? Py_NewRef(owned) : PyUnicode_FromStringAndSize(s, n);
}

static int
sft_word_is(const char *s, Py_ssize_t n, const char *lit)
{
    return (size_t)n == strlen(lit) && memcmp(s, lit, (size_t)n) == 0;
}

/* A non-negative JSON integer that fits in int64. */
static int
sft_json_uint(SftHeader *h, const char *what, PyObject *name, uint64_t *out)
{
    sft_json_ws(h);
    if (h->p >= h->end || *h->p < '0' || *h->p > '9') { /* a '-' too */
        return sft_fail(h->st, h->display, "tensor %R: %s must be non-negative integers", name, what);
    }
    uint64_t v = 0;
    const unsigned char *first = h->p;
    while (h->p < h->end && *h->p >= '0' && *h->p <= '9') {
        unsigned d = (unsigned)(*h->p - '0');
        if (v > ((uint64_t)INT64_MAX - d) / 10) {
            return sft_fail(h->st, h->display, "tensor %R: %s: a number over 2**63-1", name, what);
        }
        v = v * 10 + d;
        h->p++;
    }
    if (*first == '0' && h->p - first > 1) {
        return sft_json_fail(h, "leading zero in a number");
    }
    if (h->p < h->end && (*h->p == '.' || *h->p == 'e' || *h->p == 'E')) {
        return sft_fail(h->st, h->display, "tensor %R: %s must be non-negative integers", name, what);
    }
    *out = v;
    return 0;
}

/* ------------------------------------------------------------------ objects */

/* One "k": "v" pair of a str map into `dict`. */
static int
sft_json_str_pair(SftHeader *h, PyObject *dict, const char *what)
{
    PyObject *k = NULL, *v = NULL;
    int rc = -1;
    if ((k = sft_json_string(h)) == NULL || sft_json_expect(h, ':', "expected ':'") < 0) {
        goto done;
    }
    sft_json_ws(h);
    if (h->p < h->end && *h->p != '"') {
        sft_fail(h->st, h->display, "%s value of %R must be a string", what, k);
        goto done;
    }
    if ((v = sft_json_string(h)) == NULL) {
        goto done;
    }
    int dup = PyDict_Contains(dict, k);
    if (dup == 1) {
        sft_fail(h->st, h->display, "duplicate %s key %R", what, k);
    }
    if (dup == 0) {
        rc = PyDict_SetItem(dict, k, v);
    }
done:
    Py_XDECREF(k);
    Py_XDECREF(v);
    return rc;
}

int
sft_json_str_map(SftHeader *h, PyObject *dict, const char *what)
{
    if (sft_json_expect(h, '{', "expected an object") < 0) {
        return -1;
    }
    if (sft_json_take(h, '}')) {
        return 0;
    }
    int more;
    do {
        if (sft_json_str_pair(h, dict, what) < 0) {
            return -1;
        }
        more = sft_json_next(h, '}', "expected ',' or '}'");
    } while (more > 0);
    return more;
}

static int
sft_push_shape(SftHeader *h, int64_t v)
{
    if (h->nshapes == h->cap_shapes) {
        size_t cap = h->cap_shapes ? h->cap_shapes * 2 : 64;
        int64_t *s = PyMem_Realloc(h->shapes, cap * sizeof(int64_t));
        if (s == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        h->shapes = s;
        h->cap_shapes = cap;
    }
    h->shapes[h->nshapes++] = v;
    return 0;
}

static int
sft_push_entry(SftHeader *h, const SftEntry *e)
{
    if (h->nentries == h->cap_entries) {
        size_t cap = h->cap_entries ? h->cap_entries * 2 : 16;
        SftEntry *es = PyMem_Realloc(h->entries, cap * sizeof(SftEntry));
        if (es == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        h->entries = es;
        h->cap_entries = cap;
    }
    h->entries[h->nentries] = *e;
    h->entries[h->nentries++].name = Py_NewRef(e->name);
    return 0;
}

/* The fields of an entry, as bits of its `seen` mask. */
enum { SFT_DTYPE = 1, SFT_SHAPE = 2, SFT_OFFSETS = 4, SFT_ALL = 7 };

/* A field name of tensor `name`'s entry and its ':' -> its bit; an unknown or
 * repeated field is an error. */
static int
sft_json_field(SftHeader *h, PyObject *name, int seen)
{
    const char *ks;
    Py_ssize_t kn;
    PyObject *k = NULL, *key = NULL;
    int bit = -1;
    if (sft_json_word(h, &ks, &kn, &k) < 0) {
        goto done;
    }
    int b = sft_word_is(ks, kn, "dtype")          ? SFT_DTYPE
            : sft_word_is(ks, kn, "shape")        ? SFT_SHAPE
            : sft_word_is(ks, kn, "data_offsets") ? SFT_OFFSETS
                                                  : 0;
    if (b == 0 || (seen & b)) {
        if ((key = sft_word_str(ks, kn, k)) != NULL) {
            sft_fail(h->st, h->display, b ? "tensor %R: duplicate field %R" : "tensor %R: unknown field %R", name,
                     key);
        }
        goto done;
    }
    if (sft_json_expect(h, ':', "expected ':'") < 0) {
        goto done;
    }
    bit = b;
done:
    Py_XDECREF(k);
    Py_XDECREF(key);
    return bit;
}

static int
sft_json_dtype(SftHeader *h, PyObject *name, SftEntry *e)
{
    const char *ds;
    Py_ssize_t dn;
    PyObject *dt = NULL, *shown = NULL;
    int rc = -1;
    if (sft_json_word(h, &ds, &dn, &dt) < 0) {
        goto done;
    }
    e->dtype = sft_dtype_by_name(ds, (size_t)dn);
    if (e->dtype < 0) {
        if ((shown = sft_word_str(ds, dn, dt)) != NULL) {
            sft_fail(h->st, h->display, "tensor %R: unknown dtype %R", name, shown);
        }
        goto done;
    }
    rc = 0;
done:
    Py_XDECREF(dt);
    Py_XDECREF(shown);
    return rc;
}

static int
sft_json_shape(SftHeader *h, PyObject *name, SftEntry *e)
{
    sft_json_ws(h);
    if (h->p >= h->end || *h->p != '[') {
        return sft_fail(h->st, h->display, "tensor %R: shape must be a list of non-negative integers", name);
    }
    h->p++;
    if (sft_json_take(h, ']')) {
        return 0;
    }
    int more;
    do {
        uint64_t v;
        if (sft_json_uint(h, "shape entries", name, &v) < 0) {
            return -1;
        }
        if (++e->ndim > SFT_MAX_NDIM) {
            return sft_fail(h->st, h->display, "tensor %R: more than %d dimensions", name, SFT_MAX_NDIM);
        }
        if (sft_push_shape(h, (int64_t)v) < 0) {
            return -1;
        }
        more = sft_json_next(h, ']', "expected ',' or ']'");
    } while (more > 0);
    return more;
}

static int
sft_json_offsets(SftHeader *h, PyObject *name, SftEntry *e)
{
    if (sft_json_expect(h, '[', "expected '[' for data_offsets") < 0 ||
        sft_json_uint(h, "data_offsets", name, &e->begin) < 0) {
        return -1;
    }
    if (!sft_json_take(h, ',')) {
        return sft_fail(h->st, h->display, "tensor %R: data_offsets must be exactly [begin, end]", name);
    }
    if (sft_json_uint(h, "data_offsets", name, &e->end) < 0) {
        return -1;
    }
    if (!sft_json_take(h, ']')) {
        return sft_fail(h->st, h->display, "tensor %R: data_offsets must be exactly [begin, end]", name);
    }
    return 0;
}

/* {"dtype": "...", "shape": [...], "data_offsets": [b, e]} for tensor `name`. */
static int
sft_json_entry(SftHeader *h, PyObject *name)
{
    SftEntry e = {.name = name, .shape_at = h->nshapes};
    int seen = 0, more;
    sft_json_ws(h);
    if (h->p >= h->end) {
        return sft_json_fail(h, "unexpected end of the header");
    }
    if (*h->p != '{') {
        return sft_fail(h->st, h->display, "tensor %R: its entry must be an object", name);
    }
    h->p++;
    do {
        int bit = sft_json_field(h, name, seen);
        if (bit < 0) {
            return -1;
        }
        seen |= bit;
        int rc = bit == SFT_DTYPE   ? sft_json_dtype(h, name, &e)
                 : bit == SFT_SHAPE ? sft_json_shape(h, name, &e)
                                    : sft_json_offsets(h, name, &e);
        if (rc < 0) {
            return -1;
        }
        more = sft_json_next(h, '}', "expected ',' or '}'");
    } while (more > 0);
    if (more < 0) {
        return -1;
    }
    if (seen != SFT_ALL) {
        return sft_fail(h->st, h->display, "tensor %R: missing field %s", name,
                        !(seen & SFT_DTYPE)   ? "'dtype'"
                        : !(seen & SFT_SHAPE) ? "'shape'"
                                              : "'data_offsets'");
    }
    return sft_push_entry(h, &e);
}

/* One top-level "key": value: the metadata object, or a tensor entry. */
static int
sft_json_member(SftHeader *h, PyObject *metadata, int *have_meta)
{
    PyObject *k = NULL;
    int rc = -1;
    if ((k = sft_json_string(h)) == NULL || sft_json_expect(h, ':', "expected ':'") < 0) {
        goto done;
    }
    if (PyUnicode_CompareWithASCIIString(k, "__metadata__") != 0) {
        rc = sft_json_entry(h, k); /* duplicate names are found once all are read, by sorting */
        goto done;
    }
    if (*have_meta) {
        sft_fail(h->st, h->display, "duplicate key '__metadata__' in the header");
        goto done;
    }
    *have_meta = 1;
    sft_json_ws(h);
    if (h->p >= h->end || *h->p != '{') {
        sft_fail(h->st, h->display, "__metadata__ must be an object of strings");
        goto done;
    }
    rc = sft_json_str_map(h, metadata, "metadata");
done:
    Py_XDECREF(k);
    return rc;
}

/* The whole header object, and nothing after it. */
static int
sft_json_top(SftHeader *h, PyObject *metadata)
{
    int have_meta = 0, more = 0;
    if (h->p >= h->end || *h->p != '{') {
        return sft_fail(h->st, h->display, "the header is not a JSON object (it must start with '{')");
    }
    h->p++;
    if (!sft_json_take(h, '}')) {
        do {
            if (sft_json_member(h, metadata, &have_meta) < 0) {
                return -1;
            }
            more = sft_json_next(h, '}', "expected ',' or '}'");
        } while (more > 0);
    }
    if (more < 0) {
        return -1;
    }
    sft_json_ws(h);
    if (h->p != h->end) {
        return sft_json_fail(h, "trailing bytes after the header object");
    }
    return 0;
}

/* ------------------------------------------------------------------ layout */

/* The element count of entry e, or UINT64_MAX when it overflows int64 before a
 * zero dimension makes it 0 (no real span can match it). */
static uint64_t
sft_entry_numel(const SftHeader *h, const SftEntry *e)
{
    const int64_t *shape = sft_entry_dims(h, e);
    uint64_t numel = 1;
    for (int d = 0; d < e->ndim; d++) {
        uint64_t s = (uint64_t)shape[d];
        if (s != 0 && numel > (uint64_t)INT64_MAX / s) {
            return UINT64_MAX;
        }
        numel *= s;
    }
    return numel;
}

/* Each entry's offsets are ordered, inside the data section, and span exactly
 * what its shape and dtype need. */
static int
sft_check_sizes(SftHeader *h, uint64_t data_len)
{
    for (size_t i = 0; i < h->nentries; i++) {
        SftEntry *e = &h->entries[i];
        unsigned long long b = e->begin, end = e->end;
        if (e->end < e->begin) {
            return sft_fail(h->st, h->display, "tensor %R: data_offsets [%llu, %llu] end before they begin",
                            e->name, b, end);
        }
        if (e->end > data_len) {
            return sft_fail(h->st, h->display,
                            "tensor %R: data_offsets [%llu, %llu] run past the %llu-byte data section", e->name,
                            b, end, (unsigned long long)data_len);
        }
        uint64_t numel = sft_entry_numel(h, e), isz = (uint64_t)sft_dtypes[e->dtype].itemsize;
        int over = numel == UINT64_MAX || numel > (uint64_t)INT64_MAX / isz;
        if (over || numel * isz != e->end - e->begin) {
            return sft_fail(h->st, h->display,
                            "tensor %R: shape and dtype %s need %s%llu bytes but data_offsets span %llu", e->name,
                            sft_dtypes[e->dtype].name, over ? "over " : "",
                            (unsigned long long)(over ? (uint64_t)INT64_MAX : numel * isz), end - b);
        }
    }
    return 0;
}

static int
sft_cmp_entry_names(const void *a, const void *b)
{
    const SftEntry *x = *(const SftEntry *const *)a, *y = *(const SftEntry *const *)b;
    return PyUnicode_Compare(x->name, y->name); /* str vs str: cannot fail */
}

static int
sft_cmp_entry_offsets(const void *a, const void *b)
{
    const SftEntry *x = *(const SftEntry *const *)a, *y = *(const SftEntry *const *)b;
    if (x->begin != y->begin) {
        return x->begin < y->begin ? -1 : 1;
    }
    if (x->end != y->end) {
        return x->end < y->end ? -1 : 1;
    }
    return x < y ? -1 : (x > y);
}

/* `sorted` (every entry) sorted by offset: contiguous from 0, covering all. */
static int
sft_check_contiguous(SftHeader *h, SftEntry **sorted, uint64_t data_len)
{
    uint64_t at = 0;
    for (size_t i = 0; i < h->nentries; i++) {
        SftEntry *e = sorted[i];
        if (e->begin < at) {
            return sft_fail(h->st, h->display, "tensor %R: data_offsets [%llu, %llu] overlap tensor %R", e->name,
                            (unsigned long long)e->begin, (unsigned long long)e->end, sorted[i - 1]->name);
        }
        if (e->begin > at) {
            return sft_fail(h->st, h->display, "tensor %R: a gap of %llu bytes before its data_offsets [%llu, %llu]",
                            e->name, (unsigned long long)(e->begin - at), (unsigned long long)e->begin,
                            (unsigned long long)e->end);
        }
        at = e->end;
    }
    if (at != data_len) {
        return sft_fail(h->st, h->display,
                        "the data section has %llu bytes that no tensor covers (tensors end at %llu of %llu)",
                        (unsigned long long)(data_len - at), (unsigned long long)at, (unsigned long long)data_len);
    }
    return 0;
}

/* Unique names, then the layout: sorted by offset, contiguous from 0, covering all. */
static int
sft_check_layout(SftHeader *h, uint64_t data_len)
{
    int rc = -1;
    SftEntry **sorted = PyMem_Calloc(h->nentries + 1, sizeof(SftEntry *));
    if (sorted == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    for (size_t i = 0; i < h->nentries; i++) {
        sorted[i] = &h->entries[i];
    }
    /* Sorted by name, a duplicate sits next to its twin (O(n log n) time, no
     * per-name hash table). */
    qsort(sorted, h->nentries, sizeof(SftEntry *), sft_cmp_entry_names);
    for (size_t i = 1; i < h->nentries; i++) {
        if (PyUnicode_Compare(sorted[i - 1]->name, sorted[i]->name) == 0) {
            sft_fail(h->st, h->display, "duplicate tensor name %R in the header", sorted[i]->name);
            goto done;
        }
    }
    qsort(sorted, h->nentries, sizeof(SftEntry *), sft_cmp_entry_offsets);
    rc = sft_check_contiguous(h, sorted, data_len);
done:
    PyMem_Free(sorted);
    return rc;
}

int
sft_parse_header(SftHeader *h, const unsigned char *json, size_t n, uint64_t data_len, PyObject *metadata)
{
    h->start = h->p = json;
    h->end = json + n;
    if (sft_json_top(h, metadata) < 0 || sft_check_sizes(h, data_len) < 0 || sft_check_layout(h, data_len) < 0) {
        return -1;
    }
    return 0;
}

void
sft_header_clear(SftHeader *h)
{
    for (size_t i = 0; i < h->nentries; i++) {
        Py_XDECREF(h->entries[i].name);
    }
    PyMem_Free(h->entries);
    PyMem_Free(h->shapes);
    h->entries = NULL;
    h->shapes = NULL;
    h->nentries = h->nshapes = 0;
}
