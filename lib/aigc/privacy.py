"""Differentially private fine-tuning: DP-SGD with Opacus on plain DDP (`aigc.ddp`), accounted per example.

What the guarantee rests on, and where each piece is:

- **The unit is one example** (one row of the data: a prompt/completion pair or a conversation). The config
  requires one example per row (`data.packing: false`; text data, packed across documents, is refused).
- **Poisson sampling, as the accountant assumes** (`PoissonBatches`): at every optimizer step each worker keeps
  each example of its disjoint shard independently with probability q = expected batch / N, so the union over
  workers is a Poisson sample of all N examples. The batch size varies; the expected one is
  `optim.micro_batch_size * optim.grad_accum` per worker.
- **Per-example loss** (`per_example_loss`): each example's mean over its own trainable tokens, then the mean
  over the batch. Labels -100 (prompt tokens, padding) contribute nothing. A loss divided by the whole batch's
  token count would couple the examples' gradients.
- **Clipping and noise** (`make_private`): Opacus' `GradSampleModule` computes per-example gradients, its
  (distributed) `DPOptimizer` clips each to `max_grad_norm`, sums, adds N(0, (sigma * max_grad_norm)^2) noise
  once (on rank 0) before the cross-worker sum, and divides by the expected batch.
- **Accounting** (`make_accountant`, `epsilon`, `plan`): Opacus' RDP or PRV accountant, stepped by the optimizer;
  its history rides in every checkpoint so epsilon keeps adding up across resume.

Not covered: floating-point attacks on the noise (Opacus' `secure_mode` is off), and what the validation split
reveals through the choice of the best checkpoint (validation rows are not training rows).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

if TYPE_CHECKING:  # opacus (and the scipy it pulls in, ~1 s) is imported where DP runs, not by every worker
    from opacus import GradSampleModule
    from opacus.accountants import IAccountant
    from opacus.optimizers import DPOptimizer

from aigc.config import PrivacySection
from aigc.data import expand

IGNORE_INDEX = -100


class PrivacyBudgetError(ValueError):
    """The configured steps would spend more than `privacy.target_epsilon`."""


def default_delta(n_examples: int) -> float:
    """1/N rounded down to a power of ten: 1,500 examples -> 1e-4, 1,000 -> 1e-3."""
    return 10.0 ** -math.ceil(math.log10(max(n_examples, 1)))


@dataclass(frozen=True)
class DPPlan:
    """The DP-SGD parameters of one run, fixed on the driver before any worker starts (`plan`)."""

    noise_multiplier: float
    max_grad_norm: float
    sample_rate: float  # q: the probability that an example is in a step's batch
    delta: float
    accountant: str  # "rdp" | "prv"
    target_epsilon: float | None
    n_examples: int  # training examples the workers sample from (all shards together)
    batch_per_worker: int  # expected examples per worker per optimizer step

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def plan(p: PrivacySection, n_examples: int, world_size: int, batch_per_worker: int, steps: int) -> DPPlan:
    """The run's noise multiplier (calibrated to `target_epsilon` over `steps` when that is given), sampling rate
    and delta. `n_examples` are the training rows before the equal split over workers drops the remainder."""
    n = n_examples // world_size * world_size
    q = batch_per_worker * world_size / max(n, 1)
    if q >= 1:
        raise PrivacyBudgetError(f"privacy: {batch_per_worker} x {world_size} workers = {batch_per_worker * world_size} "
                                 f"expected examples per step but only {n} training examples; DP-SGD samples a "
                                 "fraction of them per step (lower optim.micro_batch_size or add data)")
    delta = p.delta or default_delta(n)
    sigma = p.noise_multiplier
    if sigma is None:
        from opacus.accountants.utils import get_noise_multiplier

        try:
            sigma = get_noise_multiplier(target_epsilon=p.target_epsilon, target_delta=delta, sample_rate=q,
                                         steps=steps, accountant=p.accountant)
        except ValueError as e:
            raise PrivacyBudgetError(f"privacy.target_epsilon={p.target_epsilon}: no noise multiplier reaches it in "
                                     f"{steps} steps at sample rate {q:.4g} and delta {delta:g} ({e})") from None
    return DPPlan(float(sigma), p.max_grad_norm, q, delta, p.accountant, p.target_epsilon, n, batch_per_worker)


def make_accountant(name: str, history: list | None = None) -> IAccountant:
    """An Opacus accountant ("rdp" or "prv"), optionally holding a history of (sigma, q, steps) entries."""
    from opacus.accountants import create_accountant

    acc = create_accountant(mechanism=name)
    acc.history = [tuple(h) for h in history or []]
    return acc


def epsilon(accountant: IAccountant, delta: float) -> float:
    """Epsilon spent so far at `delta` (0 before the first step)."""
    return float(accountant.get_epsilon(delta=delta)) if accountant.history else 0.0


def projected_epsilon(dp: DPPlan, history: list, more_steps: int) -> float:
    """Epsilon after `history` plus `more_steps` steps of this plan: what a run would spend if it went on."""
    extra = [(dp.noise_multiplier, dp.sample_rate, more_steps)] if more_steps > 0 else []
    return epsilon(make_accountant(dp.accountant, [*history, *extra]), dp.delta)


def check_budget(dp: DPPlan, history: list, more_steps: int) -> float:
    """The projected epsilon at the end of the run; a PrivacyBudgetError when it passes `target_epsilon`
    (a resumed run whose max_steps grew past what its noise was calibrated for)."""
    eps = projected_epsilon(dp, history, more_steps)
    if dp.target_epsilon is not None and eps > dp.target_epsilon * 1.001:  # calibration lands just below it
        raise PrivacyBudgetError(f"privacy.target_epsilon={dp.target_epsilon}: {more_steps} more steps at noise "
                                 f"multiplier {dp.noise_multiplier:.4g} would spend epsilon {eps:.3f} "
                                 f"(delta {dp.delta:g}); refusing to train past the budget")
    return eps


def per_example_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[B] losses: each example's mean next-token loss over its own trainable tokens (labels != -100); an example
    with none has loss 0 and so no gradient."""
    lg, lb = logits[:, :-1].float(), labels[:, 1:]
    tok = F.cross_entropy(lg.reshape(-1, lg.size(-1)), lb.reshape(-1), ignore_index=IGNORE_INDEX,
                          reduction="none").view(lb.shape)
    mask = (lb != IGNORE_INDEX).to(tok.dtype)
    return (tok * mask).sum(1) / mask.sum(1).clamp(min=1)


def make_private(model: torch.nn.Module, optimizer: torch.optim.Optimizer, dp: DPPlan, distributed: bool,
                 seed: int) -> tuple[GradSampleModule, DPOptimizer, IAccountant, torch.Generator]:
    """Opacus' pieces, as `PrivacyEngine.make_private` assembles them but fed by our own Poisson sampler: the model
    wrapped for per-example gradients (after DPDDP, which broadcasts rank 0's weights), the clipping and noising
    optimizer (the distributed one adds the noise on rank 0 only, then sums over workers), the accountant the
    optimizer steps, and the noise's generator (its state goes into checkpoints for an exact resume)."""
    from opacus import GradSampleModule
    from opacus.distributed import DifferentiallyPrivateDistributedDataParallel as DPDDP
    from opacus.optimizers import DistributedDPOptimizer, DPOptimizer

    module = GradSampleModule(DPDDP(model) if distributed else model, loss_reduction="mean")
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    cls = DistributedDPOptimizer if distributed else DPOptimizer
    opt = cls(optimizer, noise_multiplier=dp.noise_multiplier, max_grad_norm=dp.max_grad_norm,
              expected_batch_size=dp.batch_per_worker, loss_reduction="mean", generator=gen)
    acc = make_accountant(dp.accountant)
    opt.attach_step_hook(acc.get_optimizer_hook_fn(sample_rate=dp.sample_rate))
    return module, opt, acc, gen


class PoissonBatches:
    """One worker's Poisson-sampled training batches, held in memory (DP fine-tunes small models on modest data).

    Step s of epoch e keeps each example of this worker's shard with probability q, drawn from a generator seeded
    by (seed, epoch, step, rank): a pure function of the position, so a resume that skips the micro-batches already
    seen continues exactly. A step's sample is cut into `grad_accum` micro-batches; an empty one (possible: the
    batch size is random) is one row whose labels are all -100, which adds a zero gradient, so every worker runs
    the same number of forwards and reaches the same optimizer step. An epoch is round(1/q) steps (one pass in
    expectation)."""

    def __init__(self, rows: dict[str, torch.Tensor], sample_rate: float, grad_accum: int, seed: int, rank: int):
        self.rows, self.q, self.grad_accum, self.seed, self.rank = rows, sample_rate, grad_accum, seed, rank
        self.n = len(rows["input_ids"])
        self.steps_per_epoch = max(1, round(1 / sample_rate))

    @classmethod
    def from_shard(cls, shard: Any, sample_rate: float, grad_accum: int, seed: int, rank: int) -> PoissonBatches:
        """Read a worker's whole Ray Data shard into tensors once."""
        parts = list(shard.iter_torch_batches(batch_size=4096, dtypes=torch.long))
        rows = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
        if "ids" in rows:  # compact rows (aigc.splits): the model columns, labels included, built once here
            rows = expand(rows)
        return cls(rows, sample_rate, grad_accum, seed, rank)

    def sample(self, epoch: int, step: int) -> torch.Tensor:
        """Indices of this worker's examples in the batch of (epoch, step)."""
        state = np.random.SeedSequence([self.seed, epoch, step, self.rank]).generate_state(2)
        gen = torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))
        return (torch.rand(self.n, generator=gen) < self.q).nonzero().flatten()

    def _empty(self) -> dict[str, torch.Tensor]:
        row = {k: v[:1].clone() for k, v in self.rows.items()}
        row["labels"][:] = IGNORE_INDEX
        if "n_tokens" in row:
            row["n_tokens"][:] = 0
        return row

    def epoch(self, epoch: int) -> Iterator[dict[str, torch.Tensor]]:
        """The epoch's micro-batches, `grad_accum` per optimizer step."""
        for step in range(self.steps_per_epoch):
            for chunk in torch.tensor_split(self.sample(epoch, step), self.grad_accum):
                yield {k: v[chunk] for k, v in self.rows.items()} if len(chunk) else self._empty()
