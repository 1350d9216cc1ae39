"""Issue 15: the tensor-count axis of benchmarks/run.py and its report (no measuring here).

The harness itself is exercised by running it; these pin its command line, the nested
model the count axis builds, and the tables and plot the report makes from count samples.
"""

import argparse
import os
import sys

import pytest
import torch
import torch.nn as nn

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
sys.path.insert(0, BENCH)

import models  # noqa: E402
import report  # noqa: E402
import run  # noqa: E402


def test_axes_and_counts_arguments(capsys):
    assert run._axes("imports,counts") == ("counts", "imports")  # in AXES order
    assert run._axes(" sizes , counts ") == ("sizes", "counts")
    with pytest.raises(argparse.ArgumentTypeError, match=r"^unknown axis size: choose from sizes, counts, bookkeeping, "
                                                          r"imports$"):
        run._axes("size,counts")
    with pytest.raises(argparse.ArgumentTypeError, match=r"^unknown axis \(none given\)"):
        run._axes(",")
    assert run._counts("1000,10000") == (1000, 10000)
    with pytest.raises(argparse.ArgumentTypeError, match=r"^'1k': give tensor counts as integers, e\.g\. 1000,10000$"):
        run._counts("1k")
    for bad in ("1000,0", "1001", "1000,1000"):
        with pytest.raises(argparse.ArgumentTypeError, match=rf"^'{bad}': every count must be even, at least 2, and "
                                                              r"given once$"):
            run._counts(bad)
    with pytest.raises(SystemExit) as info:
        run.main(["--reps", "0"])  # refused before any process starts
    assert info.value.code == 2 and capsys.readouterr().err.endswith(": error: argument --reps: 0: give at least 1\n")
    assert run.QUICK.counts == (1000, 10000) and run.FULL.counts == (1000, 10000, 50000, 100000)


def test_count_model_is_nested_and_checkable():
    model = models.build_stack(70, 4, torch.float32, True, fanout=8)
    assert all(len(m._modules) <= 8 for m in model.modules() if isinstance(m, nn.Sequential))
    assert max(k.count(".") for k in model.state_dict()) == 3  # 70 layers -> 9 groups -> 2 -> root
    layers = models.linear_layers(model)
    assert len(layers) == 70 and len(model.state_dict()) == 140
    assert layers[69].weight[0, 0].item() == models.layer_value(69) and layers[69].bias[0].item() == -models.layer_value(69)
    models.check_stack(model)
    flat = models.build_stack(5, 4, torch.float32, True, fanout=8)  # fewer layers than the fan-out: one level
    assert list(flat.state_dict())[:2] == ["0.weight", "0.bias"]
    zeroed = models.build_stack(70, 4, torch.float32, False, fanout=8)
    with pytest.raises(AssertionError, match=r"^layer 0: restored values are wrong$"):
        models.check_stack(zeroed)


def _series(group, n, name, seconds, **extra):
    params = {"size": f"{n:,}", "tensors": n, "layers": n // 2}
    if group == "count restore":
        params["cache"] = "warm"
    samples = [{"seconds": s, **extra} for s in seconds]
    return {"group": group, "params": params, "name": name, "samples": samples, "errors": []}


def _run_info(axes):
    machine = {k: "?" for k in ("cpu", "cores", "ram_gb", "kernel", "python", "torch", "git_commit",
                                "scratch_filesystem", "date_utc")}
    return {"settings": {"mode": "quick", "reps": 2}, "page_cache": ["warm"], "machine": machine,
            "libraries": {}, "notes": [], "wall_seconds": 1.0, "axes": axes, "nvidia_max_tensors": None}


def test_report_count_tables(tmp_path):
    pytest.importorskip("matplotlib")  # the plot (and without it, a note saying so); not in the torch-matrix venvs
    nvidia, ours = "nvidia-modelopt mto.save/restore", "modelopt_c torch format"
    rss = {"rss_anon": {"extra_peak": 2_500_000}}
    series = [
        _series("count save", 1000, ours, [0.05, 0.07], fsync_seconds=0.01, file_bytes=1),
        _series("count save", 1000, nvidia, [0.1, 0.1], fsync_seconds=0.02, file_bytes=1),
        _series("count restore", 1000, ours, [0.04, 0.04], **rss),
        _series("count restore", 1000, nvidia, [0.2, 0.2], **rss),
    ]
    series.insert(2, {**_series("count restore", 1000, "torch.load(mmap=True)", []), "errors": ["OSError: gone"]})
    text = report.write_all(tmp_path, _run_info(["counts"]), series)
    assert "| 1,000 | modelopt_c torch format | 60 ms [50–70] | 70 ms | 70.0 | 1.67× / 1.71× |" in text
    assert "| 1,000 | warm | modelopt_c torch format | 40 ms [40–40] | 40.0 | 2.5 MB | 5.00× |" in text
    # run order of the parameters, then libraries.METHODS order: the failed series sits in its place
    rows = [line for line in text.splitlines() if line.startswith("| 1,000 | warm")]
    assert [r.split(" | ")[2] for r in rows] == [ours, nvidia, "torch.load(mmap=True)"]
    assert rows[2] == "| 1,000 | warm | torch.load(mmap=True) | skipped [1] | – | – | – |"
    assert "## Skipped\n\n1. OSError: gone" in text
    # only what ran has a section: no size tables, bookkeeping headline or import table
    assert [line for line in text.splitlines() if line.startswith("## ")] == [
        "## Tensor count: save", "## Tensor count: restore", "## Skipped"]
    assert (tmp_path / "results.png").stat().st_size > 0 and (tmp_path / "results.json").is_file()
