"""The command line's slips of issue 31, each reproduced: --version, python -m moee_ref, --verbose and --quiet after the
command, float16, --alpha with a kind that ignores it, eval sts --alpha auto and with 2 pairs, a mistyped local
path, Ctrl-C at start-up, a closed pipe, and install hints that work from a clone."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import moee_ref
from moee_ref.cli import main as cli
from moee_ref.demo.checkpoints import SMALL_CONFIGS, write_random_checkpoint

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return write_random_checkpoint(tmp_path_factory.mktemp("slips") / "olmoe", SMALL_CONFIGS["olmoe"], seed=3)


def run(capsys, *argv) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_the_version_in_three_places(capsys):
    version = re.search(r'^version = "(.+)"$', (ROOT / "pyproject.toml").read_text(), re.M)[1]
    assert moee_ref.__version__ == version
    assert cli.main(["--version"]) == 0 and capsys.readouterr().out == f"moee {version}\n"
    # python -m moee_ref is the command line; the version needs no torch.
    proc = subprocess.run([sys.executable, "-c", "import runpy, sys; sys.argv = ['moee', '--version']\n"
                           "try:\n    runpy.run_module('moee_ref', run_name='__main__')\nexcept SystemExit:\n    pass\n"
                           "print('torch' in sys.modules)"], capture_output=True, text=True, env=ENV, timeout=120)
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, f"moee {version}\nFalse\n", "")


def test_verbose_and_quiet_are_taken_after_the_command(capsys, checkpoint, tmp_path):
    (tmp_path / "t.txt").write_text("one\ntwo\n")
    code, out, err = run(capsys, "embed", "--model", tmp_path / "nope", "--input", tmp_path / "t.txt", "--output", tmp_path / "v.npy",
                         "--verbose")
    assert code == 1 and "Traceback" in err
    assert err.endswith(f"moee embed: error: {tmp_path}/nope: no such directory, and not a hub id of the form 'owner/name'\n")
    code, out, err = run(capsys, "embed", "--model", checkpoint, "--input", tmp_path / "t.txt", "--output", tmp_path / "v.npy",
                         "--dtype", "float32", "--quiet")
    assert (code, out, err) == (0, "", "")
    code, out, err = run(capsys, "--verbose", "info", "--model", checkpoint, "--quiet")
    assert (code, err) == (2, "moee info: error: --verbose and --quiet contradict each other; give one (see moee info --help)\n")


def test_every_command_takes_verbose_and_quiet_after_it():
    parser = cli.build_parser()
    commands = next(a for a in parser._actions if a.dest == "command").choices
    for name, sub in commands.items():
        flags = {option for action in sub._actions for option in action.option_strings}
        assert {"--verbose", "--quiet"} <= flags, name


def test_float16_is_a_cli_dtype_as_it_is_an_api_one():
    ns = cli.build_parser().parse_args(["embed", "--model", "m", "--input", "i", "--output", "o.npy", "--dtype", "float16"])
    assert ns.dtype == "float16"


def test_alpha_with_a_kind_that_ignores_it_is_refused(capsys, monkeypatch):
    monkeypatch.setattr(cli, "load_embedder", lambda ns: pytest.fail("loaded"))
    code, out, err = run(capsys, "embed", "--model", "m", "--input", "i.txt", "--output", "o.npy", "--kind", "hs", "--alpha", "5")
    assert (code, err) == (2, "moee embed: error: --alpha weighs RW against HS in moee-sum; --kind hs does not use it: drop --alpha "
                              "(see moee embed --help)\n")


def test_a_mistyped_local_path_is_not_sent_to_the_hub(capsys, monkeypatch, checkpoint):
    monkeypatch.chdir(checkpoint.parent.parent)
    folder = checkpoint.parent.name
    code, out, err = run(capsys, "info", "--model", f"{folder}/nope")  # as demo-checkpoints/nope: owner/name in form
    assert (code, err) == (1, f"moee info: error: {folder}/nope: no such directory in {folder} (checkpoints there: olmoe)\n")


def pairs_file(path: Path, pairs) -> Path:
    path.write_text("sentence1\tsentence2\tscore\n" + "".join(f"{a}\t{b}\t{s}\n" for a, b, s in pairs))
    return path


PAIRS = [("A man plays a guitar.", "Someone plays music.", 4.0), ("The market fell.", "Shares dropped.", 4.5),
         ("A cat sleeps.", "It is raining.", 0.5), ("He bought a car.", "He purchased a vehicle.", 4.3)]


def test_eval_sts_alpha_auto_and_two_pairs(capsys, checkpoint, tmp_path):
    code, out, err = run(capsys, "eval", "sts", "--model", checkpoint, "--pairs", pairs_file(tmp_path / "p.tsv", PAIRS),
                         "--dtype", "float32", "--alpha", "auto", "--json")
    assert code == 0, err
    rows = json.loads(out)["rows"]
    assert [(r["embedding"], r["alpha_rule"]) for r in rows] == [("hs", None), ("rw", None), ("moee-concat", None), ("moee-sum", "auto")]
    code, out, err = run(capsys, "eval", "sts", "--model", checkpoint, "--pairs", pairs_file(tmp_path / "two.tsv", PAIRS[:2]),
                         "--dtype", "float32", "--json")
    assert code == 0, err
    result = json.loads(out)
    assert [(r["embedding"], r["alpha_rule"]) for r in result["rows"]] == [
        ("hs", None), ("rw", None), ("moee-concat", None), ("moee-sum", "fixed")]
    assert result["notes"] == ["the auto alpha row needs at least 3 pairs (2 given): left out"]


def test_ctrl_c_while_the_command_starts_says_interrupted_without_a_traceback(capsys, monkeypatch):
    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "build_parser", interrupted)
    assert cli.main(["info", "--model", "x"]) == 130
    assert capsys.readouterr().err == "moee: interrupted\n"


def test_a_closed_pipe_ends_the_output_quietly(checkpoint):
    # `moee info --json | head -1`: the reader leaves after its first line.
    proc = subprocess.Popen([sys.executable, "-m", "moee_ref", "info", "--model", str(checkpoint), "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV)
    proc.stdout.close()  # the reader is gone before the command writes
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141
    assert err == ""


def test_install_hints_work_from_a_clone(capsys, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    monkeypatch.setattr(cli, "load_embedder", lambda ns: pytest.fail("loaded"))
    (tmp_path / "t.txt").write_text("one\n")
    code, out, err = run(capsys, "embed", "--model", "m", "--input", tmp_path / "t.txt", "--output", tmp_path / "v.parquet")
    assert code == 1 and "pip install 'moee-ref[" not in err
    assert err.endswith("pip install pyarrow (in a clone of moee-ref: pip install -e '.[parquet]')\n")
