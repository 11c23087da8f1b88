"""The HIPAA policy pack: policies in `infra.policy.hipaa`, the pack in ``__main__.py``."""
