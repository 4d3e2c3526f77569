#!/usr/bin/env bash
# Start, stop or check autorank's MLflow tracking server.
#   mlflow_server/serve.sh start [--port N] [--backend postgres] [--auth] [--data-dir DIR]
#   mlflow_server/serve.sh health
#   mlflow_server/serve.sh stop
# Settings come from mlflow_server/server.yaml (or $AUTORANK_SERVER_CONFIG); options override them.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
python="${AUTORANK_PYTHON:-$here/../.venv/bin/python}"
[ -x "$python" ] || python=python3
[ $# -ge 1 ] || { echo "usage: $0 start|stop|health [options]" >&2; exit 2; }
action="$1"; shift
exec "$python" -m autorank server "$action" --config "${AUTORANK_SERVER_CONFIG:-$here/server.yaml}" "$@"
