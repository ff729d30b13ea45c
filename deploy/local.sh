#!/usr/bin/env bash
# Start the real trojanscan stack as processes on this machine (no Docker): MLflow server,
# Prefect server, work pools + deployments, a worker per pool, the webhook receiver, and the
# MLflow webhook that points at it. Everything listens on 127.0.0.1.
#   bash deploy/local.sh start [DIR]   # state, logs and pids in DIR (default .trojanscan-stack)
#   bash deploy/local.sh stop  [DIR]
# Needs the project's .venv (bash scripts/run.sh env) and a policy: DIR/policy.yaml is created
# from deploy/policy.example.yaml if missing.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
action="${1:-start}"; dir="$(realpath -m "${2:-$root/.trojanscan-stack}")"
bin="$root/.venv/bin"
MLFLOW_PORT="${MLFLOW_PORT:-5000}" PREFECT_PORT="${PREFECT_PORT:-4200}" RECEIVER_PORT="${RECEIVER_PORT:-8686}"

stop() {  # TERM each process group, then KILL what is left after 10 s
  local pids=()
  for pidfile in "$dir"/*.pid; do
    [ -f "$pidfile" ] || continue
    pids+=("$(cat "$pidfile")")
    rm -f "$pidfile"
  done
  for pid in "${pids[@]}"; do kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true; done
  for _ in $(seq 1 10); do
    alive=0; for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
    [ "$alive" = 0 ] && break; sleep 1
  done
  for pid in "${pids[@]}"; do kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true; done
  echo "stopped"
}

wait_for() {  # wait_for URL NAME
  for _ in $(seq 1 120); do curl -fsS "$1" >/dev/null 2>&1 && return 0; sleep 1; done
  echo "$2 did not start; see $dir/$2.log" >&2; exit 2
}

launch() {  # launch NAME COMMAND...: a process group of its own, pid and log in $dir
  local name="$1"; shift
  setsid "$@" >"$dir/$name.log" 2>&1 < /dev/null &
  echo $! >"$dir/$name.pid"
}

start() {
  mkdir -p "$dir/artifacts" "$dir/work"
  [ -f "$dir/policy.yaml" ] || cp "$root/deploy/policy.example.yaml" "$dir/policy.yaml"
  [ -f "$dir/secrets.env" ] || {
    echo "TROJANSCAN_WEBHOOK_SECRET=$("$bin/python" -c 'import secrets; print(secrets.token_hex(24))')"
    echo "MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY=$("$bin/python" -c 'from cryptography.fernet import Fernet; print(Fernet.generate_key().decode())')"
  } >"$dir/secrets.env"
  set -a; . "$dir/secrets.env"; set +a
  export PREFECT_HOME="$dir/prefect-home" PREFECT_SERVER_ANALYTICS_ENABLED=false MLFLOW_DISABLE_TELEMETRY=true
  export PREFECT_API_URL="http://127.0.0.1:$PREFECT_PORT/api" MLFLOW_TRACKING_URI="http://127.0.0.1:$MLFLOW_PORT"
  export TROJANSCAN_POLICY="$dir/policy.yaml" TROJANSCAN_WORKDIR="$dir/work" TROJANSCAN_HOME="$root"
  export MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false MLFLOW_WEBHOOK_ALLOWED_SCHEMES=http,https MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS=true
  export MLFLOW_WEBHOOK_REQUEST_MAX_RETRIES=8  # deliveries outlast a receiver restart (about 3 min of retries)
  export PREFECT_WORKER_QUERY_SECONDS="${PREFECT_WORKER_QUERY_SECONDS:-2}"  # a triggered scan starts within 2 s, not 10
  cd "$root"
  launch mlflow "$bin/mlflow" server --backend-store-uri "sqlite:///$dir/mlflow.db" --artifacts-destination "$dir/artifacts" \
    --host 127.0.0.1 --port "$MLFLOW_PORT" --workers 1
  launch prefect "$bin/prefect" server start --host 127.0.0.1 --port "$PREFECT_PORT"
  wait_for "http://127.0.0.1:$MLFLOW_PORT/health" mlflow
  wait_for "http://127.0.0.1:$PREFECT_PORT/api/health" prefect
  "$bin/prefect" work-pool create gpu --type process --overwrite >/dev/null
  "$bin/prefect" work-pool create cpu --type process --overwrite >/dev/null
  "$bin/prefect" --no-prompt deploy --all --prefect-file deploy/prefect.yaml >"$dir/deploy.log" 2>&1
  launch worker-gpu "$bin/prefect" worker start --pool gpu
  launch worker-cpu "$bin/prefect" worker start --pool cpu
  launch receiver "$bin/trojanscan" serve --host 127.0.0.1 --port "$RECEIVER_PORT" --replay-db "$dir/deliveries.sqlite"
  wait_for "http://127.0.0.1:$RECEIVER_PORT/health" receiver
  if ! "$bin/python" -c "from mlflow import MlflowClient; import sys; sys.exit(0 if any(w.name == 'trojanscan' for w in MlflowClient().list_webhooks()) else 1)"; then
    "$bin/trojanscan" webhook register --url "http://127.0.0.1:$RECEIVER_PORT/webhooks/mlflow"
  fi
  cat <<INFO
trojanscan stack running (state in $dir):
  MLflow    $MLFLOW_TRACKING_URI
  Prefect   http://127.0.0.1:$PREFECT_PORT
  receiver  http://127.0.0.1:$RECEIVER_PORT/webhooks/mlflow
  policy    $dir/policy.yaml
Use it from a shell with:  set -a; . $dir/secrets.env; set +a; export MLFLOW_TRACKING_URI=$MLFLOW_TRACKING_URI PREFECT_API_URL=$PREFECT_API_URL
Stop it with:              bash deploy/local.sh stop $dir
INFO
}

case "$action" in
  start) start ;;
  stop) stop ;;
  *) echo "usage: bash deploy/local.sh start|stop [DIR]" >&2; exit 4 ;;
esac
