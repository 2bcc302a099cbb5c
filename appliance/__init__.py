"""On-premise visual inspection appliance that speaks PEKAT VISION's REST API."""

__version__ = "0.1.0"
