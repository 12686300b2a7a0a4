"""Command-line plumbing shared by every command: absl flags, with one-line errors."""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from absl import flags


def usage_error(prog: str, message: str) -> NoReturn:
    """Ends a command with one line on stderr and exit status 2 (a usage error)."""
    print(f"{prog}: {message}", file=sys.stderr)
    raise SystemExit(2)


def parse_flags(
    prog: str,
    define: Callable[[flags.FlagValues], None],
    argv: Sequence[str] | None,
    usage: str = "[flags]",
    doc: str = "",
) -> tuple[flags.FlagValues, list[str]]:
    """The command line of every command: absl flags defined by `define` on a FlagValues of their
    own (so commands never clash and tests can call a command's main(argv)); returns them and the
    positional arguments. argv defaults to sys.argv[1:]. --help prints the flags and exits 0; a bad
    flag, or a --config.FIELD override of a field the config does not have, exits 2 with one line
    that names it. The global absl flags (the libraries': grain's worker processes read them) keep
    their defaults."""
    values = flags.FlagValues()
    define(values)
    args = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help", "--helpfull") for a in args):
        print(f"usage: python -m {prog} {usage}\n{doc.strip()}\n\n{values.get_help()}")
        raise SystemExit(0)
    try:
        rest = values([prog, *args])
    except (AttributeError, KeyError) as e:  # ml_collections: a locked config has no such field
        usage_error(prog, _unknown_config_field(e, args))
    except flags.Error as e:
        usage_error(prog, str(e))
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
    return values, rest[1:]


def define_config(
    fv: flags.FlagValues, argv: Sequence[str] | None, workdir_help: str | None = None
) -> None:
    """A required --config (configs/NAME.py[:arg], any field overridable as --config.FIELD=value)
    and, given its help text, a required --workdir. `argv`: the arguments parse_flags gets (None:
    sys.argv[1:]), where ml_collections finds the overrides."""
    from ml_collections import config_flags

    config_flags.DEFINE_config_file(
        "config",
        None,
        "Config file (configs/NAME.py[:arg]).",
        flag_values=fv,
        sys_argv=None if argv is None else ["", *argv],
    )
    flags.mark_flag_as_required("config", flag_values=fv)
    if workdir_help is not None:
        flags.DEFINE_string("workdir", None, workdir_help, flag_values=fv)
        flags.mark_flag_as_required("workdir", flag_values=fv)


def _unknown_config_field(error: Exception, args: Sequence[str]) -> str:
    """ml_collections' error for an override of a missing config field, as one line naming it."""
    message = str(error.args[0] if error.args else error).replace("\\n", " ").replace("\n", " ")
    message = re.sub(r"[\\'\"]+", "'", message).strip("'")
    key = re.match(r"[A-Za-z_]\w*", message)
    overrides = [a[2:].split("=")[0] for a in args if a.startswith("--config.")]
    named = [o for o in overrides if key and key.group(0) in o.split(".")]
    field = named[0] if named else "in a --config override"
    hint = message.split("'", 1)[1].strip(" '") if "'" in message else message
    return f"unknown config field {field}. {hint}"


def configure_logging() -> None:
    """What a command prints of the logs: the project's INFO lines (progress, resume, layout) and
    every library's warnings, one line each; the libraries' INFO lines (orbax, tfds) are noise."""
    from absl import logging as absl_logging

    logging.basicConfig(
        level=logging.WARNING,
        format="%(levelname).1s%(asctime)s %(name)s] %(message)s",
        datefmt="%m%d %H:%M:%S",
        force=True,  # a library that logged through the root logger on import configured it
    )
    absl_logging.set_verbosity(absl_logging.WARNING)
    logging.getLogger("marnet_jax").setLevel(logging.INFO)


def configure_jax() -> None:
    """What every entry point sets before JAX starts a backend: XLA's CPU flags (marnet_jax.cpu) and,
    where the TPU runtime library is installed (for the preflight) but no TPU chip and no GPU is
    attached, the CPU as JAX's only platform. Otherwise jax starts that runtime to look for chips,
    and on such a machine it prints errors and warnings a user cannot act on. JAX_PLATFORMS, when
    set, is left to decide."""
    import jax

    from marnet_jax import cpu

    cpu.configure_xla()
    if "JAX_PLATFORMS" not in os.environ and not _accelerator_attached():
        jax.config.update("jax_platforms", "cpu")


def _accelerator_attached() -> bool:
    """False only where the TPU runtime library is installed and jax's own probes (PCI ids, device
    nodes) find neither a TPU chip nor a GPU; True where jax's private probes have moved."""
    if importlib.util.find_spec("libtpu") is None:
        return True  # nothing to keep quiet: jax chooses as it always does
    try:
        from jax._src import hardware_utils
    except ImportError:
        return True
    gpu = hardware_utils.has_visible_nvidia_gpu() or os.path.exists("/dev/kfd")
    return tpu_chips_attached() or gpu


def tpu_chips_attached() -> bool:
    """Whether jax's probe (the PCI ids of TPU chips) finds a TPU chip on this machine; True where
    jax's private probe has moved (then nothing is changed on its account)."""
    try:
        from jax._src import hardware_utils
    except ImportError:
        return True
    return hardware_utils.num_available_tpu_chips_and_device_id()[0] > 0


def run(main: Callable[[], Any]) -> NoReturn:
    """A command's entry point: JAX's settings before it starts (`configure_jax`), the logs
    (`configure_logging`), then `main()`; an int it returns is the exit status."""
    configure_jax()
    configure_logging()
    status = main()
    sys.exit(status if isinstance(status, int) else 0)
