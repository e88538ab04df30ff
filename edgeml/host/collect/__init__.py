"""The upstream side: receive what devices sync, store it once, report across the fleet."""
