"""Run a CLI entry point on N local processes when it was started as one.

`python -m model.convert hf-to-mcore --tp 2 ...` should just work on a workstation, so
entry points that need several ranks re-launch themselves through torchrun. Under
torchrun, srun or any launcher that sets WORLD_SIZE, nothing is re-launched; a world
size that does not fit is reported instead.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys


def relaunch_if_needed(module: str, argv: list[str], nprocs: int) -> None:
    """Return in the worker; in a single un-launched process, re-run on `nprocs` ranks and exit."""
    if "WORLD_SIZE" in os.environ:
        world = int(os.environ["WORLD_SIZE"])
        if world % nprocs:
            raise SystemExit(f"error: this layout needs a multiple of {nprocs} processes, got WORLD_SIZE={world}")
        if os.environ.get("QWEN3_RELAUNCHED") == "1":
            _die_with_launcher()
        from model.parallel import quiet_other_ranks

        quiet_other_ranks()   # before the caller imports megatron-core: its warnings come at import
        return
    if nprocs == 1:
        return
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={nprocs}", "-m", module, *argv]
    sys.exit(subprocess.call(cmd, env={**os.environ, "QWEN3_RELAUNCHED": "1"}))


def _die_with_launcher() -> None:
    """torchrun starts each rank in a session of its own, so a SIGKILL to the command's
    process group (a killed job step, `kill -9 -PGID`) stops the launcher but would leave
    the ranks training on as orphans, writing into a run directory that a re-run then
    shares. Ask Linux to kill this rank when its parent, the launcher, dies."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    PR_SET_PDEATHSIG = 1
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() == 1:   # the launcher died before the request took effect
        os._exit(1)


def hydra_cli(config_name: str, run_cli, usage: str | None = None) -> None:
    """`python -m` entry of a CLI configured by hydra_conf/<config_name>.yaml: composes it
    with the command line's `key=value` overrides (`compose`) and exits with
    `run_cli(cfg)`'s code. A config that does not compose is one `error:` line and exit 2,
    before anything else runs. `-h`/`--help` prints `usage` (the module's docstring);
    `--cfg job` (or `all`) prints the composed config, `--resolve` with interpolations
    resolved, and exits."""
    from model.config import ConfigError

    overrides, show, resolve = [], None, False
    args = iter(sys.argv[1:])
    for arg in args:
        if arg in ("-h", "--help"):
            print((usage or "").strip() or f"usage: python -m <module> [key=value ...] (hydra_conf/{config_name}.yaml)")
            sys.exit(0)
        elif arg in ("--cfg", "-c") or arg.startswith("--cfg="):
            show = arg.split("=", 1)[1] if "=" in arg else next(args, None)
            if show not in ("job", "all"):
                _config_exit(f"{arg} takes job or all, got {show!r}")
        elif arg == "--resolve":
            resolve = True
        elif arg.startswith("-"):
            _config_exit(f"unknown option {arg!r} (expected key=value overrides, --cfg job [--resolve] or --help)")
        else:
            overrides.append(arg)
    try:
        cfg = compose(config_name, overrides)
    except ConfigError as e:
        _config_exit(str(e))
    if show is not None:
        from omegaconf import OmegaConf

        print(OmegaConf.to_yaml(cfg, resolve=resolve), end="")
        sys.exit(0)
    sys.exit(run_cli(cfg))


def _config_exit(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)   # recipes.train.EXIT_CONFIG, as for every other config error


def compose(config_name: str, overrides: list[str]):
    """hydra_conf/<config_name>.yaml composed with `overrides`, as its CLI sees it.

    Where the config has a schema (a structured config first in its defaults list, e.g.
    recipes.schema's for config.yaml), every key and type is checked against it, also the
    keys that a `+key=value` adds (Hydra lets those past a structured node), and every
    interpolation is resolved once. Any failure is a ConfigError of one line naming the
    override, its value and what was expected; for an unknown key, the closest valid one.
    """
    from hydra import compose as hydra_compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from model.config import HYDRA_CONF, ConfigError

    try:
        with initialize_config_dir(config_dir=str(HYDRA_CONF), version_base=None):
            cfg = hydra_compose(config_name=config_name, overrides=list(overrides))
        schema = OmegaConf.get_type(cfg)
        if dataclasses.is_dataclass(schema):
            # as plain data: merged as a DictConfig, the nodes a `+` added would pass unchecked
            OmegaConf.merge(OmegaConf.structured(schema), OmegaConf.to_container(cfg))
        OmegaConf.to_container(cfg, resolve=True)
    except (HydraException, OmegaConfBaseException, AssertionError, AttributeError) as e:
        # (Assertion and Attribute errors: how Hydra and OmegaConf 2.3 fail on a key below,
        # or a mapping into, a typed section that is null)
        line = _one_line(e, config_name, overrides).strip()
        raise ConfigError(line.splitlines()[0] if line else type(e).__name__) from None
    return cfg


def _one_line(e: BaseException, config_name: str, overrides: list[str]) -> str:
    """What went wrong in composing, as one line."""
    import difflib

    from hydra.errors import MissingConfigException, OverrideParseException
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException, ValidationError

    if isinstance(e, MissingConfigException):   # model=nosuch
        first = str(e).strip().splitlines()[0]
        options = list(e.options or [])
        group, _, choice = (e.missing_cfg_file or "").rpartition("/")
        close = difflib.get_close_matches(choice, options, n=1)
        if group and options:
            hint = f"; did you mean {group}={close[0]}?" if close else ""
            return f"{group}={choice}: no such {group} (available: {', '.join(options)}){hint}"
        return first
    if isinstance(e, OverrideParseException):
        bad = next((o for o in overrides if _unparsable(o)), None)
        reason = str(e).strip().splitlines()[0]
        return f"{bad}: not a key=value override ({reason})" if bad else f"cannot parse the overrides: {reason}"
    cause = e
    while cause is not None and not (isinstance(cause, OmegaConfBaseException) and cause.full_key):
        cause = cause.__cause__ or cause.__context__
    if cause is None or isinstance(e, AttributeError):   # Hydra could not place an override
        for o in overrides:
            if (null := _null_parent(o, config_name, overrides)) is not None:
                return (f"{o}: {null} is null in this config (its stage sets no {null} section), "
                        f"so {_key(o)} cannot be set")
        return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    key = cause.full_key
    # the override that set the key, else the one it is inside of (a list or a mapping),
    # else the one below it (a misspelt section: `trainr.max_steps=`)
    given = next((o for o in overrides if _key(o) == key), None) or \
        next((o for o in overrides if key.startswith((_key(o) + "[", _key(o) + "."))), None) or \
        next((o for o in overrides if _key(o).startswith(key + ".")), None)
    shown = given or (f"{key}={cause.value!r}" if cause.value is not None else key)
    if isinstance(cause, (ConfigAttributeError, ConfigKeyError)) and "not in" in str(cause.msg) + str(cause):
        parent, _, name = key.rpartition(".")
        valid = _valid_keys(cause)
        close = difflib.get_close_matches(name, valid, n=1, cutoff=0.5)
        where = f"{parent}." if parent else ""
        if close:
            return f"{shown}: unknown key {key}; did you mean {where}{close[0]}?"
        if not valid:
            return f"{shown}: unknown key {key} ({parent or 'the config'} has no keys here)"
        return f"{shown}: unknown key {key} (valid keys{' of ' + parent if parent else ''}: {', '.join(valid)})"
    if isinstance(cause, ValidationError):
        expected = _expected(cause)
        got = given.split("=", 1)[1] if given and _key(given) == key else repr(cause.value)
        if expected:
            return f"{shown}: {key} must be {expected}, got {got}"
    return f"{shown}: {str(cause.msg or cause).strip().splitlines()[0]}"


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def _unparsable(override: str) -> bool:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        OverridesParser.create().parse_override(override)
    except Exception:
        return True
    return False


def _valid_keys(cause) -> list[str]:
    """The keys of the node an unknown key was looked up in."""
    from omegaconf import DictConfig

    if dataclasses.is_dataclass(cause.object_type):
        return [f.name for f in dataclasses.fields(cause.object_type)]
    if isinstance(cause.parent_node, DictConfig):
        return [str(k) for k in cause.parent_node.keys()]
    return []


def _expected(cause) -> str | None:
    """In words, the type the schema has for the key a ValidationError is about."""
    import typing

    if not dataclasses.is_dataclass(cause.object_type) or cause.key is None:
        text = str(cause.msg or "").strip().splitlines()[0] if str(cause.msg or "").strip() else ""
        return f"of type {text.rsplit(' to ', 1)[1]}" if " could not be converted to " in text else None
    try:
        hint = typing.get_type_hints(cause.object_type).get(str(cause.key))
    except Exception:
        return None
    return _describe(hint) if hint is not None else None


def _describe(hint) -> str:
    import types
    import typing

    words = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}
    if hint in words:
        return words[hint]
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        named = [_describe(a) for a in args if a is not type(None)]
        return " or ".join(named + (["null"] if type(None) in args else []))
    if origin is list:
        return f"a list of {_describe(args[0]).removeprefix('an ').removeprefix('a ')}s" if args else "a list"
    if origin is dict or dataclasses.is_dataclass(hint):
        return "a mapping"
    return getattr(hint, "__name__", str(hint))


def _null_parent(override: str, config_name: str, overrides: list[str]) -> str | None:
    """The section above `override`'s key (or the key itself, for a mapping value) that is
    null once the config groups are chosen."""
    from hydra import compose as hydra_compose, initialize_config_dir
    from omegaconf import OmegaConf

    from model.config import HYDRA_CONF

    parts = _key(override).split(".")
    if override.startswith("~"):
        return None
    groups = {p.name for p in HYDRA_CONF.iterdir() if p.is_dir()}
    chosen = [o for o in overrides if "." not in _key(o) and _key(o) in groups]
    try:
        with initialize_config_dir(config_dir=str(HYDRA_CONF), version_base=None):
            base = hydra_compose(config_name=config_name, overrides=chosen)
    except Exception:
        return None
    mapping = override.split("=", 1)[-1].lstrip().startswith("{")
    for i in range(1, len(parts) + mapping):
        prefix = ".".join(parts[:i])
        if OmegaConf.select(base, prefix, default="absent") is None:
            return prefix
    return None
