"""Staged rollouts: a version goes to a group in waves and goes on only while the evidence
in the fleet database holds (see docs/fleet.md, "Rollouts")."""
