"""One error type for everything a user can get wrong: it names the problem and the fix."""


class SlimlmError(Exception):
    """A user-facing failure. The CLI prints `str(err)` on one line and exits non-zero."""

    def __init__(self, problem: str, fix: str | None = None):
        self.problem = problem
        self.fix = fix
        super().__init__(f"{problem} — {fix}" if fix else problem)
