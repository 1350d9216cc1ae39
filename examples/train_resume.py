"""A training loop that saves a crash-safe checkpoint every few steps and resumes
from the newest one: the model with its modelopt state, plus the optimizer, the
scheduler, the step and the RNG state, in one atomically replaced file.

    python examples/train_resume.py --dir ckpts --steps 50          # kill it any time,
    python examples/train_resume.py --dir ckpts --steps 50          # run it again: it resumes

tests/test_periodic.py kills it with SIGKILL mid-run and checks that the resumed
losses are bit-identical to an uninterrupted run's.
"""

from __future__ import annotations

import argparse
import glob
import os

import torch
import torch.nn as nn

import modelopt_c as mto
import modelopt_c.example_modes  # noqa: F401  (registers swap_activation)


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Dropout(0.1), nn.Linear(32, 1))


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)  # the data depends on the step only
    x = torch.randn(64, 16, generator=g)
    return x, x.sum(dim=1, keepdim=True).sin()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dir", required=True)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--save-every", type=int, default=1)
    parser.add_argument("--log", help="append 'step loss.hex()' lines here")
    args = parser.parse_args()
    os.makedirs(args.dir, exist_ok=True)

    model = make_model()
    newest = sorted(glob.glob(os.path.join(args.dir, "ckpt-*.pt")))  # zero-padded: sorted by step
    if newest:
        model = mto.restore(model, newest[-1])  # the modes replayed, the weights copied in
    else:
        model = mto.apply_mode(model, [("swap_activation", {"to": "gelu"})])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=10, gamma=0.5)
    start = 0
    if newest:
        extra = mto.load_extra(newest[-1])
        opt.load_state_dict(extra["optimizer"])
        sched.load_state_dict(extra["scheduler"])
        torch.set_rng_state(extra["rng"])
        start = extra["step"] + 1

    log = open(args.log, "a") if args.log else None
    for step in range(start, args.steps):
        model.train()
        x, y = batch(step)
        loss = nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if log:
            log.write(f"{step} {loss.item().hex()}\n")
            log.flush()
        if (step + 1) % args.save_every == 0 or step + 1 == args.steps:
            mto.save(
                model,
                os.path.join(args.dir, f"ckpt-{step:06d}.pt"),
                extra={"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "step": step,
                       "rng": torch.get_rng_state()},
                keep_last=2,
                progress=False,
            )


if __name__ == "__main__":
    main()
