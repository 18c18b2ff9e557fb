"""AWS EC2 on 127.0.0.1: moto's EC2 API (its validations on), whose instances are real local hosts.

    sim = AwsSimulator(tmp / "aws")        # one HTTP server: moto, plus the hosts' control URL
    env = sim.env()                         # AWS_ENDPOINT_URL, fake credentials, AWS_DEFAULT_REGION
    sim.fail("us-east-1", "g5.xlarge")      # launches of that type there: InsufficientInstanceCapacity
    sim.interrupt(instance_id)              # a spot interruption, as EC2 does it
    sim.close()

How moto is bridged to the hosts (tests/simulators/hosts.py): with hooks on moto's in-process
backend, not a proxy. The server runs in this process, so while a simulator is open, moto's
InstanceBackend.run_instances / start_instances / stop_instances / terminate_instances and the
get_console_output answer are wrapped:

  run_instances       a capacity fault configured for the (region or zone, type) answers what EC2
                      answers (HTTP 500 InsufficientInstanceCapacity) and creates nothing; else moto
                      creates the instance, and a host is made for it: the key pair's public key in
                      its authorized_keys, the UserData as its boot script, its own loopback address
                      as PublicIpAddress (SSH on port 22 there, as on EC2) and as PrivateIpAddress too
                      (the primary network interface's: an address the host can bind and every other
                      host can reach, as one VPC's instances reach each other; moto's would be a
                      172.31.x.y that nothing here answers), and the instance's SecurityGroups are its
                      primary interface's (moto leaves them empty for groups given on the interface).
                      `pending` until the host's SSH server is up, then `running` (moto alone jumps to
                      `running` at once).
  modify_instance_attribute Groups
                      replaces the primary interface's groups, as EC2 does (moto's interface would keep
                      its launch groups beside the new ones); a group id that does not exist is
                      InvalidGroup.NotFound, and an instance shutting down or terminated (no interface
                      left) is IncorrectInstanceState (that code is the simulator's: EC2 documents none).
  stop_instances      `stopping` until every process of the host ended, then `stopped` (the disk
                      stays). A one-time spot instance cannot be stopped (UnsupportedOperation).
  start_instances     `pending` until the host booted again (its boot script runs again, as a
                      per-boot script does), then `running`; capacity faults apply here too.
  terminate_instances `shutting-down` until the host is destroyed, then `terminated`.
  poweroff on a host  the host's shim POSTs to /_sim/power-off/ID; EC2 then does what the
                      instance's InstanceInitiatedShutdownBehavior says (stop or terminate), with
                      StateReason Client.InstanceInitiatedShutdown.
  interrupt(id)       a spot interruption: terminated (or stopped) by EC2 with StateReason
                      Server.SpotInstanceTermination (Server.SpotInstanceShutdown).
  get_console_output  the host's console: the file its ORCH_CONSOLE names (what the image's
                      /dev/console is on EC2).

Each host also gets a `sudo` in its image's PATH (passwordless, as on the Deep Learning AMI) that
runs the command as the host's user, so `sudo poweroff` reaches the power shim, never this machine.
The region backends get a Deep Learning AMI look-alike (owner alias amazon, the DLAMI's name) since
AMI validation is on and moto's default AMIs are not loaded (they take seconds per region).
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

from tests.simulators.hosts import HostPool

DLAMI_NAME = "Deep Learning OSS Nvidia Driver AMI GPU PyTorch 2.9 (Ubuntu 24.04) 20260103"
DLAMI_OWNER = "898082745236"
REGIONS = ("us-east-1", "us-east-2", "us-west-2")
CODES = {"pending": 0, "running": 16, "shutting-down": 32, "terminated": 48, "stopping": 64, "stopped": 80}
MOTO_FLAGS = {  # environment variable -> moto.settings attribute
    "MOTO_ENABLE_AMI_VALIDATION": "ENABLE_AMI_VALIDATION",
    "MOTO_ENABLE_KEYPAIR_VALIDATION": "ENABLE_KEYPAIR_VALIDATION",
    "MOTO_EC2_ENABLE_INSTANCE_TYPE_VALIDATION": "EC2_ENABLE_INSTANCE_TYPE_VALIDATION",
}
SUDO = """#!/bin/sh
# The image's sudo: passwordless, as on the Deep Learning AMI; the simulated host already runs as its user.
while [ $# -gt 0 ]; do case "$1" in -u|-g) shift 2;; --) shift; break;; -*) shift;; *) break;; esac; done
exec "$@"
"""

_open: list["AwsSimulator"] = []


def _ec2_error(code: str, message: str, status: int) -> Exception:
    """An EC2 error answer with the HTTP status EC2 gives it (moto's own errors are all 400)."""
    from werkzeug.exceptions import HTTPException

    class Ec2Error(HTTPException):
        def get_headers(self, *args: Any, **kwargs: Any) -> list[tuple[str, str]]:
            return [("Content-Type", "text/xml")]

    error = Ec2Error()
    error.code = status
    error.description = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Response><Errors><Error><Code>{code}</Code>'
                         f"<Message>{escape(message)}</Message></Error></Errors><RequestID>{uuid.uuid4()}</RequestID></Response>")
    return error


class AwsSimulator:
    def __init__(self, root: Path, minute_seconds: float = 60.0, python: str | None = None):
        if _open:
            raise RuntimeError("one AWS simulator at a time: its hooks are on moto's in-process backend")
        from moto import settings as moto_settings
        from moto.core import DEFAULT_ACCOUNT_ID
        from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
        from werkzeug.serving import make_server

        self.account = DEFAULT_ACCOUNT_ID
        self._saved_env = {k: os.environ.get(k) for k in [*MOTO_FLAGS, "MOTO_EC2_LOAD_DEFAULT_AMIS"]}
        self._saved_flags = {attr: getattr(moto_settings, attr) for attr in MOTO_FLAGS.values()}
        os.environ.update({k: "true" for k in MOTO_FLAGS}, MOTO_EC2_LOAD_DEFAULT_AMIS="false")
        for attr in MOTO_FLAGS.values():
            setattr(moto_settings, attr, True)
        logging.getLogger("werkzeug").setLevel(logging.WARNING)

        self._lock = threading.RLock()
        self.faults: dict[tuple[str, str], str] = {}  # (region or zone, instance type) -> EC2 error code
        self._throttled = 0
        self.events: list[tuple[float, str, str]] = []  # (time, instance id, state it entered)
        self._region: dict[str, str] = {}  # instance id -> region
        self._generation: dict[str, int] = {}
        self._server = make_server("127.0.0.1", 0, self._app(DomainDispatcherApplication(create_backend_app)),
                                   threaded=True, request_handler=MotoRequestHandler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="aws-simulator", daemon=True)
        self._thread.start()
        self.hosts = HostPool(root, control_url=f"{self.url}/_sim", minute_seconds=minute_seconds, python=python)
        self._patch()
        _open.append(self)
        try:
            self.images = {region: self._register_image(region) for region in REGIONS}
        except BaseException:
            self.close()
            raise

    # -- what tests use -------------------------------------------------------------------

    def env(self, region: str = "us-east-1") -> dict[str, str]:
        """The environment that points boto3 (and a CLI subprocess) here, with fake credentials."""
        return {"AWS_ENDPOINT_URL": self.url, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                "AWS_DEFAULT_REGION": region, "AWS_EC2_METADATA_DISABLED": "true",
                "AWS_CONFIG_FILE": "/dev/null", "AWS_SHARED_CREDENTIALS_FILE": "/dev/null"}

    def fail(self, where: str, instance_type: str, code: str = "InsufficientInstanceCapacity") -> None:
        """Launches (and starts) of instance_type in `where` (a region or a zone) fail with `code`."""
        self.faults[(where, instance_type)] = code

    def heal(self, where: str | None = None, instance_type: str | None = None) -> None:
        for key in list(self.faults):
            if where in (None, key[0]) and instance_type in (None, key[1]):
                del self.faults[key]

    def throttle_launches(self, times: int) -> None:
        """The next `times` launches are refused with RequestLimitExceeded (HTTP 503), creating nothing."""
        self._throttled = times

    def interrupt(self, instance_id: str, stop: bool = False) -> None:
        """A spot interruption: EC2 terminates (stop=True: stops) the instance and says why."""
        iid = instance_id.partition("@")[0]
        instance = self.instance(iid)
        assert instance.lifecycle == "spot", f"{iid} is not a spot instance"
        code = "Server.SpotInstanceShutdown" if stop else "Server.SpotInstanceTermination"
        self._shut_down(instance, stop, code, f"{code}: Spot instance {'shutdown' if stop else 'termination'}")

    def instance(self, instance_id: str) -> Any:
        iid = instance_id.partition("@")[0]
        return self._backend(self._region[iid]).get_instance(iid)

    def state(self, instance_id: str) -> str:
        return self.instance(instance_id).state

    def entered(self, instance_id: str, state: str, after: float | None = None) -> float | None:
        """When the instance last entered `state` (time.time()), or first did after `after`; None if it did not."""
        iid = instance_id.partition("@")[0]
        times = [t for t, i, s in self.events if i == iid and s == state]
        if after is not None:
            return next((t for t in times if t >= after), None)
        return times[-1] if times else None

    def host_dir(self, instance_id: str) -> Path:
        return self.hosts.dir(instance_id.partition("@")[0])

    def console(self, instance_id: str) -> str:
        try:
            return (self.host_dir(instance_id) / "console.log").read_text(errors="replace")
        except OSError:
            return ""

    def close(self) -> None:
        try:
            self.hosts.close()
        finally:
            self._unpatch()
            try:
                import urllib.request

                urllib.request.urlopen(urllib.request.Request(f"{self.url}/moto-api/reset", method="POST", data=b""),
                                       timeout=30).read()
            except OSError:
                pass
            self._server.shutdown()
            self._thread.join(timeout=10)
            from moto import settings as moto_settings

            for attr, value in self._saved_flags.items():
                setattr(moto_settings, attr, value)
            for key, value in self._saved_env.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
            if self in _open:
                _open.remove(self)

    def __enter__(self) -> "AwsSimulator":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the server: moto, plus the control URL -------------------------------------------

    def _app(self, moto_app: Any) -> Any:
        def app(environ: dict[str, Any], start_response: Any) -> Any:
            path = environ.get("PATH_INFO", "")
            if path.startswith("/_sim/power-off/") and environ.get("REQUEST_METHOD") == "POST":
                self._powered_off(path.rsplit("/", 1)[1])
                start_response("200 OK", [("Content-Type", "text/plain")])
                return [b"ok\n"]
            return moto_app(environ, start_response)

        return app

    def _backend(self, region: str) -> Any:
        from moto.ec2.models import ec2_backends

        return ec2_backends[self.account][region]

    def _register_image(self, region: str) -> str:
        from moto.ec2.models.amis import Ami
        from moto.ec2.utils import random_ami_id

        backend = self._backend(region)
        image_id = random_ami_id()
        backend.amis[image_id] = Ami(backend, image_id, name=DLAMI_NAME, owner_id=DLAMI_OWNER, owner_alias="amazon",
                                     public=True, architecture="x86_64", virtualization_type="hvm", root_device_type="ebs",
                                     root_device_name="/dev/sda1", region_name=f"{region}a", hypervisor="xen",
                                     creation_date=datetime(2026, 1, 3, tzinfo=timezone.utc))
        return image_id

    # -- moto's backend, wrapped ----------------------------------------------------------

    def _patch(self) -> None:
        from moto.ec2.models.instances import InstanceBackend
        from moto.ec2.responses.general import General

        names = ("run_instances", "start_instances", "stop_instances", "terminate_instances", "modify_instance_security_groups")
        self._originals = {name: InstanceBackend.__dict__[name] for name in names}
        self._original_console = General.__dict__["get_console_output"]
        sim, original = self, self._originals

        def run_instances(backend: Any, image_id: str, count: int, user_data: Any, security_group_names: list[str],
                          **kwargs: Any) -> Any:
            sim._refuse_launch(backend, kwargs.get("instance_type", ""), sim._zone(backend, kwargs))
            reservation = original["run_instances"](backend, image_id, count, user_data, security_group_names, **kwargs)
            for instance in reservation.instances:
                sim._created(backend, instance)
            return reservation

        def start_instances(backend: Any, instance_ids: list[str]) -> Any:
            from moto.ec2.exceptions import EC2ClientError

            for instance in backend.get_multi_instances_by_id(instance_ids):
                if instance.state not in ("stopped", "pending", "running"):
                    raise EC2ClientError("IncorrectInstanceState",
                                         f"The instance '{instance.id}' is not in a state from which it can be started.")
                if instance.state == "stopped":
                    sim._refuse_launch(backend, instance.instance_type, instance.placement.zone)
            result = original["start_instances"](backend, instance_ids)
            for instance, previous in result:
                if previous.name == "stopped":
                    sim._boot(instance)
                else:
                    sim._set_state(instance, previous.name)
            return result

        def stop_instances(backend: Any, instance_ids: list[str]) -> Any:
            from moto.ec2.exceptions import EC2ClientError

            for instance in backend.get_multi_instances_by_id(instance_ids):
                if instance.lifecycle == "spot":
                    raise EC2ClientError("UnsupportedOperation", f"You can't stop the Spot Instance '{instance.id}' because "
                                         "it is associated with a one-time Spot Instance request. You can only stop Spot "
                                         "Instances associated with persistent Spot Instance requests.")
                if instance.state in ("shutting-down", "terminated"):
                    raise EC2ClientError("IncorrectInstanceState",
                                         f"This instance '{instance.id}' is not in a state from which it can be stopped.")
            result = original["stop_instances"](backend, instance_ids)
            for instance, previous in result:
                if previous.name in ("pending", "running"):
                    sim._power_down(instance, "stopped")
                else:
                    sim._set_state(instance, previous.name)
            return result

        def terminate_instances(backend: Any, instance_ids: list[str]) -> Any:
            result = original["terminate_instances"](backend, instance_ids)
            for instance, previous in result:
                if previous.name in ("shutting-down", "terminated"):
                    sim._set_state(instance, previous.name)
                else:
                    sim._power_down(instance, "terminated")
            return result

        def modify_instance_security_groups(backend: Any, instance_id: str, new_group_id_list: list[str]) -> Any:
            from moto.ec2.exceptions import EC2ClientError, InvalidSecurityGroupNotFoundError

            instance = backend.get_instance(instance_id)
            if instance.state in ("shutting-down", "terminated"):
                raise EC2ClientError("IncorrectInstanceState", f"The instance '{instance_id}' is not in a state from which "
                                                               f"its security groups can be changed.")
            groups = [backend.get_security_group_from_id(g) for g in new_group_id_list]
            missing = [g for g, found in zip(new_group_id_list, groups) if found is None]
            if missing:
                raise InvalidSecurityGroupNotFoundError(missing[0])
            result = original["modify_instance_security_groups"](backend, instance_id, new_group_id_list)
            nic = instance.nics.get(0)
            if nic is not None:
                nic._group_set = list(groups)
            return result

        def get_console_output(response: Any) -> Any:
            from moto.core.responses import ActionResult
            from moto.core.utils import utcnow
            from moto.ec2.utils import Base64EncodedString

            instance = response.ec2_backend.get_instance(response._get_param("InstanceId"))
            return ActionResult({"InstanceId": instance.id, "Timestamp": utcnow(),
                                 "Output": Base64EncodedString.from_raw_string(sim.console(instance.id))})

        for name, fn in (("run_instances", run_instances), ("start_instances", start_instances),
                         ("stop_instances", stop_instances), ("terminate_instances", terminate_instances),
                         ("modify_instance_security_groups", modify_instance_security_groups)):
            setattr(InstanceBackend, name, fn)
        General.get_console_output = get_console_output

    def _unpatch(self) -> None:
        from moto.ec2.models.instances import InstanceBackend
        from moto.ec2.responses.general import General

        for name, fn in getattr(self, "_originals", {}).items():
            setattr(InstanceBackend, name, fn)
        if hasattr(self, "_original_console"):
            General.get_console_output = self._original_console

    def _zone(self, backend: Any, kwargs: dict[str, Any]) -> str | None:
        subnet = kwargs.get("subnet_id") or next((n.get("SubnetId") for n in kwargs.get("nics") or [] if n.get("SubnetId")), None)
        if subnet:
            return backend.get_subnet(subnet).availability_zone
        return kwargs.get("placement")

    def _refuse_launch(self, backend: Any, instance_type: str, zone: str | None) -> None:
        with self._lock:
            if self._throttled > 0:
                self._throttled -= 1
                raise _ec2_error("RequestLimitExceeded", "Request limit exceeded.", 503)
        code = self.faults.get((backend.region_name, instance_type)) or (zone and self.faults.get((zone, instance_type)))
        if not code:
            return
        if code.startswith("Insufficient"):
            raise _ec2_error(code, f"We currently do not have sufficient {instance_type} capacity in the Availability Zone "
                                   f"you requested ({zone or backend.region_name}). Our system will be working on provisioning "
                                   f"additional capacity.", 500)
        from moto.ec2.exceptions import EC2ClientError

        raise EC2ClientError(code, f"You have requested more vCPU capacity than your current vCPU limit allows for "
                                   f"the instance bucket that {instance_type} belongs to.")

    # -- hosts behind instances ------------------------------------------------------------

    def _created(self, backend: Any, instance: Any) -> None:
        key = backend.key_pairs.get(instance.key_name) if instance.key_name else None
        script = instance.user_data.decode() if instance.user_data else ""
        self._region[instance.id] = backend.region_name
        self.hosts.create(instance.id, authorized_keys=[key.public_key] if key else [], boot_script=script,
                          env={"ORCH_CONSOLE": str(self.hosts.dir(instance.id) / "console.log")})
        sudo = self.hosts.dir(instance.id) / "image-bin" / "sudo"
        sudo.write_text(SUDO)
        sudo.chmod(0o755)
        self._private_address(instance)
        self._boot(instance)

    def _private_address(self, instance: Any) -> None:
        """The host's own loopback address as the primary interface's private one; its groups as the instance's."""
        from moto.ec2.utils import generate_dns_from_ip

        nic = instance.nics.get(0)
        if nic is None:
            return
        address = self.hosts.address(instance.id)[0]
        # instance._private_ips keeps moto's subnet address, so moto still frees it from the subnet at the end.
        nic.private_ip_address = address
        nic.private_ip_addresses = [{"Primary": True, "PrivateIpAddress": address}]
        if getattr(nic, "private_dns_name", None):
            nic.private_dns_name = generate_dns_from_ip(address)
            nic.private_ip_addresses[0]["PrivateDnsName"] = nic.private_dns_name
        instance.security_groups = list(dict.fromkeys([*nic._group_set, *instance.security_groups]))

    def _set_state(self, instance: Any, state: str) -> None:
        with self._lock:
            instance._state.name, instance._state.code = state, CODES[state]
            self.events.append((time.time(), instance.id, state))

    def _bump(self, instance: Any) -> int:
        with self._lock:
            self._generation[instance.id] = self._generation.get(instance.id, 0) + 1
            return self._generation[instance.id]

    def _finish(self, instance: Any, generation: int, state: str) -> None:
        with self._lock:
            if self._generation.get(instance.id) == generation:  # nothing happened to it meanwhile
                self._set_state(instance, state)

    def _boot(self, instance: Any) -> None:
        """`pending` until the host's SSH server answers, then `running` at the host's address."""
        generation = self._bump(instance)
        self._set_state(instance, "pending")
        nic = instance.nics.get(0)
        if nic is not None and nic.public_ip:
            nic.public_ip = self.hosts.address(instance.id)[0]

        def boot() -> None:
            try:
                self.hosts.start(instance.id)
            except Exception as e:  # the host failed to boot: EC2 would show it stopped
                logging.getLogger(__name__).warning("host %s did not boot: %s", instance.id, e)
                self._finish(instance, generation, "stopped")
                return
            self._finish(instance, generation, "running")

        threading.Thread(target=boot, name=f"boot-{instance.id}", daemon=True).start()

    def _power_down(self, instance: Any, final: str, reason: tuple[str, str] | None = None) -> None:
        """`stopping` / `shutting-down` until the host is off (destroyed), then `stopped` / `terminated`."""
        from moto.ec2.models.instances import StateReason

        generation = self._bump(instance)
        self._set_state(instance, "stopping" if final == "stopped" else "shutting-down")
        if reason:
            code, message = reason
            instance.state_reason = StateReason(message, code)
            instance._reason = f"{message.split(':')[0]} ({datetime.now(timezone.utc):%Y-%m-%d %H:%M:%S} GMT)"

        def power_down() -> None:
            if final == "terminated":
                self.hosts.destroy(instance.id)
            else:
                self.hosts.stop(instance.id)
            self._finish(instance, generation, final)

        threading.Thread(target=power_down, name=f"power-down-{instance.id}", daemon=True).start()

    def _shut_down(self, instance: Any, stop: bool, code: str, message: str) -> None:
        """The machine went down outside the API (it powered itself off, or EC2 interrupted it)."""
        with self._lock:
            if instance.state not in ("pending", "running"):
                return
            if stop:
                instance.stop()  # moto's model: the public address goes, as on EC2
            else:
                self._originals["terminate_instances"](self._backend(self._region[instance.id]), [instance.id])
        self._power_down(instance, "stopped" if stop else "terminated", (code, message))

    def _powered_off(self, host_id: str) -> None:
        if host_id not in self._region:
            return
        instance = self.instance(host_id)
        stop = instance.instance_initiated_shutdown_behavior != "terminate"
        self._shut_down(instance, stop, "Client.InstanceInitiatedShutdown", "Client.InstanceInitiatedShutdown: Instance initiated shutdown")


def module_simulator(request: Any, minute_seconds: float = 60.0) -> AwsSimulator:
    """One simulator per test module, closed when the module's tests end (for fixture-less callers)."""
    import pytest

    module = request.node.getparent(pytest.Module)
    sim = getattr(module, "_aws_simulator", None)
    if sim is None:
        root = request.getfixturevalue("tmp_path_factory").mktemp("aws-sim")
        sim = AwsSimulator(root, minute_seconds=minute_seconds)
        module._aws_simulator = sim

        def close() -> None:
            sim.close()
            module._aws_simulator = None

        module.addfinalizer(close)
    return sim


__all__ = ["AwsSimulator", "DLAMI_NAME", "module_simulator"]
