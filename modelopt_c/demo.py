"""``python -m modelopt_c demo``: apply two modes, save, restore, check, with timings."""

from __future__ import annotations

import argparse
import os
import pprint
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn as nn

import modelopt_c as mto
from modelopt_c import example_modes  # noqa: F401  (registers the example modes)


class DemoNet(nn.Module):
    """A small MLP: two hidden layers with ReLUs (for swap_activation) and Linears to prune."""

    def __init__(self, width: int = 256) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(64, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU())
        self.head = nn.Linear(width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def _timed(label: str, fn: Callable[[], Any]) -> Any:
    start = time.perf_counter()
    result = fn()
    print(f"  {label:<52} {1e3 * (time.perf_counter() - start):8.2f} ms")
    return result


def main(argv: Sequence[str] | None = None) -> int:
    """Run the demo; returns 0 when the restored model matches the original."""
    parser = argparse.ArgumentParser(prog="python -m modelopt_c demo", description=__doc__)
    parser.add_argument("--width", type=int, default=256, help="hidden width of the demo model")
    parser.add_argument("--keep", metavar="DIR", help="write the checkpoints here instead of a temp folder")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    x = torch.randn(8, 64)
    print(f"modelopt_c {mto.__version__} (state layout of nvidia-modelopt {mto.MODELOPT_STATE_VERSION})\n")
    print("1. Build a model and apply two modes")
    model = DemoNet(args.width)
    model = _timed(
        "apply_mode: swap_activation(to=gelu), magnitude_prune(0.5)",
        lambda: mto.apply_mode(model, [("swap_activation", {"to": "gelu"}), ("magnitude_prune", {"sparsity": 0.5})]),
    )
    expected = model(x)
    manager = mto.ModeloptStateManager(model)
    print(f"  modes: {[str(d) for d, _, _ in manager.modes_with_states()]}; waiting for export: "
          f"{list(manager._export_stack)}")
    state = _timed("modelopt_state", lambda: mto.modelopt_state(model))
    print("\n2. The recorded state (what a checkpoint carries besides the weights)")
    print("  " + pprint.pformat(state, width=100, compact=True).replace("\n", "\n  "))

    folder = args.keep or tempfile.mkdtemp(prefix="modelopt_c_demo_")
    os.makedirs(folder, exist_ok=True)
    formats = [("torch", os.path.join(folder, "demo.pt"))]
    try:
        from modelopt_c import st_format  # noqa: F401

        formats.append(("safetensors", os.path.join(folder, "demo.safetensors")))
    except ImportError:
        pass
    ok = True
    print("\n3. Save, then restore into a fresh DemoNet")
    for fmt, path in formats:
        _timed(f"save ({fmt}) -> {os.path.basename(path)}", lambda: mto.save(model, path))
        restored = _timed(f"restore ({fmt}) into DemoNet()", lambda: mto.restore(DemoNet(args.width), path))
        same = torch.equal(restored(x), expected)
        ok &= same
        print(f"  {'outputs identical' if same else 'OUTPUTS DIFFER'}; {os.path.getsize(path) / 1e6:.2f} MB on disk; "
              f"activation is now {type(restored.body[1]).__name__}")

    print("\n4. Finish with the export mode (folds the masks into the weights)")
    model = _timed("apply_mode: magnitude_prune_export", lambda: mto.apply_mode(model, "magnitude_prune_export"))
    zeros = sum(int((m.weight == 0).sum()) for m in model.modules() if isinstance(m, nn.Linear))
    print(f"  export stack now {list(mto.ModeloptStateManager(model)._export_stack)}; {zeros} weights are zero; "
          f"outputs unchanged: {torch.equal(model(x), expected)}")
    print(f"\n{'OK' if ok else 'FAILED'}: checkpoints in {folder}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
