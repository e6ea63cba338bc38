"""`zero.stage: 0`: plain PyTorch DDP without DeepSpeed, behind the surface of DeepSpeed's engine that
`aigc.train`'s loop uses, so the loop stays one loop. With `privacy.enabled` the same engine runs DP-SGD
(`aigc.privacy`: Opacus' per-example clipping and noise in place of DDP's gradient all-reduce).

The surface: calling the engine runs the forward; `backward(loss)`, `step()` (an optimizer step at the end of
each gradient-accumulation window, with clipping and the lr schedule), `global_steps`, `device`, `module` (the
plain model), `eval()`/`train()`, `save_checkpoint(dir, tag=, client_state=)` and
`load_checkpoint(dir, tag=) -> (path, client_state)`. A checkpoint is one file, `<dir>/<tag>/ddp_state.pt`,
written by rank 0 (every rank holds the same weights); `fp32_state_dict` reads its weights for the export.
"""

from __future__ import annotations

import os
import warnings
from contextlib import nullcontext
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from aigc.config import OptimSection
from aigc.modeling import param_groups
from aigc.privacy import DPPlan, epsilon, make_accountant, make_private, per_example_loss
from aigc.schedule import make_scheduler

STATE_FILE = "ddp_state.pt"


def is_ddp_checkpoint(ckpt_dir: str, tag: str) -> bool:
    """Whether a reported checkpoint was written by this engine (else it is DeepSpeed's)."""
    return os.path.isfile(os.path.join(ckpt_dir, tag, STATE_FILE))


def _read_state(ckpt_dir: str, tag: str) -> dict[str, Any]:
    # weights_only: tensors, numbers, strings and containers only; no pickled code runs on load
    return torch.load(os.path.join(ckpt_dir, tag, STATE_FILE), map_location="cpu", weights_only=True)


def fp32_state_dict(ckpt_dir: str, tag: str) -> dict[str, torch.Tensor]:
    """The model's weights (fp32, the master copy the optimizer updates) from this engine's checkpoint."""
    return {k: v.float() for k, v in _read_state(ckpt_dir, tag)["module"].items()}


class DDPEngine:
    """One rank's model, optimizer and lr scheduler under torch DDP (or Opacus DP-SGD with `dp`)."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, *, grad_accum: int,
                 grad_clip: float, precision: str = "fp32", dp: DPPlan | None = None, seed: int = 0):
        self.module, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.grad_accum, self.grad_clip, self.dp = grad_accum, grad_clip, dp
        self.device = next(model.parameters()).device
        self.global_steps, self.micro_steps = 0, 0
        self.accountant, self._noise = None, None
        distributed = dist.is_initialized() and dist.get_world_size() > 1
        # bf16 autocast on GPUs that have it; fp32 otherwise (config refuses fp16: it would need a loss scaler)
        self._autocast = precision == "bf16"
        if dp is not None:
            self._wrapped, self.optimizer, self.accountant, self._noise = make_private(
                model, optimizer, dp, distributed, seed)
        elif distributed:
            self._wrapped = DistributedDataParallel(model, device_ids=[self.device.index] if self.device.type == "cuda"
                                                    else None)
        else:
            self._wrapped = model

    def _boundary(self) -> bool:
        """Whether the current micro-batch ends a gradient-accumulation window (then `step` updates)."""
        return (self.micro_steps + 1) % self.grad_accum == 0

    def __call__(self, **inputs: Any) -> Any:
        """The forward. Under DP in training mode `.loss` is the per-example loss (each example's token mean, then
        the batch mean: the unit DP clips); evaluation keeps the model's own token-mean loss, as every path does."""
        if isinstance(self._wrapped, DistributedDataParallel):
            # what `no_sync()` does, for a forward and a backward made in separate calls: all-reduce only at the
            # end of the accumulation window
            self._wrapped.require_backward_grad_sync = self._boundary()
        ctx = torch.autocast(self.device.type, dtype=torch.bfloat16) if self._autocast else nullcontext()
        if self.dp is None or not self.module.training:
            with ctx:
                return self._wrapped(**inputs)
        labels = inputs.pop("labels")
        if "position_ids" not in inputs:
            # explicit [B, T] positions: the model's own are [1, T], broadcast, which gives the position
            # embedding a per-example gradient of batch size 1
            b, t = inputs["input_ids"].shape
            inputs["position_ids"] = torch.arange(t, device=self.device).repeat(b, 1)
        with ctx:
            out = self._wrapped(**inputs)
        out.loss = per_example_loss(out.logits, labels).mean()
        return out

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of one micro-batch. Without DP the loss is divided by grad_accum (as DeepSpeed does), so the
        window's gradient is the mean; with DP Opacus divides the window's clipped sum by the expected batch."""
        if self.dp is None:
            (loss / self.grad_accum).backward()
            return
        with warnings.catch_warnings():
            # Opacus' module hooks fire on outputs because token ids need no gradient: expected, said every run
            warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)
            loss.backward()

    def step(self) -> None:
        """End of a micro-batch: at the end of a window clip, update, step the lr schedule and count the step."""
        boundary = self._boundary()
        self.micro_steps += 1
        if self.dp is not None:
            if not boundary:
                self.optimizer.signal_skip_step(True)  # clip and accumulate this micro-batch, no update yet
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)  # keeps the window's clipped sum until the update
        elif boundary:
            if self.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_([p for p in self.module.parameters() if p.requires_grad],
                                               self.grad_clip)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        if boundary:
            self.scheduler.step()
            self.global_steps += 1

    def eval(self) -> None:
        self.module.eval()

    def train(self) -> None:
        self.module.train()

    def epsilon(self) -> float | None:
        """Epsilon spent so far at the plan's delta (None without DP)."""
        return None if self.dp is None else epsilon(self.accountant, self.dp.delta)

    def save_checkpoint(self, save_dir: str, tag: str, client_state: dict[str, Any] | None = None) -> None:
        """Rank 0 writes everything an exact resume needs into `<save_dir>/<tag>/ddp_state.pt`."""
        if dist.is_initialized() and dist.get_rank() != 0:
            return
        state = {
            "module": {k: v.detach().cpu() for k, v in self.module.state_dict().items()},
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "global_steps": self.global_steps, "micro_steps": self.micro_steps, "client_state": client_state or {},
        }
        if self.dp is not None:
            state["accountant"] = {"history": [list(h) for h in self.accountant.history]}
            state["noise_rng"] = self._noise.get_state()
        os.makedirs(os.path.join(save_dir, tag), exist_ok=True)
        torch.save(state, os.path.join(save_dir, tag, STATE_FILE))

    def load_checkpoint(self, load_dir: str, tag: str) -> tuple[str, dict[str, Any]]:
        """Every rank restores the same state: weights, optimizer moments, lr schedule, step counters and, under DP,
        the accountant's history (epsilon keeps adding up) and the noise generator."""
        state = _read_state(load_dir, tag)
        self.module.load_state_dict(state["module"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.global_steps, self.micro_steps = state["global_steps"], state["micro_steps"]
        if self.dp is not None:
            self.accountant.history = make_accountant(self.dp.accountant, state["accountant"]["history"]).history
            self._noise.set_state(state["noise_rng"])
        return os.path.join(load_dir, tag), state["client_state"]


def build_engine(model: torch.nn.Module, o: OptimSection, device: torch.device, precision: str,
                 dp: DPPlan | None = None) -> DDPEngine:
    """The stage-0 engine for a loaded model: moved to `device`, AdamW (torch's, with aigc's parameter groups and
    the optimizer settings DeepSpeed gets) and aigc's lr schedule, under DDP or, with `dp`, DP-SGD."""
    model.to(device)
    optimizer = torch.optim.AdamW(param_groups(model, o.weight_decay), lr=o.lr, betas=tuple(o.betas), eps=o.eps)
    scheduler = make_scheduler(o)(optimizer)  # on the plain optimizer: Opacus' wrapper shares its param groups
    return DDPEngine(model, optimizer, scheduler, grad_accum=o.grad_accum, grad_clip=o.grad_clip, precision=precision,
                     dp=dp, seed=o.seed)
