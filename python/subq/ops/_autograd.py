"""The double backward of ops whose first backward is a kernel.

Second derivatives are rare (Hessian-vector products, gradient penalties), so rather than more kernels the
backward op's own backward differentiates the plain PyTorch reference twice."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch


def grad_of_grad(reference: Callable, primals: Sequence[torch.Tensor | None],
                 cotangents: Sequence[torch.Tensor | None], wanted: Sequence[bool],
                 grad_outputs: Sequence[torch.Tensor | None]) -> list[torch.Tensor | None]:
    """The backward of ``firsts = d<reference(*primals), cotangents>/d primals``: the gradients w.r.t.
    ``(*cotangents, *primals)`` of ``Σ_i <grad_outputs[i], firsts[i]>`` over the ``wanted`` primals.

    ``reference`` returns one tensor or a tuple, one per cotangent; a None cotangent leaves its output out, and a
    None primal (an absent optional input) is passed as None. Absent inputs and unused ones get None."""
    with torch.enable_grad():
        leaves = [None if t is None else t.detach().requires_grad_() for t in primals]
        cot_leaves = [None if c is None else c.detach().requires_grad_() for c in cotangents]
        outputs = reference(*leaves)
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        used = [(o, c) for o, c in zip(outputs, cot_leaves, strict=True) if c is not None]
        picked = [(i, t) for i, t in enumerate(leaves) if t is not None and wanted[i]]
        firsts = torch.autograd.grad([o for o, _ in used], [t for _, t in picked], [c for _, c in used],
                                     create_graph=True, allow_unused=True)
        pairs = [(f, grad_outputs[i]) for f, (i, _) in zip(firsts, picked, strict=True)
                 if f is not None and grad_outputs[i] is not None]
        if not pairs:
            return [None] * len(cot_leaves + leaves)
        differentiable = [t for t in (*cot_leaves, *leaves) if t is not None]
        seconds = iter(torch.autograd.grad([f for f, _ in pairs], differentiable, [g for _, g in pairs],
                                           allow_unused=True))
    return [None if t is None else next(seconds) for t in (*cot_leaves, *leaves)]
