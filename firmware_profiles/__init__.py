"""Shipped firmware profiles (one TOML file per device class); read with edgeml.profiles."""
