"""reroute-export: export vision-language models with in-decoder Reroute token routing."""

__version__ = "0.1.0"
