"""Many LoRA adapters on one base over real Ray Serve and HTTP: two adapters trained on two slices of the embedded
task (footwear briefs, audio briefs) served as '<base>:<adapter>' beside their base, each answering as its own
model alone, each better on its own slice; the merged export of one served alone answering as its adapter does;
unknown adapters 404; and the pipeline putting a winner onto the running app as one more adapter.

The adapters train in-process (a plain loop over the task's own encoder and loss masks) to keep this file cheap:
training LoRA under Ray Train and ZeRO, and its export, are tests/integration/test_lora_zero3.py's.
"""

from __future__ import annotations

import random
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
import torch

from aigc.config import DataSection, FinetuneConfig, load_config
from aigc.corpus import sample_task_rows, to_prompt_completion
from aigc.evaluate import completion_nats
from aigc.generation import max_positions
from aigc.lora import trainable_model
from aigc.modeldir import load_model, save_adapter_dir
from aigc.taskdata import encode_example, fit_example, pad_id
from conftest import free_port

pytestmark = pytest.mark.integration

KEY, BASE = "test-key", "base"
AUTH = {"Authorization": f"Bearer {KEY}"}
SLICES = ("footwear", "audio")  # two categories of the embedded task: one adapter each
LORA = ["model.peft.method=lora", "model.peft.r=8", "model.peft.alpha=16", "model.train_top_n_blocks=0"]
STEPS, BATCH, LR = 30, 16, 1e-2  # ~3 s of training per adapter on the session's tiny base (one thread)


def rows_by_slice(n: int, seed: int) -> dict[str, list[dict]]:
    rows = sample_task_rows(n, seed)
    return {c: [to_prompt_completion(r) for r in rows if r["brief"]["category"] == c] for c in SLICES}


def train_adapter(base: str, rows: list[dict], out: Path, data: DataSection) -> str:
    """LoRA on `base` trained on `rows` (completion tokens only, as the fine-tune's masks), exported merged."""
    lm = load_model(base)
    model, _, _ = trainable_model(lm.model, load_config(FinetuneConfig, None, LORA).model)
    examples = [ex[:2] for r in rows if (ex := fit_example(*encode_example(r, lm.tokenizer, data.format), data))[0]]
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=LR)
    rng, pad = random.Random(0), pad_id(lm.tokenizer)
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 2 x 32 model: more threads only contend on a shared machine
    model.train()
    for _ in range(STEPS):
        batch = rng.sample(examples, BATCH)
        width = max(len(ids) for ids, _ in batch)
        ids = torch.tensor([i + [pad] * (width - len(i)) for i, _ in batch])
        labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in batch])
        mask = torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i, _ in batch])
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad()
    torch.set_num_threads(threads)
    model.eval()
    return str(save_adapter_dir(model, lm.tokenizer, out, base=base, merge=True, config={"slice": out.name},
                                metrics={}))


@pytest.fixture(scope="module")
def trained(embedded_base, tmp_path_factory):
    """The footwear adapter as a listed directory, the audio one inside the adapter folder; held-out rows per slice."""
    root = tmp_path_factory.mktemp("adapters")
    data = DataSection(format="prompt_completion", block_size=max_positions(load_model(embedded_base.path).model))
    train, test = rows_by_slice(1400, seed=0), rows_by_slice(400, seed=1)
    dirs = {"footwear": train_adapter(embedded_base.path, train["footwear"], root / "listed" / "footwear", data),
            "audio": train_adapter(embedded_base.path, train["audio"], root / "folder" / "audio", data)}
    return {"dirs": dirs, "folder": str(root / "folder"), "test": {c: test[c][:24] for c in SLICES}, "data": data}


@pytest.fixture(scope="module")
def served(ray_local, embedded_base, trained):
    from ray import serve

    from aigc.serving.app import build_app

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    one = {"num_cpus": 0.5, "autoscaling": {"min_replicas": 1, "max_replicas": 1}, "api_keys": [KEY],
           "limits": {"max_tokens": 64}}
    # one adapter per replica: asking for the other unloads the first (Serve's LRU), so reloads are exercised
    serve.run(build_app({**one, "model_dir": embedded_base.path, "model_name": BASE, "max_adapters_per_replica": 1,
                         "adapters": [trained["dirs"]["footwear"]], "adapter_folder": trained["folder"]}),
              name="multi", route_prefix="/")
    serve.run(build_app({**one, "model_dir": trained["dirs"]["footwear"], "model_name": "merged"}),
              name="merged", route_prefix="/merged")
    yield {"url": f"http://127.0.0.1:{port}", "port": port}
    serve.delete("multi")
    serve.delete("merged")


def complete(url: str, model: str, prompt: str, **extra) -> requests.Response:
    body = {"model": model, "prompt": prompt, "max_tokens": 24, "temperature": 0, "return_token_ids": True, **extra}
    return requests.post(f"{url}/v1/completions", json=body, headers=AUTH, timeout=120)


def greedy(url: str, model: str, prompt: str) -> list[int]:
    r = complete(url, model, prompt)
    assert r.status_code == 200, r.text
    assert r.json()["model"] == model
    return r.json()["choices"][0]["token_ids"]


def test_models_lists_base_and_adapters_and_an_unknown_one_is_a_404_naming_it(served):
    url = served["url"]
    listed = requests.get(f"{url}/v1/models", headers=AUTH, timeout=60).json()["data"]
    assert [m["id"] for m in listed] == [BASE, f"{BASE}:footwear", f"{BASE}:audio"]
    assert all(m["parent"] == BASE for m in listed[1:]) and len({m["system_fingerprint"] for m in listed}) == 3
    r = complete(url, f"{BASE}:nonesuch", "Save")
    assert r.status_code == 404
    assert r.json()["error"] == {
        "message": f"model: adapter 'nonesuch' of '{BASE}' does not exist; this server has '{BASE}', "
                   f"'{BASE}:footwear', '{BASE}:audio'", "type": "invalid_request_error", "param": "model",
        "code": "model_not_found"}
    assert complete(url, "other:footwear", "Save").status_code == 404
    assert requests.post(f"{url}/v1/completions", json={"model": BASE, "prompt": "Save"}, timeout=60).status_code == 401


def test_two_adapters_answer_differently_and_each_fits_its_own_slice_best(served, trained):
    url, test, data = served["url"], trained["test"], trained["data"]
    prompt = test["footwear"][0]["prompt"]
    answers = {a: greedy(url, f"{BASE}:{a}", prompt) for a in SLICES}
    assert answers["footwear"] != answers["audio"] and greedy(url, BASE, prompt) not in answers.values()

    def loss(adapter: str, slice_: str) -> float:  # mean completion nats, the adapter's model as served
        lm = load_model(trained["dirs"][adapter])
        nats = completion_nats(lm.model, lm.tokenizer, test[slice_], data)
        return sum(n for n in nats if n is not None) / sum(n is not None for n in nats)

    for own, other in (SLICES, SLICES[::-1]):
        assert loss(own, own) < loss(other, own), own


def test_the_merged_export_served_alone_answers_as_its_adapter_on_the_base(served, trained):
    """Also: the footwear and audio adapters take turns on a replica that holds one (unload, reload), and
    requests for the base and both adapters at once answer as each alone."""
    url, test = served["url"], trained["test"]
    prompts = [test["footwear"][i]["prompt"] for i in range(3)]
    merged = [greedy(f"{url}/merged", "merged", p) for p in prompts]
    assert [greedy(url, f"{BASE}:footwear", p) for p in prompts] == merged
    alone = {m: greedy(url, m, prompts[0]) for m in (f"{BASE}:audio", BASE, f"{BASE}:footwear")}
    assert alone[f"{BASE}:footwear"] == merged[0]
    with ThreadPoolExecutor(6) as pool:
        at_once = list(pool.map(lambda m: (m, greedy(url, m, prompts[0])), [*alone, *alone]))
    assert all(tokens == alone[m] for m, tokens in at_once)


def test_the_pipeline_deploys_a_winner_as_an_adapter_onto_the_running_app(served, trained, tmp_path):
    from aigc.pipeline import deploy_adapter, smoke
    from aigc.pipeline_config import DeploySection

    d = DeploySection(app_name="multi", port=served["port"], as_adapter=True, smoke_max_tokens=24)
    url, model = deploy_adapter(trained["dirs"]["footwear"], d, "customer2")
    assert (url, model) == (served["url"], f"{BASE}:customer2")
    brief = trained["test"]["footwear"][0]["prompt"]
    [got] = smoke(url, d, model, [{"route": "completions", "prompt": brief, "text": brief}], KEY)
    r = complete(url, f"{BASE}:footwear", brief)
    assert got["completion"] == r.json()["choices"][0]["text"] and "valid" in got  # scored as an embedded brief
    with pytest.raises(RuntimeError, match="no running Serve app 'nonesuch'"):
        deploy_adapter(trained["dirs"]["footwear"], d.model_copy(update={"app_name": "nonesuch"}), "x")
    with pytest.raises(RuntimeError, match="the running app 'merged' serves no adapter_folder"):
        deploy_adapter(trained["dirs"]["footwear"], d.model_copy(update={"app_name": "merged"}), "x")
