"""Fault-injection helpers: dependencies a test can start, kill, freeze and restart."""
