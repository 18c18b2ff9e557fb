"""AWS EC2: GPU instance types as offers per region; an instance per `orch up`, on orch's key pair
and a security group that opens only SSH.

- Offers: the GPU instance types of prices.py that EC2 says a region has
  (describe_instance_type_offerings), on-demand at the table's price, then the same types as spot
  offers (Offer.interruptible) at EC2's current spot price (describe_spot_price_history).
- create: orch's public key imported once as key pair `orch-<fingerprint>`; a security group
  `orch-ssh-<cidr>` per VPC opening TCP 22 to aws.ssh_cidr only; the Deep Learning AMI (newest
  image of aws.ami_owner named like aws.ami_name, or aws.ami); one launch per availability zone
  that has the type, moving to the next zone on a capacity error; orch's tags on the instance,
  its volume and its network interface; user-data from boot.py (the agent armed at every boot);
  InstanceInitiatedShutdownBehavior = stop (terminate for spot), so the agent's power-off stops it.
- Spot instances are one-time requests that EC2 terminates on interruption. EC2 cannot stop
  them (only persistent requests can be stopped, and EC2 restarts those by itself when capacity
  returns: billing that nobody asked for), so `stop` terminates a spot instance.
- PrivateNetwork (a Ray cluster's members): a second group per VPC, `orch-cluster`, whose only inbound
  rule is every TCP port from its own members (a group reference matches their private addresses
  only); open adds it beside the instances' SSH group, close takes it off. Not in the SSH group,
  which takes out every rule but SSH from aws.ssh_cidr.
- Instance ids are `i-...@region` (EC2's ids are regional); a bare `i-...` is looked up in
  every region orch uses.
"""

from __future__ import annotations

import hashlib
import logging
import re
import time
from datetime import datetime, timezone
from typing import Any, Callable

from ...errors import ConfigError
from ..base import (
    NAME_TAG,
    ORCH_TAG,
    RUN_TAG,
    AuthError,
    BadResponse,
    Capabilities,
    Image,
    Instance,
    InstanceSpec,
    InstanceStatus,
    InsufficientCapacity,
    InvalidState,
    NotFound,
    Offer,
    ProviderError,
    QuotaExceeded,
    RemoteRuntime,
    SshEndpoint,
)
from . import boot, prices
from .ec2 import Ec2
from .settings import Settings

log = logging.getLogger(__name__)

ID_RE = re.compile(r"(i-[0-9a-f]{8,17})(?:@([a-z0-9-]+))?")
STATUS = {
    "pending": InstanceStatus.PENDING,
    "running": InstanceStatus.RUNNING,
    "stopping": InstanceStatus.STOPPING,
    "stopped": InstanceStatus.STOPPED,
    "shutting-down": InstanceStatus.TERMINATING,
    "terminated": InstanceStatus.TERMINATED,
}
PRICE_TAG = "orch-price"
CREATED_TAG = "orch-created"
SPOT_REASONS = ("Server.SpotInstanceTermination", "Server.SpotInstanceShutdown", "Server.SpotInstanceHibernate")
RECENT_S = 60.0  # EC2 is eventually consistent: a new instance may be unknown to describe for a few seconds


IMAGE_TAG = "orch-image"
IMAGE_TIMEOUT_S = 1800.0
CLUSTER_GROUP = "orch-cluster"  # per VPC: every TCP port between its members (PrivateNetwork)


class AwsProvider:
    """Implements Provider, ReportsStopReason, NativeImages (AMIs), BootBackstop and PrivateNetwork (one VPC)."""

    name = "aws"
    capabilities = Capabilities(regions=prices.REGIONS, gpus=prices.GPUS)

    def __init__(self, settings: Settings, ec2: Ec2 | None = None):
        self.settings = settings
        self.ec2 = ec2 or Ec2(settings)
        self._images: dict[tuple[str, str], dict[str, Any]] = {}
        self._groups: dict[tuple[str, str], str] = {}
        self._recent: dict[str, float] = {}
        self._warned = False

    # -- regions -------------------------------------------------------------------------

    def _known_region(self, region: str, where: str) -> str:
        if region not in prices.ON_DEMAND:
            raise ConfigError(f"aws: {where} {region!r} is not a region orch has prices for; regions: "
                              f"{', '.join(prices.REGIONS)} (prices of {prices.PRICES_DATE})")
        return region

    def regions(self, region: str | None = None) -> tuple[str, ...]:
        """Where offers are looked for: --region, else aws.regions, else the AWS default region, else all."""
        if region:
            return (self._known_region(region, "--region"),)
        if self.settings.regions:
            return tuple(self._known_region(r, "aws.regions:") for r in self.settings.regions)
        default = self.ec2.default_region()
        if default:
            return (self._known_region(default, "the default region (AWS_DEFAULT_REGION / the profile's region)"),)
        return prices.REGIONS

    def _list_regions(self) -> tuple[str, ...]:
        """Every region orch may have created instances in."""
        default = self.ec2.default_region()
        return tuple(dict.fromkeys([*self.settings.regions, *([default] if default else []), *prices.REGIONS]))

    # -- offers --------------------------------------------------------------------------

    def offers(self, gpu: str | None = None, region: str | None = None, max_price: float | None = None) -> list[Offer]:
        types = prices.types_for(gpu)
        if types is None:
            raise ConfigError(f"aws has no GPU {gpu!r}; GPUs: {', '.join(prices.GPUS)} "
                              f"(or name an instance type: {', '.join(prices.TYPES)})")
        on_demand: list[Offer] = []
        spot: list[Offer] = []
        for r in self.regions(region):
            offered = self._offered(r, [t.name for t in types])
            spot_prices = self._spot_prices(r, sorted(offered)) if offered else {}
            for t in types:
                if t.name not in offered:
                    continue
                price = prices.on_demand(r, t.name)
                if price is not None and (max_price is None or price <= max_price):
                    on_demand.append(self._offer(t, r, price, spot=False))
                low = spot_prices.get(t.name)
                if low is not None and (max_price is None or low <= max_price):
                    spot.append(self._offer(t, r, low, spot=True))
        # On-demand first: a spot offer is never the fallback of an on-demand one by accident.
        by_price = lambda o: o.price_per_hour  # noqa: E731
        return sorted(on_demand, key=by_price) + sorted(spot, key=by_price)

    def _offer(self, t: prices.InstanceType, region: str, price: float, spot: bool) -> Offer:
        details = {"instance_type": t.name, "market": "spot" if spot else "on-demand", "vcpus": t.vcpus,
                   "gpu_memory_gb": t.gpu_memory_gb,
                   "price_source": "EC2 describe_spot_price_history (lowest zone, now)" if spot
                   else f"orch's table, {prices.PRICES_DATE}"}
        # available=None: EC2 says a region has the type, never whether it has capacity until a launch.
        return Offer(provider=self.name, gpu=t.gpu, region=region, price_per_hour=price, gpu_count=t.gpu_count,
                     offer_id=t.name, available=None, interruptible=spot, details=details)

    def _offered(self, region: str, names: list[str]) -> set[str]:
        items = self.ec2.paginate(region, "describe_instance_type_offerings", "InstanceTypeOfferings", LocationType="region",
                                  Filters=[{"Name": "instance-type", "Values": names}])
        with _reading("describe_instance_type_offerings", region):
            return {o["InstanceType"] for o in items}

    def _spot_prices(self, region: str, names: list[str]) -> dict[str, float]:
        try:
            items = self.ec2.paginate(region, "describe_spot_price_history", "SpotPriceHistory", InstanceTypes=names,
                                      ProductDescriptions=["Linux/UNIX"], StartTime=datetime.now(timezone.utc))
        except AuthError as e:
            log.warning("no spot offers in %s: %s", region, e)
            return {}
        low: dict[str, float] = {}
        with _reading("describe_spot_price_history", region):
            for item in items:
                price = float(item["SpotPrice"])
                low[item["InstanceType"]] = min(price, low.get(item["InstanceType"], price))
        return low

    # -- create --------------------------------------------------------------------------

    def create(self, spec: InstanceSpec) -> Instance:
        # `deadline` (epoch seconds: created_at + max_lifetime) arms EC2's own backstop once the lifecycle passes it.
        return self._create(spec, deadline=spec.deadline)

    def _create(self, spec: InstanceSpec, deadline: float | None = None) -> Instance:
        offer = spec.offer
        region = offer.region
        itype = prices.TYPES.get(offer.offer_id)
        if itype is None:
            raise ConfigError(f"aws: offer {offer.offer_id!r} is not an instance type orch knows; `orch offers --provider aws`")
        self._warn_open_ssh()
        spot = offer.interruptible
        key_name = self._key_pair(region, spec.ssh_public_key)
        image = self._image(region, spec.image_id.partition("@")[0] if spec.image_id else None)  # orch's AMI ids: ami-...@region
        zones = self._subnets(region, itype.name)
        price = offer.price_per_hour if offer.price_per_hour is not None else prices.on_demand(region, itype.name)
        tags = {**spec.tags, "Name": f"orch-{spec.name}", PRICE_TAG: f"{price or 0.0:g}", CREATED_TAG: f"{time.time():.0f}"}
        tag_list = [{"Key": k, "Value": v} for k, v in tags.items()]
        kinds = ["instance", "volume", "network-interface"] + (["spot-instances-request"] if spot else [])
        params: dict[str, Any] = dict(
            ImageId=image["ImageId"], InstanceType=itype.name, MinCount=1, MaxCount=1, KeyName=key_name,
            UserData=boot.user_data(spec.startup_script, self.settings.ssh_user, deadline),
            InstanceInitiatedShutdownBehavior="terminate" if spot else "stop",
            BlockDeviceMappings=[{"DeviceName": image["RootDeviceName"],
                                  "Ebs": {"VolumeSize": max(spec.disk_gb, image["root_gb"]), "VolumeType": "gp3",
                                          "DeleteOnTermination": True}}],
            TagSpecifications=[{"ResourceType": kind, "Tags": tag_list} for kind in kinds],
            MetadataOptions={"HttpTokens": "required", "HttpEndpoint": "enabled"},
        )
        if spot:
            params["InstanceMarketOptions"] = {"MarketType": "spot", "SpotOptions": {
                "SpotInstanceType": "one-time", "InstanceInterruptionBehavior": "terminate"}}
        run = spec.tags.get(RUN_TAG) or hashlib.sha256(f"{spec.name}{time.time()}".encode()).hexdigest()[:16]
        refused: list[str] = []
        for zone, subnet, vpc in zones:
            group = self._security_group(region, vpc)
            interface = {"DeviceIndex": 0, "SubnetId": subnet, "Groups": [group], "AssociatePublicIpAddress": True,
                         "DeleteOnTermination": True}
            try:
                # The same ClientToken on a retried request: EC2 returns the first launch, never a second instance.
                answer = self.ec2.launch(region, "run_instances", **params, NetworkInterfaces=[interface],
                                         ClientToken=f"orch-{run}-{itype.name}-{zone}"[:64])
            except QuotaExceeded:
                raise
            except InsufficientCapacity as e:
                refused.append(f"{zone}: {e}")
                continue
            with _reading("run_instances", region):
                instance = self._instance(region, answer["Instances"][0])
            self._recent[instance.instance_id] = time.monotonic()
            return instance
        raise InsufficientCapacity(f"EC2 has no {itype.name} capacity in {region} right now (tried "
                                   f"{', '.join(z for z, _, _ in zones)}); last answer: {refused[-1]}")

    def _warn_open_ssh(self) -> None:
        if not self._warned and self.settings.ssh_cidr in ("0.0.0.0/0", "::/0"):
            self._warned = True
            log.warning("aws.ssh_cidr is %s: the instances' SSH port (22) is open to anyone (logins need orch's key); "
                        "set aws.ssh_cidr in orch.yaml to your address range, like 203.0.113.7/32", self.settings.ssh_cidr)

    def _key_pair(self, region: str, public_key: str) -> str:
        """orch's public key as an EC2 key pair (imported once per region), named by its fingerprint."""
        material = " ".join(public_key.split()[:2])
        name = "orch-" + hashlib.sha256(material.encode()).hexdigest()[:16]
        found = self.ec2.call(region, "describe_key_pairs", Filters=[{"Name": "key-name", "Values": [name]}])
        if found.get("KeyPairs"):
            return name
        try:
            self.ec2.call(region, "import_key_pair", KeyName=name, PublicKeyMaterial=material.encode(),
                          TagSpecifications=[{"ResourceType": "key-pair", "Tags": [{"Key": ORCH_TAG, "Value": "1"}]}])
        except ProviderError as e:
            if getattr(e, "aws_code", "") != "InvalidKeyPair.Duplicate":  # another orch imported it meanwhile
                raise
        return name

    def _image(self, region: str, image_id: str | None) -> dict[str, Any]:
        """The AMI: the spec's, else aws.ami, else the newest image of aws.ami_owner named like aws.ami_name."""
        wanted = image_id or self.settings.ami
        key = (region, wanted or "")
        if key in self._images:
            return self._images[key]
        if wanted:
            images = self.ec2.call(region, "describe_images", ImageIds=[wanted]).get("Images")
        else:
            images = self.ec2.call(region, "describe_images", Owners=[self.settings.ami_owner], Filters=[
                {"Name": "name", "Values": [self.settings.ami_name]}, {"Name": "architecture", "Values": ["x86_64"]},
                {"Name": "state", "Values": ["available"]}]).get("Images")
        if not isinstance(images, list):
            raise BadResponse(f"EC2 describe_images in {region} answered without an Images list")
        if not images:
            what = f"image {wanted}" if wanted else f"image named like {self.settings.ami_name!r} owned by {self.settings.ami_owner}"
            raise ConfigError(f"aws: no {what} in {region}; set aws.ami to an AMI id of that region, or aws.ami_name / aws.ami_owner")
        with _reading("describe_images", region):
            image = max(images, key=lambda i: i.get("CreationDate", ""))
            root = image.get("RootDeviceName") or "/dev/sda1"
            sizes = [m["Ebs"].get("VolumeSize", 0) for m in image.get("BlockDeviceMappings") or []
                     if m.get("DeviceName") == root and "Ebs" in m]
            found = {"ImageId": image["ImageId"], "RootDeviceName": root, "root_gb": int(max(sizes or [0])),
                     "Name": image.get("Name", "")}
        self._images[key] = found
        return found

    def _subnets(self, region: str, instance_type: str) -> list[tuple[str, str, str]]:
        """(zone, subnet, vpc) to try: aws.subnet_id, else the default subnet of each zone that has the type."""
        if self.settings.subnet_id:
            subnets = self.ec2.call(region, "describe_subnets", SubnetIds=[self.settings.subnet_id]).get("Subnets") or []
            with _reading("describe_subnets", region):
                return [(s["AvailabilityZone"], s["SubnetId"], s["VpcId"]) for s in subnets]
        offered = self.ec2.paginate(region, "describe_instance_type_offerings", "InstanceTypeOfferings",
                                    LocationType="availability-zone",
                                    Filters=[{"Name": "instance-type", "Values": [instance_type]}])
        subnets = self.ec2.paginate(region, "describe_subnets", "Subnets",
                                    Filters=[{"Name": "default-for-az", "Values": ["true"]}])
        with _reading("describe_subnets", region):
            zones = {o["Location"] for o in offered}
            found = sorted((s["AvailabilityZone"], s["SubnetId"], s["VpcId"]) for s in subnets)
        if not found:
            raise ConfigError(f"aws: region {region} has no default VPC; set aws.subnet_id to a subnet whose instances "
                              f"may have a public address")
        usable = [z for z in found if z[0] in zones]
        if not usable:
            raise InsufficientCapacity(f"no availability zone of {region} with a default subnet has {instance_type}")
        return usable

    def _security_group(self, region: str, vpc: str) -> str:
        """orch's group for aws.ssh_cidr in this VPC: inbound TCP 22 from that range, nothing else."""
        cidr = self.settings.ssh_cidr
        if (region, vpc) in self._groups:
            return self._groups[(region, vpc)]
        group_id, rules = self._group(region, vpc, f"orch-ssh-{cidr}", f"orch: SSH (22) from {cidr} only")
        ranges = "Ipv6Ranges" if ":" in cidr else "IpRanges"
        key = "CidrIpv6" if ":" in cidr else "CidrIp"

        def ssh(r: dict[str, Any]) -> bool:
            return (r.get("IpProtocol") == "tcp" and r.get("FromPort") == 22 and r.get("ToPort") == 22
                    and [x.get(key) for x in r.get(ranges) or []] == [cidr]
                    and not r.get("IpRanges" if ranges == "Ipv6Ranges" else "Ipv6Ranges")
                    and not r.get("UserIdGroupPairs") and not r.get("PrefixListIds"))

        self._only_rule(region, group_id, rules, ssh,
                        {"IpProtocol": "tcp", "FromPort": 22, "ToPort": 22, ranges: [{key: cidr, "Description": "orch: SSH"}]})
        self._groups[(region, vpc)] = group_id
        return group_id

    def _group(self, region: str, vpc: str, name: str, description: str) -> tuple[str, list[dict[str, Any]]]:
        """The security group `name` of this VPC (made with orch's tag if missing) and its inbound rules."""
        filters = [{"Name": "group-name", "Values": [name]}, {"Name": "vpc-id", "Values": [vpc]}]
        groups = self.ec2.call(region, "describe_security_groups", Filters=filters).get("SecurityGroups") or []
        with _reading("describe_security_groups", region):
            if groups:
                return groups[0]["GroupId"], groups[0].get("IpPermissions") or []
            try:
                return self.ec2.call(region, "create_security_group", GroupName=name, VpcId=vpc, Description=description,
                                     TagSpecifications=[{"ResourceType": "security-group",
                                                         "Tags": [{"Key": ORCH_TAG, "Value": "1"}]}])["GroupId"], []
            except ProviderError as e:
                if getattr(e, "aws_code", "") != "InvalidGroup.Duplicate":  # another orch made it meanwhile
                    raise
                found = self.ec2.call(region, "describe_security_groups", Filters=filters)["SecurityGroups"][0]
                return found["GroupId"], found.get("IpPermissions") or []

    def _only_rule(self, region: str, group_id: str, rules: list[dict[str, Any]], wanted: Callable[[dict[str, Any]], bool],
                   rule: dict[str, Any]) -> None:
        """Make `rule` the group's only inbound rule: anything else someone added is taken out."""
        extra = [r for r in rules if not wanted(r)]
        if extra:
            self.ec2.call(region, "revoke_security_group_ingress", GroupId=group_id, IpPermissions=extra)
        if len(extra) == len(rules):
            try:
                self.ec2.call(region, "authorize_security_group_ingress", GroupId=group_id, IpPermissions=[rule])
            except ProviderError as e:
                if getattr(e, "aws_code", "") != "InvalidPermission.Duplicate":
                    raise

    # -- one instance --------------------------------------------------------------------

    def _locate(self, instance_id: str) -> tuple[str, tuple[str, ...]]:
        m = ID_RE.fullmatch(instance_id or "")
        if not m:
            raise NotFound(f"{instance_id!r} is not an EC2 instance id (i-...@region)")
        return m.group(1), ((m.group(2),) if m.group(2) else self._list_regions())

    def _document(self, instance_id: str) -> tuple[str, str, dict[str, Any]]:
        """(region, EC2 id, EC2's description) of the instance; NotFound if no region has it."""
        iid, regions = self._locate(instance_id)
        created = self._recent.get(instance_id)
        deadline = time.monotonic() + 20 if created is not None and time.monotonic() - created < RECENT_S else 0
        while True:
            for region in regions:
                try:
                    answer = self.ec2.call(region, "describe_instances", InstanceIds=[iid])
                except NotFound:
                    continue
                with _reading("describe_instances", region):
                    found = [d for r in answer["Reservations"] for d in r["Instances"] if d["InstanceId"] == iid]
                if found:
                    return region, iid, found[0]
            if time.monotonic() >= deadline:
                raise NotFound(f"EC2 has no instance {iid} in {', '.join(regions)}")
            time.sleep(1.0)

    def _instance(self, region: str, d: dict[str, Any]) -> Instance:
        iid = d["InstanceId"]
        state = d["State"]["Name"]
        status = STATUS.get(state, InstanceStatus.UNKNOWN)
        tags = {t["Key"]: t["Value"] for t in d.get("Tags") or []}
        why = (d.get("StateReason") or {}).get("Message") or ""
        shown = why and status in (InstanceStatus.STOPPING, InstanceStatus.STOPPED, InstanceStatus.TERMINATING,
                                   InstanceStatus.TERMINATED)
        itype = prices.TYPES.get(d.get("InstanceType", ""))
        ip = d.get("PublicIpAddress")
        price = _number(tags.get(PRICE_TAG))
        if price is None:
            price = prices.on_demand(region, d.get("InstanceType", "")) or 0.0
        created = _number(tags.get(CREATED_TAG))
        if created is None and isinstance(d.get("LaunchTime"), datetime):
            created = d["LaunchTime"].timestamp()
        return Instance(
            provider=self.name,
            instance_id=f"{iid}@{region}",
            name=tags.get(NAME_TAG, iid),
            status=status,
            raw_status=f"{state} ({why})" if shown else state,
            ssh=SshEndpoint(host=ip, port=22, user=self.settings.ssh_user) if status == InstanceStatus.RUNNING and ip else None,
            price_per_hour=price,
            gpu=itype.gpu if itype else d.get("InstanceType", ""),
            region=region,
            created_at=created,
            tags=tags,
        )

    def get(self, instance_id: str) -> Instance:
        region, _, d = self._document(instance_id)
        with _reading("describe_instances", region):
            return self._instance(region, d)

    def start(self, instance_id: str) -> Instance:
        region, iid, d = self._document(instance_id)
        state = (d.get("State") or {}).get("Name")
        if state in ("shutting-down", "terminated"):
            raise NotFound(f"instance {iid} in {region} was terminated; `orch up` makes a new one")
        if state == "stopping":
            raise InvalidState(f"instance {iid} in {region} is still stopping; try again in a few seconds")
        if state == "stopped":
            try:
                self.ec2.launch(region, "start_instances", InstanceIds=[iid])
            except QuotaExceeded:
                raise
            except InsufficientCapacity as e:
                raise InsufficientCapacity(f"{e}; the instance and its disk are kept: try `orch up` again later, or "
                                           f"`orch down --terminate` and `orch up` on another offer") from None
        return self.get(f"{iid}@{region}")

    def stop(self, instance_id: str) -> Instance:
        region, iid, d = self._document(instance_id)
        if d.get("InstanceLifecycle") == "spot":
            # A one-time spot instance cannot be stopped; terminating it is what ends its billing.
            return self.terminate(f"{iid}@{region}")
        state = (d.get("State") or {}).get("Name")
        if state == "pending":  # EC2 stops only a running instance: wait for it (bounded), then stop it
            state = self._after_pending(region, iid)
        if state == "running":
            self.ec2.call(region, "stop_instances", InstanceIds=[iid])
        return self.get(f"{iid}@{region}")

    def _after_pending(self, region: str, iid: str, timeout: float = 300.0) -> str:
        deadline = time.monotonic() + timeout
        while True:
            _, _, d = self._document(f"{iid}@{region}")
            with _reading("describe_instances", region):
                state = d["State"]["Name"]
            if state != "pending":
                return state
            if time.monotonic() > deadline:
                raise InvalidState(f"instance {iid} in {region} is still pending after {timeout:.0f}s; EC2 stops it "
                                   f"only once it runs: `orch down` again in a minute")
            time.sleep(2.0)

    def terminate(self, instance_id: str) -> Instance:
        region, iid, _ = self._document(instance_id)
        self.ec2.call(region, "terminate_instances", InstanceIds=[iid])
        return self.get(f"{iid}@{region}")

    def list(self) -> list[Instance]:
        found: list[Instance] = []
        for region in self._list_regions():
            reservations = self.ec2.paginate(region, "describe_instances", "Reservations",
                                             Filters=[{"Name": f"tag:{ORCH_TAG}", "Values": ["1"]}])
            with _reading("describe_instances", region):
                found.extend(self._instance(region, d) for r in reservations for d in r["Instances"])
        return found

    # -- on the instance -----------------------------------------------------------------

    def runtime(self, name: str) -> RemoteRuntime:
        # cloud-init runs the boot recipe as root: it arms the agent as the login user and adds a systemd timer
        return RemoteRuntime(python=self.settings.python, code_on_path=False, home="~/.orch", run_as=self.settings.ssh_user,
                             rearm="systemd")

    def backstop_command(self, deadline: float) -> str:
        """BootBackstop: move EC2's own max_lifetime backstop (`orch extend --max-lifetime`)."""
        return boot.backstop_command(deadline)

    def self_stop_command(self, name: str) -> str:
        return boot.self_stop_command(self.runtime(name).home)

    # -- PrivateNetwork: one VPC ----------------------------------------------------------

    def private_address(self, instance_id: str) -> str:
        region, iid, d = self._document(instance_id)
        with _reading("describe_instances", region):
            state, address = d["State"]["Name"], d.get("PrivateIpAddress")
        if state != "running":
            raise InvalidState(f"aws: instance {iid}@{region} is {state}: its private address is used only while it runs")
        if not isinstance(address, str) or not address:
            raise InvalidState(f"aws: instance {iid}@{region} has no private address (EC2 gave it none)")
        return address

    def network_of(self, instance_id: str) -> str:
        region, iid, d = self._document(instance_id)
        return f"aws:{region}:{_vpc(region, iid, d)}"

    def open_private_network(self, instance_ids: list[str]) -> None:
        """Every TCP port between these instances over their private addresses, through orch's cluster group
        (a group rule matches only its members' private addresses); their SSH group stays as it is."""
        members = [self._document(i) for i in instance_ids]
        networks = {(region, _vpc(region, iid, d)) for region, iid, d in members}
        if len(networks) > 1:
            listed = ", ".join(f"{iid}@{region} ({d.get('VpcId')})" for region, iid, d in members)
            raise ProviderError(f"aws: a private network joins instances of one region and one VPC; these are in "
                                f"{len(networks)}: {listed}")
        for region, vpc in networks:
            group = self._cluster_group(region, vpc)
            for _, iid, d in members:
                groups = [g for g, _ in _primary_groups(region, d)]
                if not groups:  # replacing an unknown set of groups could take SSH away
                    raise BadResponse(f"EC2 describe_instances in {region} showed no security groups for {iid}")
                if group not in groups:
                    self.ec2.call(region, "modify_instance_attribute", InstanceId=iid, Groups=[*groups, group])

    def close_private_network(self, instance_ids: list[str]) -> None:
        """orch's cluster group off these instances; one terminated (or forgotten by EC2) is skipped."""
        for instance_id in instance_ids:
            try:
                region, iid, d = self._document(instance_id)
            except NotFound:
                continue
            groups = [] if _gone(d) else _primary_groups(region, d)
            kept = [g for g, name in groups if name != CLUSTER_GROUP]
            if len(kept) == len(groups):
                continue
            try:
                self.ec2.call(region, "modify_instance_attribute", InstanceId=iid, Groups=kept)
            except ProviderError:
                if not self._gone_now(f"{iid}@{region}"):  # terminated since it was read: nothing left to close
                    raise

    def _gone_now(self, instance_id: str) -> bool:
        try:
            return _gone(self._document(instance_id)[2])
        except NotFound:
            return True

    def _cluster_group(self, region: str, vpc: str) -> str:
        """orch's cluster group of this VPC: every TCP port from its own members, nothing else.

        Not orch's SSH group: that one takes out every rule but SSH, and admits a CIDR, not members."""
        group_id, rules = self._group(region, vpc, CLUSTER_GROUP, "orch: every TCP port between members of this group only")

        def members_only(r: dict[str, Any]) -> bool:
            return ((r.get("IpProtocol"), r.get("FromPort"), r.get("ToPort")) == ("tcp", 0, 65535)
                    and [p.get("GroupId") for p in r.get("UserIdGroupPairs") or []] == [group_id]
                    and not r.get("IpRanges") and not r.get("Ipv6Ranges") and not r.get("PrefixListIds"))

        self._only_rule(region, group_id, rules, members_only, {
            "IpProtocol": "tcp", "FromPort": 0, "ToPort": 65535,
            "UserIdGroupPairs": [{"GroupId": group_id, "Description": "orch: cluster members"}]})
        return group_id

    # -- NativeImages: AMIs ---------------------------------------------------------------

    def save_image(self, instance_id: str, name: str) -> Image:
        """An AMI of the instance's disks (without a reboot), once EC2 says it is available."""
        region, iid, _ = self._document(instance_id)
        answer = self.ec2.call(region, "create_image", InstanceId=iid, Name=f"orch-{name}-{int(time.time())}", NoReboot=True,
                               Description=f"orch image {name}",
                               TagSpecifications=[{"ResourceType": "image",
                                                   "Tags": [{"Key": ORCH_TAG, "Value": "1"}, {"Key": IMAGE_TAG, "Value": name}]}])
        ami = answer.get("ImageId")
        if not isinstance(ami, str):
            raise BadResponse(f"EC2 create_image in {region} answered without an ImageId")
        deadline = time.monotonic() + IMAGE_TIMEOUT_S
        while True:
            images = self.ec2.call(region, "describe_images", ImageIds=[ami]).get("Images") or []
            state = images[0].get("State") if images else None
            if state == "available":
                return Image(provider=self.name, image_id=f"{ami}@{region}", name=name, region=region, created_at=time.time())
            if state in ("failed", "invalid", "deregistered", "error"):
                raise ProviderError(f"aws: the AMI {ami} of {instance_id} ended {state}: {images[0].get('StateReason')}")
            if time.monotonic() > deadline:
                raise ProviderError(f"aws: the AMI {ami} of {instance_id} was not available after {IMAGE_TIMEOUT_S:.0f}s "
                                    f"(still {state}); it may still finish: `aws ec2 describe-images --image-ids {ami}`")
            time.sleep(5)

    def list_images(self) -> list[Image]:
        found = []
        for region in self.regions():
            images = self.ec2.call(region, "describe_images", Owners=["self"],
                                   Filters=[{"Name": f"tag:{ORCH_TAG}", "Values": ["1"]}]).get("Images")
            if not isinstance(images, list):
                raise BadResponse(f"EC2 describe_images in {region} answered without an Images list")
            for i in images:
                tags = {t["Key"]: t["Value"] for t in i.get("Tags") or []}
                found.append(Image(provider=self.name, image_id=f"{i['ImageId']}@{region}", name=tags.get(IMAGE_TAG, i.get("Name", "")),
                                   region=region))
        return found

    def delete_image(self, image_id: str) -> None:
        """Deregister the AMI and delete its snapshots (they bill on their own once the AMI is gone)."""
        ami, _, region = image_id.partition("@")
        if not region:
            raise NotFound(f"aws: {image_id!r} is not an orch image id (ami-...@region)")
        images = self.ec2.call(region, "describe_images", ImageIds=[ami]).get("Images") or []
        snapshots = [m["Ebs"]["SnapshotId"] for i in images for m in i.get("BlockDeviceMappings") or []
                     if m.get("Ebs", {}).get("SnapshotId")]
        self.ec2.call(region, "deregister_image", ImageId=ami)
        for snapshot in snapshots:
            self.ec2.call(region, "delete_snapshot", SnapshotId=snapshot)

    def stop_reason(self, instance_id: str) -> str | None:
        """Why EC2 stopped it: the agent's reason from the console, a spot interruption, or EC2's own words."""
        try:
            region, iid, d = self._document(instance_id)
        except NotFound:
            return None
        reason = d.get("StateReason") or {}
        code, message = reason.get("Code") or "", reason.get("Message") or ""
        if code in SPOT_REASONS:
            return f"spot interruption: EC2 took the capacity back ({code})"
        if code == "Client.InstanceInitiatedShutdown":
            return self._console_reason(region, iid) or (
                "the instance powered itself off (Client.InstanceInitiatedShutdown) without an agent's reason: "
                "orch's max_lifetime backstop, or a shutdown run on it")
        if code == "Client.UserInitiatedShutdown":
            return "stopped through the EC2 API or console, outside orch (Client.UserInitiatedShutdown)"
        return f"EC2: {message or code}" if code else None

    def _console_reason(self, region: str, iid: str) -> str | None:
        for params in ({"Latest": True}, {}):  # the latest output where the instance type supports it (Nitro)
            try:
                # botocore decodes EC2's base64 Output itself (its after-call handler for GetConsoleOutput).
                output = self.ec2.call(region, "get_console_output", InstanceId=iid, **params).get("Output") or ""
            except ProviderError:
                continue
            return boot.reason_from_console(output if isinstance(output, str) else "")
        return None


class _reading:
    """A context in which a missing or mistyped field of EC2's answer is a BadResponse, never 'nothing there'."""

    def __init__(self, operation: str, region: str):
        self.operation, self.region = operation, region

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type | None, error: BaseException | None, tb: object) -> bool:
        if kind is not None and issubclass(kind, (KeyError, TypeError, ValueError, AttributeError, IndexError)):
            raise BadResponse(f"EC2 {self.operation} in {self.region} answered something orch cannot read "
                              f"({kind.__name__}: {error})") from error
        return False


def _gone(d: dict[str, Any]) -> bool:
    return (d.get("State") or {}).get("Name") in ("shutting-down", "terminated")


def _vpc(region: str, iid: str, d: dict[str, Any]) -> str:
    """The instance's VPC; an instance on its way out has none that counts."""
    vpc = d.get("VpcId")
    if _gone(d) or not isinstance(vpc, str) or not vpc:
        state = (d.get("State") or {}).get("Name", "unknown")
        raise InvalidState(f"aws: instance {iid}@{region} is {state} and in no VPC: it cannot join a private network")
    return vpc


def _primary_groups(region: str, d: dict[str, Any]) -> list[tuple[str, str]]:
    """(id, name) of the groups on the primary network interface: the ones ModifyInstanceAttribute replaces."""
    with _reading("describe_instances", region):
        for nic in d.get("NetworkInterfaces") or []:
            if nic["Attachment"]["DeviceIndex"] == 0:
                return [(g["GroupId"], g.get("GroupName", "")) for g in nic.get("Groups") or []]
    return []


def _number(value: Any) -> float | None:
    try:
        return float(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


__all__ = ["AwsProvider"]
