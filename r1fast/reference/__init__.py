"""Plain-torch oracles for every op: obvious code that may materialise everything and runs in float64."""
