"""The finite-difference check every gradient penalty's test uses (float64, central differences)."""

import torch
from torch import nn
from torch.nn.utils import parameters_to_vector, vector_to_parameters

F64 = torch.float64


def value(t: torch.Tensor) -> float:
    return float(t.detach())


def assert_fd_gradient(model: nn.Module, penalty, directions: int = 3, h: float = 1e-5, rtol: float = 1e-5) -> None:
    """∂penalty/∂θ is nonzero and its directional derivatives match central differences (float64)."""
    params = list(model.parameters())
    grads = torch.autograd.grad(penalty(model), params, allow_unused=True)
    grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
    flat = torch.cat([g.reshape(-1) for g in grads])
    assert float(flat.abs().max()) > 1e-8, "penalty does not reach the parameters"
    theta = parameters_to_vector(params).detach().clone()
    gen = torch.Generator().manual_seed(123)
    try:
        for _ in range(directions):
            v = torch.randn(theta.shape, generator=gen, dtype=F64)
            v /= v.norm()
            analytic = float(flat @ v)
            with torch.no_grad():
                vector_to_parameters(theta + h * v, params)
            plus = value(penalty(model))  # not under no_grad: RRR/RBR need autograd for their input gradients
            with torch.no_grad():
                vector_to_parameters(theta - h * v, params)
            minus = value(penalty(model))
            fd = (plus - minus) / (2 * h)
            assert abs(analytic - fd) <= rtol * max(abs(analytic), abs(fd)), (analytic, fd)
    finally:
        with torch.no_grad():
            vector_to_parameters(theta, params)
