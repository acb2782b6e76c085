#!/usr/bin/env bash
# Start the MLflow tracking server.
#
#   mlflow/server.sh [sqlite|postgres] [--auth] [-- <extra `mlflow server` options>]
#
# Modes (first argument, or MLFLOW_SERVER_MODE; default sqlite):
#   sqlite    embedded SQLite file + local artifact folder, proxied by the server
#             MLFLOW_HOME (./.mlflow-server)  state folder
#             MLFLOW_SQLITE_PATH ($MLFLOW_HOME/mlflow.db)
#             MLFLOW_ARTIFACTS_DESTINATION ($MLFLOW_HOME/artifacts)
#   postgres  PostgreSQL backend + local folder or S3-compatible artifact store
#             MLFLOW_BACKEND_STORE_URI, or built from POSTGRES_HOST (127.0.0.1),
#             POSTGRES_PORT (5432), POSTGRES_USER (postgres), POSTGRES_PASSWORD (empty),
#             MLFLOW_DB (mlflow) as postgresql+psycopg2://...
#             MLFLOW_ARTIFACTS_DESTINATION: a folder or s3://bucket/prefix; for MinIO also
#             MLFLOW_S3_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY
# --auth (or MLFLOW_AUTH=true): MLflow basic-auth app. MLFLOW_AUTH_ADMIN_PASSWORD (>= 12
#             chars) creates the admin user on first start; MLFLOW_AUTH_ADMIN_USERNAME
#             (admin); MLFLOW_AUTH_DATABASE_URI (sqlite:///$MLFLOW_HOME/basic_auth.db);
#             MLFLOW_FLASK_SERVER_SECRET_KEY (CSRF key; random per start when unset).
#             Needs `pip install 'mlflow[auth]'` (Flask-WTF).
# Always: MLFLOW_HOST (127.0.0.1), MLFLOW_PORT (5000), MLFLOW_WORKERS (mlflow's default),
# MLFLOW_SERVER_ENABLE_JOB_EXECUTION (false: no GenAI job runner).
# Secrets come from the environment only; the rendered auth config (mode 600) is the only
# file that may hold one (a password inside MLFLOW_AUTH_DATABASE_URI).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
die() { echo "mlflow/server.sh: $*" >&2; exit 2; }

mode="${MLFLOW_SERVER_MODE:-sqlite}"
auth="${MLFLOW_AUTH:-false}"
extra=()
while (($#)); do
  case "$1" in
    sqlite | postgres) mode="$1" ;;
    --auth) auth=true ;;
    --) shift; extra=("$@"); break ;;
    -h | --help) awk 'NR > 1 && !/^#/ {exit} NR > 1 {sub(/^# ?/, ""); print}' "${BASH_SOURCE[0]}"; exit 0 ;;
    *) die "unknown argument '$1' (expected sqlite, postgres, --auth or -- <mlflow server options>)" ;;
  esac
  shift
done

export MLFLOW_DISABLE_TELEMETRY=true
# MLflow's GenAI job runner (scorers, trace rollups) adds ~8 processes this pipeline never uses.
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION="${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}"
python="${PYTHON:-python3}"
home="$(mkdir -p "${MLFLOW_HOME:-.mlflow-server}" && cd "${MLFLOW_HOME:-.mlflow-server}" && pwd)"

case "$mode" in
  sqlite)
    db="${MLFLOW_SQLITE_PATH:-$home/mlflow.db}"
    [[ "$db" == /* ]] || die "MLFLOW_SQLITE_PATH must be an absolute path, got '$db'"
    backend="sqlite:///$db" # sqlite:////abs/path.db
    artifacts="${MLFLOW_ARTIFACTS_DESTINATION:-$home/artifacts}"
    ;;
  postgres)
    if [[ -n "${MLFLOW_BACKEND_STORE_URI:-}" ]]; then
      backend="$MLFLOW_BACKEND_STORE_URI"
    else
      # URL-encode the credentials so passwords with @ : / % work.
      backend="$("$python" - <<'EOF'
import os
from urllib.parse import quote
env = os.environ.get
user, password = quote(env("POSTGRES_USER", "postgres"), safe=""), quote(env("POSTGRES_PASSWORD", ""), safe="")
auth = f"{user}:{password}" if password else user
print(f"postgresql+psycopg2://{auth}@{env('POSTGRES_HOST', '127.0.0.1')}:{env('POSTGRES_PORT', '5432')}/{env('MLFLOW_DB', 'mlflow')}")
EOF
)"
    fi
    [[ "$backend" == postgresql* ]] || die "postgres mode needs a postgresql URI, got '${backend%%://*}://...'"
    artifacts="${MLFLOW_ARTIFACTS_DESTINATION:-$home/artifacts}"
    ;;
  *) die "unknown mode '$mode' (MLFLOW_SERVER_MODE must be sqlite or postgres)" ;;
esac

if [[ "$artifacts" == s3://* ]]; then
  "$python" -c 'import boto3' 2>/dev/null || die "artifact store $artifacts needs boto3: pip install boto3"
  [[ -n "${AWS_ACCESS_KEY_ID:-}" && -n "${AWS_SECRET_ACCESS_KEY:-}" ]] ||
    die "artifact store $artifacts needs AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY in the environment"
elif [[ "$artifacts" != *://* ]]; then
  mkdir -p "$artifacts"
fi

args=(--backend-store-uri "$backend" --serve-artifacts --artifacts-destination "$artifacts"
  --host "${MLFLOW_HOST:-127.0.0.1}" --port "${MLFLOW_PORT:-5000}")
[[ -n "${MLFLOW_WORKERS:-}" ]] && args+=(--workers "$MLFLOW_WORKERS")

if [[ "$auth" == true ]]; then
  export MLFLOW_AUTH_DATABASE_URI="${MLFLOW_AUTH_DATABASE_URI:-sqlite:///$home/basic_auth.db}"
  auth_db="${MLFLOW_AUTH_DATABASE_URI#sqlite:///}"
  pw="${MLFLOW_AUTH_ADMIN_PASSWORD:-}"
  if [[ "$auth_db" != "$MLFLOW_AUTH_DATABASE_URI" && ! -f "$auth_db" ]] && ((${#pw} < 12)); then
    die "--auth: a new user store needs MLFLOW_AUTH_ADMIN_PASSWORD (at least 12 characters) for the admin user"
  fi
  if [[ -z "${MLFLOW_FLASK_SERVER_SECRET_KEY:-}" ]]; then
    # CSRF key shared by this server's workers; set it yourself to keep UI sessions across restarts.
    echo "mlflow/server.sh: MLFLOW_FLASK_SERVER_SECRET_KEY unset, using a random one" >&2
    MLFLOW_FLASK_SERVER_SECRET_KEY="$("$python" -c 'import secrets; print(secrets.token_hex(32))')"
    export MLFLOW_FLASK_SERVER_SECRET_KEY
  fi
  # configparser does not read the environment: fill the ${...} placeholders of the template into $home.
  export MLFLOW_AUTH_CONFIG_PATH="$home/basic_auth.ini"
  (umask 077 && "$python" - "$here/basic_auth.ini" "$MLFLOW_AUTH_CONFIG_PATH") <<'EOF'
import os, re, sys
text = open(sys.argv[1], encoding="utf-8").read()
missing = sorted(set(re.findall(r"\$\{(\w+)\}", text)) - set(os.environ))
if missing:
    sys.exit(f"mlflow/server.sh: {sys.argv[1]} needs {', '.join(missing)} in the environment")
# configparser treats % as interpolation: double it (URL-encoded passwords contain %).
text = re.sub(r"\$\{(\w+)\}", lambda m: os.environ[m[1]].replace("%", "%%"), text)
open(sys.argv[2], "w", encoding="utf-8").write(text)
EOF
  args+=(--app-name basic-auth)
fi

echo "mlflow/server.sh: mode=$mode auth=$auth artifacts=$artifacts" \
  "url=http://${MLFLOW_HOST:-127.0.0.1}:${MLFLOW_PORT:-5000}" >&2
exec "${MLFLOW_BIN:-mlflow}" server "${args[@]}" "${extra[@]}"
