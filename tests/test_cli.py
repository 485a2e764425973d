"""The ``medtune`` command line: an unknown command is a usage error."""

from __future__ import annotations

import pytest


def test_cli_unknown_command_exits_nonzero(capsys):
    from medtune.cli import main

    with pytest.raises(SystemExit) as info:
        main(["no-such-command"])
    assert info.value.code == 2
