"""The one config system: layering, every problem reported at once by full key, every shipped config valid."""

from pathlib import Path

import pytest

from aigc.config import ConfigError, FinetuneConfig, load_config, parse_overrides

ROOT = Path(__file__).resolve().parents[2]
JOB_CONFIGS = sorted(p for p in (ROOT / "jobs" / "configs").glob("*.yaml") if not p.name.startswith(("pipeline-", "refresh-")))
PIPELINE_CONFIGS = sorted((ROOT / "jobs" / "configs").glob("pipeline-*.yaml"))


def test_layers_defaults_then_yaml_then_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("optim:\n  lr: 0.001\n  max_steps: 100\nzero:\n  stage: 3\n")
    cfg = load_config(FinetuneConfig, f, ["optim.lr=2e-4", "data.split_ratios=[0.8,0.1,0.1]"])
    assert cfg.optim.lr == 2e-4  # override beats YAML
    assert cfg.optim.max_steps == 100  # YAML beats default
    assert cfg.zero.stage == 3
    assert cfg.optim.weight_decay == FinetuneConfig().optim.weight_decay  # default kept
    assert cfg.data.split_ratios == (0.8, 0.1, 0.1)


def test_every_problem_listed_at_once_by_full_key(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("optim:\n  lr: -1\n  bogus: 3\nzero:\n  stage: 7\nnot_a_section: {}\n")
    with pytest.raises(ConfigError) as e:
        load_config(FinetuneConfig, f, ["scaling.num_workers=0", "data.block_size=abc"])
    keys = {p.split(":")[0] for p in e.value.problems}
    assert keys == {"optim.lr", "optim.bogus", "zero.stage", "not_a_section", "scaling.num_workers", "data.block_size"}
    assert "unknown key" in str(e.value)


def test_cross_field_problems_name_the_keys():
    with pytest.raises(ConfigError) as e:
        load_config(FinetuneConfig, None, ["zero.stage=2", "zero.offload_param=true", "optim.warmup_steps=500",
                                            "optim.max_steps=100", "data.source=files"])
    text = str(e.value)
    assert "zero.offload_param: needs zero.stage=3" in text
    assert "optim.warmup_steps" in text and "data.train_files: required" in text


@pytest.mark.parametrize("bad", ["optim.lr", "=3", "a..b=1", "optim.lr=[unclosed"])
def test_malformed_overrides_rejected(bad):
    _, problems = parse_overrides([bad])
    assert problems and (bad.split("=")[0] in problems[0] or "section.key=value" in problems[0])


def test_missing_and_non_mapping_files(tmp_path):
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(FinetuneConfig, tmp_path / "nope.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(FinetuneConfig, tmp_path / "list.yaml")


def test_shipped_job_configs_validate():
    assert {p.name for p in JOB_CONFIGS} >= {"tiny-cpu.yaml", "gpt2-zero2.yaml", "gpt2-xl-zero3-offload.yaml"}
    for path in JOB_CONFIGS:
        cfg = load_config(FinetuneConfig, path)
        assert cfg.run.name and cfg.optim.max_steps > cfg.optim.warmup_steps, path
    xl = load_config(FinetuneConfig, ROOT / "jobs/configs/gpt2-xl-zero3-offload.yaml")
    assert xl.zero.stage == 3 and xl.zero.offload_optimizer and xl.zero.offload_param and xl.scaling.use_gpu


def test_shipped_pipeline_configs_validate_including_their_serve_args():
    from aigc.pipeline_config import PipelineConfig

    assert PIPELINE_CONFIGS
    for path in PIPELINE_CONFIGS:
        cfg = load_config(PipelineConfig, path)
        assert cfg.deploy.smoke_prompts and cfg.search.num_samples >= 2, path
    with pytest.raises(ConfigError) as e:
        load_config(PipelineConfig, PIPELINE_CONFIGS[0], ["deploy.args.num_cpus=-1", "deploy.args.model_dir=/x"])
    assert "deploy.args.model_dir: set by the pipeline" in str(e.value)
