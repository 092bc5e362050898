"""Runners execute a sweep's work items. `local` runs them in this process; `ray` (which
alone imports ray) fans them out. Both call the work functions of `probeserve.sweep`."""
