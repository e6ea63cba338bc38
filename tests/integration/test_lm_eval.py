"""lm-eval-harness as the acceptance test of the OpenAI surface: a real client, run as users run it.

`lm_eval --model local-completions` against the served embedded base (the session's `embedded_base`), fully
offline, on two tasks over local JSONL written here from the embedded task: `aigc_ads_mc` ranks each
brief's own ad against three other briefs' ads by loglikelihood (token-id prompts, `echo`, `logprobs: 1`,
`max_tokens: 1`), and `aigc_ads_gen` generates an ad for each brief (`generate_until`). Every loglikelihood
it reports must equal the one a plain forward of the same model computes in this process (to 1e-4), and
every generation the one the shared generation path gives.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import free_port

pytestmark = pytest.mark.integration

NAME, KEY, DOCS = "base", "lm-eval-key", 8


@pytest.fixture(scope="module")
def served_base(embedded_base, ray_local):
    from ray import serve

    from aigc.serving.app import build_app

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app({"model_dir": embedded_base.path, "model_name": NAME, "api_keys": [KEY], "num_cpus": 0.5,
                         "autoscaling": {"min_replicas": 1, "max_replicas": 1}}), name="lm-eval", route_prefix="/")
    yield f"http://127.0.0.1:{port}"
    serve.delete("lm-eval")
    serve.shutdown()


def _tasks(folder: Path) -> None:
    """The two task YAMLs and their JSONL: each brief with its own ad and three other briefs' ads."""
    from aigc.corpus import sample_task_rows

    rows = sample_task_rows(DOCS, seed=2026)
    docs = []
    for i, row in enumerate(rows):
        brief, ad = (m["content"] for m in row["messages"])
        wrong = [rows[(i + k) % DOCS]["messages"][1]["content"] for k in (1, 2, 3)]
        label = i % 4  # the right ad's place moves, so always picking one place scores 25%
        docs.append({"brief": brief, "choices": wrong[:label] + [ad] + wrong[label:], "label": label, "ad": ad})
    data = folder / "ads.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    common = (f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
              'doc_to_text: "{{brief}}"\n')
    # the continuation is "\n" + the ad: the prompt the task's training renders (aigc.corpus.PROMPT_SUFFIX)
    (folder / "mc.yaml").write_text("task: aigc_ads_mc\n" + common + 'output_type: multiple_choice\n'
                                    'target_delimiter: "\\n"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: label\n'
                                    "metric_list:\n  - metric: acc\n")
    (folder / "gen.yaml").write_text("task: aigc_ads_gen\n" + common + 'output_type: generate_until\n'
                                     'target_delimiter: "\\n"\ndoc_to_target: "{{ad}}"\n'
                                     'generation_kwargs:\n  until: ["\\n\\n"]\n  max_gen_toks: 24\n'
                                     "metric_list:\n  - metric: exact_match\n")


def _loglikelihood(lm, context: str, continuation: str) -> float:
    """log p(continuation | context) from one plain forward, with the tokens lm-eval's `_encode_pair` makes
    (the whole text encoded, the context's tokens cut off the front)."""
    import torch

    whole, n = lm.tokenizer.encode(context + continuation), len(lm.tokenizer.encode(context))
    with torch.no_grad():
        logits = lm.model(torch.tensor([whole])).logits[0].float()
    lp = torch.log_softmax(logits[:-1], -1).gather(1, torch.tensor(whole[1:])[:, None])[:, 0]
    return lp[n - 1 :].sum().item()


def _samples(out: Path, task: str) -> list[dict]:
    [path] = out.rglob(f"samples_{task}_*.jsonl")
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_lm_eval_harness_scores_the_served_model_as_the_model_does(served_base, embedded_base, tmp_path):
    from aigc.generation import SamplingParams, generate
    from aigc.modeldir import load_model

    _tasks(tmp_path)
    out = tmp_path / "out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OPENAI_API_KEY": KEY,
           "HF_DATASETS_CACHE": str(tmp_path / "hf"), "TOKENIZERS_PARALLELISM": "false"}
    model_args = (f"base_url={served_base}/v1/completions,model={NAME},tokenizer={embedded_base.path},"
                  "tokenizer_backend=huggingface,num_concurrent=1,max_retries=1,max_length=256")
    cmd = [sys.executable, "-m", "lm_eval", "--model", "local-completions", "--model_args", model_args,
           "--tasks", "aigc_ads_mc,aigc_ads_gen", "--include_path", str(tmp_path), "--output_path", str(out),
           "--log_samples", "--seed", "1234"]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]

    lm = load_model(embedded_base.path)
    mc = _samples(out, "aigc_ads_mc")
    assert len(mc) == DOCS
    correct = 0
    for s in mc:
        got = [float(r[0][0]) for r in s["resps"]]  # per choice: [loglikelihood, is_greedy], logged as strings
        args = [(a["arg_0"], a["arg_1"]) for a in s["arguments"].values()]
        want = [_loglikelihood(lm, ctx, cont) for ctx, cont in args]
        assert got == pytest.approx(want, abs=1e-4), (s["doc_id"], got, want)
        assert args[s["doc"]["label"]][1] == "\n" + s["doc"]["ad"]
        correct += max(range(4), key=want.__getitem__) == s["doc"]["label"]
    [results] = out.rglob("results_*.json")
    acc = json.loads(results.read_text())["results"]["aigc_ads_mc"]["acc,none"]
    assert acc == correct / DOCS  # lm-eval's accuracy is the in-process ranking's
    print(f"lm-eval aigc_ads_mc acc={acc:.3f} over {DOCS} briefs (4 choices: chance 0.25)")

    stop = ["\n\n", lm.tokenizer.eos_token]  # lm-eval adds the tokenizer's EOS to `until`
    for s in _samples(out, "aigc_ads_gen"):
        [ctx] = [a["arg_0"] for a in s["arguments"].values()]
        [want] = generate(lm.model, lm.tokenizer, [ctx], SamplingParams(temperature=0, max_tokens=24, stop=stop))
        assert s["resps"][0][0] == want.text, s["doc_id"]
