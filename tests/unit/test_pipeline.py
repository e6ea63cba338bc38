"""The pipeline's smoke step: what it sends after deploying, per data format (no Ray, no HTTP)."""

from __future__ import annotations

from aigc.config import DataSection
from aigc.pipeline import smoke_requests
from aigc.pipeline_config import DeploySection
from aigc.taskmetrics import is_embedded_task

SMALL = {"n_train": 30, "n_validation": 10, "n_test": 10, "seed": 0}


def test_chat_smoke_sends_test_briefs_without_their_answers():
    reqs = smoke_requests(DataSection(source="embedded", format="chat", embedded=SMALL), DeploySection())
    assert len(reqs) == 3 and {r["route"] for r in reqs} == {"chat"}
    for r in reqs:
        assert r["messages"][-1]["role"] == "user" and r["prompt"] == r["messages"][-1]["content"]
        assert all(m["role"] != "assistant" for m in r["messages"])  # the reference ad is not sent
    assert is_embedded_task([r["prompt"] for r in reqs])  # so the pipeline scores validity and fidelity


def test_prompt_completion_smoke_uses_completions_and_text_uses_the_configured_prompts():
    reqs = smoke_requests(DataSection(source="embedded", format="prompt_completion", embedded=SMALL),
                          DeploySection(smoke_examples=2))
    assert len(reqs) == 2 and all(r["route"] == "completions" and r["text"].startswith("Product: ") for r in reqs)
    text = smoke_requests(DataSection(), DeploySection(smoke_prompts=["Save"]))
    assert text == [{"route": "completions", "prompt": "Save", "text": "Save"}]


def test_deploying_as_an_adapter_needs_a_lora_winner_and_a_usable_name():
    from pathlib import Path

    import pytest

    from aigc.config import ConfigError, load_config
    from aigc.pipeline_config import PipelineConfig

    shipped = Path(__file__).resolve().parents[2] / "jobs/configs/pipeline-tiny-cpu.yaml"
    cfg = load_config(PipelineConfig, shipped, ["deploy.as_adapter=true", "base.model.peft.method=lora",
                                                "base.model.train_top_n_blocks=0", "deploy.adapter_name=shoes"])
    assert cfg.deploy.as_adapter and cfg.deploy.adapter_name == "shoes"
    with pytest.raises(ConfigError) as e:
        load_config(PipelineConfig, shipped, ["deploy.as_adapter=true"])
    assert "deploy.as_adapter: the winner must be a LoRA adapter, but base.model.peft.method is 'none'" in str(e.value)
    with pytest.raises(ConfigError, match="deploy.adapter_name: String should match pattern"):
        load_config(PipelineConfig, shipped, ["deploy.adapter_name=a:b"])


def test_deploy_refuses_a_port_something_listens_on_where_no_serve_runs_yet(monkeypatch):
    """Serve's proxy binds with SO_REUSEPORT: a pipeline starting Serve on a port another local Serve holds would share
    it silently. Where this Ray runs no Serve yet, deploy refuses the port before starting Serve; where Serve runs
    (an update in place), the port is its own."""
    import socket

    import pytest
    from ray import serve

    from aigc import pipeline
    from aigc.config import ConfigError

    started = []
    monkeypatch.setattr(serve, "start", lambda **kw: started.append(kw))
    monkeypatch.setattr(serve, "run", lambda *a, **kw: None)
    monkeypatch.setattr(pipeline, "build_app", lambda args: None)
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        monkeypatch.setattr(pipeline, "serve_running", lambda: False)
        with pytest.raises(ConfigError, match=f"deploy.port: something already listens on 127.0.0.1:{port}"):
            pipeline.deploy("winner", DeploySection(port=port))
        assert started == []
        monkeypatch.setattr(pipeline, "serve_running", lambda: True)
        assert pipeline.deploy("winner", DeploySection(port=port)) == f"http://127.0.0.1:{port}"
        assert started == [{"http_options": {"host": "127.0.0.1", "port": port}}]


def test_the_pipeline_refuses_a_taken_port_before_its_search(monkeypatch):
    """A deploy.port the deploy would refuse stops the pipeline before the search, not after it."""
    import socket
    from pathlib import Path

    import pytest

    from aigc import pipeline
    from aigc.config import ConfigError, load_config
    from aigc.pipeline_config import PipelineConfig

    shipped = Path(__file__).resolve().parents[2] / "jobs/configs/pipeline-tiny-cpu.yaml"
    searched = []
    monkeypatch.setattr(pipeline, "init_ray", lambda: None)
    monkeypatch.setattr(pipeline, "serve_running", lambda: False)
    monkeypatch.setattr(pipeline, "run_search", lambda cfg: searched.append(cfg))
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        cfg = load_config(PipelineConfig, shipped, [f"deploy.port={port}"])
        with pytest.raises(ConfigError, match=rf"deploy.port: something already listens on \S+:{port} .*"
                                               r"\(checked before the search"):
            pipeline.run_pipeline(cfg)
    assert searched == []
