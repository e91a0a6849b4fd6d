"""Assertions the CLI tests share."""


def assert_one_line_error(result, *fragments, code=2):
    """A typer CliRunner result: exit `code`, exactly one `error:` line on stderr, no traceback, fragments in it."""
    assert result.exit_code == code, result.output
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    assert "Traceback" not in result.output
    text = " ".join(result.stderr.split())
    for fragment in fragments:
        assert fragment in text, text
