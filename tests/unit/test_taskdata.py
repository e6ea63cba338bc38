"""Task data: row validation naming file, line and field; loss masks proven by decoding; one chat rendering
for training and serving; packing whose loss equals the examples' one at a time."""

import json

import numpy as np
import pytest
import torch

from aigc.config import DataSection
from aigc.data import DataError, expand, load_splits, model_inputs
from aigc.modeling import EOS, train_tokenizer
from aigc.taskdata import (
    NO_LOSS,
    OK,
    RENDER_ERROR,
    TOO_LONG,
    TRUNCATED,
    encode_example,
    fit_example,
    make_blocker,
    make_encoder,
    make_task_packer,
    pack_examples,
)
from aigc.template import (
    DEFAULT_CHAT_TEMPLATE,
    TemplateError,
    chat_segments,
    ensure_chat_template,
    prompt_ids,
    render_prompt,
)

CHATS = [
    [{"role": "user", "content": "Brief: running shoes, 20% off"},
     {"role": "assistant", "content": "Run lighter: our trail shoes are 20% off this week."}],
    [{"role": "system", "content": "You write short ads."},
     {"role": "user", "content": "Brief: coffee grinder"},
     {"role": "assistant", "content": "Grind fresh every morning."},
     {"role": "user", "content": "Shorter, please."},
     {"role": "assistant", "content": "Fresh grind, daily."}],
    [{"role": "user", "content": "Brief: desk lamp\nTone: calm"},
     {"role": "assistant", "content": "Soft light for\nlong evenings."}],
]
PAIRS = [("Brief: wool socks\nAd:", " Warm feet, all winter."), ("Brief: tea\nAd:", " Steep, sip, smile."),
         ("Brief: bike lights\nAd:", " Be seen on every ride.")]


@pytest.fixture(scope="module")
def tok():
    texts = [m["content"] for c in CHATS for m in c] + [p + c for p, c in PAIRS]
    t = train_tokenizer(texts * 20 + ["User: Assistant: System:"] * 20, vocab_size=320)
    ensure_chat_template(t)
    return t


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def cfg_for(fmt, **kw):
    return DataSection(source="files", train_files=["unused.jsonl"], format=fmt, **kw)


def labelled(tok, row, fmt, **kw):
    ids, labels, status = fit_example(*encode_example(row, tok, fmt), cfg_for(fmt, **kw))
    return ids, labels, status


def loss_text(tok, labels):
    return tok.decode([t for t in labels if t != -100])


# --------------------------------------------------------------------------------------------- masks


@pytest.mark.parametrize("chat", CHATS)
def test_chat_tokens_with_loss_decode_to_the_assistant_turns_and_eos(tok, chat):
    _, labels, status = labelled(tok, {"messages": json.dumps(chat)}, "chat", block_size=256)
    assert status == OK
    assert loss_text(tok, labels) == "".join(m["content"] + EOS for m in chat if m["role"] == "assistant")


@pytest.mark.parametrize("prompt, completion", PAIRS)
def test_prompt_completion_tokens_with_loss_decode_to_the_completion_and_eos(tok, prompt, completion):
    ids, labels, status = labelled(tok, {"prompt": prompt, "completion": completion}, "prompt_completion")
    assert status == OK and loss_text(tok, labels) == completion + EOS
    assert tok.decode(ids) == prompt + completion + EOS


def test_train_on_prompt_learns_everything_but_the_first_token(tok):
    ids, labels, _ = labelled(tok, {"messages": json.dumps(CHATS[1])}, "chat", block_size=256, train_on_prompt=True)
    assert labels[0] == -100 and labels[1:] == ids[1:]


def test_truncation_policies(tok):
    row = {"prompt": "Brief: " + "very long brief " * 20 + "\nAd:", "completion": " Short ad."}
    full, _ = encode_example(row, tok, "prompt_completion")
    block = len(full) - 5
    assert labelled(tok, row, "prompt_completion", block_size=block)[2] == TOO_LONG  # error: driver names it
    assert labelled(tok, row, "prompt_completion", block_size=block, truncation="drop")[2] == TOO_LONG
    ids, labels, status = labelled(tok, row, "prompt_completion", block_size=block, truncation="truncate_prompt_left")
    assert status == TRUNCATED and len(ids) == block and ids == full[5:]
    assert loss_text(tok, labels) == " Short ad." + EOS  # the completion is never cut
    # a completion that cannot fit with any context is dropped, not trained on nothing
    n_completion = len(tok(" Short ad.", add_special_tokens=False)["input_ids"]) + 1
    assert labelled(tok, row, "prompt_completion", block_size=max(8, n_completion),
                    truncation="truncate_prompt_left")[2] == TOO_LONG


def test_truncation_leaves_no_loss_on_a_partly_cut_turn(tok):
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "one two three four five six"},
            {"role": "user", "content": "again"}, {"role": "assistant", "content": "ok"}]
    full, train = encode_example({"messages": json.dumps(chat)}, tok, "chat")
    first_turn = train.index(True)
    cut = first_turn + 2  # two tokens into the first assistant turn
    ids, labels, status = fit_example(full, train, cfg_for("chat", block_size=len(full) - cut,
                                                           truncation="truncate_prompt_left"))
    assert status == TRUNCATED and loss_text(tok, labels) == "ok" + EOS


def test_an_example_with_nothing_to_learn_is_reported():
    assert fit_example([1, 2], [False, True], cfg_for("prompt_completion"))[2] == OK
    assert fit_example([1, 2], [True, False], cfg_for("prompt_completion"))[2] == NO_LOSS  # only the first token


# ------------------------------------------------------------------------------------------ template


@pytest.mark.parametrize("chat", CHATS)
def test_training_prompt_part_equals_the_serve_rendering(tok, chat):
    """The text and token ids before the last assistant turn are what Serve sends for the same messages."""
    last = max(i for i, m in enumerate(chat) if m["role"] == "assistant")
    segments = chat_segments(tok, chat)
    assert not segments[-1].text.startswith("Assistant") and segments[-1].train
    prompt_text = "".join(s.text for s in segments[:-1])
    assert prompt_text == render_prompt(tok, chat[:last])
    assert prompt_text == tok.apply_chat_template(chat[:last], tokenize=False, add_generation_prompt=True)
    served = prompt_ids(tok, chat[:last])
    ids, train = encode_example({"messages": json.dumps(chat)}, tok, "chat")
    assert ids[:len(served)] == served and not train[len(served) - 1]  # the same ids, then the last turn
    assert all(train[len(served):]) and tok.decode(ids[len(served):]) == chat[last]["content"] + EOS


def test_default_template_text_and_saved_with_the_tokenizer(tok, tmp_path):
    from transformers import AutoTokenizer

    assert render_prompt(tok, CHATS[1][:2]) == "System: You write short ads.\nUser: Brief: coffee grinder\nAssistant:\n"
    assert "".join(s.text for s in chat_segments(tok, CHATS[0])) == (
        "User: Brief: running shoes, 20% off\nAssistant:\nRun lighter: our trail shoes are 20% off this week." + EOS)
    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again.chat_template == DEFAULT_CHAT_TEMPLATE and not ensure_chat_template(again)
    assert prompt_ids(again, CHATS[2][:1]) == prompt_ids(tok, CHATS[2][:1])


def test_a_template_that_cannot_render_or_split_raises(tok):
    import copy

    broken = copy.copy(tok)
    broken.chat_template = "{{ messages[0]['content'] + undefined_function() }}"
    with pytest.raises(TemplateError, match="fails to render"):
        chat_segments(broken, CHATS[0])
    broken.chat_template = "{% for m in messages|reverse %}{{ m['content'] }}{% endfor %}"  # not prefix-stable
    with pytest.raises(TemplateError, match="prefix-stable"):
        chat_segments(broken, CHATS[1])


# ------------------------------------------------------------------------------------------- packing


def gpt2(vocab):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=vocab, n_positions=64, n_layer=2, n_embd=32, n_head=2,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(cfg).eval()


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_block_loss_equals_examples_one_at_a_time(attn):
    """No cross-talk: the loss of packed blocks equals the token-weighted loss of their examples alone."""
    rng = np.random.default_rng(0)
    examples = []
    for n in (9, 5, 14, 3, 11, 7):
        ids = rng.integers(1, 50, n)
        labels = ids.copy()
        labels[: n // 2] = -100  # a prompt
        examples.append((ids, labels))
    block = pack_examples([e[0] for e in examples], [e[1] for e in examples], block_size=24, pad=0)
    assert len(block["ids"]) < len(examples)  # several examples share a block
    model = gpt2(50)
    model.set_attn_implementation(attn)
    with torch.no_grad():
        batch = model_inputs({k: torch.from_numpy(v) for k, v in block.items()}, "cpu")
        n_packed = int((batch["labels"][:, 1:] != -100).sum())
        packed = float(model(**batch).loss) * n_packed
        alone, n_alone = 0.0, 0
        for ids, labels in examples:
            lab = torch.from_numpy(labels)[None]
            n = int((lab[:, 1:] != -100).sum())
            alone += float(model(input_ids=torch.from_numpy(ids)[None], labels=lab).loss) * n
            n_alone += n
    assert n_packed == n_alone == int(block["n_loss"].sum())
    assert packed / n_packed == pytest.approx(alone / n_alone, abs=1e-4)
    # and the check has teeth: with a KV cache (the config default) the examples would see each other
    with torch.no_grad():
        leaky = float(model(**{**batch, "use_cache": True}).loss) * n_packed
    assert abs(leaky / n_packed - alone / n_alone) > 1e-3


def test_pack_examples_resets_positions_and_masks_padding():
    block = pack_examples([np.array([5, 6, 7]), np.array([8, 9])], [np.array([-100, 6, 7]), np.array([-100, 9])],
                          block_size=8, pad=0)
    assert set(block) == {"ids", "n_tokens", "n_loss", "layout"}  # one integer a token, nothing else per token
    out = {k: v.tolist() for k, v in expand({k: torch.from_numpy(v) for k, v in block.items()}).items()}
    out["n_loss"] = block["n_loss"]
    assert out["input_ids"] == [[5, 6, 7, 8, 9, 0, 0, 0]]
    assert out["position_ids"] == [[0, 1, 2, 0, 1, 0, 1, 2]]
    assert out["labels"] == [[-100, 6, 7, -100, 9, -100, -100, -100]]
    assert out["n_tokens"] == [5] and out["n_loss"].tolist() == [3]


def test_unpacked_rows_are_trimmed_to_the_longest_in_the_batch(tok):
    cfg = cfg_for("prompt_completion", block_size=64, packing=False)
    rows = {"prompt": np.array([p for p, _ in PAIRS], dtype=object),
            "completion": np.array([c for _, c in PAIRS], dtype=object),
            "source": np.array(["f line 1", "f line 2", "f line 3"], dtype=object)}
    encoded = make_encoder(tok, cfg)(rows)
    assert encoded["status"].tolist() == [OK] * 3
    padded = make_blocker(64, False, tok.eos_token_id)(encoded)
    batch = model_inputs({k: torch.from_numpy(v) for k, v in padded.items()}, "cpu")
    assert batch["input_ids"].shape == (3, int(encoded["length"].max())) and batch["use_cache"] is False
    for r in range(3):
        assert loss_text(tok, batch["labels"][r].tolist()) == PAIRS[r][1] + EOS


# -------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "fmt, row, match",
    [
        ("chat", {"messages": [{"role": "user", "content": "hi"}]}, r"line 2: field 'messages': no assistant turn"),
        ("chat", {"messages": [{"role": "bot", "content": "hi"}, {"role": "assistant", "content": "x"}]},
         r"line 2: field 'messages\[0\].role': 'bot' is not one of system, user, assistant"),
        ("chat", {"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "x"}]},
         r"line 2: field 'messages\[0\].content': holds int, not text"),
        ("chat", {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": " "}]},
         r"line 2: field 'messages\[1\].content': empty assistant turn"),
        ("chat", {"text": "no messages"}, r"line 2: field 'messages': missing"),
        ("prompt_completion", {"prompt": "p"}, r"line 2: field 'completion': missing"),
        ("prompt_completion", {"prompt": None, "completion": "c"}, r"line 2: field 'prompt': null"),
        ("prompt_completion", {"prompt": "p", "completion": ""}, r"line 2: field 'completion': empty"),
        ("prompt_completion", {"prompt": ["p"], "completion": "c"}, r"line 2: field 'prompt': holds list"),
    ],
)
def test_bad_rows_name_file_line_and_field(tmp_path, fmt, row, match):
    good = ({"messages": CHATS[0]} if fmt == "chat" else {"prompt": "p", "completion": "c"})
    f = write(tmp_path / "bad.jsonl", [good, row, good])
    with pytest.raises(DataError, match="bad.jsonl" + ".*" + match):
        load_splits(DataSection(source="files", train_files=[f], format=fmt))


def test_every_bad_row_is_counted_in_one_error(tmp_path):
    f = write(tmp_path / "many.jsonl", [{"prompt": "p"}] * 15)
    with pytest.raises(DataError, match=r"15 bad row\(s\)(.|\n)*and 5 more"):
        load_splits(DataSection(source="files", train_files=[f], format="prompt_completion"))


def test_extra_columns_are_ignored_and_alpaca_columns_map(tmp_path):
    rows = [{"messages": CHATS[0], "brief": {"product": "shoes"}, "nats": 12.5}] * 20
    s = load_splits(DataSection(source="files", train_files=[write(tmp_path / "c.jsonl", rows)], format="chat"))
    assert set(s.train.columns) == {"messages", "source"} and len(s.train) + len(s.validation) + len(s.test) == 20
    assert json.loads(s.train.to_list()[0]["messages"]) == CHATS[0]
    alpaca = [{"instruction": "Write an ad", "input": "for tea" if i % 2 else "", "output": "Sip."} for i in range(20)]
    s = load_splits(DataSection(source="files", train_files=[write(tmp_path / "a.jsonl", alpaca)],
                               format="prompt_completion", prompt_column="instruction", input_column="input",
                               completion_column="output", prompt_suffix="\n", split_ratios=(1.0, 0.0, 0.0)))
    assert sorted({r["prompt"] for r in s.train.rows()}) == ["Write an ad\n", "Write an ad\n\nfor tea\n"]


def test_plain_text_files_cannot_hold_task_rows(tmp_path):
    (tmp_path / "t.txt").write_text("a line\n")
    with pytest.raises(DataError, match="t.txt: plain text has no fields"):
        load_splits(DataSection(source="files", train_files=[str(tmp_path / "t.txt")], format="chat"))


def test_encoder_marks_rows_whose_template_fails(tok):
    import copy

    broken = copy.copy(tok)
    broken.chat_template = "{{ raise_exception('nope') }}"
    out = make_encoder(broken, cfg_for("chat"))({"messages": np.array([json.dumps(CHATS[0])], dtype=object),
                                                 "source": np.array(["f line 7"], dtype=object)})
    assert out["status"].tolist() == [RENDER_ERROR] and "nope" in out["error"][0]


def test_the_readme_examples_load_and_mask(tmp_path, tok):
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    chat, pc = re.findall(r"```jsonl\n(.*?)```", readme, re.S)
    for fmt, body in (("chat", chat), ("prompt_completion", pc)):
        f = tmp_path / f"{fmt}.jsonl"
        f.write_text(body)
        s = load_splits(DataSection(source="files", format=fmt, train_files=[str(f)], validation_files=[str(f)],
                                   test_files=[str(f)]))
        assert len(s.train) == 5
        for row in s.train.rows():
            _, labels, status = labelled(tok, row, fmt, block_size=256)
            assert status == OK
            want = ([m["content"] for m in json.loads(row["messages"]) if m["role"] == "assistant"] if fmt == "chat"
                    else [row["completion"]])
            assert loss_text(tok, labels) == "".join(w + EOS for w in want)


@pytest.mark.parametrize("packing", [True, False])
def test_the_cluster_map_keeps_one_compact_integer_a_token_and_its_loss_decodes_to_the_completions(tok, packing):
    """The Ray Data map of task rows stores flagged uint16 ids (the 320-token vocabulary fits with 2 flag bits);
    the labels `model_inputs` builds from them are exactly the completions and their EOS."""
    cfg = cfg_for("prompt_completion", block_size=64, packing=packing, scrub_pii=True)
    rows = {"prompt": np.array([p for p, _ in PAIRS], dtype=object),
            "completion": np.array([c for _, c in PAIRS], dtype=object),
            "source": np.array(["f line 1", "f line 2", "f line 3"], dtype=object)}
    out = make_task_packer(tok, cfg)(rows)
    assert out["ids"].dtype == np.uint16 and out["ids"].ndim == 2
    assert (out["n_ok"].sum(), out["n_too_long"].sum(), out["pii_email"].sum()) == (3, 0, 0)
    per_token = out["ids"].itemsize + sum(v.itemsize for k, v in out.items() if k != "ids") / out["ids"].shape[1]
    assert per_token <= 4
    batch = model_inputs({k: torch.from_numpy(v) for k, v in out.items()}, "cpu")
    assert ("position_ids" in batch) == packing and ("attention_mask" in batch) != packing
    got = [loss_text(tok, row.tolist()) for row in batch["labels"]]
    want = [c + EOS for _, c in PAIRS]
    assert sorted(got) == sorted(want) if not packing else "".join(got) == "".join(sorted(want, key=len, reverse=True))
    assert int(out["n_loss"].sum()) == int((batch["labels"] != -100).sum())


def test_a_row_that_cannot_be_used_stops_the_cluster_map_naming_it(tok):
    cfg = cfg_for("prompt_completion", block_size=16)
    rows = {"prompt": np.array(["Brief: " + "very long brief " * 20, "p"], dtype=object),
            "completion": np.array([" ad.", " ad."], dtype=object), "source": np.array(["f line 4", "f line 5"], dtype=object)}
    with pytest.raises(DataError, match="f line 4: longer than data.block_size=16"):
        make_task_packer(tok, cfg)(rows)
    dropped = make_task_packer(tok, cfg_for("prompt_completion", block_size=16, truncation="drop"))(rows)
    assert dropped["n_too_long"].sum() == 1 and dropped["n_ok"].sum() == 1
