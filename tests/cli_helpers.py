"""Helpers shared by the CLI tests: invoke the app without progress bars, and check the one-line error contract."""

from typer.testing import CliRunner

from modelfix.cli import app

runner = CliRunner()


def run(*args):
    return runner.invoke(app, ["--no-progress", *map(str, args)])


def assert_one_line_error(result, *fragments, code=2):
    """Exit `code`, exactly one non-empty stderr line starting with 'error:', no traceback, each fragment in it."""
    assert result.exit_code == code, (result.exit_code, result.stdout, result.stderr)
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error:")
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
