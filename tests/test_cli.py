"""The `pyseg` command: each subcommand is `python -m pyseg.X` with the same flags and exit codes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from pyseg import cli


def test_a_wrong_or_missing_subcommand_is_one_line_and_exit_2(capsys):
    assert cli.main(["fit"]) == 2
    err = capsys.readouterr().err
    assert "unknown command 'fit'" in err and "train,val,predict,tune,submit,export" in err and err.count("\n") == 1
    assert cli.main([]) == 2 and "no command given" in capsys.readouterr().err
    assert cli.main(["--help"]) == 0 and "pyseg COMMAND --help" in capsys.readouterr().out


def test_the_installed_pyseg_command_runs_the_subcommands_main(tmp_path):
    """The console script pip installs (pyproject's [project.scripts]) beside this interpreter: a bad flag of
    export is export's one-line user error and exit 2, and --help is export's own."""
    command = Path(sys.executable).parent / "pyseg"
    assert command.is_file(), f"{command} is missing: reinstall pyseg (pip install -e .)"
    junk = tmp_path / "junk.pt"
    junk.write_text("not a checkpoint")
    done = subprocess.run(
        [str(command), "export", "--weights", str(junk), "--format", "coreml"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and "--format must be one of onnx, torchscript" in done.stderr, done.stderr
    helped = subprocess.run([str(command), "export", "--help"], capture_output=True, text=True, timeout=120)
    assert helped.returncode == 0 and "--end2end" in helped.stdout
