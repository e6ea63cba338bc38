"""The vLLM engine against aigc's own on one model directory: the same requests through both engines'
`stream` (the API the replica calls), compared. vLLM lives in its own environment (`make vllm-env`), so the
comparison runs there (tests/integration/vllm_check.py) and this test reads what it printed. Skipped without
that environment (a few GB; CI builds it in .ci/run); AIGC_VLLM_PYTHON names another one's interpreter.

    make vllm-env && .venv/bin/python -m pytest tests/integration/test_vllm_engine.py -v
"""

import json
import os
import subprocess
from pathlib import Path

import pytest

from conftest import free_port, save_random_adapter_dir, save_tiny_model_dir

ROOT = Path(__file__).resolve().parents[2]
VLLM_PYTHON = os.environ.get("AIGC_VLLM_PYTHON", str(ROOT / ".venv-vllm" / "bin" / "python"))

pytestmark = [pytest.mark.integration, pytest.mark.vllm,
              pytest.mark.skipif(not Path(VLLM_PYTHON).is_file(), reason=f"no vLLM environment at {VLLM_PYTHON}")]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny GPT-2 with 64-wide heads (vLLM's CPU attention has no kernel for the 16-wide heads of the suite's
    other tiny models)."""
    return str(save_tiny_model_dir(tmp_path_factory.mktemp("vllm") / "tiny", n_embd=128))


@pytest.fixture(scope="module")
def both(model_dir):
    """What each engine answered (vllm_check.py)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "lib"), "VLLM_CPU_KVCACHE_SPACE": "1"}
    done = subprocess.run([VLLM_PYTHON, str(ROOT / "tests" / "integration" / "vllm_check.py"), str(model_dir)],
                          env=env, capture_output=True, text=True, timeout=600)
    lines = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")]
    assert done.returncode == 0 and lines, done.stderr[-4000:]
    return json.loads(lines[-1][len("RESULT "):])


def test_greedy_tokens_logprobs_and_finish_agree(both):
    a, v = both["aigc"], both["vllm"]
    for kind in ("greedy", "greedy_json"):
        for x, y in zip(a[kind], v[kind], strict=True):
            assert x["ids"] == y["ids"] and len(y["ids"]) == 12
            assert (x["finish"], x["n"]) == (y["finish"], y["n"]) == ("length", 12)
            # aigc ends a text cut inside a UTF-8 character with U+FFFD; vLLM leaves the partial character out
            assert x["text"].rstrip("\ufffd") == y["text"].rstrip("\ufffd")
            for p, q in zip(x["logprobs"], y["logprobs"], strict=True):
                assert p[0] == q[0] and abs(p[1] - q[1]) < 1e-4
                assert [t for t, _ in p[2]] == [t for t, _ in q[2]]
                assert all(abs(lp - lq) < 1e-4 for (_, lp), (_, lq) in zip(p[2], q[2], strict=True))
    # a stream gets its tokens as they come (vLLM joins those made while its reader was busy: up to one a token),
    # a JSON answer the whole output at once
    assert all(1 < r["deltas"] <= 12 for r in v["greedy"]) and [r["deltas"] for r in v["greedy_json"]] == [1, 1, 1]


def test_scoring_a_prompt_matches_and_generates_nothing(both):
    x, y = both["aigc"]["score"], both["vllm"]["score"]
    assert (y["n"], y["finish"], y["text"], y["ids"]) == (0, "length", "", [])
    assert len(y["prompt_logprobs"]) == len(x["prompt_logprobs"]) > 10 and y["prompt_logprobs"][0] is None
    for p, q in zip(x["prompt_logprobs"][1:], y["prompt_logprobs"][1:], strict=True):
        assert p[0] == q[0] and abs(p[1] - q[1]) < 1e-4


def test_stop_strings_seeds_and_an_aborted_stream(both):
    v = both["vllm"]
    assert v["stop"]["finish"] == both["aigc"]["stop"]["finish"] == "stop"
    assert v["stop"]["text"] == both["aigc"]["stop"]["text"] and both["stop_string"] not in v["stop"]["text"]
    first, again = v["seeded"]
    assert first["ids"] == again["ids"] and len(first["ids"]) == 16  # one seed, one sample
    # after a stream was closed mid-generation, the engine answers the same request as before and its check passes
    assert v["after_abort"]["ids"] == v["greedy"][0]["ids"] and v["check"] == 1


def test_the_vllm_engine_records_the_replica_metrics(both):
    """Six requests at once: the queue and running gauges rose and ended at zero, one batch size per request,
    some of them decoded together."""
    m = both["vllm"]["metrics"]
    assert m["counts"] == [0, 0] and m["queued"][-1] == m["running"][-1] == 0
    assert max(m["queued"]) >= 1 and max(m["running"]) > 1
    assert len(m["batch_size"]) == 6 and all(1 <= b <= 6 for b in m["batch_size"]) and max(m["batch_size"]) > 1


def test_the_app_serves_with_vllm_in_its_own_environment(ray_local, model_dir, tmp_path):
    """`engine: vllm` with `vllm_python`: the model replica runs in the vLLM environment behind aigc's edge, and
    the OpenAI surface answers as with aigc's engine: greedy text and scores equal to the model's in-process,
    streaming, a 400 for a bad request and then service as before, /ready and /v1/models. The model is an
    adapter-only directory (vLLM has no LoRA for GPT-2): the replica serves it merged, as the adapter's model."""
    import requests
    from openai import BadRequestError, OpenAI
    from ray import serve

    from aigc.generation import SamplingParams, generate
    from aigc.modeldir import files_fingerprint, load_model, read_metadata
    from aigc.serving.app import build_app

    adapter = save_random_adapter_dir(model_dir, tmp_path / "adapter", seed=4)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    app = build_app({"model_dir": adapter, "model_name": "tiny", "engine": "vllm", "vllm_python": VLLM_PYTHON,
                     "num_cpus": 1, "autoscaling": {"min_replicas": 1, "max_replicas": 1},  # dtype auto: as saved
                     # on a CPU, the fraction of the host memory vLLM reserves (0.92 by default)
                     "vllm_args": {"max_num_seqs": 8, "gpu_memory_utilization": 0.1}})
    serve.run(app, name="vllm", route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    client = OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)
    lm = load_model(adapter)  # merged in memory, as aigc's engine serves it
    base = load_model(model_dir)
    [want] = generate(lm.model, lm.tokenizer, ["Introducing the"],
                      SamplingParams(temperature=0, max_tokens=12, logprobs=2))

    got = client.completions.create(model="tiny", prompt="Introducing the", max_tokens=12, temperature=0, logprobs=2)
    c = got.choices[0]
    assert c.text.rstrip("\ufffd") == want.text.rstrip("\ufffd") and c.finish_reason == "length"
    [plain] = generate(base.model, base.tokenizer, ["Introducing the"], SamplingParams(temperature=0, max_tokens=12))
    assert plain.token_ids != want.token_ids  # the adapter changes what the model says
    assert got.usage.completion_tokens == 12 and len(c.logprobs.tokens) == 12
    assert got.system_fingerprint == files_fingerprint(read_metadata(adapter))  # the adapter's, not the merged copy's
    # each token's logprob and its two best alternatives as in-process (keyed by text: two byte tokens may both
    # read U+FFFD, and then one entry stands for both)
    for top, chosen, lp, mine in zip(c.logprobs.top_logprobs, c.logprobs.tokens, c.logprobs.token_logprobs,
                                     want.logprobs, strict=True):
        assert lp == pytest.approx(mine.logprob, abs=1e-4) and chosen in top and 1 <= len(top) <= 2
        assert all(any(abs(v - alt) < 1e-4 for _, alt in mine.top) for v in top.values())
    streamed = client.completions.create(model="tiny", prompt="Introducing the", max_tokens=12, temperature=0,
                                         stream=True)
    assert "".join(x.choices[0].text for x in streamed).rstrip("\ufffd") == want.text.rstrip("\ufffd")
    # lm-eval-harness's loglikelihood request: the prompt's token scores, nothing generated
    ids = lm.tokenizer("Save big on our new shoes")["input_ids"]
    [scored] = generate(lm.model, lm.tokenizer, [ids], SamplingParams(max_tokens=0, prompt_logprobs=0))
    zero = client.completions.create(model="tiny", prompt=ids, max_tokens=0, echo=True, logprobs=0)
    assert zero.usage.completion_tokens == 0
    assert zero.choices[0].logprobs.token_logprobs[1:] == pytest.approx(
        [t.logprob for t in scored.prompt_logprobs[1:]], abs=1e-4)
    with pytest.raises(BadRequestError, match="max_tokens"):
        client.completions.create(model="tiny", prompt="a", max_tokens=10**6)
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens <= 4
    ready = requests.get(url + "/ready", timeout=60)
    assert ready.status_code == 200 and ready.json()["generated_tokens"] == 1
    assert [m.id for m in client.models.list().data] == ["tiny"]
    serve.delete("vllm")
