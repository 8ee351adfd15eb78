"""Simulated devices speaking the public MQTT contract (see `firmware-sim --help`)."""

from .devices import SimConfig, Simulation, simulate
from .model import correlations

__all__ = ["SimConfig", "Simulation", "correlations", "simulate"]
