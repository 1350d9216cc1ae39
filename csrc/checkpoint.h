/* Public face of checkpoint.c: crash-safe file replacement and in-place weight loading. */
#ifndef MODELOPT_C_CHECKPOINT_H
#define MODELOPT_C_CHECKPOINT_H

#include "compat.h"

typedef struct {
    PyObject *torch_save;     /* torch.save */
    PyObject *s_detach;
    PyObject *to_dlpack;      /* torch._C._to_dlpack: unlike Tensor.__dlpack__, it exports a
                               * CUDA tensor that is not on the current device */
    PyObject *s_copy_;
} CheckpointState;

int checkpoint_state_init(PyObject *module, CheckpointState *cs);
int checkpoint_state_traverse(CheckpointState *cs, visitproc visit, void *arg);
void checkpoint_state_clear(CheckpointState *cs);

extern PyMethodDef checkpoint_methods[];

#endif
