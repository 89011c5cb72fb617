"""Rollouts: the planner (waves, exclusions), the gate (budget, soak), the journal (write-ahead,
lock, abort), the engine (host steps, rollback, resume) and the world edges (inventory, facts, SSH).

planner, gate and the journal reader are pure; engine and world touch hosts through transports.
"""
