"""The fleet: inventory (hosts, groups, patterns), facts, and host livepatch operations."""
