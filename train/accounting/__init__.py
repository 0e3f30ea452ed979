"""GPU-hours, energy and CO2 accounting (issue 5).

``ledger.Ledger`` holds the figures; ``callback.CarbonLedger`` records them during a fit and keeps
them in the checkpoint; ``pipeline`` sums the stages into the paper's Table 2 shape; ``projection``
scales a measured run to the paper_v2 recipe; ``cli`` is ``wurst-carbon``. Kept import-light so the
CLI starts without Lightning: import the submodules directly.
"""
