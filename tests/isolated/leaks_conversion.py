"""Leak loops over the state manager and the conversion entry points (apply_mode,
modelopt_state, get_mode, restore_from_modelopt_state), success and error paths.
Run by tests/test_isolated.py: python tests/isolated/leaks_conversion.py TMPDIR"""

from _leakcheck import expect, leak_check

import modelopt_c as mto
from modes import TinyNet, facade, register

MODES = register(facade("modelopt_c"))  # keep the registry alive
SM = mto.ModeloptStateManager

# success paths
base = mto.apply_mode(TinyNet(), ["t_replace", ("t_sparse", {"sparsity": 0.5})])
state = mto.modelopt_state(base)


def manager():
    m = TinyNet()
    sm = SM(m, init_state=True)
    sm.add_mode("t_update", SM.get_config_class("t_update", {}), {})
    sm.check_mode("t_replace")
    sm.update_last_state_before_save(m)
    sm.update_last_state_before_new_mode(m)
    list(sm.modes_with_states())
    sm.last_mode, sm._export_stack, sm.has_state, sm.state_version, sm.state_dict()
    SM.is_converted(m, is_root=True)
    SM.has_state_for_mode_type("t_modes", model=m)
    other = TinyNet()
    SM.transfer_state_dict(m, other)
    SM.remove_state(other)


leak_check("manager", manager)
leak_check("apply_mode", lambda: mto.apply_mode(TinyNet(), ["t_update", "t_replace"], mode_kwargs={"a": 1}))
leak_check("modelopt_state", lambda: mto.modelopt_state(base))
leak_check("get_mode", lambda: mto.get_mode(base))
leak_check("restore_from_modelopt_state", lambda: mto.restore_from_modelopt_state(TinyNet(), state))

# error paths
converted = mto.apply_mode(TinyNet(), "t_update")
leak_check("unknown mode", lambda: expect(KeyError, mto.apply_mode, TinyNet(), "nope_mode_q"))
leak_check("bad config", lambda: expect(Exception, mto.apply_mode, TinyNet(), [("t_sparse", {"sparsity": 9})]))
leak_check("bad convert", lambda: expect(TypeError, mto.apply_mode, TinyNet(), "t_bad_convert"))
leak_check("order", lambda: expect(AssertionError, mto.apply_mode, TinyNet(), "t_sparse_export"))
leak_check("init twice", lambda: expect(AssertionError, SM, converted, init_state=True))
leak_check("malformed", lambda: expect(ValueError, SM(init_state=True).load_state_dict, ["x"]))
