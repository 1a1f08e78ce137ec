"""The EAGLE-3 target appliance: a frozen causal LM served over the upstream remote-target protocol."""

__version__ = "0.1.0"
