"""A real-model row: a quantized transformers model (>= 0.5 GB) saved and restored by
modelopt_c and by nvidia-modelopt in the same run (issue 11).

    python benchmarks/hf_model.py                 # ~3 minutes on 2 cores: 0.62 GB, 5 repetitions
    python benchmarks/hf_model.py --reps 3 --layers 4 --out DIR --scratch DIR

The model is a LlamaForCausalLM built from a config (no download: hidden 1024, 8 layers,
vocab 32000, untied embeddings; 0.62 GB of fp32 weights) and quantized with
nvidia-modelopt's INT8_DEFAULT_CFG, calibrated on random tokens.  Both libraries run in one
process (the quantization modes are nvidia-modelopt's either way); the methods take turns
in an order that rotates every repetition.  Saves: the target is removed and ``sync`` run
first (untimed), so no save pays for the previous file's blocks; nvidia-modelopt's
``mto.save`` does not fsync, so it is shown with and without an fsync afterwards (modelopt_c
fsyncs inside ``save``).  Restores: warm (the file read once, untimed), into a freshly built
model (built untimed); the logits of every restored model are checked bit-identical.
Medians [min-max]; a ratio is nvidia-modelopt's median over the other (above 1: faster).
Writes ``hf_model.md`` and ``hf_model.json`` into ``--out`` (default benchmarks/out).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

HERE = Path(__file__).resolve().parent


def build(layers: int) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=layers,
        num_attention_heads=16, num_key_value_heads=4, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _read(path: Path) -> None:
    with open(path, "rb") as f:
        while f.read(64 << 20):
            pass


def _timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def _summary(samples: list[float]) -> dict[str, float]:
    return {"median": statistics.median(samples), "min": min(samples), "max": max(samples)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--out", type=Path, default=HERE / "out")
    parser.add_argument("--scratch", type=Path, default=HERE / "out" / "scratch")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    args.scratch.mkdir(parents=True, exist_ok=True)

    import modelopt.torch.opt as nvidia
    import modelopt.torch.quantization as mtq

    import modelopt_c

    ids = torch.randint(0, 32000, (1, 16), generator=torch.Generator().manual_seed(1))
    model = build(args.layers)
    with torch.no_grad():
        model = mtq.quantize(model, mtq.INT8_DEFAULT_CFG, lambda m: m(ids))
        expected = model(ids).logits
    weight_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    print(f"model: {weight_bytes / 1e9:.3f} GB of weights, {len(model.state_dict())} tensors", file=sys.stderr)

    files = {
        "modelopt_c (torch)": args.scratch / "hf_c.pt",
        "modelopt_c (safetensors)": args.scratch / "hf_c.safetensors",
        "nvidia-modelopt": args.scratch / "hf_nvidia.pt",
        "nvidia-modelopt + fsync": args.scratch / "hf_nvidia_fsync.pt",
    }

    def save(name: str) -> None:
        path = files[name]
        if name.startswith("modelopt_c"):
            modelopt_c.save(model, path)
        else:
            nvidia.save(model, path)
            if name.endswith("fsync"):
                _fsync(path)

    restores: dict[str, Callable[[Any], Any]] = {
        "modelopt_c (torch)": lambda m: modelopt_c.restore(m, files["modelopt_c (torch)"]),
        "modelopt_c (safetensors)": lambda m: modelopt_c.restore(m, files["modelopt_c (safetensors)"]),
        "nvidia-modelopt": lambda m: nvidia.restore(m, files["nvidia-modelopt"]),
    }
    saves: dict[str, list[float]] = {name: [] for name in files}
    loads: dict[str, list[float]] = {name: [] for name in restores}
    for rep in range(args.reps):
        order = list(files)
        order = order[rep % len(order):] + order[: rep % len(order)]
        for name in order:
            files[name].unlink(missing_ok=True)
            os.sync()
            seconds, _ = _timed(lambda: save(name))
            saves[name].append(seconds)
            print(f"rep {rep} save {name}: {seconds:.3f} s", file=sys.stderr)
        order = list(restores)
        order = order[rep % len(order):] + order[: rep % len(order)]
        for name in order:
            target = build(args.layers)
            _read(files[name])
            seconds, restored = _timed(lambda: restores[name](target))
            loads[name].append(seconds)
            print(f"rep {rep} restore {name}: {seconds:.3f} s", file=sys.stderr)
            if rep == 0:
                with torch.no_grad():
                    assert torch.equal(restored(ids).logits, expected), f"{name}: the restored logits differ"
            del target, restored

    result = {
        "model": f"LlamaForCausalLM, hidden 1024, {args.layers} layers, vocab 32000, INT8_DEFAULT_CFG",
        "weight_bytes": weight_bytes,
        "reps": args.reps,
        "save": {k: {**_summary(v), "samples": v} for k, v in saves.items()},
        "restore": {k: {**_summary(v), "samples": v} for k, v in loads.items()},
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__},
        "command": "python benchmarks/hf_model.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    gb = weight_bytes / 1e9
    lines = [
        f"### Real model: {result['model']} ({gb:.2f} GB, {len(model.state_dict())} tensors)",
        "",
        f"`{result['command'].strip()}`; medians of {args.reps} [min-max]; ratio = nvidia-modelopt's median / this one.",
        "",
        "| operation | method | time (s) | GB/s | ratio |",
        "| --- | --- | --- | --- | --- |",
    ]
    for op, table, ref in (("save", saves, "nvidia-modelopt + fsync"), ("restore", loads, "nvidia-modelopt")):
        base = statistics.median(table[ref])
        for name, samples in table.items():
            s = _summary(samples)
            ratio = base / s["median"]
            lines.append(
                f"| {op} | {name} | {s['median']:.2f} [{s['min']:.2f}-{s['max']:.2f}] | {gb / s['median']:.2f} | "
                f"{ratio:.2f}x |"
            )
    lines.append("")
    lines.append("Save ratios are against nvidia-modelopt + fsync (the like-for-like figure: modelopt_c fsyncs).")
    text = "\n".join(lines)
    print(text)
    (args.out / "hf_model.md").write_text(text + "\n")
    (args.out / "hf_model.json").write_text(json.dumps(result, indent=1) + "\n")
    for path in files.values():
        path.unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
