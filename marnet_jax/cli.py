"""Command-line plumbing shared by marnet_jax.main and the evidence commands."""

from __future__ import annotations

import re
import sys
from collections.abc import Callable


def flags_parser(prog: str) -> Callable[[list[str]], list[str]]:
    """absl flag parsing for `prog`; a mistyped config field ends the program with one line that
    names it, not a traceback."""
    from absl import flags

    def parse(argv: list[str]) -> list[str]:
        try:
            return flags.FLAGS(argv)
        except (AttributeError, KeyError) as e:
            message = str(e.args[0] if e.args else e).replace("\\n", " ").replace("\n", " ")
            message = re.sub(r"[\\'\"]+", "'", message).strip("'")
            key = re.match(r"[A-Za-z_]\w*", message)
            overrides = [a[2:].split("=")[0] for a in argv if a.startswith("--config.")]
            named = [o for o in overrides if key and key.group(0) in o.split(".")]
            field = named[0] if named else "in a --config override"
            hint = message.split("'", 1)[1].strip(" '") if "'" in message else message
            sys.exit(f"{prog}: unknown config field {field}. {hint}")
        except flags.Error as e:
            sys.exit(f"{prog}: {e}")

    return parse
