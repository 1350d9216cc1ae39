/* The safetensors reader (st_read, st_read_header): opens the file, reads and
 * validates its header (safetensors_json.c), maps the file copy-on-write and makes
 * zero-copy tensors over the mapping; st_read(verify=True) first checks every
 * tensor's XXH64 against the header, hashing on several threads. */
#include "safetensors.h"
#include "safetensors_buf.h"
#include "safetensors_dtype.h"
#include "safetensors_error.h"
#include "safetensors_json.h"
#include "aten_bridge.h"
#include "xxh64.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

/* ------------------------------------------------------------------ the header */

/* fd's size, refusing anything but a regular file long enough for the length prefix. */
static int
sft_file_size(ModuleState *st, PyObject *display, int fd, uint64_t *size)
{
    struct stat stt;
    if (fstat(fd, &stt) < 0) {
        PyErr_SetFromErrnoWithFilenameObject(PyExc_OSError, display);
        return -1;
    }
    if (!S_ISREG(stt.st_mode)) {
        return sft_fail(st, display, "not a regular file");
    }
    *size = (uint64_t)stt.st_size;
    if (*size < 8) {
        return sft_fail(st, display, "the file is %llu bytes, too short for the 8-byte header length",
                        (unsigned long long)*size);
    }
    return 0;
}

/* The header length from the 8-byte prefix, checked against the cap and the file. */
static int
sft_header_length(ModuleState *st, PyObject *display, int fd, uint64_t size, uint64_t *n)
{
    unsigned char len8[8];
    if (sft_read_all(fd, (char *)len8, 8, 0) < 0) {
        PyErr_SetFromErrnoWithFilenameObject(PyExc_OSError, display);
        return -1;
    }
    *n = 0;
    for (int i = 7; i >= 0; i--) {
        *n = (*n << 8) | len8[i];
    }
    if (*n > SFT_MAX_HEADER) {
        return sft_fail(st, display, "header length %llu is over the %llu-byte limit", (unsigned long long)*n,
                        (unsigned long long)SFT_MAX_HEADER);
    }
    if (*n > size - 8) {
        return sft_fail(st, display, "header length %llu runs past the end of the file (%llu bytes)",
                        (unsigned long long)*n, (unsigned long long)size);
    }
    return 0;
}

/* Read the n header bytes of fd and parse them into h and `metadata`. */
static int
sft_header_parse_fd(SftHeader *h, int fd, uint64_t n, uint64_t size, PyObject *metadata)
{
    int r, saved_errno = 0, rc = -1;
    unsigned char *json = PyMem_Malloc(n ? (size_t)n : 1);
    if (json == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    Py_BEGIN_ALLOW_THREADS
    r = sft_read_all(fd, (char *)json, (size_t)n, 8);
    saved_errno = errno;
    Py_END_ALLOW_THREADS
    if (r < 0) {
        sft_os_error(h->display, saved_errno);
        goto done;
    }
    rc = sft_parse_header(h, json, (size_t)n, size - 8 - n, metadata);
done:
    PyMem_Free(json);
    return rc;
}

/* Open `fsbytes`, read and validate its header into h (h->st, h->display set).
 * On success *fd_out is the open file (when fd_out is not NULL), *hdr_len the
 * header's byte length, *size the file size. */
static int
sft_load_header(SftHeader *h, PyObject *fsbytes, PyObject *metadata, int *fd_out, uint64_t *hdr_len,
                uint64_t *size)
{
    int rc = -1;
    int fd = open(PyBytes_AS_STRING(fsbytes), O_RDONLY | O_CLOEXEC | O_NONBLOCK);
    if (fd < 0) {
        PyErr_SetFromErrnoWithFilenameObject(PyExc_OSError, h->display);
        goto done;
    }
    if (sft_file_size(h->st, h->display, fd, size) < 0 ||
        sft_header_length(h->st, h->display, fd, *size, hdr_len) < 0 ||
        sft_header_parse_fd(h, fd, *hdr_len, *size, metadata) < 0) {
        goto done;
    }
    rc = 0;
done:
    if (fd >= 0 && (rc < 0 || fd_out == NULL)) {
        close(fd);
    }
    else if (fd_out != NULL) {
        *fd_out = fd;
    }
    return rc;
}

/* ------------------------------------------------------------------ tensors */

typedef struct {
    atomic_long refs;
    void *addr;
    size_t len;
} SftMap;

/* Runs when the last tensor over the mapping goes; no Python, maybe no GIL. */
static void
sft_map_release(void *ctx)
{
    SftMap *m = ctx;
    if (atomic_fetch_sub(&m->refs, 1) == 1) {
        munmap(m->addr, m->len);
        free(m);
    }
}

/* The whole file mapped copy-on-write, one reference held by the caller. */
static SftMap *
sft_map_file(PyObject *display, int fd, uint64_t size)
{
    SftMap *map = malloc(sizeof(SftMap));
    if (map == NULL) {
        PyErr_NoMemory();
        return NULL;
    }
    atomic_init(&map->refs, 1);
    map->len = (size_t)size;
    map->addr = mmap(NULL, map->len, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0);
    if (map->addr == MAP_FAILED) {
        free(map);
        PyErr_SetFromErrnoWithFilenameObject(PyExc_OSError, display);
        return NULL;
    }
    return map;
}

static void
sft_dlpack_capsule_destructor(PyObject *cap)
{
    if (PyCapsule_IsValid(cap, "dltensor")) {
        atb_dlpack_free(PyCapsule_GetPointer(cap, "dltensor"));
    }
}

/* A torch.Tensor (new reference) for entry `e` over the mapping. */
static PyObject *
sft_make_tensor(SftMap *map, const SftHeader *h, const SftEntry *e, char *data, PyObject *from_dlpack)
{
    AtbTensor *t = NULL, *copy = NULL;
    AtbError err;
    void *dlm = NULL;
    PyObject *cap = NULL, *result = NULL;
    char *ptr = data + e->begin;

    atomic_fetch_add(&map->refs, 1);
    if (atb_from_blob(ptr, sft_dtypes[e->dtype].code, sft_entry_dims(h, e), e->ndim, sft_map_release, map, &t,
                      &err) < 0) {
        /* The bridge's contract: on failure it has not called (and never will call)
         * sft_map_release, so the reference taken above is still ours to drop. */
        sft_map_release(map);
        sft_fail(h->st, h->display, "tensor %R: its shape cannot be made into a tensor (%s)", e->name, err.msg);
        goto done;
    }
    if ((uintptr_t)ptr % (uintptr_t)sft_dtypes[e->dtype].itemsize != 0) {
        /* Misaligned in a foreign file: give this one tensor its own memory. */
        if (atb_clone(t, &copy, &err) < 0) {
            sft_fail(h->st, h->display, "tensor %R: %s", e->name, err.msg);
            goto done;
        }
        atb_free(t);
        t = copy;
        copy = NULL;
    }
    if (atb_to_dlpack(t, &dlm, &err) < 0) {
        sft_fail(h->st, h->display, "tensor %R: %s", e->name, err.msg);
        goto done;
    }
    cap = PyCapsule_New(dlm, "dltensor", sft_dlpack_capsule_destructor);
    if (cap == NULL) {
        atb_dlpack_free(dlm);
        goto done;
    }
    result = PyObject_CallOneArg(from_dlpack, cap);
done:
    Py_XDECREF(cap);
    if (t != NULL) {
        atb_free(t);
    }
    return result;
}

/* ------------------------------------------------------------------ verify */

/* The hash pass of sft_verify, on up to SFT_HASH_THREADS threads when there is
 * enough data: each takes the next unhashed tensor (one tensor is hashed by one
 * thread, XXH64 being sequential). No Python, called without the GIL. */
#define SFT_HASH_THREADS 8
#define SFT_HASH_PARALLEL_MIN ((uint64_t)64 << 20)

typedef struct {
    const SftHeader *h;
    const char *data;
    uint64_t *actual;
    atomic_size_t next;
} SftHashJob;

static void *
sft_hash_worker(void *arg)
{
    SftHashJob *job = arg;
    for (;;) {
        size_t i = atomic_fetch_add(&job->next, 1);
        if (i >= job->h->nentries) {
            return NULL;
        }
        const SftEntry *e = &job->h->entries[i];
        job->actual[i] = xxh64_buffer(job->data + e->begin, (size_t)(e->end - e->begin));
    }
}

/* How many threads hash: one for little data or when one tensor is nearly
 * everything (threads buy nothing), else up to the CPUs. */
static int
sft_hash_threads(const SftHeader *h)
{
    uint64_t total = 0, biggest = 0;
    for (size_t i = 0; i < h->nentries; i++) {
        uint64_t n = h->entries[i].end - h->entries[i].begin;
        total += n;
        biggest = n > biggest ? n : biggest;
    }
    if (total < SFT_HASH_PARALLEL_MIN || total - biggest < SFT_HASH_PARALLEL_MIN / 2 || h->nentries < 2) {
        return 1;
    }
    long cpus = sysconf(_SC_NPROCESSORS_ONLN);
    return cpus > 1 ? (int)(cpus < SFT_HASH_THREADS ? cpus : SFT_HASH_THREADS) : 1;
}

static void
sft_hash_all(const SftHeader *h, const char *data, uint64_t *actual)
{
    SftHashJob job = {.h = h, .data = data, .actual = actual};
    atomic_init(&job.next, 0);
    pthread_t threads[SFT_HASH_THREADS];
    int started = 0, want = sft_hash_threads(h);
    for (int t = 1; t < want; t++) { /* this thread is worker 0 */
        if (pthread_create(&threads[started], NULL, sft_hash_worker, &job) != 0) {
            break; /* fewer helpers; the work still gets done */
        }
        started++;
    }
    sft_hash_worker(&job);
    for (int t = 0; t < started; t++) {
        pthread_join(threads[t], NULL);
    }
}

/* The 'checksums' metadata (a JSON object in a string) into `sums`, after the
 * algorithm is checked; one entry per tensor of the file. */
static int
sft_checksum_map(SftHeader *h, PyObject *metadata, PyObject *sums)
{
    PyObject *algo = NULL, *text = NULL;
    SftHeader sub = {.st = h->st, .display = h->display};
    int rc = -1;
    if (PyDict_GetItemRef(metadata, h->st->sft.s_checksums, &text) < 0 ||
        PyDict_GetItemRef(metadata, h->st->sft.s_checksum_algorithm, &algo) < 0) {
        goto done;
    }
    if (text == NULL) {
        sft_fail(h->st, h->display, "no checksums to verify (the metadata has no 'checksums')");
        goto done;
    }
    if (algo == NULL || PyUnicode_CompareWithASCIIString(algo, "xxh64") != 0) {
        sft_fail(h->st, h->display, "unsupported checksum_algorithm %R (this build checks 'xxh64')",
                 algo ? algo : Py_None);
        goto done;
    }
    Py_ssize_t n;
    const char *s = PyUnicode_AsUTF8AndSize(text, &n);
    if (s == NULL) {
        goto done;
    }
    sub.start = sub.p = (const unsigned char *)s;
    sub.end = sub.start + n;
    if (sft_json_str_map(&sub, sums, "checksums") < 0) {
        sft_rewrap(h->st, h->display, "the 'checksums' metadata is malformed");
        goto done;
    }
    sft_json_ws(&sub);
    if (sub.p != sub.end) {
        sft_fail(h->st, h->display, "the 'checksums' metadata has trailing bytes");
        goto done;
    }
    if ((size_t)PyDict_GET_SIZE(sums) != h->nentries) {
        sft_fail(h->st, h->display, "the 'checksums' metadata lists %zd tensors but the file has %zu",
                 PyDict_GET_SIZE(sums), h->nentries);
        goto done;
    }
    rc = 0;
done:
    Py_XDECREF(algo);
    Py_XDECREF(text);
    return rc;
}

/* Entry i's stored digest: sums[name], 16 hex digits. */
static int
sft_expected_digest(SftHeader *h, PyObject *sums, size_t i, uint64_t *out)
{
    PyObject *value = NULL;
    int rc = -1;
    if (PyDict_GetItemRef(sums, h->entries[i].name, &value) < 0) {
        goto done;
    }
    if (value == NULL) {
        sft_fail(h->st, h->display, "tensor %R has no checksum", h->entries[i].name);
        goto done;
    }
    Py_ssize_t vn;
    const char *v = PyUnicode_AsUTF8AndSize(value, &vn);
    if (v == NULL) {
        goto done;
    }
    uint64_t x = 0;
    for (Py_ssize_t k = 0; k < vn && vn == 16; k++) {
        int d = sft_hexval((unsigned char)v[k]);
        if (d < 0) {
            vn = -1;
        }
        x = (x << 4) | (uint64_t)(d < 0 ? 0 : d);
    }
    if (vn != 16) {
        sft_fail(h->st, h->display, "tensor %R: checksum %R is not 16 hex digits", h->entries[i].name, value);
        goto done;
    }
    *out = x;
    rc = 0;
done:
    Py_XDECREF(value);
    return rc;
}

/* Check the stored checksums of every entry against the mapped bytes. */
static int
sft_verify(SftHeader *h, PyObject *metadata, const char *data)
{
    PyObject *sums = NULL;
    uint64_t *expected = NULL, *actual = NULL;
    int rc = -1;
    if ((sums = PyDict_New()) == NULL || sft_checksum_map(h, metadata, sums) < 0) {
        goto done;
    }
    expected = PyMem_Calloc(h->nentries + 1, sizeof(uint64_t));
    actual = PyMem_Calloc(h->nentries + 1, sizeof(uint64_t));
    if (expected == NULL || actual == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    for (size_t i = 0; i < h->nentries; i++) {
        if (sft_expected_digest(h, sums, i, &expected[i]) < 0) {
            goto done;
        }
    }
    Py_BEGIN_ALLOW_THREADS
    sft_hash_all(h, data, actual);
    Py_END_ALLOW_THREADS
    for (size_t i = 0; i < h->nentries; i++) {
        if (actual[i] != expected[i]) {
            char a[17] = {0}, b[17] = {0};
            xxh64_to_hex(expected[i], a);
            xxh64_to_hex(actual[i], b);
            sft_fail(h->st, h->display,
                     "tensor %R: checksum mismatch (stored xxh64 %s, data has %s): the file is corrupt",
                     h->entries[i].name, a, b);
            goto done;
        }
    }
    rc = 0;
done:
    Py_XDECREF(sums);
    PyMem_Free(expected);
    PyMem_Free(actual);
    return rc;
}

/* ------------------------------------------------------------------ entry points */

/* Every entry as a tensor over `map` into `tensors`, in header order. */
static int
sft_make_tensors(SftHeader *h, SftMap *map, char *data, PyObject *tensors)
{
    for (size_t i = 0; i < h->nentries; i++) {
        PyObject *t = sft_make_tensor(map, h, &h->entries[i], data, h->st->sft.from_dlpack);
        int rc = t == NULL ? -1 : PyDict_SetItem(tensors, h->entries[i].name, t);
        Py_XDECREF(t);
        if (rc < 0) {
            return -1;
        }
    }
    return 0;
}

/* What st_read and st_read_header hold: the path, the parsed header, the two dicts. */
typedef struct {
    SftHeader h;
    PyObject *fsbytes, *display, *metadata, *tensors;
    uint64_t hdr_len, size;
} SftReadCall;

/* The path, then the file's header read and validated into c (and the open file
 * into *fd_out when it is not NULL).  sft_read_end releases c on every path. */
static int
sft_read_begin(SftReadCall *c, PyObject *module, PyObject *path, int *fd_out)
{
    c->h.st = module_state(module);
    if (sft_path_args(path, &c->fsbytes, &c->display) < 0) {
        return -1;
    }
    c->h.display = c->display;
    if ((c->metadata = PyDict_New()) == NULL || (c->tensors = PyDict_New()) == NULL) {
        return -1;
    }
    return sft_load_header(&c->h, c->fsbytes, c->metadata, fd_out, &c->hdr_len, &c->size);
}

static void
sft_read_end(SftReadCall *c)
{
    sft_header_clear(&c->h);
    Py_XDECREF(c->fsbytes);
    Py_XDECREF(c->display);
    Py_XDECREF(c->metadata);
    Py_XDECREF(c->tensors);
}

PyObject *
sft_read(PyObject *module, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"path", "verify", "_verify_if_present", NULL};
    PyObject *path = NULL, *result = NULL;
    int verify = 0, if_present = 0, fd = -1;
    SftReadCall c = {0};
    SftMap *map = NULL;

    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "O|$pp:st_read", kwlist, &path, &verify, &if_present) ||
        sft_read_begin(&c, module, path, &fd) < 0 || (map = sft_map_file(c.display, fd, c.size)) == NULL) {
        goto done;
    }
    close(fd);
    fd = -1;
    char *data = (char *)map->addr + 8 + c.hdr_len;
    if (verify && if_present) {
        /* metadata holds only str: the lookup cannot fail */
        verify = PyDict_GetItemWithError(c.metadata, c.h.st->sft.s_checksums) != NULL;
    }
    if ((verify && sft_verify(&c.h, c.metadata, data) < 0) || sft_make_tensors(&c.h, map, data, c.tensors) < 0) {
        goto done;
    }
    result = PyTuple_Pack(2, c.metadata, c.tensors);
done:
    if (fd >= 0) {
        close(fd);
    }
    if (map != NULL) {
        sft_map_release(map);
    }
    sft_read_end(&c);
    return result;
}

/* name -> (dtype, shape, begin, end) for every entry, into `tensors`. */
static int
sft_describe_entries(const SftHeader *h, PyObject *tensors)
{
    PyObject *shape = NULL, *info = NULL;
    int rc = -1;
    for (size_t i = 0; i < h->nentries; i++) {
        const SftEntry *e = &h->entries[i];
        if ((shape = PyTuple_New(e->ndim)) == NULL) {
            goto done;
        }
        const int64_t *dims = sft_entry_dims(h, e);
        for (int d = 0; d < e->ndim; d++) {
            PyObject *v = PyLong_FromLongLong(dims[d]);
            if (v == NULL) {
                goto done;
            }
            PyTuple_SET_ITEM(shape, d, v);
        }
        info = Py_BuildValue("(sOKK)", sft_dtypes[e->dtype].name, shape, (unsigned long long)e->begin,
                             (unsigned long long)e->end);
        if (info == NULL || PyDict_SetItem(tensors, e->name, info) < 0) {
            goto done;
        }
        Py_CLEAR(shape);
        Py_CLEAR(info);
    }
    rc = 0;
done:
    Py_XDECREF(shape);
    Py_XDECREF(info);
    return rc;
}

PyObject *
sft_read_header(PyObject *module, PyObject *path)
{
    PyObject *result = NULL;
    SftReadCall c = {0};
    if (sft_read_begin(&c, module, path, NULL) < 0 || sft_describe_entries(&c.h, c.tensors) < 0) {
        goto done;
    }
    result = Py_BuildValue("(OOK)", c.metadata, c.tensors, (unsigned long long)(8 + c.hdr_len));
done:
    sft_read_end(&c);
    return result;
}
