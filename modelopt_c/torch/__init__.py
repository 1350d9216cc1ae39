"""Namespace that mirrors ``modelopt.torch`` so ``import modelopt_c.torch.opt as mto`` works."""
