"""The data layer: the privacy-safe feature schema, the error tree and the stores."""
