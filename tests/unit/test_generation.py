"""The one generation path: validation, per-row sampling, batch-independent seeds, stops, KV cache.

`sample` and `Row` are tested on their own first (no model), then the whole path on the tiny model."""

import pytest
import torch
from pydantic import ValidationError

from aigc.generation import GenerationError, Row, SamplingParams, generate, max_positions, stream_generate
from aigc.sampling import sample

GREEDY = SamplingParams(temperature=0, max_tokens=12)


@pytest.fixture(scope="module")
def lm(tiny_model_dir):
    from aigc.modeldir import load_model

    torch.set_num_threads(1)
    return load_model(tiny_model_dir)


# ------------------------------------------------------------------------------------------ validation


@pytest.mark.parametrize(
    "field, value",
    [
        ("temperature", -0.1),
        ("top_p", 0.0),
        ("top_p", 1.01),
        ("top_k", -1),
        ("max_tokens", 0),
        ("stop", ["a", "b", "c", "d", "e"]),
        ("stop", [""]),
        ("seed", -1),
        ("temperature", "hot"),
        ("colour", "red"),
    ],
)
def test_invalid_sampling_params_name_the_field(field, value):
    with pytest.raises(ValidationError) as e:
        SamplingParams(**{field: value})
    assert [err["loc"][0] for err in e.value.errors()] == [field]


def test_sampling_defaults_and_stop_forms():
    p = SamplingParams()
    assert (p.temperature, p.top_p, p.top_k, p.max_tokens, p.stop, p.seed) == (1.0, 1.0, 0, 16, [], None)
    assert SamplingParams(stop="END").stop == ["END"]
    assert SamplingParams(stop=None).stop == []
    assert SamplingParams(top_p=1.0, temperature=0).top_p == 1.0


def test_empty_and_too_long_prompts_are_refused(lm):
    with pytest.raises(GenerationError) as e:
        generate(lm.model, lm.tokenizer, [""], GREEDY)
    assert e.value.param == "prompt"
    ctx = max_positions(lm.model)
    with pytest.raises(GenerationError) as e:
        generate(lm.model, lm.tokenizer, ["ok", [5] * ctx], GREEDY)
    assert e.value.param == "prompt[1]" and str(ctx) in str(e.value)


# ------------------------------------------------------------------------------ sample, without a model


def _gens(*seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


def _draws(logits, params, seeds):
    """The token each seed draws from one row of logits."""
    return [sample(logits[None], [params], _gens(s))[0] for s in seeds]


def test_greedy_picks_the_argmax_and_draws_nothing():
    logits = torch.randn(5, 40, generator=torch.Generator().manual_seed(0))
    gens = _gens(*range(5))
    before = [g.get_state() for g in gens]
    assert sample(logits, [SamplingParams(temperature=0)] * 5, gens) == logits.argmax(-1).tolist()
    assert all(torch.equal(g.get_state(), b) for g, b in zip(gens, before, strict=True))


def test_top_k_1_equals_greedy_at_any_temperature():
    logits = torch.randn(6, 40, generator=torch.Generator().manual_seed(1))
    params = [SamplingParams(temperature=t, top_k=1) for t in (0.1, 1.0, 5.0, 0.5, 2.0, 100.0)]
    assert sample(logits, params, _gens(*range(6))) == logits.argmax(-1).tolist()


def test_top_k_keeps_the_k_most_likely():
    logits = torch.tensor([0.0, 3.0, 1.0, 2.5, -1.0, 2.9])
    drawn = set(_draws(logits, SamplingParams(temperature=10.0, top_k=3), range(200)))
    assert drawn == {1, 3, 5}  # a hot temperature reaches all three, and nothing past them


def test_top_p_masks_the_tail():
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()
    # mass before each token: 0, 0.5, 0.8, 0.95; top_p=0.75 keeps the first two
    drawn = _draws(logits, SamplingParams(top_p=0.75), range(300))
    assert set(drawn) == {0, 1}
    assert 0.5 < drawn.count(0) / len(drawn) < 0.75  # renormalised: 0.5 / 0.8 = 0.625
    assert set(_draws(logits, SamplingParams(top_p=1e-6), range(50))) == {0}  # a tiny nucleus is greedy


def test_a_seeded_generator_is_reproducible_and_batch_independent():
    logits = torch.randn(4, 64, generator=torch.Generator().manual_seed(2))
    params = [SamplingParams(seed=7), SamplingParams(top_p=0.9, top_k=20), SamplingParams(temperature=0),
              SamplingParams(temperature=0.7)]
    seeds = (7, 8, 9, 10)
    gens = _gens(*seeds)
    first = [sample(logits, params, gens) for _ in range(5)]
    gens = _gens(*seeds)
    assert [sample(logits, params, gens) for _ in range(5)] == first
    assert len({tuple(step) for step in first}) > 1  # the generators advance: not the same token every step
    for row in range(4):  # each row alone draws what it drew in company
        gen = _gens(seeds[row])
        assert [sample(logits[row : row + 1], [params[row]], gen)[0] for _ in range(5)] == [s[row] for s in first]


def test_temperature_scales_the_logits():
    logits = torch.randn(1, 64, generator=torch.Generator().manual_seed(3))
    for t in (0.25, 0.5, 2.0, 4.0):
        for top_k in (0, 10):  # the vocabulary-order and the sorted (filtering) CDF
            hot = _draws(logits[0], SamplingParams(temperature=t, top_k=top_k), range(20))
            assert hot == _draws(logits[0] / t, SamplingParams(temperature=1.0, top_k=top_k), range(20))
    top = int(logits.argmax())
    cold = _draws(logits[0], SamplingParams(temperature=0.05), range(100))
    warm = _draws(logits[0], SamplingParams(temperature=5.0), range(100))
    assert cold.count(top) > 90 and warm.count(top) < 50 and len(set(warm)) > len(set(cold))


def test_sample_refuses_mismatched_rows():
    with pytest.raises(ValueError, match="2 rows"):
        sample(torch.zeros(2, 8), [SamplingParams()], _gens(0))


# -------------------------------------------------------------------------------- Row, without a model

VOCAB = ["Save", " big", " E", "N", "D", "!", " now", "E"]


def _row(stop=(), max_new=20, decode=None, eos=()):
    decode = decode or (lambda ids: "".join(VOCAB[i] for i in ids))
    return Row([0], SamplingParams(stop=list(stop)), torch.Generator(), max_new, decode, set(eos))


def _push_all(row, tokens):
    return [row.push(t) for t in tokens]


def test_row_holds_back_a_stop_string_split_across_tokens():
    row = _row(stop=[" END"])
    out = _push_all(row, [0, 1, 2, 3, 4])  # "Save", " big", " E", "N", "D": the stop ends the row
    assert out == [("Save", None), (" big", None), None, None, ("", "stop")]
    assert row.text == "Save big" and row.finish_reason == "stop" and row.out_ids == [0, 1, 2, 3, 4]


def test_row_releases_held_back_text_that_turns_out_not_to_be_a_stop():
    row = _row(stop=[" END"])
    out = _push_all(row, [0, 2, 3, 5])  # " E", "N" could start " END"; "!" shows they did not
    assert out == [("Save", None), None, None, (" EN!", None)]
    assert row.push(6) == (" now", None) and row.finish_reason is None


def test_row_cuts_at_the_earliest_of_several_stops_even_inside_one_token():
    row = _row(stop=["!", "ig"])
    assert _push_all(row, [0, 1]) == [("Save", None), (" b", "stop")]
    assert row.text == "Save b"


def test_row_holds_back_a_partial_utf8_character():
    pieces = [b"caf", b"\xc3", b"\xa9", b" \xe2\x82", b"\xac"]  # "café €" with both characters split
    row = _row(decode=lambda ids: b"".join(pieces[i] for i in ids).decode("utf-8", errors="replace"))
    out = _push_all(row, range(5))
    assert out == [("caf", None), None, ("é", None), (" ", None), ("€", None)]
    assert row.text == "café €"


def test_row_ends_on_eos_and_on_max_new():
    row = _row(eos=[7])
    assert _push_all(row, [0, 7]) == [("Save", None), ("", "stop")]
    assert row.text == "Save" and row.out_ids == [0, 7]
    row = _row(max_new=2, stop=[" END"])
    assert _push_all(row, [0, 2]) == [("Save", None), (" E", "length")]  # the held-back " E" comes out at the end


# ------------------------------------------------------------------------------------ decode exactness


def test_greedy_equals_argmax_of_full_forward(lm):
    prompt = "Introducing the"
    out = generate(lm.model, lm.tokenizer, [prompt], GREEDY)[0]
    ids = lm.tokenizer.encode(prompt)
    assert out.prompt_tokens == len(ids) and len(out.token_ids) == 12 and out.finish_reason == "length"
    with torch.no_grad():
        logits = lm.model(torch.tensor([ids + out.token_ids])).logits[0]
    # the token after position t is the argmax of the logits at t (no cache, one full forward)
    expected = logits[len(ids) - 1 : -1].argmax(-1).tolist()
    assert out.token_ids == expected
    assert out.text == lm.tokenizer.decode(out.token_ids, skip_special_tokens=True)


def test_kv_cache_steps_match_full_forward_in_a_padded_batch(lm):
    prompts = ["Save", "Our new noise-cancelling headphones are here with"]
    stream = stream_generate(lm.model, lm.tokenizer, prompts, SamplingParams(temperature=0, max_tokens=6))
    step_logits = []
    for _ in stream:
        step_logits.append({row: logits.clone() for row, logits in stream.last_logits.items()})
    outs = stream.completions()
    for row, prompt in enumerate(prompts):
        ids = lm.tokenizer.encode(prompt)
        with torch.no_grad():
            full = lm.model(torch.tensor([ids + outs[row].token_ids])).logits[0]
        for step, cached in enumerate(step_logits):
            # row 0 is left-padded by many tokens: the mask and position ids must make that invisible
            torch.testing.assert_close(cached[row], full[len(ids) - 1 + step], atol=1e-4, rtol=1e-4)
    assert len(step_logits) == 6


# ----------------------------------------------------------------------------------- per-row sampling


@pytest.mark.parametrize(
    "mine",
    [
        SamplingParams(temperature=1.0, top_p=0.9, top_k=50, max_tokens=20, seed=1234),  # sorted CDF
        SamplingParams(temperature=0.7, max_tokens=20, seed=77),  # vocabulary-order CDF
    ],
    ids=["filtered", "plain"],
)
def test_seeded_row_is_independent_of_its_batch_company(lm, mine):
    alone = generate(lm.model, lm.tokenizer, ["Limited time:"], mine)[0]
    company = [
        ("A much longer prompt about a water-resistant shell and studio-quality sound", SamplingParams(seed=1)),
        ("Save", SamplingParams(temperature=0, max_tokens=3)),
        ("Discover", SamplingParams(temperature=1.5, top_k=5)),  # random seed
        ("Our new", SamplingParams(temperature=0.8, top_p=0.5, seed=3)),
    ]
    for position in (0, 2, 4):
        rows = [p for p, _ in company]
        params = [s for _, s in company]
        rows.insert(position, "Limited time:")
        params.insert(position, mine)
        together = generate(lm.model, lm.tokenizer, rows, params)[position]
        assert together.token_ids == alone.token_ids
        assert together.text == alone.text
    other_seed = generate(lm.model, lm.tokenizer, ["Limited time:"], mine.model_copy(update={"seed": 99}))[0]
    assert other_seed.token_ids != alone.token_ids


def test_per_row_params_in_one_batch(lm):
    prompts = ["Introducing the"] * 4
    params = [
        SamplingParams(temperature=0, max_tokens=10),  # greedy
        SamplingParams(temperature=1.0, top_k=1, max_tokens=10, seed=3),  # top_k=1 is greedy
        SamplingParams(temperature=1.0, top_p=1e-6, max_tokens=10, seed=4),  # a tiny nucleus is greedy
        SamplingParams(temperature=1.0, max_tokens=3, seed=5),
    ]
    outs = generate(lm.model, lm.tokenizer, prompts, params)
    assert outs[0].token_ids == outs[1].token_ids == outs[2].token_ids
    assert len(outs[0].token_ids) == 10 and len(outs[3].token_ids) == 3
    assert [o.finish_reason for o in outs] == ["length"] * 4


def test_top_k_limits_the_choice_to_the_k_most_likely(lm):
    ids = lm.tokenizer.encode("Discover")
    with torch.no_grad():
        top3 = set(lm.model(torch.tensor([ids])).logits[0, -1].topk(3).indices.tolist())
    firsts = {
        generate(lm.model, lm.tokenizer, ["Discover"], SamplingParams(temperature=5.0, top_k=3, max_tokens=1, seed=s))[
            0
        ].token_ids[0]
        for s in range(40)
    }
    assert firsts <= top3 and len(firsts) > 1


# ------------------------------------------------------------------------------------- stops and ends


def test_stop_string_cuts_the_text_and_is_never_streamed(lm):
    base = generate(lm.model, lm.tokenizer, ["Introducing the"], SamplingParams(temperature=0, max_tokens=30))[0]
    assert len(base.text) > 6
    stop = base.text[3:6]
    cut = base.text.index(stop)
    params = SamplingParams(temperature=0, max_tokens=30, stop=["never-there", stop])
    stream = stream_generate(lm.model, lm.tokenizer, ["Introducing the"], params)
    pieces = [d for step in stream for d in step]
    out = stream.completions()[0]
    assert out.text == base.text[:cut] and out.finish_reason == "stop"
    assert "".join(d.text for d in pieces) == out.text
    assert all(stop not in d.text for d in pieces) and pieces[-1].finish_reason == "stop"
    assert out.token_ids == base.token_ids[: len(out.token_ids)] and len(out.token_ids) < 30


def test_streamed_deltas_add_up_to_the_completions(lm):
    prompts = ["Our new", "Save big on"]
    params = [SamplingParams(max_tokens=15, seed=1), SamplingParams(max_tokens=7, seed=2)]
    stream = stream_generate(lm.model, lm.tokenizer, prompts, params)
    texts, reasons = ["", ""], [None, None]
    for step in stream:
        for d in step:
            assert reasons[d.row] is None  # nothing after a row's final delta
            texts[d.row] += d.text
            reasons[d.row] = d.finish_reason
    outs = stream.completions()
    assert texts == [o.text for o in outs] and reasons == ["length", "length"]
    assert outs == generate(lm.model, lm.tokenizer, prompts, params)


def test_eos_ends_a_row_with_stop(lm):
    first = generate(lm.model, lm.tokenizer, ["Save"], SamplingParams(temperature=0, max_tokens=1))[0].token_ids[0]
    cfg = lm.model.generation_config
    saved = cfg.eos_token_id
    cfg.eos_token_id = [first]  # pretend the model's next token is its end-of-sequence token
    try:
        out = generate(lm.model, lm.tokenizer, ["Save"], SamplingParams(temperature=0, max_tokens=5))[0]
    finally:
        cfg.eos_token_id = saved
    assert (out.text, out.token_ids, out.finish_reason) == ("", [first], "stop")


def test_max_tokens_is_capped_by_the_models_positions(lm):
    ctx = max_positions(lm.model)
    prompt = [7] * (ctx - 3)  # token ids pass through untouched
    out = generate(lm.model, lm.tokenizer, [prompt], SamplingParams(temperature=0, max_tokens=50))[0]
    assert len(out.token_ids) == 3 and out.finish_reason == "length"


def test_finish_ends_one_row_and_the_others_go_on(lm):
    stream = stream_generate(lm.model, lm.tokenizer, ["Save", "Discover"], SamplingParams(temperature=0, max_tokens=8))
    next(stream)
    stream.finish(0, "cancelled")
    rest = [d for step in stream for d in step]
    outs = stream.completions()
    assert outs[0].finish_reason == "cancelled" and len(outs[0].token_ids) == 1
    assert outs[1].finish_reason == "length" and len(outs[1].token_ids) == 8
    assert outs[1] == generate(lm.model, lm.tokenizer, ["Discover"], SamplingParams(temperature=0, max_tokens=8))[0]
    assert [d.finish_reason for d in rest if d.row == 0] == ["cancelled"]


# --------------------------------------------------------------------------------- continuous batching


def _solo(lm, prompt, params):
    return generate(lm.model, lm.tokenizer, [prompt], params)[0]


def test_rows_joining_a_running_batch_match_their_solo_runs(lm):
    from aigc.generation import BatchStream

    first = ("Save", SamplingParams(temperature=1.0, max_tokens=20, seed=11))
    later = [
        # longer than the running cache: the running rows get left-padded
        ("A much longer prompt about a water-resistant shell and studio-quality sound", SamplingParams(
            temperature=0.9, top_k=30, max_tokens=12, seed=12)),
        ("Our", SamplingParams(temperature=0, max_tokens=15)),  # shorter: the new row gets left-padded
    ]
    stream = BatchStream(lm.model, lm.tokenizer, max_batch_size=8)
    [a] = stream.add([first[0]], [first[1]])
    logits: dict[int, list[torch.Tensor]] = {}
    for step in range(30):
        if step == 5:
            b, c = stream.add([p for p, _ in later], [s for _, s in later])
            assert stream.waiting == 2
        stream.step()
        for row, lg in stream.last_logits.items():
            logits.setdefault(row, []).append(lg.clone())
        if step == 5:
            assert stream.active == [a, b, c] and stream.waiting == 0
    assert stream.idle()
    outs = dict(zip([a, b, c], stream.completions(), strict=True))
    for row, (prompt, params) in zip([a, b, c], [first, *later], strict=True):
        solo = _solo(lm, prompt, params)
        assert outs[row].token_ids == solo.token_ids and outs[row].text == solo.text
        # and the joined KV cache gives the logits of a plain full forward, step by step
        ids = lm.tokenizer.encode(prompt)
        with torch.no_grad():
            full = lm.model(torch.tensor([ids + solo.token_ids])).logits[0]
        for k, lg in enumerate(logits[row]):
            torch.testing.assert_close(lg, full[len(ids) - 1 + k], atol=1e-4, rtol=1e-4)


def test_max_batch_size_makes_rows_wait_and_finished_rows_are_dropped(lm):
    from aigc.generation import BatchStream

    prompts = ["Save", "Our new", "Discover", "Limited time:"]
    params = [SamplingParams(max_tokens=n, seed=n) for n in (3, 6, 4, 5)]
    stream = BatchStream(lm.model, lm.tokenizer, max_batch_size=2, keep_finished=False)
    rows = stream.add(prompts, params)
    stream.step()
    assert stream.active == rows[:2] and stream.waiting == 2
    finals = {}
    while not stream.idle():
        for d in stream.step():
            assert len(stream.active) <= 2
            if d.finish_reason:
                finals[d.row] = d
    for row, prompt, p in zip(rows, prompts, params, strict=True):
        assert finals[row].token_ids == _solo(lm, prompt, p).token_ids
    assert stream.rows == {}  # keep_finished=False: nothing left behind


# ---------------------------------------------------------------------- penalties and logprobs


def test_penalties_follow_openais_formula_and_only_count_generated_tokens():
    from aigc.sampling import apply_penalties

    logits = torch.zeros(2, 6)
    p = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25)
    out = apply_penalties(logits, [p, SamplingParams()], [[1, 1, 3], [1]])
    # token 1 twice: 2 * 0.25 + 0.5; token 3 once: 0.25 + 0.5; the unpenalised row is untouched
    assert out[0].tolist() == [0, -1.0, 0, -0.75, 0, 0] and out[1].tolist() == [0] * 6
    assert logits.abs().sum() == 0  # the caller's logits are not changed
    assert apply_penalties(logits, [SamplingParams()] * 2, [[1], [2]]) is logits


def test_a_penalty_changes_the_greedy_pick():
    logits = torch.tensor([[0.0, 2.0, 1.5]])
    greedy = SamplingParams(temperature=0, frequency_penalty=1.0)
    assert sample(logits, [greedy], _gens(0)) == [1]
    assert sample(logits, [greedy], _gens(0), [[1]]) == [2]  # 2.0 - 1.0 < 1.5


def test_logprobs_are_the_raw_log_softmax_with_the_top_alternatives():
    from aigc.sampling import logprobs_of

    logits = torch.randn(3, 10, generator=torch.Generator().manual_seed(1))
    lp = torch.log_softmax(logits, -1)
    out = logprobs_of(logits, [4, 0, 9], [2, 0, 3])
    assert [o.token for o in out] == [4, 0, 9]
    assert [o.logprob for o in out] == pytest.approx([lp[0, 4].item(), lp[1, 0].item(), lp[2, 9].item()])
    assert [len(o.top) for o in out] == [2, 0, 3]
    best = lp[2].topk(3)
    assert [t for t, _ in out[2].top] == best.indices.tolist()
    assert [v for _, v in out[2].top] == pytest.approx(best.values.tolist())


def _scores(lm, ids):
    """log p(ids[i] | ids[:i]) for i >= 1, from one plain forward of the whole sequence."""
    with torch.no_grad():
        logits = lm.model(torch.tensor([ids])).logits[0].float()
    return torch.log_softmax(logits[:-1], -1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0].tolist()


def test_prompt_logprobs_equal_a_full_forward_even_left_padded_in_a_batch(lm):
    short, long = lm.tokenizer.encode("Save big"), lm.tokenizer.encode("Introducing the all new running shoes")
    scoring = SamplingParams(temperature=0, max_tokens=0, prompt_logprobs=2)
    out = generate(lm.model, lm.tokenizer, [short, long], scoring)
    for ids, c in zip([short, long], out, strict=True):
        assert c.prompt_logprobs[0] is None and len(c.prompt_logprobs) == len(ids)
        assert [e.token for e in c.prompt_logprobs[1:]] == ids[1:]
        assert [e.logprob for e in c.prompt_logprobs[1:]] == pytest.approx(_scores(lm, ids), abs=1e-5)
        assert all(len(e.top) == 2 for e in c.prompt_logprobs[1:])
        # max_tokens 0: the prompt is scored, nothing is generated
        assert (c.token_ids, c.text, c.finish_reason) == ([], "", "length")


def test_generated_logprobs_score_the_sampled_tokens(lm):
    ids = lm.tokenizer.encode("Our new")
    [c] = generate(lm.model, lm.tokenizer, [ids], SamplingParams(temperature=1.0, seed=3, max_tokens=6, logprobs=1))
    assert [e.token for e in c.logprobs] == c.token_ids
    # each generated token's logprob is its score given everything before it
    assert [e.logprob for e in c.logprobs] == pytest.approx(_scores(lm, ids + c.token_ids)[len(ids) - 1 :], abs=1e-4)
    assert c.prompt_logprobs is None


def test_logprobs_arrive_with_the_deltas_that_carry_the_tokens(lm):
    params = SamplingParams(temperature=0, max_tokens=10, logprobs=0, prompt_logprobs=0)
    deltas = [d for step in stream_generate(lm.model, lm.tokenizer, ["Our new"], params) for d in step]
    assert sum(1 for d in deltas if d.prompt_logprobs is not None) == 1
    assert [e.token for d in deltas for e in d.logprobs] == deltas[-1].token_ids


def test_max_tokens_zero_needs_prompt_logprobs():
    with pytest.raises(ValidationError) as e:
        SamplingParams(max_tokens=0)
    assert [err["loc"][0] for err in e.value.errors()] == ["max_tokens"]
    assert SamplingParams(max_tokens=0, prompt_logprobs=0).max_tokens == 0


def test_a_plain_gpt2_decodes_through_the_lean_forward_with_transformers_logits(lm):
    """aigc.decode's forward against transformers' own, step by step through a prefill with left padding, rows
    joining a running batch (the cache re-padded) and rows leaving it (the cache cut): same logits, same tokens."""
    import copy

    from aigc.decode import lean_forward
    from aigc.generation import BatchStream

    def run(lean: bool, model=lm.model) -> tuple[list[dict[int, torch.Tensor]], list]:
        stream = BatchStream(model, lm.tokenizer, max_batch_size=8, lean=lean)
        stream.add(["Save", "Our new noise-cancelling headphones"], [GREEDY, SamplingParams(temperature=0, max_tokens=4)])
        steps = []
        for step in range(20):
            if step == 3:
                stream.add(["A much longer prompt about a water-resistant shell", "Hi"],
                           SamplingParams(temperature=0.8, max_tokens=9, seed=5))
            if stream.idle():
                break
            stream.step()
            steps.append({row: lg.clone() for row, lg in stream.last_logits.items()})
        return steps, [c.token_ids for c in stream.completions()]

    lean_steps, lean_tokens = run(True)
    hf_steps, hf_tokens = run(False)
    assert lean_tokens == hf_tokens and len(lean_steps) == len(hf_steps) > 10
    for mine, theirs in zip(lean_steps, hf_steps, strict=True):
        assert mine.keys() == theirs.keys()
        for row in mine:
            assert (mine[row] - theirs[row]).abs().max() <= 1e-5
    # what it does not compute exactly runs transformers' forward
    assert lean_forward(lm.model) is not None
    other = copy.deepcopy(lm.model)
    other.config.scale_attn_by_inverse_layer_idx = True
    assert lean_forward(other) is None
    assert lean_forward(other.train()) is None and lean_forward(lm.model.transformer) is None
    # its plan is kept per model: a layer swapped in place (as peft injects LoRA) turns it off until it is back,
    # and weights changed in place show through
    tuned = copy.deepcopy(lm.model)
    assert lean_forward(tuned) is not None
    attn = tuned.transformer.h[0].attn
    original, attn.c_attn = attn.c_attn, torch.nn.Identity()
    assert lean_forward(tuned) is None
    attn.c_attn = original
    assert lean_forward(tuned) is not None
    with torch.no_grad():
        tuned.transformer.h[0].mlp.c_fc.weight.mul_(3.0)
    changed_steps, _ = run(True, tuned)
    assert (changed_steps[0][0] - lean_steps[0][0]).abs().max() > 1e-3
    assert all((a[r] - b[r]).abs().max() <= 1e-5 for a, b in zip(changed_steps, run(False, tuned)[0], strict=True)
               for r in a)
