/* The safetensors-compatible checkpoint format (docs/FORMAT.md), Python face: the
 * module-state sub-struct, the functions of modelopt_c._conversion it adds, and the
 * few helpers its files share (the error of a bad file, path arguments).
 *   safetensors_dtype.c  dtype table      xxh64.c             checksum
 *   safetensors_buf.c    buffers, I/O     safetensors_json.c  header parser
 *   safetensors_write.c  writer           safetensors_read.c  reader, verify */
#ifndef MODELOPT_C_SAFETENSORS_H
#define MODELOPT_C_SAFETENSORS_H

#include "compat.h"

/* torch objects the format needs, cached at module exec (ModuleState.sft). */
typedef struct {
    PyObject *Tensor;      /* torch.Tensor */
    PyObject *Parameter;   /* torch.nn.Parameter */
    PyObject *strided;     /* torch.strided */
    PyObject *from_dlpack; /* torch.from_dlpack */
    PyObject *to_dlpack;   /* torch._C._to_dlpack: exports a CUDA tensor off the current device */
    PyObject *s_checksums;          /* "checksums" */
    PyObject *s_checksum_algorithm; /* "checksum_algorithm" */
    int noted_unpinned; /* st_write said that pinned staging buffers could not be had */
} SftState;

int sft_state_init(SftState *ss);
int sft_state_traverse(SftState *ss, visitproc visit, void *arg);
void sft_state_clear(SftState *ss);

/* st_write, st_read, st_read_header, st_xxh64 (the Python names stay). */
extern PyMethodDef sft_methods[];

/* The entry points in sft_methods, each documented there. */
PyObject *sft_write(PyObject *module, PyObject *args, PyObject *kwargs); /* safetensors_write.c */
PyObject *sft_read(PyObject *module, PyObject *args, PyObject *kwargs);  /* safetensors_read.c */
PyObject *sft_read_header(PyObject *module, PyObject *path);             /* safetensors_read.c */

#endif
