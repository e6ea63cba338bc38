"""aigc.console: known dependency noise is filtered by message *and* source; everything else still shows."""

from __future__ import annotations

import logging
import re
import warnings

import pytest

from aigc import console


@pytest.fixture
def filters(monkeypatch):
    """The console's filters installed in this process, undone afterwards."""
    monkeypatch.setattr(warnings, "filters", list(warnings.filters))
    names = [console._logger_name(name) for name, _ in console.KNOWN_LOG_RECORDS]
    saved = {name: list(logging.getLogger(name).filters) for name in names}
    levels = {name: logging.getLogger(name).level for name in console.QUIET_LOGGERS}
    console.install_filters()
    yield
    for name, fs in saved.items():
        logging.getLogger(name).filters = fs
    for name, lvl in levels.items():
        logging.getLogger(name).setLevel(lvl)


def shown(message: str, category: type[Warning], module: str) -> list[str]:
    """The warnings that reach the user when `module` issues this one (as if from its own line)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")  # what a fresh process does with an unfiltered warning
        console.install_filters()  # catch_warnings reset the filters; install them inside the block
        warnings.warn_explicit(message, category, filename=module.replace(".", "/") + ".py", lineno=83,
                               module=module, registry={})
    return [str(w.message) for w in caught]


TORCH_MSG = ("`torch.distributed.all_gather_into_tensor` is deprecated. Please use "
             "`torch.distributed.all_gather_single` instead.")


def test_known_warning_from_its_module_is_filtered(filters):
    assert shown(TORCH_MSG, FutureWarning, "torch.distributed.c10d_logger") == []


def test_same_text_from_another_module_still_shows(filters):
    assert shown(TORCH_MSG, FutureWarning, "aigc.train") == [TORCH_MSG]
    assert shown(TORCH_MSG, FutureWarning, "torch.distributed.c10d_logger_v2") == [TORCH_MSG]  # exact module


def test_unknown_warning_from_a_known_module_still_shows(filters):
    msg = "`torch.distributed.reduce_scatter` will change its default"
    assert shown(msg, FutureWarning, "torch.distributed.c10d_logger") == [msg]


@pytest.mark.parametrize("lvl, expected", [("info", []), ("debug", [TORCH_MSG])])
def test_the_worker_hook_filters_at_info_and_lets_everything_through_at_debug(filters, monkeypatch, lvl, expected):
    monkeypatch.setenv(console.LEVEL_ENV, lvl)
    for k in console.QUIET_ENV:  # setup_worker sets these when absent; give them back afterwards
        monkeypatch.delenv(k, raising=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")  # a fresh worker process
        console.setup_worker()
        warnings.warn_explicit(TORCH_MSG, FutureWarning, filename="torch/distributed/c10d_logger.py", lineno=83,
                               module="torch.distributed.c10d_logger", registry={})
    assert [str(w.message) for w in caught] == expected


def test_known_log_record_is_dropped_only_on_its_logger(filters, caplog):
    msg = "`loss_type=None` was set in the config but it is unrecognized. Using the default loss: `ForCausalLMLoss`."
    caplog.set_level(logging.WARNING)
    logging.getLogger("transformers.modeling_utils").warning(msg)
    logging.getLogger("transformers.modeling_utils").warning("Some weights were not initialized")
    logging.getLogger("aigc.other").warning(msg)
    assert [(r.name, r.getMessage()) for r in caplog.records] == [
        ("transformers.modeling_utils", "Some weights were not initialized"), ("aigc.other", msg)]


def test_train_report_logger_named_by_its_file_is_found(filters, caplog):
    import ray.train.v2._internal.execution.context as ctx

    caplog.set_level(logging.INFO)
    ctx.logger.info("Reporting training result 3: TrainingReport(checkpoint=None) from rank 0")
    ctx.logger.info("Some other Train message")
    assert [r.getMessage() for r in caplog.records] == ["Some other Train message"]


def test_quiet_loggers_keep_warnings_and_errors(filters, caplog):
    caplog.set_level(logging.DEBUG)  # the root logger and the capture take everything; ray.tune stays at WARNING
    logging.getLogger("ray.tune").info("Wrote the latest version of all result files")
    logging.getLogger("ray.tune").error("Trial failed")
    assert [r.getMessage() for r in caplog.records] == ["Trial failed"]


def test_forwarded_line_patterns_match_the_noise_and_not_our_lines():
    skip = re.compile(console._skip_regex())
    noise = [
        "WARNING: 12 PYTHON worker processes have been started on node: 9586 with address: 192.0.2.2, which is 6x",
        "[2026-12-03 07:28:45,310 E 6188 6257] core_worker.cc:2465: Actor with class name: 'PreemptionWatcher' and ID",
        "DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built successfully",
        "Processing zero checkpoint '/tmp/x/checkpoint_1/ds'",
        "\rLoading checkpoint shards:   0%|          | 0/2 [00:00<?, ?it/s]",
        "INFO 2026-12-03 07:31:40,689 proxy 192.0.2.2 -- Proxy starting on node 9586 (HTTP port: 18931).",
        "INFO 2026-12-03 07:31:49,241 aigc_Model 52logi6u 0c900ddb-9127 -- POST /v1/completions 200 24.5ms",
    ]
    kept = [
        "[aigc] trial-1 step    10/60 | loss 6.2327 | lr 1.08e-04 | 13.2k tok/s | eta 0m07s",
        "[2026-12-03 07:28:45,310 E 6188 6257] core_worker.cc:2465: Actor with class name: 'Model' failed",
        "ERROR 2026-12-03 07:31:49,241 controller 11074 -- Deploying Deployment(name='Model') failed",
        "INFO 2026-12-03 07:31:49,240 aigc_Model 52logi6u 0c900ddb -- cmpl-bb9d 200 prompt_tokens=2 completion_tokens=5",
        "DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op failed to build",
    ]
    assert [line for line in noise if not skip.search(line)] == []
    assert [line for line in kept if skip.search(line)] == []


def test_level_reads_the_env_and_rejects_typos(monkeypatch):
    monkeypatch.delenv(console.LEVEL_ENV, raising=False)
    assert console.level() == "info" and console.tune_verbosity() == 0
    monkeypatch.setenv(console.LEVEL_ENV, "DEBUG")
    assert console.verbose() and console.tune_verbosity() is None and console.train_logging() is None
    monkeypatch.setenv(console.LEVEL_ENV, "loud")
    with pytest.raises(ValueError, match="AIGC_LOG_LEVEL='loud'"):
        console.level()


def test_progress_prints_lines_when_not_on_a_terminal(monkeypatch, capfd):
    monkeypatch.setenv(console.PROGRESS_ENV, "lines")
    p = console.Progress(total=20, desc="run")
    p.update(5)
    p.log("[aigc] run step 5/20 | loss 1.0", short="loss 1.0")
    p.close()
    assert capfd.readouterr().out == "[aigc] run step 5/20 | loss 1.0\n"


def test_setup_turns_off_the_bars_of_an_already_imported_datasets(filters, monkeypatch):
    import datasets

    for k in [*console.QUIET_ENV, console.LEVEL_ENV, console.PROGRESS_ENV, "RAY_DEDUP_LOGS_SKIP_REGEX",
              "RAY_DEDUP_LOGS_ALLOW_REGEX"]:
        monkeypatch.delenv(k, raising=False)  # setup() writes them; the test leaves the environment as it found it
    datasets.enable_progress_bars()
    try:
        console.setup()  # datasets was imported first, so its env switch came too late: setup uses its API
        assert not datasets.is_progress_bar_enabled()
    finally:
        datasets.enable_progress_bars()
