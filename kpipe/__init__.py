"""kpipe: ship kernel live patches to Linux fleets without a reboot."""

__version__ = "0.1.0"
