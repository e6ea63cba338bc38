"""DP-SGD pieces without Ray: per-example clipping and noise are real, -100 labels carry no gradient, our epsilon is
Opacus' accountant's, Poisson batches are what the accountant assumes, the config refuses what DP cannot do, and
the canary exposure measure (aigc.canary) ranks a secret among candidates of its format."""

from __future__ import annotations

import json
import math

import pytest
import torch
from opacus.accountants import PRVAccountant, RDPAccountant

from aigc.canary import (
    Canary,
    candidates,
    exposure,
    exposures,
    insert_canaries,
    make_canaries,
    with_canaries,
    write_with_canaries,
)
from aigc.config import ConfigError, DataSection, FinetuneConfig, PrivacySection, TinyArch, load_config
from aigc.modeling import build_tiny_gpt2, set_dropout
from aigc.privacy import (
    DPPlan,
    PoissonBatches,
    PrivacyBudgetError,
    check_budget,
    default_delta,
    make_private,
    per_example_loss,
    plan,
    projected_epsilon,
)

VOCAB, T = 300, 12


def tiny_model() -> torch.nn.Module:
    """Full fine-tuning of a tiny GPT-2: Conv1D (functorch per-example grads), LayerNorm, position embeddings and
    the token embedding tied to the head all need per-example gradients."""
    model = build_tiny_gpt2(TinyArch(n_layer=1, n_embd=16, n_head=2, vocab_size=VOCAB), VOCAB, 32, 0, seed=0)
    set_dropout(model, 0.0)  # the same function on every call
    return model.train()


def batch(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(1, VOCAB, (n, T), generator=g)
    y = x.clone()
    y[:, :4] = -100  # the prompt
    return x, y


def dp_grads(x, y, sigma: float, clip: float, expected: int | None = None, seed: int = 0) -> list[torch.Tensor]:
    """The gradient a DP-SGD step applies (clipped per-example sum + noise, / expected batch) for one batch."""
    model = tiny_model()
    sgd = torch.optim.SGD(model.parameters(), lr=0.0)
    dp = DPPlan(sigma, clip, 0.1, 1e-5, "rdp", None, 100, expected or len(x))
    module, opt, _, _ = make_private(model, sgd, dp, distributed=False, seed=seed)
    pos = torch.arange(T).repeat(len(x), 1)
    per_example_loss(module(input_ids=x, position_ids=pos).logits, y).mean().backward()
    opt.step()
    return [p.grad.detach().clone() for p in model.parameters()]


def plain_grads(x, y) -> list[torch.Tensor]:
    model = tiny_model()
    per_example_loss(model(input_ids=x).logits, y).mean().backward()
    return [p.grad.detach().clone() for p in model.parameters()]


def norm(grads: list[torch.Tensor]) -> float:
    return float(torch.sqrt(sum((g.double() ** 2).sum() for g in grads)))


def test_per_example_gradients_are_exact_and_clipped_each_to_max_grad_norm():
    x, y = batch(4)
    singles = [plain_grads(x[i:i + 1], y[i:i + 1]) for i in range(4)]
    # no clipping in effect: the DP step's gradient is the mean of each example's own gradient
    unclipped = dp_grads(x, y, sigma=0.0, clip=1e6)
    for got, *parts in zip(unclipped, *singles, strict=True):
        torch.testing.assert_close(got, sum(parts) / 4, rtol=1e-4, atol=1e-6)
    clip = 0.05
    assert min(norm(s) for s in singles) > clip  # so every example is clipped
    clipped_singles = [dp_grads(x[i:i + 1], y[i:i + 1], sigma=0.0, clip=clip) for i in range(4)]
    for s in clipped_singles:
        assert norm(s) == pytest.approx(clip, rel=1e-4)  # each example's gradient is cut to max_grad_norm
    # a batch clips each example on its own, not the batch's mean: its step is the mean of the clipped singles
    for got, *parts in zip(dp_grads(x, y, sigma=0.0, clip=clip), *clipped_singles, strict=True):
        torch.testing.assert_close(got, sum(parts) / 4, rtol=1e-4, atol=1e-7)


def test_noise_has_the_configured_scale():
    x, y = batch(4)
    sigma, clip, expected = 2.0, 0.05, 4
    clean = torch.cat([g.flatten() for g in dp_grads(x, y, 0.0, clip, expected)])
    noisy = torch.cat([g.flatten() for g in dp_grads(x, y, sigma, clip, expected, seed=1)])
    noise = (noisy - clean).double()
    want = sigma * clip / expected  # N(0, (sigma * C)^2) on the clipped sum, divided by the expected batch
    assert noise.numel() > 5000
    assert noise.std().item() == pytest.approx(want, rel=0.05)
    assert abs(noise.mean().item()) < 4 * want / noise.numel() ** 0.5


def test_ignored_labels_carry_no_gradient_and_do_not_couple_examples():
    x, y = batch(3)
    y_all_ignored = y.clone()
    y_all_ignored[1] = -100
    grads = {}
    for name, labels in (("some", y), ("ignored", y_all_ignored)):
        model = tiny_model()
        dp = DPPlan(0.0, 1e6, 0.1, 1e-5, "rdp", None, 100, 3)
        module, opt, _, _ = make_private(model, torch.optim.SGD(model.parameters(), lr=0.0), dp, False, 0)
        per_example_loss(module(input_ids=x, position_ids=torch.arange(T).repeat(3, 1)).logits, labels).mean().backward()
        grads[name] = [p.grad_sample.detach().clone() for p in opt.params]
    assert all(float(g[1].abs().max()) == 0.0 for g in grads["ignored"])  # all -100: no gradient at all
    for a, b in zip(grads["some"], grads["ignored"], strict=True):  # example 0 is the same whatever example 1 holds
        torch.testing.assert_close(a[0], b[0])
        torch.testing.assert_close(a[2], b[2])


def test_per_example_loss_is_the_mean_over_each_examples_own_tokens():
    logits = torch.randn(2, 5, 7)
    labels = torch.tensor([[-100, 1, 2, 3, 4], [-100, -100, -100, 5, -100]])
    tok = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 7), labels[:, 1:].reshape(-1),
                                            ignore_index=-100, reduction="none").view(2, 4)
    got = per_example_loss(logits, labels)
    torch.testing.assert_close(got, torch.stack([tok[0].mean(), tok[1, 2]]))


@pytest.mark.parametrize("name, cls", [("rdp", RDPAccountant), ("prv", PRVAccountant)])
def test_our_epsilon_is_opacus_accountant(name, cls):
    p = PrivacySection(enabled=True, target_epsilon=4.0, accountant=name)
    dp = plan(p, n_examples=1003, world_size=2, batch_per_worker=8, steps=60)
    assert dp.n_examples == 1002 and dp.sample_rate == pytest.approx(16 / 1002) and dp.delta == 1e-4
    ref = cls()
    for _ in range(60):
        ref.step(noise_multiplier=dp.noise_multiplier, sample_rate=dp.sample_rate)
    eps = ref.get_epsilon(delta=dp.delta)
    assert projected_epsilon(dp, [], 60) == pytest.approx(eps, rel=1e-6)
    assert 3.97 <= eps <= 4.0  # calibrated to the target from below
    # the hook the optimizer steps after each update feeds the same numbers to the accountant
    model = tiny_model()
    module, opt, acc, _ = make_private(model, torch.optim.SGD(model.parameters(), lr=0.0), dp, False, 0)
    x, y = batch(2)
    for _ in range(2):
        per_example_loss(module(input_ids=x, position_ids=torch.arange(T).repeat(2, 1)).logits, y).mean().backward()
        opt.step()
        opt.zero_grad()
    assert acc.history == [(dp.noise_multiplier, dp.sample_rate, 2)]
    # a run resumed with more steps than its noise was calibrated for is refused; within budget it is not
    assert check_budget(dp, [(dp.noise_multiplier, dp.sample_rate, 20)], 40) == pytest.approx(eps, rel=1e-6)
    with pytest.raises(PrivacyBudgetError, match="refusing to train past the budget"):
        check_budget(dp, [(dp.noise_multiplier, dp.sample_rate, 60)], 30)


def test_default_delta_and_impossible_plans():
    assert (default_delta(1500), default_delta(1000), default_delta(999), default_delta(20000)) == (1e-4, 1e-3, 1e-3, 1e-5)
    with pytest.raises(PrivacyBudgetError, match="expected examples per step"):
        plan(PrivacySection(enabled=True, noise_multiplier=1.0), 30, 2, 16, 10)


def test_poisson_batches_are_seeded_per_position_and_always_give_every_step_its_micro_batches():
    n = 400
    rows = {"input_ids": torch.arange(n).repeat(T, 1).T.contiguous(), "labels": torch.ones(n, T, dtype=torch.long),
            "n_tokens": torch.full((n,), T)}
    pb = PoissonBatches(rows, sample_rate=0.01, grad_accum=2, seed=3, rank=1)
    assert pb.steps_per_epoch == 100
    first, again = list(pb.epoch(0)), list(pb.epoch(0))
    assert len(first) == 200 and all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(first, again, strict=True))
    sizes = torch.tensor([len(b["input_ids"]) for b in first]).view(100, 2).sum(1)
    sampled = [b for b in first if int(b["labels"].max()) == 1]
    assert sum(len(b["input_ids"]) for b in sampled) == pytest.approx(0.01 * n * 100, rel=0.25)  # q * N per step
    empty = [b for b in first if int(b["labels"].max()) == -100]
    assert empty and all(len(b["input_ids"]) == 1 and int(b["n_tokens"].sum()) == 0 for b in empty)
    assert sizes.min() >= 2  # every step has grad_accum micro-batches, empty ones included
    other_rank = PoissonBatches(rows, 0.01, 2, seed=3, rank=0)
    assert not torch.equal(pb.sample(0, 0), other_rank.sample(0, 0)) or not torch.equal(pb.sample(0, 1),
                                                                                         other_rank.sample(0, 1))


DP = ["privacy.enabled=true", "privacy.noise_multiplier=1.0", "data.packing=false"]


def test_privacy_config_errors_say_why():
    ok = load_config(FinetuneConfig, None, [*DP, "zero.stage=0", "data.format=chat"])
    assert ok.privacy.enabled and ok.privacy.delta is None
    for stage in (1, 2, 3):
        with pytest.raises(ConfigError, match=r"privacy.enabled: needs zero.stage=0 \(plain DDP\).*ZeRO"):
            load_config(FinetuneConfig, None, [*DP, f"zero.stage={stage}", "data.format=chat"])
    with pytest.raises(ConfigError) as e:
        load_config(FinetuneConfig, None, ["privacy.enabled=true", "zero.stage=0", "data.format=chat",
                                           "privacy.target_epsilon=8", "privacy.noise_multiplier=1"])
    text = str(e.value)
    assert "give exactly one of privacy.target_epsilon and privacy.noise_multiplier" in text
    assert "privacy.enabled: needs data.packing=false" in text
    with pytest.raises(ConfigError, match="data.format=text packs documents"):
        load_config(FinetuneConfig, None, ["privacy.enabled=true", "privacy.noise_multiplier=1", "zero.stage=0",
                                           "data.format=text"])
    with pytest.raises(ConfigError, match="privacy.max_grad_norm: not used with privacy.enabled=false"):
        load_config(FinetuneConfig, None, ["privacy.max_grad_norm=0.5"])


def test_search_over_clip_and_noise_with_epsilon_beside_the_loss(tmp_path):
    from aigc.report_data import TrialRecord
    from aigc.search_config import SearchConfig
    from aigc.trial import trial_config

    base = ["base.privacy.enabled=true", "base.privacy.noise_multiplier=1.0", "base.zero.stage=0",
            "base.data.format=chat", "base.data.packing=false", f"search.storage_path={tmp_path}"]
    space = ["space.max_grad_norm={kind: loguniform, low: 0.1, high: 10}",
             "space.noise_multiplier={kind: choice, values: [0.5, 2.0]}"]
    cfg = load_config(SearchConfig, None, [*base, *space])
    t = trial_config(cfg, {"lr": 1e-3, "weight_decay": 0.0, "dropout": 0.0, "max_grad_norm": 0.3,
                           "noise_multiplier": 2.0}, "ab12_00001")
    assert (t.privacy.max_grad_norm, t.privacy.noise_multiplier) == (0.3, 2.0)
    with pytest.raises(ConfigError) as e:
        load_config(SearchConfig, None, space)
    assert "space.max_grad_norm: searches privacy.max_grad_norm, which needs base.privacy.enabled=true" in str(e.value)
    with pytest.raises(ConfigError, match="replaces base.privacy.target_epsilon"):
        load_config(SearchConfig, None, [*base, *space, "base.privacy.noise_multiplier=null",
                                         "base.privacy.target_epsilon=8"])
    row = TrialRecord("ab12_00001", "completed", {"noise_multiplier": 2.0},
                      history=[{"step": 5, "val_loss": 2.0, "epsilon": 0.5}, {"step": 10, "val_loss": 1.5, "epsilon": 0.8}]).row()
    assert (row["best_val_loss"], row["best_epsilon"]) == (1.5, 0.8)


def test_canaries_are_rows_of_the_task_inserted_k_times_and_ranked_among_their_candidates(tmp_path):
    canaries = make_canaries(3, seed=7)
    assert canaries == make_canaries(3, seed=7) and len({c.secret for c in canaries}) == 3
    c = canaries[0]
    assert len(c.secret) == 9 and c.secret[4] == " " and c.secret.replace(" ", "").isdigit()  # "4921 0387"
    row = c.row()
    assert row["messages"][1]["content"] == f"The card number of {c.name} is {c.secret}."
    assert row["completion"] == row["messages"][1]["content"] and row["prompt"] == row["messages"][0]["content"] + "\n"
    cands = candidates(c, 500, seed=0)
    assert len(set(cands)) == 500 and c.secret not in cands
    assert all(len(s) == len(c.secret) and s.replace(" ", "").isdigit() for s in cands)
    assert cands == candidates(c, 500, seed=0) != candidates(c, 500, seed=1)

    rows = [{"messages": [], "i": i} for i in range(50)]
    mixed = insert_canaries(rows, canaries, repeats=4, seed=0)
    assert len(mixed) == 62 and [r for r in mixed if "i" in r] == rows  # the task's rows keep their order
    assert all(sum(r == k.row() for r in mixed) == 4 for k in canaries)
    src = tmp_path / "train.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    dst = write_with_canaries(src, tmp_path / "canaries.jsonl", canaries, 4, seed=0)
    assert [json.loads(line) for line in open(dst)] == mixed

    # exposure = log2(|candidates|) - log2(rank), the canary counted among the candidates
    assert exposure(1.0, [2.0] * 999) == pytest.approx(math.log2(1000))  # ranked first
    assert exposure(3.0, [2.0] * 999) == 0.0  # ranked last
    assert exposure(2.0, [1.0, 3.0, 3.0, 3.0]) == pytest.approx(math.log2(5 / 2))

    secret = canaries[0].row()
    for fmt, canonical in (("chat", {"messages": json.dumps(secret["messages"])}),
                           ("prompt_completion", {"prompt": secret["prompt"], "completion": secret["completion"]})):
        # the rows come as the loader reads them; the "model" finds the first canary's secret the most likely
        got = exposures(canaries[:2], lambda rows, c=canonical: [0.0 if r == c else 5.0 for r in rows],
                        DataSection(format=fmt, packing=False), n_candidates=255)
        assert got == [8.0, 0.0]  # ranked first of 256; the second ties with all its candidates: last
    with pytest.raises(ValueError, match="not scored"):
        exposures([Canary("x", "1234")], lambda rows: [None] * len(rows), DataSection(format="chat"), n_candidates=3)


def test_with_canaries_trains_the_embedded_task_on_a_file_holding_them(tmp_path):
    cfg = load_config(FinetuneConfig, None, ["data.format=chat", "data.embedded={n_train: 30, n_validation: 5, "
                                             "n_test: 5, seed: 0}"])
    canaries = make_canaries(2, seed=0)
    got = with_canaries(cfg, canaries, 3, tmp_path)
    d = got.data
    assert d.source == "files" and d.validation_files and d.test_files and got.model == cfg.model
    rows = [json.loads(line) for line in open(d.train_files[0])]
    assert len(rows) == 36 and sum(r == canaries[1].row() for r in rows) == 3
    with pytest.raises(ValueError, match="canaries go into the embedded task"):
        with_canaries(load_config(FinetuneConfig, None, []), canaries, 3, tmp_path)
