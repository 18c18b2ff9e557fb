#!/bin/sh
# orch's boot recipe: turns a provider's stock CUDA/PyTorch image into an orch instance.
#
# Run at first boot as EC2/Lambda user-data (cloud-init, as root) or as a container's start
# command (RunPod, Vast, AutoDL), and by orch's local and ssh providers. orch puts a prologue
# before it that sets these variables (see orchestrator/lifecycle/boot_recipe.py):
#   ORCH_HOME_SPEC     orch's directory on the instance; a leading ~/ means the run-as user's home
#   ORCH_RUN_AS        the user orch logs in as (its files and processes belong to it); empty: this user
#   ORCH_PYTHON        interpreter to use (default: python3)
#   ORCH_AGENT_TGZ     the agent's code (stdlib only), a base64 tar.gz of remote/
#   ORCH_AGENT_CONFIG  the agent's configuration, base64 JSON (deadlines, price, stop command)
#   ORCH_LOCK          optional: the server environment's pinned requirements, base64
#   ORCH_MODELS_DIR    optional: where models live (a data disk that survives a stop)
#   ORCH_REARM         systemd | cron | empty: how a dead agent is armed again (empty: the host is
#                      not orch's to change, as with the local and ssh providers)
#
# In order: the agent armed (before anything slow); a second way to
# re-arm it if both its processes die (a systemd timer where systemd runs, else cron where
# present; the image server also checks it); the models directory; then the server's packages
# (a venv with the lock, only where the interpreter lacks them). Progress and the outcome go to
# $ORCH_HOME/boot-recipe.json, which the laptop waits on: {"status": running|done|failed, ...}.
set -u

if [ -n "${ORCH_RUN_AS:-}" ] && [ "$(id -u)" = 0 ] && [ "$(id -un)" != "$ORCH_RUN_AS" ] && id "$ORCH_RUN_AS" >/dev/null 2>&1; then
    OWNER_HOME=$(getent passwd "$ORCH_RUN_AS" | cut -d: -f6)
    AS_OWNER="runuser -u $ORCH_RUN_AS --"
    command -v runuser >/dev/null 2>&1 || AS_OWNER="su -s /bin/sh $ORCH_RUN_AS -c"
else
    OWNER_HOME=$HOME
    AS_OWNER=""
fi
case "$ORCH_HOME_SPEC" in
    "~") ORCH_HOME=$OWNER_HOME ;;
    "~/"*) ORCH_HOME="$OWNER_HOME/${ORCH_HOME_SPEC#\~/}" ;;
    *) ORCH_HOME=$ORCH_HOME_SPEC ;;
esac
export ORCH_HOME

as_owner() {
    # Run "$@" as the login user (when this script runs as root for another user).
    if [ -z "$AS_OWNER" ]; then "$@"; elif [ "${AS_OWNER#runuser}" != "$AS_OWNER" ]; then $AS_OWNER "$@";
    else $AS_OWNER "$(printf '%s ' "$@")"; fi
}

PY=${ORCH_PYTHON:-}
[ -z "$PY" ] && PY=$(command -v python3 || command -v python || true)
if [ -z "$PY" ]; then
    echo "orch boot recipe: no python3 on this image" >&2
    exit 1
fi

as_owner mkdir -p "$ORCH_HOME/logs" "$ORCH_HOME/agent" "$ORCH_HOME/app"
LOG="$ORCH_HOME/logs/boot-recipe.log"
STATUS="$ORCH_HOME/boot-recipe.json"
say() { echo "$(date -u +%Y-%m-%dT%H:%M:%SZ) $*" >> "$LOG"; }
status() { # status STATE [PYTHON] [ERROR]: written atomically
    printf '{"status": "%s", "python": "%s", "error": "%s", "at": %s}\n' "$1" "${2:-}" "${3:-}" "$(date +%s)" > "$STATUS.tmp" \
        && mv -f "$STATUS.tmp" "$STATUS"
}
[ -n "$AS_OWNER" ] && touch "$LOG" "$STATUS" && chown "$ORCH_RUN_AS" "$LOG" "$STATUS" 2>/dev/null
status running
say "boot recipe started (python $PY, home $ORCH_HOME)"

# 1. the agent, before anything slow
if [ ! -f "$ORCH_HOME/app/remote/agent.py" ] && [ -n "${ORCH_AGENT_TGZ:-}" ]; then
    printf '%s' "$ORCH_AGENT_TGZ" | "$PY" -c 'import base64,sys; sys.stdout.buffer.write(base64.b64decode(sys.stdin.read()))' \
        | as_owner tar -xzf - -C "$ORCH_HOME/app"
fi
ARM="PYTHONPATH=$ORCH_HOME/app $PY -m remote.agent --home $ORCH_HOME arm --config-b64"
if as_owner env PYTHONPATH="$ORCH_HOME/app" "$PY" -m remote.agent --home "$ORCH_HOME" arm --config-b64 "${ORCH_AGENT_CONFIG:-e30=}" >> "$LOG" 2>&1; then
    say "agent armed"
else
    say "agent could not be armed"
fi

# 2. a second way to re-arm it: `arm` with an empty config keeps the stored one and its clocks
REARM=${ORCH_REARM:-}
UNITS=${ORCH_SYSTEMD_UNITS:-/etc/systemd/system}   # both overridable, as DESTDIR is, for the recipe's tests
RUNNING=${ORCH_SYSTEMD_RUNNING:-/run/systemd/system}
if [ "$REARM" = systemd ] && ! { [ "$(id -u)" = 0 ] && command -v systemctl >/dev/null 2>&1 && [ -d "$RUNNING" ]; }; then
    say "no systemd here (or not root): re-arming through cron instead"
    REARM=cron
fi
if [ "$REARM" = systemd ]; then
    USER_LINE=""
    [ -n "${ORCH_RUN_AS:-}" ] && USER_LINE="User=$ORCH_RUN_AS"
    cat > "$UNITS/orch-agent.service" <<UNIT
[Unit]
Description=orch auto-shutdown agent (re-arms it if its processes died)
[Service]
Type=oneshot
$USER_LINE
Environment=PYTHONPATH=$ORCH_HOME/app
ExecStart=$PY -m remote.agent --home $ORCH_HOME arm --config-b64 e30=
UNIT
    cat > "$UNITS/orch-agent.timer" <<UNIT
[Unit]
Description=orch auto-shutdown agent check
[Timer]
OnBootSec=15s
OnUnitActiveSec=30s
AccuracySec=5s
[Install]
WantedBy=timers.target
UNIT
    systemctl daemon-reload >> "$LOG" 2>&1
    systemctl enable --now orch-agent.timer >> "$LOG" 2>&1 && say "systemd timer orch-agent.timer enabled"
elif [ "$REARM" = cron ] && command -v crontab >/dev/null 2>&1; then
    LINE="* * * * * $ARM e30= >/dev/null 2>&1"
    ( as_owner crontab -l 2>/dev/null | grep -v 'remote.agent' ; echo "$LINE" ) | as_owner crontab - \
        && say "cron re-arm entry installed"
elif [ -n "$REARM" ]; then
    say "no systemd and no cron: the image server re-arms the agent"
fi

# 3. where models go
if [ -n "${ORCH_MODELS_DIR:-}" ]; then
    mkdir -p "$ORCH_MODELS_DIR"
    [ -n "$AS_OWNER" ] && chown "$ORCH_RUN_AS" "$ORCH_MODELS_DIR"
    [ -e "$ORCH_HOME/models" ] || as_owner ln -s "$ORCH_MODELS_DIR" "$ORCH_HOME/models"
fi
as_owner mkdir -p "$ORCH_HOME/models"

# 4. the server's packages, where this interpreter lacks them
# Found, not imported (importing torch and diffusers takes seconds): remote/ctl.py check-deps does the same.
CHECK='import importlib.util as u, sys; sys.exit(any(u.find_spec(m) is None for m in ("torch", "diffusers", "transformers", "fastapi", "uvicorn", "PIL", "safetensors", "blake3", "boto3")))'
if as_owner "$PY" -c "$CHECK" >> "$LOG" 2>&1; then
    say "the image has the server's packages"
    status done "$PY"
    exit 0
fi
if [ -z "${ORCH_LOCK:-}" ]; then
    say "the server's packages are missing and no lock was given: the laptop installs them over SSH"
    status done "$PY"
    exit 0
fi
VENV="$ORCH_HOME/venv"
printf '%s' "$ORCH_LOCK" | "$PY" -c 'import base64,sys; sys.stdout.buffer.write(base64.b64decode(sys.stdin.read()))' > "$ORCH_HOME/requirements.lock"
[ -n "$AS_OWNER" ] && chown "$ORCH_RUN_AS" "$ORCH_HOME/requirements.lock"
say "installing the server's packages into $VENV"
if as_owner "$PY" -m venv --system-site-packages "$VENV" >> "$LOG" 2>&1 \
    && as_owner "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -r "$ORCH_HOME/requirements.lock" >> "$LOG" 2>&1; then
    say "installed"
    status done "$VENV/bin/python"
else
    say "installing the server's packages failed"
    status failed "$PY" "pip install failed: see $LOG"
    exit 1
fi
