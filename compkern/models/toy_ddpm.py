"""The public CompLift 2-D denoisers: one small unconditional DDPM per component, and a bank that
serves them as one EpsModel.

``ToyDenoiser(x_t (N, 2), t (N,) int64) -> eps (N, 2)`` follows the architecture of the public
CompLift 2-D code (itself tanelp's tiny-diffusion MLP): a linear input projection, a learned
per-timestep embedding, ``depth`` residual blocks (LayerNorm, SiLU, widen by 2, add the time
embedding, two more layers) and a linear output. (The public runs wrap it in an energy form,
eps = grad_x |x - f(x, t)|^2, ``--mlp_type energy``; this is the plain eps form.)

``StackedToyDenoiser(M)`` holds M independent ToyDenoisers as stacked weights (M, ...) and runs
them in one batched call (``x_t (M, N, 2), t (M, N) -> (M, N, 2)``): training the eleven component
models together costs one optimizer step instead of eleven, which is what makes the public protocol
fit on a CPU. ``member(m)`` copies model m out as a plain ToyDenoiser (same outputs).

``ComponentBank([net_0, ..., net_{K-1}])`` is an EpsModel ``(x_t (N, 2), t (N,), cond (N,)) ->
(N, 2)``: cond k in [0, K) runs net k, cond K (``null_id``) returns zeros, so a composed eps with the
null as its base row is sum_k w_k eps_k, the public code's product / negation of separate models.
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["ToyDenoiser", "StackedToyDenoiser", "ComponentBank"]


class _Block(nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.fc = nn.Linear(hidden, 2 * hidden)
        self.emb = nn.Linear(hidden, 2 * hidden)
        self.mid = nn.Linear(2 * hidden, 2 * hidden)
        self.out = nn.Linear(2 * hidden, hidden)

    def forward(self, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """h (N, hidden), emb (N, hidden) -> (N, hidden)."""
        a = nn.functional.silu(self.fc(nn.functional.silu(self.norm(h))) + self.emb(emb))
        return h + self.out(nn.functional.silu(self.mid(a)))


class ToyDenoiser(nn.Module):
    """Unconditional 2-D eps-model ``forward(x_t (N, 2), t (N,) int64 in [0, num_steps)) -> (N, 2)``."""

    def __init__(self, hidden: int = 128, depth: int = 4, num_steps: int = 50):
        super().__init__()
        if hidden < 1 or depth < 1 or num_steps < 1:
            raise ValueError(f"hidden, depth and num_steps must be positive, got {hidden}, {depth}, {num_steps}")
        self.hidden, self.depth, self.num_steps = hidden, depth, num_steps
        self.inp = nn.Linear(2, hidden)
        self.t_emb = nn.Embedding(num_steps, hidden)
        self.blocks = nn.ModuleList(_Block(hidden) for _ in range(depth))
        self.out = nn.Linear(hidden, 2)

    @property
    def config(self) -> dict:
        return {"kind": "ToyDenoiser", "hidden": self.hidden, "depth": self.depth, "num_steps": self.num_steps}

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t (N, 2) float, t (N,) int64 -> eps (N, 2)."""
        if not isinstance(x_t, torch.Tensor) or not x_t.is_floating_point() or x_t.dim() != 2 or x_t.shape[1] != 2:
            raise ValueError(f"x_t must be a float tensor (N, 2), got {getattr(x_t, 'shape', type(x_t).__name__)}")
        if not isinstance(t, torch.Tensor) or t.shape != (x_t.shape[0],) or t.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"t must be an int64 tensor (N,) = ({x_t.shape[0]},)")
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= self.num_steps):
            raise ValueError(f"t must lie in [0, {self.num_steps}), got [{int(t.min())}, {int(t.max())}]")
        h, emb = self.inp(x_t), self.t_emb(t)
        for blk in self.blocks:
            h = blk(h, emb)
        return self.out(h)


class StackedToyDenoiser(nn.Module):
    """M independent ToyDenoisers with stacked weights. ``forward(x_t (M, N, 2),
    t (M, N) int64) -> (M, N, 2)``: row block m runs model m. Parameter names are those of
    ToyDenoiser's state dict with a leading model axis (``member`` maps them back)."""

    def __init__(self, members: int, hidden: int = 128, depth: int = 4, num_steps: int = 50):
        super().__init__()
        if members < 1:
            raise ValueError(f"members must be >= 1, got {members}")
        self.members, self.hidden, self.depth, self.num_steps = members, hidden, depth, num_steps
        # initialized exactly as M separate ToyDenoisers would be (torch's default init, in order)
        nets = [ToyDenoiser(hidden, depth, num_steps) for _ in range(members)]
        self._names = list(nets[0].state_dict())
        self.weights = nn.ParameterList(nn.Parameter(torch.stack([n.state_dict()[k] for n in nets]))
                                        for k in self._names)

    @property
    def config(self) -> dict:
        return {"kind": "StackedToyDenoiser", "members": self.members, "hidden": self.hidden, "depth": self.depth,
                "num_steps": self.num_steps}

    def _p(self) -> dict[str, torch.Tensor]:
        return dict(zip(self._names, self.weights))

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        M = self.members
        if x_t.dim() != 3 or x_t.shape[0] != M or x_t.shape[2] != 2 or t.shape != x_t.shape[:2]:
            raise ValueError(f"x_t must be (M, N, 2) = ({M}, N, 2) and t (M, N), got {tuple(x_t.shape)}, {tuple(t.shape)}")
        p = self._p()

        def lin(name: str, h: torch.Tensor) -> torch.Tensor:  # h (M, N, in) -> (M, N, out)
            return torch.baddbmm(p[name + ".bias"][:, None], h, p[name + ".weight"].transpose(1, 2))

        silu = nn.functional.silu
        h = lin("inp", x_t)
        emb = torch.gather(p["t_emb.weight"], 1, t[..., None].expand(*t.shape, self.hidden))
        for i in range(self.depth):
            b = f"blocks.{i}."
            z = nn.functional.layer_norm(h, (self.hidden,)) * p[b + "norm.weight"][:, None] + p[b + "norm.bias"][:, None]
            a = silu(lin(b + "fc", silu(z)) + lin(b + "emb", emb))
            h = h + lin(b + "out", silu(lin(b + "mid", a)))
        return lin("out", h)

    def member(self, m: int) -> ToyDenoiser:
        """Model m as a ToyDenoiser (a copy, in eval mode)."""
        net = ToyDenoiser(self.hidden, self.depth, self.num_steps)
        net.load_state_dict({k: w[m].detach().clone() for k, w in self._p().items()})
        return net.eval()


class ComponentBank(nn.Module):
    """EpsModel over K separate unconditional denoisers: cond k -> nets[k](x_t, t); cond K
    (``null_id``) -> zeros. ``forward(x_t (N, 2), t (N,), cond (N,) int64 in [0, K]) -> (N, 2)``."""

    def __init__(self, nets: list[nn.Module]):
        super().__init__()
        if not nets:
            raise ValueError("nets must hold at least one denoiser")
        self.nets = nn.ModuleList(nets)

    @property
    def null_id(self) -> int:
        return len(self.nets)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        if not isinstance(cond, torch.Tensor) or cond.shape != (x_t.shape[0],):
            raise ValueError(f"cond must be an int64 tensor (N,) = ({x_t.shape[0]},)")
        if cond.numel() and (int(cond.min()) < 0 or int(cond.max()) > self.null_id):
            raise ValueError(f"cond ids must lie in [0, {self.null_id}] ({self.null_id} = the zero base)")
        out = torch.zeros_like(x_t)
        for k in cond.unique().tolist():
            if k != self.null_id:
                rows = cond == k
                out[rows] = self.nets[k](x_t[rows], t[rows]).to(out.dtype)
        return out
