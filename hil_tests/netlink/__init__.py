"""Emulated device links: an agent in its own network namespace behind a rate-limited veth pair.

The kernel here has `tbf`/`htb` but no `netem`, so the rate comes from `tbf` on both veth ends and
round-trip delay, jitter, stalls and cuts from a small asyncio delay-line relay of our own
(`relay.py`) whose listening socket lives in a namespace we create. `profiles.py` describes the
links (data only), `netns.py` builds and tears them down.
"""
