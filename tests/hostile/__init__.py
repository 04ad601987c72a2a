"""The hostile suite: black-box attacks over real HTTP against ``sts serve`` and ``sts dev`` (issue 11)."""
