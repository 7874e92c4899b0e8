"""The operator's operations, one layer for the admin API and couponctl alike.

``coupons`` creates, changes and inspects coupons in both stores; ``rebuild`` restores Redis
from MySQL; ``reconcile`` compares the two and repairs drift; ``dead_letters`` lists, replays
and releases dead-lettered requests; ``cli`` is couponctl, the command line over all of them.
"""
