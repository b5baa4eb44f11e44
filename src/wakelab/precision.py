"""How AdamW's updates reach bf16 parameters: the one switch `train.precision`, and the optimizers behind it.

Round-to-nearest bf16 storage throws away every update smaller than half a grid step of the value it is added to
(the Wordybird "freeze" may be that, or a learning rate decaying to zero). The three remedies keep the model's
bf16 parameters and change only how an update lands on them:

- ``fp32-master``: an fp32 master copy of each trained parameter is what AdamW steps (moments in fp32 too); the
  bf16 parameter the model computes with is refreshed from it after each step. Hand-written: it is the usual
  mixed-precision recipe, a few lines, and no library offers it as an optimizer that steps bf16 module params.
- ``stochastic``: the update is computed in fp32 and rounded to bf16 up or down with probability proportional to the
  distance, so it is right in expectation. Hand-written after torchao's ``_fp32_to_bf16_sr`` bit trick, with a
  generator of its own kept in the optimizer's state (so resume is bit-exact): torchao's ``_AdamW`` is private,
  ``torch.compile``s one graph per parameter shape (a C++ toolchain and minutes of compile on a small CPU) and
  draws from the global RNG.
- ``kahan``: bf16 storage with a bf16 compensation buffer per parameter that carries what rounding lost into the
  next step (torch-optimi's scheme). Hand-written too: torch-optimi 0.3.3 runs on CPU, but it keeps *debiased*
  moments and one step count per group (not torch AdamW's ``exp_avg``/``step`` that the recorder, the analyses and
  Wordybird's step-100 checkpoint hold), and it uses each gradient as a scratch buffer (the recorded gradients would
  be overwritten).

One optimizer, ``RoundingAdamW``, does all three with torch AdamW's arithmetic and state layout (per-parameter
``step``/``exp_avg``/``exp_avg_sq``), loads a plain AdamW checkpoint (Wordybird's step-100 state), and saves its
master copies, compensation buffers and rounding generator in ``state_dict()``, so Trainer's checkpoints carry them
and resume is bit-exact.
"""

from __future__ import annotations

import math
from typing import Any

import torch

SETTINGS = ("bf16", "fp32-master", "stochastic", "kahan")
NEEDS_BF16 = ("fp32-master", "stochastic", "kahan")


def trained_dtype_problem(config: Any) -> str | None:
    """Why ``train.precision`` cannot apply to this config's trained parameters, or None (checked before a run)."""
    setting = config.train.precision
    if setting not in NEEDS_BF16:
        return None
    strategy = config.train.trainable
    model_dtype = config.model.compute_dtype if config.model.load_in_4bit else config.model.dtype
    dtype = config.train.rows_dtype if strategy == "tokens" and config.train.rows_dtype != "auto" else model_dtype
    if dtype in ("bfloat16", "auto"):
        return None  # `auto`: checked again on the loaded parameters (check_parameters)
    where = "train.rows_dtype" if strategy == "tokens" else "model.dtype"
    return (
        f"train.precision={setting}: the trained parameters are {dtype}, and {setting} only changes how updates "
        f"reach bf16 ones; set {where}=bfloat16 or train.precision=bf16"
    )


def check_parameters(setting: str, params: list[torch.Tensor]) -> None:
    """The same check on the loaded parameters (a model whose dtype was `auto`)."""
    from .errors import ConfigError

    if setting in NEEDS_BF16:
        other = sorted({str(p.dtype).removeprefix("torch.") for p in params if p.dtype != torch.bfloat16})
        if other:
            raise ConfigError(
                f"train.precision={setting}: the trained parameters are {', '.join(other)}, and "
                f"{setting} only changes how updates reach bf16 ones; load the model in bfloat16 "
                "(model.dtype=bfloat16) or set train.precision=bf16"
            )


def build_optimizer(setting: str, optimizer: torch.optim.Optimizer, seed: int = 0) -> torch.optim.Optimizer:
    """The optimizer for ``setting``, over the same parameter groups (lr, betas, eps, decay) as Trainer's AdamW."""
    if setting == "bf16":
        return optimizer
    if setting not in SETTINGS:
        from .errors import ConfigError

        raise ConfigError(f"train.precision: unknown setting '{setting}'; choose one of {', '.join(SETTINGS)}")
    groups = [
        {k: v for k, v in g.items() if k in ("params", "lr", "betas", "eps", "weight_decay")}
        for g in optimizer.param_groups
    ]
    return RoundingAdamW(groups, lr=optimizer.defaults["lr"], mode=setting, seed=seed)


def round_stochastic(value: torch.Tensor, generator: torch.Generator, inplace: bool = False) -> torch.Tensor:
    """fp32 -> bf16, rounding away from zero with probability (dropped low 16 bits) / 2**16: unbiased.

    ``inplace``: ``value`` (fp32, contiguous) is used as scratch, which saves two full-size temporaries."""
    work = value if inplace and value.is_contiguous() else value.contiguous().clone()
    noise = torch.randint(0, 1 << 16, value.shape, dtype=torch.int32, generator=generator, device="cpu")
    bits = work.view(torch.int32)
    bits.add_(noise.to(value.device)).bitwise_and_(-65536)  # keep sign, exponent and the top 7 mantissa bits
    return work.to(torch.bfloat16)


class RoundingAdamW(torch.optim.Optimizer):
    """AdamW computed in fp32 for bf16 parameters, landing on them as ``mode`` says.

    The arithmetic is torch AdamW's (decoupled decay, bias-corrected moments, eps outside the root).
    ``fp32-master``: state["master"] (fp32) is stepped by torch's fused AdamW kernel and copied to the parameter
    with round-to-nearest; moments are fp32. ``stochastic``: the parameter is read as fp32, stepped, and written
    back with ``round_stochastic``.
    ``kahan``: the step plus state["kahan_comp"] is added with round-to-nearest and what rounding lost is kept in
    kahan_comp. The last two keep bf16 moments updated exactly as plain AdamW updates them (as torchao and
    torch-optimi keep bf16 moments), so only the landing of the update differs from the `bf16` setting.
    """

    def __init__(
        self,
        params,
        lr: float,
        betas=(0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        mode: str = "fp32-master",
        seed: int = 0,
    ):
        if mode not in NEEDS_BF16:
            raise ValueError(f"mode must be one of {', '.join(NEEDS_BF16)}")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.mode = mode
        self.master = mode == "fp32-master"
        self.generator = torch.Generator().manual_seed(seed)

    def _state_for(self, param: torch.Tensor) -> dict[str, Any]:
        state = self.state[param]
        moment_dtype = torch.float32 if self.master else param.dtype
        if "step" not in state:
            state["step"] = torch.tensor(0.0)
        for key in ("exp_avg", "exp_avg_sq"):
            if key not in state:
                state[key] = torch.zeros_like(param, dtype=moment_dtype)
            elif state[key].dtype != moment_dtype:  # a plain AdamW checkpoint's bf16 moments
                state[key] = state[key].to(moment_dtype)
        if self.master and "master" not in state:
            state["master"] = param.detach().float().clone()
        if self.mode == "kahan" and "kahan_comp" not in state:
            state["kahan_comp"] = torch.zeros_like(param)
        return state

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr, eps, decay = float(group["lr"]), group["eps"], group["weight_decay"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                state = self._state_for(param)
                state["step"] += 1
                if self.master:
                    # torch's fused CPU/CUDA AdamW kernel on the fp32 master (it steps, we count)
                    torch._fused_adamw_(
                        [state["master"]],
                        [param.grad.float()],
                        [state["exp_avg"]],
                        [state["exp_avg_sq"]],
                        [],
                        [state["step"]],
                        lr=lr,
                        beta1=beta1,
                        beta2=beta2,
                        weight_decay=decay,
                        eps=eps,
                        amsgrad=False,
                        maximize=False,
                    )
                    param.copy_(state["master"])
                    continue
                # bf16 storage: the moments exactly as plain AdamW keeps them; only how the update lands differs.
                step = float(state["step"])
                grad, exp_avg, exp_avg_sq = param.grad, state["exp_avg"], state["exp_avg_sq"]
                exp_avg.lerp_(grad, 1 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                denom = (exp_avg_sq.sqrt() / math.sqrt(1 - beta2**step)).add_(eps)
                step_size = lr / (1 - beta1**step)
                if self.mode == "stochastic":
                    value = param.float()
                    if decay:
                        value.mul_(1 - lr * decay)
                    value.add_(exp_avg / denom, alpha=-step_size)
                    param.copy_(round_stochastic(value, self.generator, inplace=True))
                else:
                    self._kahan_step(param, state["kahan_comp"], exp_avg, denom, step_size, lr * decay)
        return loss

    @staticmethod
    def _kahan_step(param, comp, exp_avg, denom, step_size: float, decay: float) -> None:
        """param += update + comp, rounded to nearest; comp keeps what the rounding lost (torch-optimi's scheme)."""
        if decay:
            comp.add_(param, alpha=-decay)
        comp.addcdiv_(exp_avg, denom, value=-step_size)  # this step's update plus what earlier roundings lost
        old = param.clone()
        param.add_(comp)
        comp.add_(old.sub_(param))  # old - new is exact in bf16 (Sterbenz): the part of comp that landed

    def state_dict(self) -> dict[str, Any]:
        saved = super().state_dict()
        saved["rounding_generator"] = self.generator.get_state()
        return saved

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        generator = state_dict.pop("rounding_generator", None)
        state_dict = _only_adamw_group_keys(state_dict, self)
        super().load_state_dict(state_dict)
        # torch casts loaded state to the parameter's dtype; master copies and fp32 moments must stay as saved.
        for saved_group, group in zip(state_dict["param_groups"], self.param_groups, strict=False):
            for index, param in zip(saved_group["params"], group["params"], strict=False):
                for key, value in state_dict["state"].get(index, {}).items():
                    if key != "step" and isinstance(value, torch.Tensor):
                        self.state[param][key] = value.to(param.device).clone()
        if generator is not None:
            self.generator.set_state(generator)
        for group in self.param_groups:
            for param in group["params"]:
                if param in self.state:
                    self._state_for(param)  # moments to this mode's dtype; a master copy from the loaded weights


def _only_adamw_group_keys(state_dict: dict[str, Any], optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """A saved optimizer's groups with this optimizer's own settings filled in (a plain AdamW checkpoint loads)."""
    groups = []
    for saved, current in zip(state_dict["param_groups"], optimizer.param_groups, strict=False):
        merged = {k: v for k, v in current.items() if k != "params"}
        merged.update({k: saved[k] for k in ("lr", "initial_lr", "betas", "eps", "weight_decay") if k in saved})
        merged["params"] = saved["params"]
        groups.append(merged)
    return {"state": state_dict["state"], "param_groups": groups}


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes held in the optimizer's per-parameter state (moments, master copies, compensation buffers)."""
    total = 0
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor) and value.dim() > 0:
                total += value.numel() * value.element_size()
    return total
