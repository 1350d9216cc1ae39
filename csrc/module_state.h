/* The per-module state of modelopt_c._conversion: every type, exception, interned
 * string and cached Python object lives here, none in C globals (multi-phase init). */
#ifndef MODELOPT_C_MODULE_STATE_H
#define MODELOPT_C_MODULE_STATE_H

#include "compat.h"
#include "errors.h"
#include "codec_module.h"
#include "checkpoint.h"
#include "safetensors.h"

typedef struct {
    PyTypeObject *StateManagerType;
    PyObject *ApplyModeError;
    PyObject *CheckpointError; /* modelopt_c.CheckpointError: a ValueError and a RuntimeError */

    /* torch objects, imported once at module exec */
    PyObject *nn_Module;      /* torch.nn.Module */
    PyObject *deepcopy;       /* copy.deepcopy */
    PyObject *deque;          /* collections.deque */

    /* modelopt_c._runtime: the callbacks below.  Imported on first use, because the
     * package imports this module before _runtime exists. */
    PyObject *runtime;

    /* interned strings */
    PyObject *s_state_key;    /* "_modelopt_state" */
    PyObject *s_version_key;  /* "_modelopt_state_version" */
    PyObject *s_modules;      /* "_modules" */
    PyObject *s_config;
    PyObject *s_metadata;
    PyObject *s_modelopt_state_dict;
    PyObject *s_modelopt_version;
    PyObject *s_modelopt_state;
    PyObject *s_config_class;
    PyObject *s_convert;
    PyObject *s_restore;
    PyObject *s_export_mode;
    PyObject *s_is_export_mode;
    PyObject *s_update_for_save;
    PyObject *s_update_for_new_mode;
    PyObject *s_save_mode_in_state;
    PyObject *s_model_dump;

    CodecState codec;         /* owned by codec_state.c */
    CheckpointState ckpt;     /* owned by checkpoint.c */
    SftState sft;             /* owned by safetensors.c */
} ModuleState;

/* The state of the module that defined `type` (for methods of our heap types). */
ModuleState *module_state_from_type(PyTypeObject *type);
/* The state of this extension module object. */
static inline ModuleState *
module_state(PyObject *module)
{
    return (ModuleState *)PyModule_GetState(module);
}

/* The callbacks: everything the C core asks Python for, each a function of
 * modelopt_c/_runtime.py (docs/ARCHITECTURE.md says why each is one).  Users extend
 * these (modes, registries, configs, model-likes, wrappers), or they introspect
 * torch modules (the load plan).  The core never calls any other Python of the
 * package: file formats and checkpoint I/O are modelopt_c/checkpoint.py's, which
 * calls the core. */
typedef enum {
    CB_AS_MODULE,           /* as_module(model): the model, or a ModelLikeModule holding its recipe */
    CB_IS_MODEL_LIKE,       /* is_model_like(model): ours or nvidia-modelopt's holder */
    CB_PREPARE_MODEL_FOR,   /* prepare_model_for(model, descriptor): holder or built model for a mode */
    CB_UNWRAP,              /* unwrap(model, how): DataParallel / DDP / FSDP */
    CB_GET_MODE_CONFIG,     /* get_mode_config(mode): the user's mode argument as [(name, config)] */
    CB_GET_FROM_ANY,        /* get_from_any(name): the descriptor, from any registry (interop too) */
    CB_GET_REGISTRY_BY_NAME,/* get_registry_by_name(name) */
    CB_STATE_VERSION,       /* state_version(): the installed nvidia-modelopt's version, else ours */
    CB_PLAN_LOAD,           /* plan_load(model, weights, source): checked copies, or None (own loading) */
    CB_ASSIGN_TENSOR,       /* assign_tensor(model, key, tensor): for meta-device models */
    CB_COUNT
} Callback;

/* Call the callback `cb` of modelopt_c._runtime with `args`; a new reference or NULL. */
PyObject *runtime_call(ModuleState *st, Callback cb, PyObject *const *args, size_t nargs);

/* Defined in state_manager.c */
extern PyType_Spec state_manager_spec;
extern PyType_Spec stream_file_spec; /* stream_file.c */
extern PyMethodDef conversion_methods[];   /* conversion.c */

/* checkpoint.c, for conversion.c.  ckpt_save_torch_file: torch.save(obj, path,
 * **kwargs) through the crash-safe writer; None.  ckpt_load_weights copies
 * `state_dict` into the model's own tensors in place (strict); `source` names the
 * file in errors; `progress` (NULL: none) is called (done_bytes, total_bytes) after
 * each tensor. */
PyObject *ckpt_save_torch_file(ModuleState *st, PyObject *path, PyObject *obj, PyObject *kwargs);
int ckpt_load_weights(ModuleState *st, PyObject *model, PyObject *state_dict, PyObject *source, PyObject *progress);

#endif
