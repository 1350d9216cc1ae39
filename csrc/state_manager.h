/* The modelopt state manager, shared by state_manager.c (the type) and conversion.c
 * (the functions built on it).  All functions: NULL/-1 with an exception set, or a
 * value; "new" results are new references, arguments are borrowed. */
#ifndef MODELOPT_C_STATE_MANAGER_H
#define MODELOPT_C_STATE_MANAGER_H

#include "module_state.h"

typedef struct {
    PyObject_HEAD
    PyObject *state;    /* the model's _modelopt_state list itself, not a copy */
    PyObject *version;  /* the model's one-element _modelopt_state_version list */
} StateManager;

/* 1 when some module of `model` carries the state, 0 when none, -1 on error
 * (including the AssertionErrors of SPEC §5 for several states / a non-root state). */
int sm_is_converted(ModuleState *st, PyObject *model, int is_root);

/* A new manager over `model` (NULL or falsy: a fresh module), as SPEC §5's constructor. */
StateManager *sm_new(ModuleState *st, PyObject *model, int init_state);

/* A new manager over `model`, whose root is known to carry the state: sm_is_converted(st,
 * model, 1) returned 1 just before (one walk of the tree instead of two). */
StateManager *sm_of_root(ModuleState *st, PyObject *model);

/* sm_new(st, model, 1) for a model whose tree was just walked and holds no state: the
 * fresh root state needs no second walk. */
StateManager *sm_new_fresh(ModuleState *st, PyObject *model);

/* New reference to the descriptor registered as `mode` anywhere. */
PyObject *sm_descriptor(ModuleState *st, PyObject *mode);

/* New config object: descriptor(mode).config_class(**config); the mode is named on failure. */
PyObject *sm_config_object(ModuleState *st, PyObject *mode, PyObject *config);

int sm_check_mode(ModuleState *st, StateManager *sm, PyObject *mode);
int sm_add_mode(ModuleState *st, StateManager *sm, PyObject *mode, PyObject *config, PyObject *metadata);
int sm_load_state_dict(ModuleState *st, StateManager *sm, PyObject *state_dict, PyObject *version);

/* Run the last mode's `update_for_save` / `update_for_new_mode` (entry_point names it). */
int sm_update_last(ModuleState *st, StateManager *sm, PyObject *model, PyObject *entry_point);

/* Remove the state attributes from `model` (undoing a fresh state), keeping the
 * exception being raised. */
void sm_drop_state(ModuleState *st, PyObject *model);

/* Move the state list object from one model to another (SPEC §5 transfer_state_dict). */
int sm_transfer(ModuleState *st, PyObject *model_from, PyObject *model_to);


PyObject *conversion_modelopt_state_impl(ModuleState *st, PyObject *model);

#endif
