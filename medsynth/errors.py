"""Error types shared by every stage.

A :class:`UserError` is something the user can fix (bad input, missing weights, bad recipe).
The CLI prints its message as one paragraph and exits with code 1, without a traceback.
Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input, files or environment; message says what and how to fix it."""

    exit_code = 1


class RecipeError(UserError):
    """One or more problems in a recipe; ``problems`` holds one line per problem."""

    def __init__(self, problems: list[str], source: str = "recipe"):
        self.problems = list(problems)
        self.source = source
        n = len(self.problems)
        head = f"{source}: {n} problem{'s' if n != 1 else ''}:"
        super().__init__("\n".join([head] + [f"  - {p}" for p in self.problems]))
