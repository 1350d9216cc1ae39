"""Leak loops over save/restore (paths and file objects; success and error paths),
each measured against the same torch.save/torch.load calls without modelopt_c.
Run by tests/test_isolated.py: python tests/isolated/leaks_checkpoints.py TMPDIR"""

import io
import os
import sys

from _leakcheck import expect, leak_check

import torch
import torch.nn as nn

import modelopt_c as mto
from modelopt_c import _conversion
from modes import TinyNet, facade, register

MODES = register(facade("modelopt_c"))  # keep the registry alive
tmp = sys.argv[1]

# success paths
path = os.path.join(tmp, "c.pt")
base = mto.apply_mode(TinyNet(), ["t_replace", ("t_sparse", {"sparsity": 0.5})])
state = mto.modelopt_state(base)
mto.save(base, path)
ckpt = {"modelopt_state": state, "model_state_dict": base.state_dict()}
leak_check("save", lambda: mto.save(base, path), rounds=250, baseline=lambda: torch.save(ckpt, path + ".t"))
leak_check("restore", lambda: mto.restore(TinyNet(), path), rounds=250,
           baseline=lambda: torch.load(path, mmap=True, weights_only=True))
buf = io.BytesIO()


def save_restore_buffer():
    buf.seek(0)
    mto.save(base, buf)
    buf.seek(0)
    mto.restore(TinyNet(), buf)


def torch_buffer():
    buf.seek(0)
    torch.save(ckpt, buf)
    buf.seek(0)
    torch.load(buf, weights_only=True)


leak_check("file objects", save_restore_buffer, rounds=250, baseline=torch_buffer)

# error paths
bad = os.path.join(tmp, "bad.pt")
with open(bad, "wb") as f:
    f.write(b"not a checkpoint")
leak_check("not a checkpoint", lambda: expect(ValueError, mto.restore, TinyNet(), bad), rounds=250)
good = os.path.join(tmp, "good.pt")
mto.save(TinyNet(), good)
leak_check("wrong arch", lambda: expect(RuntimeError, mto.restore, nn.Linear(1, 1), good), rounds=250,
           baseline=lambda: torch.load(good, mmap=True, weights_only=True))
leak_check("missing dir", lambda: expect(FileNotFoundError, mto.save, TinyNet(), os.path.join(tmp, "no", "x.pt")))

# the progress hooks of the native writer and loader (success and a raising hook)
leak_check("save with progress", lambda: mto.save(base, path, progress=lambda d, t: None), rounds=250,
           baseline=lambda: torch.save(ckpt, path + ".t"))
leak_check("restore with progress", lambda: mto.restore(TinyNet(), path, progress=lambda d, t: None), rounds=250,
           baseline=lambda: torch.load(path, mmap=True, weights_only=True))


def refuse(*args):
    raise KeyError("stop")


leak_check("started hook raises", lambda: expect(KeyError, _conversion._save_torch_file, path, ckpt,
                                                  _started=refuse), rounds=250)
leak_check("progress hook raises", lambda: expect(KeyError, mto.restore, TinyNet(), path, progress=refuse),
           rounds=250, baseline=lambda: torch.load(path, mmap=True, weights_only=True))
