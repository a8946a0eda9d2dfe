"""The user-error boundary's parts: which classes count, and the one-line message."""

from __future__ import annotations

import importlib

import pytest

from helox.errors import USER_ERRORS, CliError, is_user_error, one_line
from shared.config import ConfigError


@pytest.mark.parametrize("module", sorted(USER_ERRORS))
def test_every_listed_user_error_class_exists(module: str) -> None:
    mod = importlib.import_module(module)
    for name in USER_ERRORS[module]:
        cls = getattr(mod, name, None)
        assert isinstance(cls, type) and issubclass(cls, Exception), f"{module}.{name} is not an exception class"


def test_user_errors_and_bugs_are_told_apart() -> None:
    assert is_user_error(ConfigError("x")) and is_user_error(CliError("y"))
    assert not is_user_error(RuntimeError("z")) and not is_user_error(KeyError("k"))


def test_a_message_of_one_bad_field_a_line_becomes_one_line() -> None:
    exc = ConfigError("invalid configuration in run.yaml [train]:\n  train.optim.lr: too small\n  train.seed: not an int")
    assert one_line(exc) == "invalid configuration in run.yaml [train]: train.optim.lr: too small; train.seed: not an int"
    assert one_line(CliError("no Redis")) == "no Redis"


def test_up_with_an_unknown_service_names_it_in_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    from helox.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["up", "--services", "trainer,traner"])
    assert exit_.value.code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "unknown service(s) ['traner']" in line
