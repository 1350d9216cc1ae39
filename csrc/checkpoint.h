/* Public face of checkpoint.c: crash-safe file replacement, in-place weight loading
 * and the safetensors-compatible format. */
#ifndef MODELOPT_C_CHECKPOINT_H
#define MODELOPT_C_CHECKPOINT_H

#include "compat.h"

typedef struct {
    PyObject *unused;
} CheckpointState;

int checkpoint_state_init(PyObject *module, CheckpointState *cs);
int checkpoint_state_traverse(CheckpointState *cs, visitproc visit, void *arg);
void checkpoint_state_clear(CheckpointState *cs);

extern PyMethodDef checkpoint_methods[];

#endif
