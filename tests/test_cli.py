"""The command lines: the ``llm-dvfs`` console script and its sub-commands, boolean options
with ``--no-`` forms that win over a config file, ``--limit``, ``--model-args``, and log lines
routed through tqdm while the sweep's bars are up."""
from __future__ import annotations

import importlib.metadata
import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from llm_dvfs import cli
from llm_dvfs import sweep
from llm_dvfs.errors import ConfigError
from llm_dvfs.run import _overrides, build_parser


# ---------------------------------------------------------------------------------------------
# llm-dvfs
# ---------------------------------------------------------------------------------------------
def test_llm_dvfs_help_lists_the_sub_commands(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: llm-dvfs")
    for name in ("run", "report", "info", "clocks"):
        assert f"    {name} " in out, name


def test_llm_dvfs_sub_commands_are_the_modules_mains(capsys, no_nvml_driver):
    with pytest.raises(SystemExit) as e:
        cli.main(["run", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: llm-dvfs run") and "--apply-chat-template" in out and "--limit N" in out
    with pytest.raises(SystemExit) as e:
        cli.main(["report", "--help"])
    assert e.value.code == 0 and capsys.readouterr().out.startswith("usage: llm-dvfs report")
    # arguments reach the sub-command: info without a driver says so and exits 0
    assert cli.main(["info", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["devices"] == []
    assert cli.main(["clocks"]) == 0 and "no NVIDIA GPU found" in capsys.readouterr().out
    # no sub-command: the help on stderr, status 2; an unknown one: a usage error
    assert cli.main([]) == 2 and "run" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        cli.main(["frobnicate"])
    assert e.value.code == 2 and "invalid choice: 'frobnicate'" in capsys.readouterr().err


def test_console_script_is_installed_and_runs():
    eps = {ep.name: ep.value for ep in importlib.metadata.entry_points(group="console_scripts")}
    assert eps.get("llm-dvfs") == "llm_dvfs.cli:main"
    script = Path(sys.executable).with_name("llm-dvfs")
    assert script.is_file(), "pip install the package: it installs the llm-dvfs script"
    for args, head in ((["--help"], "usage: llm-dvfs"), (["run", "--help"], "usage: llm-dvfs run")):
        p = subprocess.run([str(script), *args], capture_output=True, text=True, timeout=120)
        assert p.returncode == 0, p.stderr
        assert p.stdout.startswith(head)
    p = subprocess.run([sys.executable, "-m", "llm_dvfs", "--version"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and p.stdout.startswith("llm_dvfs ")


# ---------------------------------------------------------------------------------------------
# --no- forms, --limit, --model-args
# ---------------------------------------------------------------------------------------------
def _cfg(tmp_path, text, *argv):
    f = tmp_path / "s.toml"
    f.write_text(text)
    args = build_parser().parse_args(["--config", str(f), *argv])
    return sweep.load_config(args.config, _overrides(args))


@pytest.mark.parametrize("key", ["fixed_output_length", "allow_clock_changes", "apply_chat_template",
                                 "stop_sequences"])
def test_no_form_turns_off_a_config_file_true(key, tmp_path):
    flag = key.replace("_", "-")
    assert getattr(_cfg(tmp_path, f"{key} = true\n"), key) is True          # the file decides
    assert getattr(_cfg(tmp_path, f"{key} = true\n", f"--no-{flag}"), key) is False
    assert getattr(_cfg(tmp_path, f"{key} = false\n", f"--{flag}"), key) is True
    # the last of the two forms wins, as for any flag
    assert getattr(_cfg(tmp_path, "", f"--{flag}", f"--no-{flag}"), key) is False


def test_limit_is_samples_and_model_args_parse(tmp_path):
    assert _cfg(tmp_path, "samples = 9\n", "--limit", "4").samples == 4
    cfg = _cfg(tmp_path, 'model_args = { attn_implementation = "eager", revision = "0123" }\n')
    assert cfg.model_args == {"attn_implementation": "eager", "revision": "0123"}
    cfg = _cfg(tmp_path, "", "--model-args", 'revision=v1.0,quantization_config={"load_in_4bit": true}')
    assert cfg.model_args == {"revision": "v1.0", "quantization_config": {"load_in_4bit": True}}
    with pytest.raises(ConfigError, match="model_args.*not key=value"):
        _cfg(tmp_path, "", "--model-args", "revision")


def test_model_args_an_arch_model_cannot_use_are_rejected_before_any_work(tmp_path, capsys):
    from llm_dvfs.run import main

    out = tmp_path / "run"
    rc = main(["--models", "arch:tiny", "--model-args", "load_in_8bit=true", "--gpu", "none",
               "--ner", "heuristic", "--out", str(out)])
    assert rc == 2 and "needs a pretrained checkpoint" in capsys.readouterr().err
    assert not out.exists()


def test_other_clis_have_no_forms(no_nvml_driver, capsys):
    from llm_dvfs import clocks, info, report

    assert info.main(["--json", "--no-json"]) == 0
    assert capsys.readouterr().out.startswith("No NVIDIA GPU available")   # plain text, not JSON
    assert clocks.main(["--json", "--no-json"]) == 0
    assert capsys.readouterr().out.startswith("no NVIDIA GPU found")
    assert report._parser().parse_args(["d", "--no-html"]).html is False
    assert report._parser().parse_args(["d"]).html is True


# ---------------------------------------------------------------------------------------------
# log lines and progress bars
# ---------------------------------------------------------------------------------------------
def test_sweep_logs_go_through_tqdm_at_the_console_handlers_level(monkeypatch):
    import tqdm.std

    from llm_dvfs.sweep.execute import _logs_through_tqdm

    written = []
    monkeypatch.setattr(tqdm.std.tqdm, "write",
                        classmethod(lambda cls, s, file=None, end="\n", nolock=False: written.append(s)))
    lg = logging.getLogger("llm_dvfs")
    console = logging.StreamHandler(sys.stderr)       # as the CLI sets it up
    console.setLevel(logging.INFO)
    console.setFormatter(logging.Formatter("llm_dvfs: %(message)s"))
    old_level = lg.level
    lg.addHandler(console)
    lg.setLevel(logging.DEBUG)                         # as with run.log attached
    try:
        with _logs_through_tqdm():
            assert console not in lg.handlers
            logging.getLogger("llm_dvfs.sweep").info("cell 1 done")
            logging.getLogger("llm_dvfs.sweep").debug("details for run.log only")
        assert lg.handlers.count(console) == 1           # put back afterwards
    finally:
        lg.removeHandler(console)
        lg.setLevel(old_level)
    assert written == ["llm_dvfs: cell 1 done"]


def test_without_a_console_handler_nothing_is_added(monkeypatch):
    from llm_dvfs.sweep.execute import _logs_through_tqdm

    lg = logging.getLogger("llm_dvfs")
    before = list(lg.handlers)
    with _logs_through_tqdm():
        assert lg.handlers == before      # a library caller's logging is left alone
