"""The audit kit's HIPAA policy pack.

Run it with a preview or an update::

    pulumi preview --stack prod --policy-pack infra/policy

The policies themselves are in ``hipaa.py`` (importable without starting the policy server,
which building a `PolicyPack` does).
"""

from hipaa import POLICIES
from pulumi_policy import EnforcementLevel, PolicyPack

PolicyPack(
    name="audit-kit-hipaa",
    enforcement_level=EnforcementLevel.MANDATORY,
    policies=POLICIES,
)
