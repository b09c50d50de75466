"""Admission policies in virtual time: the fair queue's order and the quota arithmetic.

Pure like the planner, routing and the autoscaler: no event loop, no clock, no I/O — ``now`` is
an argument. The gateway wraps each in a thin asyncio shell (``gateway.fairqueue``,
``gateway.quotas``) and the simulator calls them unchanged in virtual time. This package imports
nothing on purpose, so importing one policy does not load the others.
"""
