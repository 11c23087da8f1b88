"""auditctl: blue-green promotion, rollback, DR failover drills and failback.

Where each concern lives:

* pure logic, unit-tested without servers: `auditctl.promotion` (the promotion state
  machine and what an abort leaves behind), `auditctl.gates` (thresholds, /metrics parsing,
  verdicts, the expand/contract migration plan), `auditctl.drill` (drill plan, timeline,
  RTO and RPO), `auditctl.report` (Markdown, JSON, HTML with an SVG timeline);
* the workflows, written once: `auditctl.release` (promote, rollback), `auditctl.failover`
  (drill, failback), `auditctl.observe` (status), with `auditctl.logcheck` for inclusion
  and consistency proofs and `auditctl.streams` for the Redis intake streams;
* the interface they use, `auditctl.platform`, and its two implementations in
  `auditctl.platforms` (``local`` and ``aws-kubernetes``);
* the command line: `auditctl.cli`.
"""
