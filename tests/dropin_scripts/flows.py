"""A user script written against nvidia-modelopt's ``modelopt.torch.opt`` (run unchanged).

python flows.py OUT [OTHER]: runs a custom mode, INT8 quantization with calibration and
magnitude sparsity + export (the last two only when nvidia-modelopt is importable), writes
each checkpoint, state and output under OUT, and, given OTHER (the folder another run of
this script writes, e.g. with the switch the other way), waits for it and restores each of
its checkpoints, checking the restored model's output against the one recorded there.
tests/test_dropin_scripts.py runs it with nvidia-modelopt alone, switched to modelopt_c,
and without nvidia-modelopt.
"""

import json
import os
import subprocess
import sys
import time

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # however this script is run
from nested_equal import same  # noqa: E402

import modelopt.torch.opt as mto
from modelopt.torch.opt.config import ModeloptBaseConfig, ModeloptField
from modelopt.torch.opt.conversion import ModeloptStateManager, apply_mode, get_mode
from modelopt.torch.opt.mode import ModeDescriptor, _ModeRegistryCls

try:
    import modelopt.torch.quantization as mtq
    import modelopt.torch.sparsity as mts
except ModuleNotFoundError:
    mtq = mts = None

out = sys.argv[1]  # (re-read below, without the flags)
child_check = "--child-check" in sys.argv
args = [a for a in sys.argv[1:] if a != "--child-check"]
other = args[1] if len(args) > 1 else None
out = args[0]
os.makedirs(out, exist_ok=True)

# ---- a custom mode, ported from nvidia-modelopt by nothing at all ----
ScaleModes = _ModeRegistryCls("dropin_test_modes")


class ScaleConfig(ModeloptBaseConfig):
    factor: float = ModeloptField(2.0, description="output scale")


class Scaled(nn.Module):
    def __init__(self, inner, factor):
        super().__init__()
        self.inner, self.factor = inner, factor

    def forward(self, x):
        return self.inner(x) * self.factor


def _wrap(model, factor, names):
    for n in names:
        parent, _, child = n.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        setattr(owner, child, Scaled(getattr(owner, child), factor))
    return model


def _convert(model, config, **kw):
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    return _wrap(model, config.factor, names), {"wrapped": names}


def _restore(model, config, metadata):
    return _wrap(model, config["factor"], metadata["wrapped"])


@ScaleModes.register_mode
class ScaleMode(ModeDescriptor):
    @property
    def name(self):
        return "dropin_scale"

    @property
    def config_class(self):
        return ScaleConfig

    @property
    def convert(self):
        return _convert

    @property
    def restore(self):
        return _restore


def net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16))


torch.manual_seed(1)
x = torch.randn(8, 16)
data = [torch.randn(4, 16) for _ in range(4)]
record = {
    "switched": mto.save.__module__.startswith("modelopt_c"),
    "apply_mode": apply_mode.__module__,
    "conversion_manager": ModeloptStateManager.__module__,
    "state_key": ModeloptStateManager._state_key,
    "version_key": ModeloptStateManager._state_version_key,
    "flows": [],
}
outputs, states = {}, {}


def finish(name, model, save_kwargs=None):
    model.eval()
    with torch.no_grad():
        outputs[name] = model(x)
    states[name] = mto.modelopt_state(model)
    mto.save(model, f=os.path.join(out, name + ".pt"))  # nvidia accepts keywords
    record["flows"].append(name)


model = apply_mode(net(), mode=[("dropin_scale", {"factor": 3.0})], registry=ScaleModes)
assert isinstance(get_mode(model), ScaleMode), get_mode(model)
finish("custom", model)

if mtq is not None:
    def forward_loop(m):
        for batch in data:
            m(batch)

    model = mtq.quantize(net(), mtq.INT8_DEFAULT_CFG, forward_loop=forward_loop)
    finish("int8", model)

    model = mts.sparsify(net(), "sparse_magnitude", config={"forward_loop": forward_loop})
    sparse_out = model(x)
    model = mts.export(model)
    assert torch.equal(model(x), sparse_out)
    finish("sparse", model)

if child_check:  # a Python process this one starts: switched as well?
    code = "import modelopt.torch.opt as mto; print(mto.save.__module__)"
    record["child_save_module"] = subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True
    ).stdout.strip()

torch.save({"outputs": outputs, "states": states}, os.path.join(out, "results.pt"))
with open(os.path.join(out, "record.json"), "w") as f:
    json.dump(record, f)

if other is not None:  # restore every checkpoint the other run wrote
    done = os.path.join(other, "record.json")
    deadline = time.monotonic() + 300
    while not os.path.exists(done):
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {done}")
        time.sleep(0.2)
    time.sleep(0.2)  # the json is written last, in one call
    theirs = torch.load(os.path.join(other, "results.pt"), weights_only=False)
    checked = []
    for name in [n for n in json.load(open(done))["flows"] if n in record["flows"]]:
        model = mto.restore(net(), os.path.join(other, name + ".pt"))
        model.eval()
        with torch.no_grad():
            got = model(x)
        assert torch.equal(got, theirs["outputs"][name]), name
        assert same(mto.modelopt_state(model), theirs["states"][name]), name
        checked.append(name)
    with open(os.path.join(out, "loaded_other.json"), "w") as f:
        json.dump(checked, f)
print("flows:", record["flows"], "switched:", record["switched"])
