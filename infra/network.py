"""The network: a new VPC (awsx) or an existing one, and the data stores' security groups.

A new VPC has public and private subnets in each availability zone and NAT gateways per the
settings (one in dev, one per AZ in prod and DR). Interface endpoints for KMS, STS, Secrets
Manager and S3 keep the worker's AWS API traffic inside the VPC, which is why the worker's
NetworkPolicy can allow TCP 443 to the VPC CIDR only. An existing VPC is expected to have
those endpoints already (the shared platform's baseline).

The database and cache security groups admit 5432 and 6379 from the worker only, and
nothing else: no CIDR rules, no egress. With a new cluster that is the worker *pod* security
group (security groups for pods, https://docs.aws.amazon.com/eks/latest/userguide/
security-groups-for-pods.html): only the worker's pods carry it, not every pod on the nodes.
It admits the nodes (kubelet probes, Prometheus, producers) on the worker's ports, and lets
the pods reach the database, Redis, DNS on the nodes and HTTPS (the API endpoints) in the VPC.
With an existing cluster the stores admit its node security group, as before.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import pulumi
import pulumi_aws as aws
import pulumi_awsx as awsx

from infra.settings import NetworkSettings

__all__ = ["API_ENDPOINT_SERVICES", "WORKER_PORTS", "Network", "NetworkArgs"]

API_ENDPOINT_SERVICES: tuple[str, ...] = ("kms", "sts", "secretsmanager", "s3")
"""AWS APIs the worker calls, reached through interface endpoints in a new VPC."""

WORKER_PORTS: tuple[int, ...] = (8080, 8081)
"""The worker's ports (health and metrics, HTTP intake): the nodes' traffic admitted to the
pods. The chart's NetworkPolicy narrows who may use them."""


@dataclass(frozen=True, kw_only=True)
class NetworkArgs:
    environment: str
    region: str
    settings: NetworkSettings
    worker_security_group_id: pulumi.Input[str] | None = None
    """An existing cluster's node security group; when None the component creates one that
    the new cluster's nodes join."""
    pod_security_group: bool = False
    """Create the worker pod security group (a new cluster with security groups for pods)
    and make it the only source the database and cache admit."""


class Network(pulumi.ComponentResource):
    vpc_id: pulumi.Output[str]
    vpc_cidr: pulumi.Output[str]
    private_subnet_ids: pulumi.Output[Sequence[str]]
    worker_security_group_id: pulumi.Output[str]
    database_security_group_id: pulumi.Output[str]
    cache_security_group_id: pulumi.Output[str]
    worker_pod_security_group_id: pulumi.Output[str] | None

    def __init__(self, name: str, args: NetworkArgs,
                 opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("audit:infra:Network", name, None, opts)
        child = pulumi.ResourceOptions(parent=self)
        s = args.settings

        if s.vpc_cidr is not None:
            nat = (awsx.ec2.NatGatewayStrategy.SINGLE if s.nat_gateways == "single"
                   else awsx.ec2.NatGatewayStrategy.ONE_PER_AZ)
            vpc = awsx.ec2.Vpc(
                f"{name}-vpc",
                cidr_block=s.vpc_cidr,
                number_of_availability_zones=s.availability_zones,
                nat_gateways=awsx.ec2.NatGatewayConfigurationArgs(strategy=nat),
                subnet_strategy=awsx.ec2.SubnetAllocationStrategy.AUTO,
                subnet_specs=[
                    awsx.ec2.SubnetSpecArgs(type=awsx.ec2.SubnetType.PUBLIC, cidr_mask=24),
                    awsx.ec2.SubnetSpecArgs(type=awsx.ec2.SubnetType.PRIVATE, cidr_mask=20),
                ],
                enable_dns_hostnames=True,
                enable_dns_support=True,
                opts=child,
            )
            self.vpc_id = vpc.vpc_id
            self.vpc_cidr = pulumi.Output.from_input(s.vpc_cidr)
            self.private_subnet_ids = vpc.private_subnet_ids
        else:
            if s.existing_vpc_id is None:
                raise TypeError("Missing required property 'existing_vpc_id'")
            existing = aws.ec2.get_vpc_output(
                id=s.existing_vpc_id, opts=pulumi.InvokeOutputOptions(parent=self))
            self.vpc_id = pulumi.Output.from_input(s.existing_vpc_id)
            self.vpc_cidr = existing.cidr_block
            self.private_subnet_ids = pulumi.Output.from_input(
                list(s.existing_private_subnet_ids))

        if args.worker_security_group_id is None:
            worker = aws.ec2.SecurityGroup(
                f"{name}-worker-sg",
                description="Audit worker nodes: the only source the database and cache admit",
                vpc_id=self.vpc_id,
                opts=child,
            )
            self.worker_security_group_id = worker.id
        else:
            self.worker_security_group_id = pulumi.Output.from_input(
                args.worker_security_group_id)

        if args.pod_security_group and args.worker_security_group_id is not None:
            raise ValueError("pod_security_group needs the node security group created here")
        self.worker_pod_security_group_id = None
        source = self.worker_security_group_id
        if args.pod_security_group:
            pods = aws.ec2.SecurityGroup(
                f"{name}-worker-pod-sg",
                description="Audit worker pods (security groups for pods): the only source "
                            "the database and cache admit",
                vpc_id=self.vpc_id,
                opts=child,
            )
            self.worker_pod_security_group_id = source = pods.id

        self.database_security_group_id = self._store_group(
            name, "db", "PostgreSQL", 5432, source)
        self.cache_security_group_id = self._store_group(
            name, "cache", "Redis", 6379, source)
        if self.worker_pod_security_group_id is not None:
            self._pod_rules(name, self.worker_pod_security_group_id)

        if s.vpc_cidr is not None:
            self._api_endpoints(name, args.region)

        self.register_outputs({
            "vpcId": self.vpc_id,
            "vpcCidr": self.vpc_cidr,
            "privateSubnetIds": self.private_subnet_ids,
            "workerSecurityGroupId": self.worker_security_group_id,
            "databaseSecurityGroupId": self.database_security_group_id,
            "cacheSecurityGroupId": self.cache_security_group_id,
            "workerPodSecurityGroupId": self.worker_pod_security_group_id,
        })

    def _store_group(self, name: str, role: str, what: str, port: int,
                     source: pulumi.Input[str]) -> pulumi.Output[str]:
        group = aws.ec2.SecurityGroup(
            f"{name}-{role}-sg",
            description=f"{what}: {port} from the audit worker only; no egress",
            vpc_id=self.vpc_id,
            opts=pulumi.ResourceOptions(parent=self),
        )
        aws.vpc.SecurityGroupIngressRule(
            f"{name}-{role}-from-worker",
            security_group_id=group.id,
            referenced_security_group_id=source,
            ip_protocol="tcp",
            from_port=port,
            to_port=port,
            description=f"{what} from the audit worker",
            opts=pulumi.ResourceOptions(parent=self),
        )
        return group.id

    def _pod_rules(self, name: str, pods: pulumi.Output[str]) -> None:
        """What the worker's pods need once their own group replaces the nodes' groups.

        In the VPC CNI's default ``strict`` mode a pod with a branch interface has only its
        own security group, also towards pods on its node.
        """
        opts = pulumi.ResourceOptions(parent=self)
        nodes = self.worker_security_group_id
        for port in WORKER_PORTS:
            # Kubelet probes come from the node's primary interface (node security group);
            # Prometheus and producers run in pods that use the nodes' groups.
            aws.vpc.SecurityGroupIngressRule(
                f"{name}-worker-pod-from-nodes-{port}", security_group_id=pods,
                referenced_security_group_id=nodes, ip_protocol="tcp", from_port=port,
                to_port=port, description=f"TCP {port} from the nodes", opts=opts)
        targets: list[tuple[str, str, int, pulumi.Input[str] | None, pulumi.Input[str] | None]] = [
            ("db", "tcp", 5432, self.database_security_group_id, None),
            ("cache", "tcp", 6379, self.cache_security_group_id, None),
            ("https", "tcp", 443, None, self.vpc_cidr),
            ("dns-udp", "udp", 53, None, self.vpc_cidr),
            ("dns-tcp", "tcp", 53, None, self.vpc_cidr),
        ]
        for role, protocol, port, group, cidr in targets:
            aws.vpc.SecurityGroupEgressRule(
                f"{name}-worker-pod-to-{role}", security_group_id=pods,
                referenced_security_group_id=group, cidr_ipv4=cidr, ip_protocol=protocol,
                from_port=port, to_port=port,
                description=f"{protocol.upper()} {port} to {role} in the VPC", opts=opts)
        for protocol in ("udp", "tcp"):
            # CoreDNS runs on the nodes, behind the node security group.
            aws.vpc.SecurityGroupIngressRule(
                f"{name}-nodes-dns-{protocol}-from-worker-pods", security_group_id=nodes,
                referenced_security_group_id=pods, ip_protocol=protocol, from_port=53,
                to_port=53, description=f"DNS ({protocol.upper()}) from the worker pods",
                opts=opts)

    def _api_endpoints(self, name: str, region: str) -> None:
        group = aws.ec2.SecurityGroup(
            f"{name}-endpoints-sg",
            description="AWS API interface endpoints: HTTPS from inside the VPC",
            vpc_id=self.vpc_id,
            opts=pulumi.ResourceOptions(parent=self),
        )
        aws.vpc.SecurityGroupIngressRule(
            f"{name}-endpoints-https",
            security_group_id=group.id,
            cidr_ipv4=self.vpc_cidr,
            ip_protocol="tcp",
            from_port=443,
            to_port=443,
            description="HTTPS from the VPC",
            opts=pulumi.ResourceOptions(parent=self),
        )
        for service in API_ENDPOINT_SERVICES:
            aws.ec2.VpcEndpoint(
                f"{name}-{service}-endpoint",
                vpc_id=self.vpc_id,
                service_name=f"com.amazonaws.{region}.{service}",
                vpc_endpoint_type="Interface",
                subnet_ids=self.private_subnet_ids,
                security_group_ids=[group.id],
                private_dns_enabled=True,
                # S3 has no gateway endpoint here, so its private DNS answers inside the VPC too.
                dns_options=aws.ec2.VpcEndpointDnsOptionsArgs(
                    private_dns_only_for_inbound_resolver_endpoint=False,
                ) if service == "s3" else None,
                opts=pulumi.ResourceOptions(parent=self),
            )
