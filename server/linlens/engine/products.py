"""Products with a Jacobian that is never built: batched VJPs and JVPs on one retained autograd graph.

For an output ``out`` (d_out numbers) computed from a tensor ``inp`` of the linear twin's graph, the Jacobian
M = d out / d inp is exactly linear (every coefficient is frozen), and

- ``vjp(U)`` returns U M (rows u^T M) for a batch of cotangents: one batched backward (``is_grads_batched``);
- ``jvp(V)`` returns M v for a batch of tangents, by the double-backward trick: g(u) = M^T u is computed once as a
  differentiable function of a dummy u (``create_graph``), and M v is the gradient of g . v with respect to u, again
  one batched backward on the same graph.

What costs is the number of backward passes over the network, not the number of products in a batch, so every
caller hands over whole blocks. Batches are split into chunks of at most ``chunk`` products to bound peak memory.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

ShouldStop = Callable[[], bool]


class GraphProducts:
    """Batched products with d out / d inp on the graph that computed ``out`` from ``inp`` (kept alive)."""

    def __init__(self, out: torch.Tensor, inp: torch.Tensor, *, chunk: int, seed: torch.Tensor | None = None) -> None:
        if out.dim() != 1:
            raise ValueError(f"the output must be a vector, not shape {tuple(out.shape)}")
        self.out = out
        self.inp = inp
        self.chunk = max(1, chunk)
        #: The value of the dummy cotangent u: any value serves the JVPs (g is linear in u), so a caller that also
        #: wants u^T M for one u passes it and reads :meth:`transposed`.
        self._seed = seed
        self._dummy: torch.Tensor | None = None
        self._transposed: torch.Tensor | None = None
        #: Products computed so far (each column of a batch counts as one).
        self.vjps = 0
        self.jvps = 0

    @property
    def out_dim(self) -> int:
        return int(self.out.shape[0])

    def vjp(self, cotangents: torch.Tensor) -> torch.Tensor:
        """(b, d_out) -> (b, *inp.shape): the rows u^T M."""
        parts = []
        for start in range(0, cotangents.shape[0], self.chunk):
            block = cotangents[start : start + self.chunk].to(self.out.dtype)
            with torch.enable_grad():
                (rows,) = torch.autograd.grad(
                    self.out, self.inp, grad_outputs=block, is_grads_batched=True, retain_graph=True
                )
            parts.append(rows)
        self.vjps += int(cotangents.shape[0])
        return torch.cat(parts) if parts else cotangents.new_zeros((0, *self.inp.shape))

    def transposed(self) -> torch.Tensor:
        """g(u) = M^T u (shape of inp) as a differentiable function of the dummy u (at the ``seed``, else 0)."""
        if self._transposed is None:
            start = self._seed if self._seed is not None else torch.zeros_like(self.out.detach())
            self._dummy = start.detach().to(self.out.dtype).clone().requires_grad_(True)
            with torch.enable_grad():
                (self._transposed,) = torch.autograd.grad(
                    self.out, self.inp, grad_outputs=self._dummy, create_graph=True, retain_graph=True
                )
        return self._transposed

    def jvp(self, tangents: torch.Tensor) -> torch.Tensor:
        """(b, *inp.shape) -> (b, d_out): the columns M v."""
        self.transposed()
        assert self._dummy is not None and self._transposed is not None
        parts = []
        for start in range(0, tangents.shape[0], self.chunk):
            block = tangents[start : start + self.chunk].to(self._transposed.dtype)
            with torch.enable_grad():
                (columns,) = torch.autograd.grad(
                    self._transposed, self._dummy, grad_outputs=block, is_grads_batched=True, retain_graph=True
                )
            parts.append(columns)
        self.jvps += int(tangents.shape[0])
        return torch.cat(parts) if parts else tangents.new_zeros((0, self.out_dim))

    def release(self) -> None:
        """Drop the double-backward graph (the forward graph belongs to whoever built ``out``)."""
        self._transposed = None
        self._dummy = None


__all__ = ["GraphProducts", "ShouldStop"]
