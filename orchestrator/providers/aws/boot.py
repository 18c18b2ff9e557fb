"""What runs on an EC2 instance for orch: the user-data around orch's boot script, and the self-stop.

User-data: cloud-init runs it as root, at the first boot only. orch's boot script must arm the
agent at every boot (a stopped instance that `orch up` starts again), so the user-data copies
itself into cloud-init's per-boot directory. It then
  1. schedules the max_lifetime backstop where orch gives a deadline: `shutdown -h +N`, N
     computed at each boot from the absolute deadline. When the machine powers itself off, EC2
     stops it (terminates a spot instance): InstanceInitiatedShutdownBehavior, set at launch;
  2. runs orch's boot script (the lifecycle's InstanceSpec.startup_script, images/bootstrap.sh) as
     root: the provider's runtime tells it to arm the agent as the login user, whose home the
     laptop's SSH session sees, and to add a systemd timer that re-arms a killed agent.
Outside cloud-init (a simulator's host runs it directly at every power-on) it only runs 1 and 2,
as the user it was started as.

Self-stop: the agent writes why to its stopped.json, then runs `self_stop_command`: the reason
goes to the serial console (EC2 keeps the console output of a stopped instance, so the provider
reads it back from outside: get_console_output), then `poweroff`. No AWS credentials on the
instance: EC2 does the stopping, because the machine powered off.
"""

from __future__ import annotations

import hashlib
import json
import math
import shlex

from ...errors import ConfigError
from ...ssh import sh_path

USER_DATA_LIMIT = 16 * 1024  # bytes, before base64 (EC2's limit)
CONSOLE_MARK = "orch-agent-stop: "
BOOT_MARK = "orch-boot: "
CONSOLE_ENV = "ORCH_CONSOLE"  # the console device (a simulator points it at a file)
PER_BOOT = "/var/lib/cloud/scripts/per-boot/orch-boot.sh"


def backstop_lines(deadline: float) -> str:
    """Shell lines (as root) that power the machine off at `deadline` (epoch seconds), computed at boot."""
    deadline_s = int(math.floor(deadline))
    return (
        "# max_lifetime backstop: the machine powers itself off at the deadline; EC2 then stops it\n"
        f"left=$(( ({deadline_s} - $(date +%s) + 59) / 60 ))\n"
        'if [ "$left" -le 0 ]; then shutdown -h now "orch: max_lifetime reached"\n'
        'else shutdown -h "+$left" "orch: max_lifetime backstop"; fi\n'
    )


def user_data(startup_script: str, login_user: str, deadline: float | None = None) -> str:
    """The EC2 user-data around orch's boot script (see the module docstring)."""
    script = startup_script if startup_script.endswith("\n") or not startup_script else startup_script + "\n"
    end = "ORCH_BOOT_" + hashlib.sha256(script.encode()).hexdigest()[:16]
    text = (
        "#!/bin/sh\n"
        "# orch (EC2): cloud-init runs this as root at first boot and, copied to its per-boot directory, at every boot.\n"
        "CLOUD_INIT=\n"
        'if [ "$(id -u)" = 0 ]; then case "$0" in /var/lib/cloud/*) CLOUD_INIT=1;; esac; fi\n'
        'if [ -n "$CLOUD_INIT" ] && [ "$0" != ' + PER_BOOT + ' ]; then\n'
        f'  mkdir -p {PER_BOOT.rsplit("/", 1)[0]} && cp "$0" {PER_BOOT} && chmod 755 {PER_BOOT}\n'
        "fi\n"
        "# a boot mark on the console: a stop reason written before it belongs to an earlier boot\n"
        f'echo "{BOOT_MARK}$(date +%s)" >> "${{{CONSOLE_ENV}:-/dev/console}}" 2>/dev/null\n'
        + (backstop_lines(deadline) if deadline is not None else "")
        + "# orch's boot script (it arms the auto-shutdown agent as the login user)\n"
        "orch_boot() {\n"
        f"cat <<'{end}'\n"
        f"{script}"
        f"{end}\n"
        "}\n"
        'sh -c "$(orch_boot)" < /dev/null\n'
    )
    size = len(text.encode())
    if size > USER_DATA_LIMIT:
        raise ConfigError(f"the instance's boot script is {size} bytes; EC2's user-data limit is {USER_DATA_LIMIT}")
    return text


def backstop_command(deadline: float) -> str:
    """Move the backstop on a running instance (`orch extend --max-lifetime`): cancel, schedule anew."""
    return f"sudo -n sh -c {shlex.quote('shutdown -c 2>/dev/null; ' + backstop_lines(deadline))}"


def self_stop_command(home: str) -> str:
    """The agent's stop command: its reason to the console, then power off (EC2 stops the instance)."""
    stopped = sh_path(f"{home.rstrip('/')}/agent/stopped.json")
    fallback = shlex.quote(json.dumps({"reason": "stop requested on the instance"}))
    return (f"r=$(tr -d '\\n' < {stopped} 2>/dev/null); [ -n \"$r\" ] || r={fallback}; "
            f"printf '{CONSOLE_MARK}%s\\n' \"$r\" | sudo -n tee -a \"${{{CONSOLE_ENV}:-/dev/console}}\" >/dev/null 2>&1; "
            "sudo -n poweroff 2>/dev/null || poweroff")


def reason_from_console(output: str) -> str | None:
    """The agent's stop reason in the console output of the instance's last boot, if it wrote one."""
    for line in reversed(output.splitlines()):
        if BOOT_MARK in line:
            return None
        _, mark, rest = line.partition(CONSOLE_MARK)
        if not mark:
            continue
        try:
            reason = json.loads(rest.strip()).get("reason")
        except (ValueError, AttributeError):
            continue
        if isinstance(reason, str) and reason:
            return reason
    return None


__all__ = ["BOOT_MARK", "CONSOLE_ENV", "CONSOLE_MARK", "backstop_command", "backstop_lines", "reason_from_console", "self_stop_command", "user_data"]
