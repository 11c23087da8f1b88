"""The audit kit's infrastructure: the Pulumi program and the things it is made of.

``__main__.py`` is the program (``Pulumi.yaml``: ``main: infra/``); it wires one
`pulumi.ComponentResource` per layer:

- ``settings``: typed per-environment settings (``environments/<name>.yaml``);
- ``tagging``: the ``environment`` tag on every AWS resource (the policy pack reads it);
- ``keys``: KMS keys per purpose; replicas of prod's keys in DR;
- ``network``: VPC, private subnets, AWS API endpoints, database and cache security groups;
- ``database``: RDS PostgreSQL (pgaudit, TLS only) or, in DR, prod's cross-region replica;
- ``cache``: ElastiCache Redis (TLS, AUTH token in Secrets Manager);
- ``archive``: S3 archive under Object Lock (COMPLIANCE), replicated to the DR region;
- ``cluster``: EKS (or an existing cluster), the ``audit`` namespace, the worker's IRSA role;
- ``chart_values``: the chart values per environment (pure; checked against the chart schema);
- ``workload``: the ``charts/audit-worker`` Helm release and its connections Secret;
- ``dr``: the prod stack reference and the Route 53 failover records (DR stack only);
- ``policy/``: the HIPAA policy pack (``pulumi preview --policy-pack infra/policy``).
"""
