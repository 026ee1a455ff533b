"""eglib: backdoor features in the eigenspace, and the EigenGuard defence."""

__version__ = "0.1.0"
