"""Scheduler extender and request router: one aiohttp service, one JouleSched cost.

See :mod:`joulepool.extender.app` for the HTTP surface and
:mod:`joulepool.extender.settings` for flags, environment and config file.
"""
