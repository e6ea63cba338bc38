"""The one command line: every verb's --help shows its config fields with their descriptions, every
config field has a description, and user errors exit 2 before any Ray resource is used."""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
import typing
from pathlib import Path

import pytest
from pydantic import BaseModel, Field

from aigc.cli import VERBS, config_fields, main
from aigc.config import FinetuneConfig, Strict

ROOT = Path(__file__).resolve().parents[2]
# The modules that hold config models (pydantic, on `Strict`): every field of every model they reach is described.
CONFIG_MODULES = ("aigc.config", "aigc.search_config", "aigc.serving.args", "aigc.pipeline_config")


def _help(capsys, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 0
    return capsys.readouterr().out


def _keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    out = []
    for name, f in model.model_fields.items():
        out.append(prefix + name)
        if isinstance(f.annotation, type) and issubclass(f.annotation, BaseModel):
            out += _keys(f.annotation, f"{prefix}{name}.")
    return out


def _strict_models() -> set[type[Strict]]:
    """Every Strict model the config modules hold, and every one their fields hold, at any depth."""
    todo = [m for name in CONFIG_MODULES for _, m in inspect.getmembers(importlib.import_module(name), inspect.isclass)
            if issubclass(m, Strict) and m is not Strict]
    seen: set[type[Strict]] = set()
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            for f in m.model_fields.values():
                todo += [t for t in _types_in(f.annotation) if isinstance(t, type) and issubclass(t, Strict)]
    return seen


def _types_in(annotation: object) -> list[object]:
    """`annotation` and every type inside it (`X | None`, `list[X]`, `dict[str, X]`, ...)."""
    return [annotation, *(t for arg in typing.get_args(annotation) for t in _types_in(arg))]


def test_every_config_field_has_a_description():
    models = list(_strict_models())
    assert {m.__name__ for m in models} >= {"FinetuneConfig", "OptimSection", "ZeroSection", "RunSection", "ParamSpec",
                                           "SearchConfig", "ServeArgs", "LimitsArgs"}
    missing = sorted(f"{m.__module__}.{m.__name__}.{name}" for m in models
                     for name, f in m.model_fields.items() if not f.description)
    assert missing == []


def test_aigc_help_lists_every_verb(capsys):
    out = _help(capsys, ["--help"])
    for verb, fn in VERBS.items():
        assert verb in out and inspect.getdoc(fn).split()[0] in out
    assert "--verbose" in out


def test_finetune_help_shows_every_field_with_type_default_and_description(capsys):
    out = _help(capsys, ["finetune", "--help"])
    assert "usage: aigc finetune" in out and "--config CONFIG" in out
    for key in _keys(FinetuneConfig):
        assert f"  {key}: " in out, key
    field = FinetuneConfig.model_fields["optim"].annotation.model_fields["lr"]
    assert f"  optim.lr: float = 0.003\n      {field.description}\n" in out
    assert '  zero.stage: Literal[0, 1, 2, 3] = 2\n' in out and "  model.dropout: float | None = null\n" in out


@pytest.mark.parametrize("verb, keys", [
    ("search", ["base.optim.lr", "space.lr.low", "search.asha.grace_period", "search.num_samples"]),
    ("pipeline", ["base.zero.stage", "space.dropout.high", "deploy.port", "deploy.keep_serving"]),
])
def test_search_and_pipeline_help_show_their_nested_fields(capsys, verb, keys):
    out = _help(capsys, [verb, "--help"])
    assert f"usage: aigc {verb}" in out
    for key in keys:
        assert f"  {key}: " in out, key
    assert "      seed of the sampler, so a search draws the same trials every time" in out


def test_serve_help_shows_its_options_then_the_serve_args(capsys):
    from aigc.serving.args import ServeArgs

    assert main(["serve", "--help"]) == 0
    out = capsys.readouterr().out
    assert "usage: aigc serve" in out and "--model MODEL" in out
    assert out.index("--route-prefix") < out.index("ServeArgs fields")
    desc = ServeArgs.model_fields["max_ongoing_requests"].description
    assert f"  max_ongoing_requests: int = 64\n      {desc}\n" in out and "  autoscaling.max_replicas: int = 2" in out


@pytest.mark.parametrize("verb, shows", [
    ("report", ["usage: aigc report", "search_dir", "--out OUT"]),
    ("check-cluster", ["--cluster CLUSTER", "configs"]),
    ("build-ops", ["usage: aigc build-ops", "--dir DIR", "make setup"]),
    ("corpus", ["usage: aigc corpus", "--out OUT", "--n-train N_TRAIN", "documents in the train split (default: 4000)"]),
])
def test_other_verbs_help(capsys, verb, shows):
    out = _help(capsys, [verb, "--help"])
    for text in shows:
        assert text in out


def test_config_fields_recurse_with_the_parents_defaults():
    class Inner(Strict):
        a: int = Field(1, description="an a")
        b: list[str] = Field(default_factory=list, description="some b")

    class Outer(Strict):
        path: str = Field(..., description="required path")
        inner: Inner = Field(default_factory=lambda: Inner(a=5), description="the inner section")

    assert config_fields(Outer) == [
        "  path: str = required", "      required path",
        "  inner: Inner", "      the inner section",
        "  inner.a: int = 5", "      an a",
        "  inner.b: list[str] = []", "      some b",
    ]


def test_bad_override_exits_2_naming_the_key_before_ray(capsys):
    assert main(["finetune", "optim.lr=-1", "zero.nonsense=1"]) == 2
    err = capsys.readouterr().err
    assert "optim.lr" in err and "zero.nonsense: unknown key" in err
    import ray

    assert not ray.is_initialized()


def test_corpus_rejects_a_bad_size(capsys, tmp_path):
    assert main(["corpus", "--out", str(tmp_path), "--n-train", "0"]) == 2
    assert "n_train" in capsys.readouterr().err and not any(tmp_path.iterdir())


def test_verbose_sets_the_log_level_for_the_verb(monkeypatch, tmp_path):
    monkeypatch.setenv("AIGC_LOG_LEVEL", "info")
    assert main(["corpus", "--out", str(tmp_path / "a"), "--n-train", "3", "--n-validation", "1", "--n-test", "1"]) == 0
    assert os.environ["AIGC_LOG_LEVEL"] == "info"
    assert main(["--verbose", "corpus", "--out", str(tmp_path / "b"), "--n-train", "3", "--n-validation", "1",
                 "--n-test", "1"]) == 0
    assert os.environ["AIGC_LOG_LEVEL"] == "debug"


@pytest.mark.parametrize("script, verb", [("jobs/finetune.py", "finetune"), ("jobs/pipeline.py", "pipeline"),
                                          ("tune/search.py", "search")])
def test_scripts_call_the_verbs_and_show_their_own_commands(capsys, script, verb):
    spec = importlib.util.spec_from_file_location(f"entry_{verb}", ROOT / script)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.__doc__.startswith(f"`python {script} --config FILE [a.b=value ...]`: ")
    with pytest.raises(SystemExit) as e:
        mod.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert f"python {script} --config" in out and " fields (set with key=value" in out
    assert mod.main(["no-equals-sign"]) == 2  # the verb's user-error handling


def test_build_ops_rejects_a_cache_it_cannot_create(capsys, tmp_path):
    (tmp_path / "a_file").write_text("")
    assert main(["build-ops", "--dir", str(tmp_path / "a_file" / "ops")]) == 2
    err = capsys.readouterr().err
    assert f"--dir {tmp_path / 'a_file' / 'ops'}: Not a directory" in err


def test_the_ops_cache_is_a_folder_per_python_environment_unless_set_explicitly(monkeypatch, tmp_path):
    import sys

    from aigc import train

    monkeypatch.setattr(sys, "prefix", "/envs/a/.venv")
    a = train.ops_cache(str(tmp_path))
    assert train.ops_cache(str(tmp_path)) == a and Path(a).parent == tmp_path and Path(a).name.startswith("venv-")
    monkeypatch.setattr(sys, "prefix", "/envs/b/.venv")
    b = train.ops_cache(str(tmp_path))
    assert b != a and Path(b).parent == tmp_path  # another checkout's environment of the same name: its own folder

    monkeypatch.setattr(train, "PREBUILT_OPS", [])  # where build-ops builds, without compiling anything
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "mine"))
    assert train.build_ops() == {} and os.environ["TORCH_EXTENSIONS_DIR"] == str(tmp_path / "mine")  # as set
    assert train.build_ops(str(tmp_path)) == {} and os.environ["TORCH_EXTENSIONS_DIR"] == b  # --dir: its folder


def test_ops_build_with_the_environments_own_ninja_whatever_path_says(monkeypatch, tmp_path):
    """Another ninja first on PATH (a system one) would record builds under other hashes and rebuild the ops."""
    import shutil

    import ninja

    from aigc.train import environment_ninja

    other = tmp_path / "bin"
    other.mkdir()
    (other / "ninja").write_text("#!/bin/sh\necho 1.11.1\n")
    (other / "ninja").chmod(0o755)
    path = f"{other}{os.pathsep}{os.environ.get('PATH', '')}"
    monkeypatch.setenv("PATH", path)
    assert shutil.which("ninja") == str(other / "ninja")
    with environment_ninja():
        assert shutil.which("ninja") == os.path.join(ninja.BIN_DIR, "ninja")
    assert os.environ["PATH"] == path  # as it was
    with pytest.raises(RuntimeError), environment_ninja():
        raise RuntimeError("a build failed")
    assert os.environ["PATH"] == path
