"""Errors that the command line turns into one clear message and a non-zero exit."""

from __future__ import annotations

from pathlib import Path


class CrossdiffError(Exception):
    """An error the user can act on; the CLI prints it without a traceback."""


class InputError(CrossdiffError):
    """A file (or folder) given by the user cannot be used; the message names it."""

    def __init__(self, path: str | Path | None, problem: str) -> None:
        self.path = None if path is None else Path(path)
        self.problem = problem
        where = f"{self.path}: " if self.path is not None else ""
        super().__init__(f"{where}{problem}")


def error_summary(error: BaseException, last: bool = False) -> str:
    """The telling line of a library's error message, for our one-line messages.

    SimpleITK prefixes a 'sitk::ERROR' banner and puts its reason on the last line (`last=True`);
    most Python errors say it on the first.
    """
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    telling = [line for line in lines if "sitk::ERROR" not in line] or lines
    if not telling:
        return type(error).__name__
    return telling[-1] if last else telling[0]


class InputWarning(UserWarning):
    """A file was read with a documented default in place of a value it lacks (e.g. MetaImage's origin 0):
    usable, but the user must hear about it; the CLI prints it as one yellow line."""

    def __init__(self, path: str | Path | None, problem: str) -> None:
        self.path = None if path is None else Path(path)
        self.problem = problem
        where = f"{self.path}: " if self.path is not None else ""
        super().__init__(f"{where}{problem}")


def warn_input(path: str | Path | None, problem: str) -> None:
    """Issue an InputWarning naming the file (shown by the CLI, recorded by reports and the fuzz suite)."""
    import warnings

    warnings.warn(InputWarning(path, problem), stacklevel=2)
